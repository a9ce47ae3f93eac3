"""The item-vector model family: vector cache identity, causality, MK-MMD by hand, frequency gating,
new items after training, resumable training, and the CLI/evaluate path."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jepa4rec_dist.cli import main
from jepa4rec_dist.config import load_config
from jepa4rec_dist.eval.harness import top_k
from jepa4rec_dist.hybrid.model import HybridConfig, HybridSeqRec, mk_mmd, whitening
from jepa4rec_dist.hybrid.scorer import hybrid_scorer
from jepa4rec_dist.hybrid.vectors import cache_paths, item_vectors
from jepa4rec_dist.train.finetune import finetune
from jepa4rec_dist.train.pretrain import pretrain
from tests.test_baselines import write_successor_dataset

REPO = Path(__file__).resolve().parent.parent
TINY = [REPO / "configs/model/tiny.yaml"]


@pytest.fixture(scope="module")
def successor(tmp_path_factory):
    return write_successor_dataset(tmp_path_factory.mktemp("succ"))


def hybrid_cfg(root, out, *extra):
    return load_config(overrides=[f"--data.out_dir={root}", "--finetune.model=hybrid", "--hybrid.text_from=minilm",
                                  f"--hybrid.output_dir={out}", "--hybrid.epochs=12", "--hybrid.max_len=8",
                                  "--hybrid.hidden=32", "--hybrid.lr=1e-2", "--hybrid.patience=3",
                                  "--model.pooling=mean", *extra])


def test_vector_cache_is_reused_and_a_changed_export_is_an_error(uneven_dataset, tmp_path):
    root, _ = uneven_dataset
    cfg = load_config(TINY, [f"--data.out_dir={root}", f"--train.output_dir={tmp_path / 'pre'}", "--train.max_steps=1",
                             "--loader.num_workers=0"])
    export = pretrain(cfg, progress=False)["export"]
    first, ident = item_vectors(cfg, root, export, progress=False)
    assert first.shape == (40, 32) and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    npy, meta = cache_paths(root, export)
    assert npy.is_file() and json.loads(meta.read_text())["weights_sha256"] == ident["weights_sha256"]
    again, _ = item_vectors(cfg, root, export, progress=False)
    assert np.array_equal(first, again)  # read back, not re-encoded
    link = tmp_path / "same-export"  # the same export under another name (a link, a relative path): reused
    link.symlink_to(Path(export).resolve())
    np.save(npy, first + 1.0)  # a marker: a re-encode would overwrite it
    assert np.array_equal(item_vectors(cfg, root, str(link), progress=False)[0], first + 1.0)
    np.save(npy, first)
    weights = load_file(str(Path(export) / "model.safetensors"))  # the export changes in place (a re-run)
    weights["encoder.embeddings.word_embeddings.weight"] += 0.01
    save_file(weights, str(Path(export) / "model.safetensors"))
    with pytest.raises(ValueError, match="stale item-vector cache: weights_sha256"):
        item_vectors(cfg, root, export, progress=False)
    fresh, ident2 = item_vectors(cfg, root, export, progress=False, refresh=True)
    assert ident2["weights_sha256"] != ident["weights_sha256"] and not np.array_equal(fresh, first)
    assert item_vectors(cfg, root, export, progress=False)[1]["weights_sha256"] == ident2["weights_sha256"]
    # evaluation (a zero-shot export as a scorer) reads the same cache, and re-encodes a stale one: it trains nothing
    from jepa4rec_dist.data.items import ItemTable
    from jepa4rec_dist.data.shards import load_manifest
    from jepa4rec_dist.data.tokenization import TokenizerInfo
    from jepa4rec_dist.eval.model_scorer import encode_items
    from jepa4rec_dist.eval.run import model_scorer
    from jepa4rec_dist.model import build_encoder

    tok, table = TokenizerInfo.from_dict(load_manifest(root)["tokenizer"]), ItemTable.load(root)
    assert np.array_equal(model_scorer(cfg, export, tok, table, progress=False).table.numpy(), fresh)
    emb = weights["encoder.embeddings.word_embeddings.weight"]  # not a constant shift: LayerNorm removes those
    emb += 0.1 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(Path(export) / "model.safetensors"))
    scorer = model_scorer(cfg, export, tok, table, progress=False)
    encoder = build_encoder(replace(cfg.model, init_from=export), tok, with_head=False)[0].eval()
    with torch.no_grad():
        direct = encode_items(encoder, table, tok, cfg.sequence, 16, "cpu", False)
    assert torch.allclose(scorer.table, direct, atol=1e-6) and not np.allclose(scorer.table.numpy(), fresh)
    assert json.loads(meta.read_text())["weights_sha256"] != ident2["weights_sha256"]  # the cache was rewritten
    # a dataset folder where the cache cannot be written: the vectors are still returned (and said so)
    import shutil

    blocked = tmp_path / "blocked"
    shutil.copytree(root, blocked, ignore=shutil.ignore_patterns("item_vectors"))
    (blocked / "item_vectors").write_text("a file where the cache folder would go")
    cfg_b = load_config(TINY, [f"--data.out_dir={blocked}", "--loader.num_workers=0"])
    vec_b, _ = item_vectors(cfg_b, blocked, export, progress=False)
    assert np.allclose(vec_b, scorer.table.numpy(), atol=1e-6)


@pytest.mark.parametrize("mode", ["hybrid", "text", "id"])
def test_a_position_never_sees_its_own_target(mode):
    torch.manual_seed(0)
    cfg = HybridConfig(mode=mode, hidden=16, layers=2, heads=2, max_len=6, dropout=0.0, id_init="normal")
    model = HybridSeqRec(9, cfg, torch.randn(9, 12), torch.arange(9.0)).eval()
    ids = torch.tensor([[0, 3, 5, 2, 7, 1], [4, 4, 9, 8, 6, 2]])
    with torch.no_grad():
        base = model(ids)
        for t in range(5):  # change everything after position t: outputs up to t must not move
            changed = ids.clone()
            changed[:, t + 1:] = torch.tensor([9, 8, 7, 6, 5, 4])[: 5 - t]
            out = model(changed)
            assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6), t
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])
    assert (base[0, 0] == 0).all()  # a pad position gives a zero query


def test_mk_mmd_by_hand():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert mk_mmd(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    y = x + torch.tensor([0.0, 2.0])
    # squared distances in z = [x; y]: within x and within y 1, across 4 (same column) and 5 (diagonal)
    # median over the positive entries {1, 1, 4, 4, 5, 5} x2 = 4
    def k(d2):
        return sum(math.exp(-d2 / (s * 4.0)) for s in (0.25, 0.5, 1.0, 2.0, 4.0))
    within = (2 * k(0) + 2 * k(1)) / 4
    across = (2 * k(4) + 2 * k(5)) / 4
    assert mk_mmd(x, y).item() == pytest.approx(2 * within - 2 * across, rel=1e-5)
    assert mk_mmd(x, y).item() > mk_mmd(x, x + 0.1).item() > 0


def test_alignment_sample_is_seeded_and_bounded():
    """`hybrid.align_max_items`: a seeded sample of the batch's distinct targets, the same for the same
    (seed, epoch, step) on every rank, another for another step; all of them when there are few enough."""
    from jepa4rec_dist.hybrid.train import align_sample

    items = torch.arange(0, 300, 3)
    a, b = align_sample(items, 16, 0, 1, 5), align_sample(items, 16, 0, 1, 5)
    assert len(a) == 16 and torch.equal(a, b) and set(a.tolist()) <= set(items.tolist())
    assert len(set(a.tolist())) == 16 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, align_sample(items, 16, 0, 1, 6))
    assert align_sample(items, 0, 0, 1, 5) is items and align_sample(items, 100, 0, 1, 5) is items
    with pytest.raises(ValueError, match="align_max_items: 0 \\(all\\) or >= 2"):
        HybridConfig(align_max_items=1).validate("hybrid")


def test_frequency_gate_follows_item_frequency():
    """Two experts over 40 items: the first scores the target of a frequent item (count 100) well and
    is noise elsewhere, the second does the same for rare items (count 2). Trained on the softmax of the
    gated scores, the gate must hand the first expert the frequent items and the second the rare ones:
    the weight of the first rises with frequency."""
    from jepa4rec_dist.hybrid.model import FrequencyGate

    torch.manual_seed(0)
    n, users = 40, 400
    counts = torch.cat([torch.full((8,), 100.0), torch.full((32,), 2.0)])
    freq = torch.log1p(counts) / math.log1p(counts.max())
    targets = torch.cat([torch.randint(0, 8, (200,)), torch.randint(8, 40, (200,))])

    def expert(informative):
        s = torch.randn(users, n)
        s[torch.arange(users)[informative], targets[informative]] += 4.0
        return s

    scores = torch.stack([expert(targets < 8), expert(targets >= 8)], -1)  # (users, items, experts)
    gate = FrequencyGate(2)
    assert torch.allclose(gate(freq), torch.full((n, 2), 0.5))  # starts uniform
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy((scores * gate(freq)).sum(-1), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = gate(freq).detach()
    assert g[:8, 0].min() > 0.9 and g[8:, 1].min() > 0.9
    # monotone in frequency: every item of the frequent group above every item of the rare one; inside a group
    # (equal counts) the gates are equal up to the last bits, so no order is asked of them
    assert g[:8, 0].min() > g[8:, 0].max()
    assert torch.allclose(g[:8, 0], g[0, 0], atol=1e-6) and torch.allclose(g[8:, 0], g[8, 0], atol=1e-6)


def test_id_dropout_zeroes_the_dropped_items_ids_in_inputs_and_keys():
    """With a mask, a dropped item's input vector and every expert key are the text-only ones (e_i = 0), a
    kept item's are unchanged, and the training objective leaves no mask behind."""
    torch.manual_seed(0)
    n = 6
    text = torch.nn.functional.normalize(torch.randn(n, 12), dim=-1)
    cfg = HybridConfig(mode="hybrid", gating="frequency", hidden=8, id_init="normal", id_dropout=0.5)
    model = HybridSeqRec(n, cfg, text, torch.arange(n) * 3)
    # normal init, but item 0 has no training interaction: its ID memory starts (and stays) empty
    assert torch.equal(model.id_emb[0].detach(), torch.zeros(8)) and (model.id_emb[1:].detach() != 0).all()
    full_in, full_keys = model.item_inputs().detach(), model.item_table().detach()
    keep = torch.tensor([True, False, True, False, True, True])
    model.set_id_mask(keep)
    masked_in, masked_keys = model.item_inputs().detach(), model.item_table().detach()
    text_in = model.text_keys().detach()
    assert torch.equal(masked_in[keep], full_in[keep]) and torch.allclose(masked_in[~keep], text_in[~keep])
    assert torch.equal(masked_keys[keep], full_keys[keep])
    g = model.gates().detach()
    h = cfg.hidden  # experts side by side: fused (= text), id (= 0), text
    assert torch.allclose(masked_keys[~keep, :h], g[~keep, :1] * text_in[~keep])
    assert torch.equal(masked_keys[~keep, h:2 * h], torch.zeros(2, h))
    from jepa4rec_dist.hybrid.train import HybridObjective

    objective = HybridObjective(model, "reference", None, None)
    ids = torch.tensor([[0, 1, 2, 3]])
    objective(ids, torch.tensor([[1, 2, 3, 4]]) - 1, torch.tensor([0, 1]), 1.0, keep)
    assert getattr(model, "_id_keep", None) is None  # cleared after the step
    with pytest.raises(ValueError, match="id_dropout needs hybrid.mode=hybrid"):
        HybridConfig(mode="text", id_dropout=0.1).validate("hybrid")


