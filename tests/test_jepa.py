"""JEPA4Rec and RecFormer objectives against losses computed by hand from the same encoder outputs."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jepa4rec_dist.config import load_config
from jepa4rec_dist.model.encoder import cls, mlm_loss
from jepa4rec_dist.model.jepa import LocalOps, ema_momentum, ema_update, make_target_encoder
from jepa4rec_dist.train.pretrain import build_pretrain_model, data_for


@pytest.fixture(scope="module")
def setup(uneven_dataset):
    root, _ = uneven_dataset

    def make(objective="jepa", *extra):
        # CLS pooling: the hand computations below take the CLS state (`cls`) as the representation
        cfg = load_config([Path("configs/model/tiny.yaml")], [f"--data.out_dir={root}", f"--pretrain.objective={objective}",
                                                             "--loader.batch_size=4", "--loader.num_workers=0",
                                                             "--model.pooling=cls", *extra])
        torch.manual_seed(0)
        tok, loader = data_for(cfg)
        model = build_pretrain_model(cfg, tok)
        # kept beside the model, not registered in it (as the training loop does)
        object.__setattr__(model, "target", make_target_encoder(model.encoder) if model.jepa else None)
        return cfg, model, next(iter(loader))

    return make


def test_ema_momentum_is_a_cosine_ramp_of_the_step():
    assert ema_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert ema_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert ema_momentum(250, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert ema_momentum(25, 100, 0.9, 1.0) == pytest.approx(1.0 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_ema_update(setup):
    _, model, _ = setup()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target.parameters()]
    ema_update(model.target, model.encoder.parameters(), 0.9)
    for t0, t1, c in zip(before, model.target.parameters(), model.encoder.parameters(), strict=True):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * c)
    with pytest.raises(RuntimeError, match="gather partitions first"):
        ema_update(model.target, [torch.zeros(3)] * len(before), 0.9)


def infonce(q, k, tau=0.05, ids=None):
    """In-batch InfoNCE by hand; with ids, the other copies of a row's own next item are not its negatives."""
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).t() / tau
    if ids is not None:
        same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(ids), dtype=torch.bool)
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(q)))


def test_jepa_losses_match_hand_computation(setup):
    cfg, model, batch = setup("jepa")
    model.eval()  # no dropout: the hand computation sees the same activations
    out = model(batch, model.target)
    with torch.no_grad():
        t_hist, t_item = cls(model.target.encode(batch, "history_")), cls(model.target.encode(batch, "next_"))
        h_hist = model.encoder.encode(batch, "history_", "masked_input_ids")
        h_item = model.encoder.encode(batch, "next_", "masked_input_ids")
        p = lambda h: F.normalize(model.predictor(cls(h)), dim=-1)  # noqa: E731
        l_map = ((p(h_hist) - F.normalize(t_hist, dim=-1)).pow(2).sum(-1).mean()
                 + (p(h_item) - F.normalize(t_item, dim=-1)).pow(2).sum(-1).mean()) / 2
        labels = torch.cat([batch["history_mlm_labels"].flatten(), batch["next_mlm_labels"].flatten()])
        logits = torch.cat([model.mlm_head(h_hist).flatten(0, 1), model.mlm_head(h_item).flatten(0, 1)])
        l_mlm = F.cross_entropy(logits, labels, ignore_index=-100)
        l_cl = infonce(cls(h_hist), cls(h_item), ids=batch["next_item_index"])
    assert out["loss_map"].item() == pytest.approx(l_map.item(), rel=1e-4)
    assert out["loss_mlm"].item() == pytest.approx(l_mlm.item(), rel=1e-4)
    assert out["loss_cl"].item() == pytest.approx(l_cl.item(), rel=1e-4)
    expected = 1.0 * l_cl + 0.1 * l_mlm + 1.0 * l_map
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_gradients_reach_context_and_predictor_not_target(setup):
    _, model, batch = setup("jepa")
    model(batch, model.target)["loss"].backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert not any(n.startswith("target") for n, _ in model.named_parameters())  # outside the optimizer
    assert model.predictor.net[0].weight.grad.abs().sum() > 0
    assert model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.encoder.embeddings.word_embeddings.weight.grad is None  # frozen (RecFormer's choice)


