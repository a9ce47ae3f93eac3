"""The encoder against HF reference implementations, across attention backends, and export round trips."""

import pytest
import torch
from transformers import BertModel, LongformerConfig, LongformerModel, RobertaConfig, RobertaModel

from jepa4rec_dist.config import ModelConfig, load_config
from jepa4rec_dist.data.tokenization import TokenizerInfo, load_tokenizer, minilm_model_dir
from jepa4rec_dist.model import build_encoder, encoder_tensors
from jepa4rec_dist.model.checkpoint import load_export, save_export
from jepa4rec_dist.model.encoder import Encoder


def inputs(vocab, batch=2, length=40, cls_id=101, pad_id=0, pad_from=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0] = cls_id
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, pad_from:] = False
    ids[~mask] = pad_id
    glob = torch.zeros(batch, length, dtype=torch.bool)
    glob[:, 0] = True
    types = torch.randint(0, 3, (batch, length), generator=g)
    return ids, mask, glob, types


@pytest.fixture(scope="module")
def minilm_encoder():
    tok = TokenizerInfo.from_tokenizer("minilm", load_tokenizer("minilm"))
    cfg = load_config(["configs/model/minilm.yaml"], ["--model.attention_backend=reference", "--model.attention_window=1000"])
    enc, head, _ = build_encoder(cfg.model, tok)
    return enc.eval(), head, tok


def test_minilm_import_matches_hf_bert(minilm_encoder):
    enc, _, _ = minilm_encoder
    bert = BertModel.from_pretrained(str(minilm_model_dir()), local_files_only=True).eval()
    ids, mask, glob, types = inputs(30522)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        # all 4 type rows = BERT's row 0; item positions start at zero (ours, not in the checkpoint), so any
        # item numbering gives BERT's function exactly, whatever the process's random state
        items = torch.randint(0, 50, ids.shape, generator=torch.Generator().manual_seed(3))
        ours = enc(ids, pos, types, items, mask, glob)
    assert (ref - ours)[mask].abs().max() < 1e-4
    # positions beyond BERT's 512 were tiled from its table
    table = enc.embeddings.position_embeddings.weight
    assert torch.equal(table[512:1024], table[:512])


def test_an_imported_checkpoint_does_not_depend_on_the_seed():
    """A HF import is the checkpoint, nothing random: two builds under different seeds are equal tensor by
    tensor (the item-position table, which no checkpoint has, starts at zero)."""
    tok = TokenizerInfo.from_tokenizer("minilm", load_tokenizer("minilm"))
    cfg = load_config(["configs/model/minilm.yaml"])
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(build_encoder(cfg.model, tok, with_head=False)[0].state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert states[0]["embeddings.item_position_embeddings.weight"].abs().sum() == 0


def test_roberta_import_matches_hf_roberta(tmp_path):
    hf_cfg = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=1, type_vocab_size=1)
    torch.manual_seed(0)
    hf = RobertaModel(hf_cfg, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path / "rob")
    cfg = ModelConfig(init_from=str(tmp_path / "rob"), attention_backend="reference", attention_window=500,
                      max_position_embeddings=130)
    enc, _, _ = build_encoder(cfg, None, with_head=False)
    enc.eval()
    torch.nn.init.zeros_(enc.embeddings.item_position_embeddings.weight)
    ids, mask, glob, types = inputs(120, length=50, cls_id=0, pad_id=1)
    pos = torch.where(mask, torch.cumsum(mask, 1) + 1, torch.ones_like(ids))  # RoBERTa numbering from pad_id + 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        ours = enc(ids, pos, types, torch.zeros_like(ids), mask, glob)
    assert (ref - ours)[mask].abs().max() < 1e-5
    table, src = enc.embeddings.position_embeddings.weight, hf.embeddings.position_embeddings.weight
    assert torch.equal(table[:66], src) and torch.equal(table[66:130], src[2:66])  # tiled after the 2 reserved rows