def test_whitening_by_hand():
    # two directions with variances 4 and 1 (mean eigenvalue 2.5): shrink a maps s -> s * 2.5 / (s + 2.5 a)
    x = torch.tensor([[2.0, 1.0], [-2.0, 1.0], [2.0, -1.0], [-2.0, -1.0]]) * math.sqrt(3 / 4) + torch.tensor([5.0, -1.0])
    mean, white = whitening(x, 0.0)
    assert torch.allclose(mean, torch.tensor([5.0, -1.0]))
    assert torch.allclose(white, torch.diag(torch.tensor([math.sqrt(2.5 / 4), math.sqrt(2.5 / 1)])), atol=1e-6)
    y = (x - mean) @ white
    assert torch.allclose(torch.cov(y.T), 2.5 * torch.eye(2), atol=1e-5)  # white, total variance kept (5)
    _, shrunk = whitening(x, 0.4)  # s + a mean = 4 + 1, 1 + 1
    assert torch.allclose(shrunk, torch.diag(torch.tensor([math.sqrt(2.5 / 5), math.sqrt(2.5 / 2)])), atol=1e-6)
    # a rotated cloud: the map is symmetric (ZCA) and whitens it too
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    _, w = whitening(x @ rot.T, 0.0)
    assert torch.allclose(w, w.T, atol=1e-6) and torch.allclose(torch.cov((x @ rot.T @ w).T), 2.5 * torch.eye(2), atol=1e-5)
    with pytest.raises(ValueError, match="no variance"):
        whitening(torch.ones(3, 2), 0.1)
    with pytest.raises(ValueError, match="text_whiten needs text"):
        HybridConfig(mode="id", text_whiten=0.1).validate("hybrid")