def test_recformer_objective(setup):
    for views in ("unmasked", "masked"):
        cfg, model, batch = setup("recformer", f"--pretrain.recformer_cl_views={views}")
        assert cfg.pretrain.masking.ratio == 0.15 and model.target is None
        model.eval()
        out = model(batch)
        with torch.no_grad():
            m_hist = model.encoder.encode(batch, "history_", "masked_input_ids")
            m_item = model.encoder.encode(batch, "next_", "masked_input_ids")
            s_h, n_h = mlm_loss(model.mlm_head, m_hist, batch["history_mlm_labels"])
            s_i, n_i = mlm_loss(model.mlm_head, m_item, batch["next_mlm_labels"])
            if views == "masked":
                q, k = cls(m_hist), cls(m_item)
            else:
                q, k = cls(model.encoder.encode(batch, "history_")), cls(model.encoder.encode(batch, "next_"))
            l_cl = infonce(q, k, ids=batch["next_item_index"])
        assert out["loss_mlm"].item() == pytest.approx((s_h / n_h + s_i / n_i).item(), rel=1e-4)
        assert out["loss"].item() == pytest.approx((l_cl + 0.1 * (s_h / n_h + s_i / n_i)).item(), rel=1e-4)


@pytest.mark.parametrize("objective", ["jepa", "recformer"])
def test_duplicate_next_items_are_not_negatives(setup, objective):
    """Rows 0, 1 and 3 share a next item: with `duplicate_positives: mask` (the default) each drops the other
    two from its softmax, row 2 keeps every key; `keep` is the plain in-batch loss. Both against hand values."""
    _, model, batch = setup(objective)
    model.eval()
    batch = dict(batch, next_item_index=torch.tensor([5, 5, 9, 5]))
    with torch.no_grad():
        view = "masked_input_ids" if objective == "jepa" else "input_ids"
        q = cls(model.encoder.encode(batch, "history_", view))
        k = cls(model.encoder.encode(batch, "next_", view))
        masked = model(batch, model.target)["loss_cl"]
        expected = infonce(q, k, ids=batch["next_item_index"])
        assert masked.item() == pytest.approx(expected.item(), rel=1e-5)
        model.cfg.duplicate_positives = "keep"
        try:
            kept = model(batch, model.target)["loss_cl"]
        finally:
            model.cfg.duplicate_positives = "mask"
        assert kept.item() == pytest.approx(infonce(q, k).item(), rel=1e-5)
    assert masked.item() < kept.item() - 1e-4  # fewer negatives: the masked loss is strictly smaller


def test_gathered_keys_give_the_global_batch_loss(setup):
    """Two "ranks" with each other's next items gathered in and the MLM token count summed: the mean of their
    losses is the full batch's loss, term by term."""
    _, model, batch = setup("jepa")
    model.eval()
    half = lambda b, s: {k: (v[s] if isinstance(v, torch.Tensor | list) else v) for k, v in b.items()}  # noqa: E731
    a, b = half(batch, slice(0, 2)), half(batch, slice(2, 4))
    with torch.no_grad():
        item_cls = {n: cls(model.encoder.encode(x, "next_", "masked_input_ids")) for n, x in (("a", a), ("b", b))}
        n_mlm = {n: int((x["history_mlm_labels"] != -100).sum() + (x["next_mlm_labels"] != -100).sum()) for n, x in (("a", a), ("b", b))}
        full = model(batch, model.target)

        class Half(LocalOps):
            world = 2

            def __init__(self, keys, offset):
                self.keys, self.offset = keys, offset

            def gather_with_grad(self, x):
                return self.keys(x), self.offset

            def all_gather(self, x):
                return batch["next_item_index"]

            def all_reduce_sum(self, x):
                return x.new_tensor(float(n_mlm["a"] + n_mlm["b"]))

        la = model(a, model.target, Half(lambda x: torch.cat([x, item_cls["b"]]), 0))
        lb = model(b, model.target, Half(lambda x: torch.cat([item_cls["a"], x]), 2))
    for key in ("loss_cl", "loss_mlm", "loss_map", "loss"):  # what data-parallel averaging computes
        assert ((la[key] + lb[key]) / 2).item() == pytest.approx(full[key].item(), rel=1e-5), key