def test_longformer_checkpoint_imports(tmp_path):
    hf_cfg = LongformerConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=70, attention_window=[8, 8], pad_token_id=1)
    LongformerModel(hf_cfg, add_pooling_layer=False).save_pretrained(tmp_path / "lf")
    enc, _, _ = build_encoder(ModelConfig(init_from=str(tmp_path / "lf"), max_position_embeddings=70), None, with_head=False)
    src = LongformerModel.from_pretrained(tmp_path / "lf")
    assert torch.equal(enc.layer[1].attention.self.query.weight, src.encoder.layer[1].attention.self.query.weight)
    assert enc.cfg.hidden_size == 32 and enc.cfg.num_layers == 2


@pytest.mark.parametrize("window", [0, 3, 100])
def test_backends_agree_inside_the_encoder(window):
    cfg = ModelConfig(init_from=None, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      attention_window=window, attention_backend="reference", hidden_dropout=0.0)
    torch.manual_seed(0)
    enc = Encoder(cfg, pad_id=0).eval()
    ids, mask, glob, types = inputs(50, length=23, cls_id=1, pad_from=15)
    glob[0, 7] = True  # a second global token mid-sequence
    pos = torch.arange(23).expand_as(ids)
    item_pos = torch.randint(0, 10, ids.shape)
    with torch.no_grad():
        ref = enc(ids, pos, types, item_pos, mask, glob)
        for backend in ("sdpa", "triton"):
            for layer in enc.layer:
                layer.attention.self.backend = backend
            out = enc(ids, pos, types, item_pos, mask, glob)
            assert (out - ref)[mask].abs().max() < 1e-4, backend


def test_export_round_trip_is_exact(minilm_encoder, tmp_path):
    enc, head, tok = minilm_encoder
    table = torch.randn(7, enc.cfg.hidden_size)
    save_export(tmp_path / "exp", enc.cfg, enc.pad_id, {**encoder_tensors(enc, head), "item_table": table}, tok.to_dict())
    cfg, pad_id, tensors, meta = load_export(tmp_path / "exp")
    assert cfg == enc.cfg and pad_id == 0 and meta["tokenizer"]["name"] == "minilm"
    again, again_head, extra = build_encoder(ModelConfig(init_from=str(tmp_path / "exp"), attention_backend="reference",
                                                         attention_window=1000), tok)
    for (k, a), (k2, b) in zip(enc.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert torch.equal(head.dense.weight, again_head.dense.weight)
    assert torch.equal(extra["item_table"], table)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ValueError, match="is not 'minilm' nor a checkpoint directory"):
        build_encoder(ModelConfig(init_from=str(tmp_path / "none")), None)
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="model_type 'gpt2' is not one of"):
        build_encoder(ModelConfig(init_from=str(tmp_path / "gpt")), None)
    big = TokenizerInfo("big", 60000, 0, 1, 2, (0, 1, 2), "roberta")
    with pytest.raises(ValueError, match="tokenizer 'big' has 60000 tokens but the model's vocabulary has 30522"):
        build_encoder(ModelConfig(init_from="minilm"), big)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(init_from=None, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      attention_window=3, hidden_dropout=0.0)
    ids, mask, glob, types = inputs(50, length=19, cls_id=1, pad_from=12)
    pos = torch.arange(19).expand_as(ids)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        enc = Encoder(ModelConfig(**{**cfg.__dict__, "gradient_checkpointing": ckpt}), pad_id=0).train()
        enc(ids, pos, types, torch.zeros_like(ids), mask, glob)[mask].pow(2).sum().backward()
        grads.append([p.grad.clone() for p in enc.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_mean_pooling_ignores_padding():
    cfg = ModelConfig(init_from=None, vocab_size=50, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                      pooling="mean")
    enc = Encoder(cfg, pad_id=0)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    pooled = enc.pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0)) and torch.allclose(pooled[1], hidden[1].mean(0))
    assert torch.equal(Encoder(ModelConfig(**{**cfg.__dict__, "pooling": "cls"}), 0).pool(hidden, mask), hidden[:, 0])