@pytest.mark.parametrize("whiten", [0.0, 0.1])
def test_text_model_scores_an_item_added_after_training(successor, tmp_path, capsys, whiten):
    result = finetune(hybrid_cfg(successor, tmp_path / "text", "--hybrid.mode=text", f"--hybrid.text_whiten={whiten}"),
                      progress=False)
    assert result["test"]["recall@10"] == 1.0
    # `jepa4rec recommend` from the export: after i3, i4 the successor i5 ranks first, the history never
    capsys.readouterr()
    assert main(["recommend", "--data", str(successor), "--model", str(tmp_path / "text" / "best"),
                 "--history", "i3", "i4", "-k", "3", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert recs[0]["item_id"] == "i5" and not {"i3", "i4"} & {r["item_id"] for r in recs}
    scorer = hybrid_scorer(tmp_path / "text" / "best", 20)
    vectors, _ = item_vectors(hybrid_cfg(successor, tmp_path), successor, "minilm", progress=False)
    # a new listing with item 5's text: after item 4 it must come first or second (tied with item 5)
    new = scorer.add_items(vectors[[5]])
    assert new == [20] and scorer.num_items == 21
    batch = {"history_items": [[2, 3, 4]], "next_item_index": torch.tensor([5]), "keys": ["u"]}
    _, best = top_k(scorer, batch, 2, exclude_history=True)
    assert set(best[0].tolist()) == {5, 20}
    # the new item went through the export's own whitening (stored with it): the same vector as item 5's
    assert torch.allclose(scorer.model.text[20], scorer.model.text[5], atol=1e-6)
    if whiten:
        raw = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
        assert not torch.allclose(scorer.model.text[5], raw[5], atol=1e-3)  # it is whitened, not the raw vector
        assert torch.allclose(scorer.model.text[5], (raw[5] - scorer.model.text_mean) @ scorer.model.text_map, atol=1e-5)
    with pytest.raises(ValueError, match="cannot score items it has never seen"):
        finetune(hybrid_cfg(successor, tmp_path / "id", "--hybrid.mode=id", "--hybrid.epochs=1"), progress=False)
        hybrid_scorer(tmp_path / "id" / "best", 20).add_items(vectors[[5]])


def test_hybrid_cli_resumes_and_evaluates(successor, tmp_path, capsys):
    out = tmp_path / "h"
    common = ["--data", str(successor), "--finetune.model=hybrid", "--hybrid.text_from=minilm",
              f"--hybrid.output_dir={out}", "--hybrid.max_len=8", "--hybrid.hidden=32", "--hybrid.lr=1e-2",
              "--hybrid.patience=0", "--model.pooling=mean", "--hybrid.align=[mmd, contrastive]",
              "--hybrid.align_max_items=8"]
    assert main(["finetune", *common, "--hybrid.epochs=2"]) == 0
    first = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in first] == [1, 2] and "align_mmd" in first[0] and "align_contrastive" in first[0]
    assert main(["finetune", *common, "--hybrid.epochs=4"]) == 0  # the same command, more epochs: resumes
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[:2] == first
    straight = tmp_path / "s"
    assert main(["finetune", *[c.replace(str(out), str(straight)) for c in common], "--hybrid.epochs=4"]) == 0
    other = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, other, strict=True):  # resumed = uninterrupted, epoch for epoch
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["valid_ndcg@10"] == pytest.approx(b["valid_ndcg@10"], abs=1e-9)
    capsys.readouterr()
    js = tmp_path / "e.json"
    assert main(["evaluate", "--data", str(successor), "--model", str(out / "best"), "--out", str(js)]) == 0
    doc = json.loads(js.read_text())
    test = json.loads((out / "result.json").read_text())["test"]
    row = next(r for r in doc["rows"] if r["setting"] == "all" and r["protocol"] == doc["primary_protocol"])
    assert row["ndcg@10"] == pytest.approx(test["ndcg@10"], abs=1e-9)


def test_step_budget_stops_mid_epoch_and_resumes_to_the_same_run(successor, tmp_path):
    """`hybrid.max_steps` ends training after that many optimizer steps (mid-epoch: the partial epoch is
    validated and is the last), also across a resume; without a budget an epoch has more steps."""
    full = finetune(hybrid_cfg(successor, tmp_path / "f", "--hybrid.epochs=1", "--hybrid.batch_size=2",
                               "--hybrid.test_at_end=false"), progress=False)
    per_epoch = full["history"][0]["steps"]
    assert per_epoch >= 4 and full["fit"]["stopped"] == "epoch cap" and full["fit"]["steps"] == per_epoch
    budget = per_epoch + per_epoch // 2  # one and a half epochs
    args = ("--hybrid.batch_size=2", "--hybrid.test_at_end=false", "--hybrid.patience=0")
    one = finetune(hybrid_cfg(successor, tmp_path / "b", "--hybrid.epochs=1", *args), progress=False)
    resumed = finetune(hybrid_cfg(successor, tmp_path / "b", f"--hybrid.max_steps={budget}", *args), progress=False)
    assert one["fit"]["steps"] == per_epoch
    assert [r["steps"] for r in resumed["history"]] == [per_epoch, budget - per_epoch]
    assert resumed["fit"] == {**resumed["fit"], "epochs": 2, "steps": budget, "stopped": "step budget"}
    # wall time: training + validation + checkpoints, summed over the resumed runs
    assert resumed["fit"]["wall_seconds"] >= one["fit"]["wall_seconds"] >= one["fit"]["train_seconds"] > 0
    assert resumed["fit"]["wall_seconds"] >= resumed["fit"]["train_seconds"]
    straight = finetune(hybrid_cfg(successor, tmp_path / "s", f"--hybrid.max_steps={budget}", *args), progress=False)
    for a, b in zip(resumed["history"], straight["history"], strict=True):  # resumed = uninterrupted
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6) and a["steps"] == b["steps"]
    with pytest.raises(ValueError, match="max_steps: must be >= 0"):
        HybridConfig(max_steps=-1).validate("hybrid")


def test_new_item_offset_is_chosen_on_validation_and_scores_with_the_export(successor, tmp_path):
    """On a new-items split the offset for never-trained items is chosen on validation: tolerance 0 picks
    the curve's best (the first on a tie), a tolerance the largest offset within it; the export carries it
    and its scores are the keys' dot product plus the offset for exactly the untrained items."""
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.hybrid.train import choose_new_item_offset
    from tests.test_evaluation import prepare_new_items

    data = tmp_path / "new"
    held = prepare_new_items(successor, data)["new_items"]["items"]
    out = tmp_path / "h"
    cfg = hybrid_cfg(data, out, "--hybrid.gating=none", "--hybrid.id_dropout=0.3", "--hybrid.epochs=4",
                     "--data.new_items.fraction=0.25", "--hybrid.new_item_min_users=2")
    result = finetune(cfg, progress=False)
    choice = result["new_item_offset"]
    assert choice["new_item_users"] > 0 and len(choice["curve"]) == 17 and choice["curve"][0]["offset"] == 0
    ndcg = [c["ndcg@10"] for c in choice["curve"]]
    assert choice["chosen"]["ndcg@10"] == max(ndcg) and choice["offset"] == choice["curve"][ndcg.index(max(ndcg))]["offset"]
    scorer = hybrid_scorer(out / "best", 20)
    assert float(scorer.model.new_offset) == pytest.approx(choice["offset"])
    untrained = EvalContext.build(cfg).train_counts == 0
    assert set(np.flatnonzero(untrained)) >= set(held)  # the held-out items are untrained
    batch = {"history_items": [[2, 3, 4]], "next_item_index": torch.tensor([5]), "keys": ["u"]}
    state = scorer.user_state(batch)
    plain = state @ scorer.model.item_table().detach().T
    expected = plain + torch.as_tensor(untrained, dtype=torch.float32) * choice["offset"]
    assert torch.allclose(scorer.item_scores(state, 0, 20), expected, atol=1e-5)
    loose = hybrid_cfg(data, out, "--hybrid.gating=none", "--hybrid.new_item_tolerance=0.5",
                       "--data.new_items.fraction=0.25", "--hybrid.new_item_min_users=2")
    wide = choose_new_item_offset(loose, EvalContext.build(loose), out / "best")
    within = [c["offset"] for c in wide["curve"] if c["ndcg@10"] >= 0.5 * max(ndcg)]
    assert wide["offset"] == max(within) >= choice["offset"]
    # the tolerance's edge is bisected between the chosen grid point and the next (4 more points), unless the
    # grid's last point is still within it; every point beyond the chosen offset is outside the tolerance
    grid = [wide["scale"] * step / 4 for step in range(17)]
    extra = [c["offset"] for c in wide["curve"] if min(abs(c["offset"] - g) for g in grid) > 1e-9]
    assert len(extra) == (0 if wide["offset"] == grid[-1] else 4)
    assert all(max(within) - wide["scale"] / 4 <= o <= max(within) + wide["scale"] / 4 for o in extra)
    assert all(c["ndcg@10"] < 0.5 * max(ndcg) for c in wide["curve"] if c["offset"] > wide["offset"])
    assert float(hybrid_scorer(out / "best", 20).model.new_offset) == pytest.approx(wide["offset"])
    # too few validation users with an untrained target: no evidence, no offset
    few = hybrid_cfg(data, out, "--hybrid.gating=none", "--hybrid.new_item_tolerance=0.5",
                     "--data.new_items.fraction=0.25", f"--hybrid.new_item_min_users={choice['new_item_users'] + 1}")
    none = choose_new_item_offset(few, EvalContext.build(few), out / "best")
    assert none["offset"] == 0.0 and "curve" not in none
    assert float(hybrid_scorer(out / "best", 20).model.new_offset) == 0.0


def test_new_item_offset_anchored_on_a_reference_export(successor, tmp_path):
    """`hybrid.new_item_reference`: the offset is the smallest whose new-item validation NDCG@10 reaches
    (1 - tolerance) x the reference's on the same users (bisected from the grid point before); a reference
    trained on other data is an error naming both."""
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.eval.loop import run_eval
    from jepa4rec_dist.hybrid.train import choose_new_item_offset
    from tests.test_evaluation import prepare_new_items

    data = tmp_path / "new"
    prepare_new_items(successor, data)
    common = ("--data.new_items.fraction=0.25", "--hybrid.new_item_min_users=2", "--hybrid.test_at_end=false")
    text = tmp_path / "text"
    finetune(hybrid_cfg(data, text, "--hybrid.mode=text", "--hybrid.epochs=4", *common), progress=False)
    out = tmp_path / "h"
    finetune(hybrid_cfg(data, out, "--hybrid.gating=none", "--hybrid.epochs=4", *common), progress=False)
    offsets = []
    for tolerance in (0.0, 0.5):
        cfg = hybrid_cfg(data, out, "--hybrid.gating=none", *common, f"--hybrid.new_item_tolerance={tolerance}",
                         f"--hybrid.new_item_reference={text / 'best'}")
        ctx = EvalContext.build(cfg)
        choice = choose_new_item_offset(cfg, ctx, out / "best")
        # the reference's number, computed here through the harness on the validation split
        res = run_eval(cfg, hybrid_scorer(text / "best", 20), ctx.root, ctx.tok, ctx.table, "valid", False,
                       exclude_history=ctx.exclude_history)
        expected = res.subset(ctx.train_counts[res.targets] == 0)["ndcg@10"]
        ref = choice["reference"]
        assert ref["new_items_ndcg@10"] == pytest.approx(expected, abs=1e-12)
        assert ref["floor"] == pytest.approx((1 - tolerance) * expected)
        reached = [c for c in choice["curve"] if c["new_items_ndcg@10"] >= ref["floor"]]
        if reached:  # the smallest offset that reaches the floor; every smaller one misses it
            assert choice["chosen"]["new_items_ndcg@10"] >= ref["floor"] and choice["offset"] == min(c["offset"] for c in reached)
            assert all(c["new_items_ndcg@10"] < ref["floor"] for c in choice["curve"] if c["offset"] < choice["offset"])
        else:
            assert choice["chosen"]["new_items_ndcg@10"] == max(c["new_items_ndcg@10"] for c in choice["curve"])
        assert len(choice["curve"]) == (17 if choice["offset"] == 0 else 17 + 4)  # 4 bisection steps at an edge
        assert float(hybrid_scorer(out / "best", 20).model.new_offset) == pytest.approx(choice["offset"])
        offsets.append(choice["offset"])
    assert offsets[0] > offsets[1] == 0.0  # on this toy data: the strict floor needs an offset, the loose one none
    other = tmp_path / "other"  # the standard split: another catalogue state and dataset identity
    finetune(hybrid_cfg(successor, other, "--hybrid.mode=text", "--hybrid.epochs=1", "--hybrid.test_at_end=false"),
             progress=False)
    bad = hybrid_cfg(data, out, "--hybrid.gating=none", *common, f"--hybrid.new_item_reference={other / 'best'}")
    with pytest.raises(ValueError, match=r"new_item_reference=.*other/best: trained on another dataset"):
        choose_new_item_offset(bad, EvalContext.build(bad), out / "best")
    with pytest.raises(ValueError, match=r"new_item_reference=.*missing: not an item-vector export"):
        finetune(hybrid_cfg(data, tmp_path / "x", *common, f"--hybrid.new_item_reference={tmp_path / 'missing'}"),
                 progress=False)


def test_low_resource_counts_are_the_subsets_own(successor, tmp_path):
    """On a low-resource run the model's item counts (the gate's input, the new-item offset's items) are
    those of the users it trains on, not of the full train split it never saw."""
    from jepa4rec_dist.data.prepare import low_resource_dataset
    from jepa4rec_dist.data.shards import iter_records
    from jepa4rec_dist.eval.context import EvalContext
    from jepa4rec_dist.eval.harness import item_counts

    out = tmp_path / "low"
    cfg = hybrid_cfg(successor, out, "--hybrid.epochs=1", "--finetune.low_resource_fraction=0.05",
                     "--hybrid.test_at_end=false")
    finetune(cfg, progress=False)
    subset = item_counts(iter_records(low_resource_dataset(successor, 0.05, cfg.finetune.seed), "train"), 20)
    full = EvalContext.build(cfg).train_counts
    assert ((subset == 0) & (full > 0)).any()  # the subset leaves out items the full split has
    freq = hybrid_scorer(out / "best", 20).model.freq.numpy()
    assert np.array_equal(freq == 0, subset == 0)
    assert np.allclose(freq, np.log1p(subset) / np.log1p(subset.max()))


def test_staged_training_starts_as_the_source_model(successor, tmp_path):
    """`hybrid.init_from`: an ID model's weights start a hybrid model whose text adapter is zero, so it scores
    exactly as the ID model before its first step; that start is validated and is a candidate for best."""
    from jepa4rec_dist.hybrid.scorer import load_hybrid
    from jepa4rec_dist.hybrid.train import start_from

    source = finetune(hybrid_cfg(successor, tmp_path / "id", "--hybrid.mode=id", "--hybrid.id_init=normal",
                                 "--hybrid.test_at_end=false"), progress=False)
    id_model, _ = load_hybrid(tmp_path / "id" / "best")
    cfg = hybrid_cfg(successor, tmp_path / "h", "--hybrid.gating=none", f"--hybrid.init_from={tmp_path / 'id' / 'best'}",
                     "--hybrid.test_at_end=false", "--hybrid.epochs=2", "--hybrid.patience=0")
    text = torch.randn(20, 8)
    model = HybridSeqRec(20, replace(cfg.hybrid, init_from=None), text, torch.ones(20))
    done = start_from(model, str(tmp_path / "id" / "best"), {"dataset": None})
    assert "id_emb" in done["copied"] and set(done["fresh"]) == {"adapter.weight", "adapter.bias"}
    model.eval()
    ids = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]])
    assert torch.allclose(model(ids), id_model(ids), atol=1e-6)
    assert torch.allclose(model.item_table(), id_model.item_table(), atol=1e-7)
    run = finetune(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["valid_ndcg@10"] == pytest.approx(source["best"]["ndcg@10"], abs=1e-9)  # the source's own
    assert run["best"]["ndcg@10"] >= source["best"]["ndcg@10"]
    with pytest.raises(ValueError, match="not an item-vector export"):
        start_from(model, str(tmp_path), {})
    with pytest.raises(ValueError, match="is not this run's"):
        start_from(HybridSeqRec(21, replace(cfg.hybrid, init_from=None), torch.randn(21, 8), torch.ones(21)),
                   str(tmp_path / "id" / "best"), {})


@pytest.mark.slow  # two catalogues trained (~7 s on 2 cores)
def test_a_text_model_moves_to_another_catalogue(successor, tmp_path):
    """`hybrid.init_from` from another dataset (transfer): a text-mode fit on a 20-item catalogue starts a model
    on a 30-item one. Its item table is rebuilt from the target's own item vectors, whitened with the source's
    map, through the source's adapter; `epochs: 0` scores the source as it is (zero-shot), and finetuning
    starts there. IDs, another encoder or another whitening cannot move."""
    from jepa4rec_dist.hybrid.scorer import load_hybrid

    target = write_successor_dataset(tmp_path / "target", n_items=30, n_users=150, seed=1)
    finetune(hybrid_cfg(successor, tmp_path / "src", "--hybrid.mode=text", "--hybrid.text_whiten=0.1",
                        "--hybrid.test_at_end=false"), progress=False)
    source = str(tmp_path / "src" / "best")
    move = ("--hybrid.mode=text", "--hybrid.text_whiten=0.1", f"--hybrid.init_from={source}")
    zero = finetune(hybrid_cfg(target, tmp_path / "zero", *move, "--hybrid.epochs=0"), progress=False)
    assert zero["fit"]["epochs"] == 0 and zero["best"]["epoch"] == 0
    src, _ = load_hybrid(source)
    moved, meta = load_hybrid(tmp_path / "zero" / "best")
    assert moved.num_items == 30 and meta["dataset"]["items"] == 30
    # by hand: the target's vectors through the source's whitening and adapter; the sequence side is the source's
    raw = torch.from_numpy(np.asarray(item_vectors(hybrid_cfg(target, tmp_path), target, "minilm", False)[0],
                                      dtype=np.float32))
    assert torch.allclose(moved.text, (raw - src.text_mean) @ src.text_map, atol=1e-5)
    assert torch.allclose(moved.item_table(), src.adapter(moved.text), atol=1e-5)
    ids = torch.tensor([[0, 3, 4, 5], [1, 2, 3, 4]])
    src.text = moved.text[:20].clone()  # the source network over the same (whitened) vectors: the same queries
    assert torch.allclose(moved(ids), src(ids), atol=1e-5)
    # the successor walk of the first 20 titles carries over: far above a random ranking of 30 items (~0.1)
    assert zero["best"]["ndcg@10"] > 0.4, zero["best"]
    tuned = finetune(hybrid_cfg(target, tmp_path / "tuned", *move, "--hybrid.epochs=3", "--hybrid.patience=0"),
                     progress=False)
    rows = [json.loads(x) for x in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["valid_ndcg@10"] == pytest.approx(zero["best"]["ndcg@10"], abs=1e-9)
    assert tuned["best"]["ndcg@10"] >= zero["best"]["ndcg@10"]
    with pytest.raises(ValueError, match="only through text"):
        finetune(hybrid_cfg(target, tmp_path / "id", "--hybrid.mode=id", f"--hybrid.init_from={source}"), progress=False)
    with pytest.raises(ValueError, match="text_whiten is 0.0 here but 0.1"):
        finetune(hybrid_cfg(target, tmp_path / "w", "--hybrid.mode=text", f"--hybrid.init_from={source}"),
                 progress=False)
    other = tmp_path / "other-encoder"  # the same export, as if its vectors had come from another encoder
    other.mkdir()
    for f in Path(source).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    doc = json.loads((other / "config.json").read_text())
    doc["text"]["weights_sha256"] = "0" * 64
    (other / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="another text encoder .*weights_sha256"):
        finetune(hybrid_cfg(target, tmp_path / "o", "--hybrid.mode=text", "--hybrid.text_whiten=0.1",
                            f"--hybrid.init_from={other}"), progress=False)
    with pytest.raises(ValueError, match="epochs: must be >= 1"):
        HybridConfig(epochs=0).validate("hybrid")


@pytest.mark.parametrize("mode", ["hybrid", "text", "id"])
def test_a_history_reads_its_items_without_the_whole_table(mode):
    """`item_inputs_at` (what forward reads: the history's items only, not an (N, H) table per call) equals the
    full table's rows, with and without an ID mask; pads read zeros."""
    torch.manual_seed(0)
    n = 9
    text = torch.nn.functional.normalize(torch.randn(n, 12), dim=-1)
    model = HybridSeqRec(n, HybridConfig(mode=mode, hidden=8, id_init="normal"), text if mode != "id" else None,
                         torch.arange(n) + 1)
    index = torch.tensor([[0, 3, 3, 8], [5, 1, 2, 7]])
    for keep in (None, torch.tensor([True, False] * 4 + [True])):
        model.set_id_mask(keep)
        torch.testing.assert_close(model.item_inputs_at(index), model.item_inputs()[index])
    model.set_id_mask(None)
    ids = torch.tensor([[0, 0, 4, 9], [1, 2, 3, 4]])  # item index + 1, 0 = pad
    out = model.eval()(ids)
    assert out.shape == (2, 4, model.cfg.hidden * (len(model.experts) if len(model.experts) > 1 else 1))
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
