"""What the train and data suites share: model sizes, our pretraining model and the HF peers behind one
interface, synthetic batches of an exact shape, the pretraining step as one callable, and the model-FLOP
count that MFU is computed from.

Peers. `HFEncoder` puts transformers' `LongformerModel` (RecFormer's backbone: attention_window = 2 w,
CLS global) or `RobertaModel` (dense attention through SDPA) behind our encoder's interface, with
RecFormer's item-position embedding added to the word embeddings (as RecFormer does), so `PretrainModel`
trains any of them unchanged and weights copy over 1:1 for the numerics checks. Longformer's global
projections get copies of the local ones: our global tokens share the local projections.

Model FLOPs (what MFU divides by time; recomputation, padding and small terms are not counted):
  one encoder forward over T non-pad tokens of sequences of length n:
      2 T layers (4 h^2 + 2 h f)       Q, K, V, output projections and the FFN (a multiply-add = 2 FLOPs)
    + 4 T layers h L_att               scores Q K^T and the weighted sum P V
  L_att = min(n, 2 w + 2) for local-global attention (the band plus the global CLS key: ours and HF
  Longformer), L_att = n for dense attention (HF RoBERTa): a dense model is credited with the extra work
  it does, so compare tokens/s across providers and MFU for how well each uses the GPU.
  Backward = 2 x forward; the MLM head adds 2 M (h^2 + h V) forward over the M masked tokens.
  pretrain step = 3 x (context history + item passes + MLM head) + 1 x (target history + item passes);
  encoder row = 3 x (one history pass). Predictor and InfoNCE (O(B^2 h)) are left out.
Peak: the GPU's dense bf16 tensor-core peak (H100 / H200 SXM 989 TFLOP/s, H100 NVL 835, H100 PCIe 756,
A100 312); other GPUs, fp32 runs and CPU rows get mfu = None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from jepa4rec_dist.config import Config, ModelConfig, load_config
from jepa4rec_dist.data.collate import IGNORE_INDEX, Collator
from jepa4rec_dist.data.items import ItemTable
from jepa4rec_dist.data.tokenization import TokenizerInfo
from jepa4rec_dist.model.encoder import Encoder, MLMHead
from jepa4rec_dist.model.jepa import LocalOps, PretrainModel, ema_update, make_target_encoder
from jepa4rec_dist.train.engine import TorchEngine
from jepa4rec_dist.train.pretrain import build_pretrain_model

FLOPS_FORMULA = ("fwd = 2*T*layers*(4h^2+2hf) + 4*T*layers*h*L_att [+ 2*M*(h^2+hV) MLM head]; "
                 "L_att = min(n, 2w+2) local-global, n dense; bwd = 2*fwd; target passes fwd only")
PEERS = ("hf_longformer", "hf_roberta_sdpa")
_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("A100", 312e12))


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int  # synthetic batches only; real data brings its tokenizer's


SIZES = {
    "tiny": ModelSize(64, 2, 2, 256, 1000),  # CPU: seconds
    "base": ModelSize(768, 12, 12, 3072, 50265),  # Longformer-base / RoBERTa-base: RecFormer's backbone
}


def default_backend(device: torch.device) -> str:
    """Our attention backend for a device's timed rows: sdpa on CPU (triton there is the interpreter:
    numerics only), else the first of triton / flex / sdpa that runs."""
    from jepa4rec_dist.kernels.local_global_attention import BACKENDS

    if device.type != "cuda":
        return "sdpa"
    return next(b for b in ("triton", "flex", "sdpa") if BACKENDS[b].unavailable_reason(device) is None)


def bench_config(size: ModelSize, length: int, window: int, batch: int, max_items: int = 50,
                 backend: str = "auto", vocab: int | None = None, overrides: tuple[str, ...] = ()) -> Config:
    """The config `pretrain` would run with: this size, window and backend, sequences of up to `length`."""
    return load_config(overrides=[
        "--model.init_from=null", f"--model.vocab_size={vocab or size.vocab}", f"--model.hidden_size={size.hidden}",
        f"--model.num_layers={size.layers}", f"--model.num_heads={size.heads}",
        f"--model.intermediate_size={size.ffn}", f"--model.attention_window={window}",
        f"--model.attention_backend={backend}", "--model.layer_norm_eps=1e-5",
        f"--model.max_position_embeddings={length + 2}", f"--model.max_item_positions={max_items + 1}",
        f"--sequence.max_tokens={length}", f"--sequence.max_items={max_items}", f"--loader.batch_size={batch}",
        "--train.max_steps=1000000", *overrides])  # max_steps: the linear decay must not reach lr 0


# ---------------------------------------------------------------------------------------------------------
# synthetic batches of an exact shape
# ---------------------------------------------------------------------------------------------------------
def synthetic_tokenizer(vocab: int) -> TokenizerInfo:
    """RoBERTa layout (<s> = 0, <pad> = 1, mask last), so positions are numbered RoBERTa-style."""
    return TokenizerInfo(name="synthetic", vocab_size=vocab, cls_id=0, pad_id=1, mask_id=vocab - 1,
                         special_ids=(0, 1, 2, 3, vocab - 1), position_style="roberta")


def history_layout(length: int) -> tuple[int, int]:
    """(max_items, tokens per item) so that every history fills exactly `length` tokens and a single
    item, [CLS] + its tokens, is a multiple of 8 long: neither side of a batch has padding."""
    max_items = max(50, math.ceil((length - 1) / 95))
    need = math.ceil((length - 1) / max_items)
    return max_items, max(23, -(-(need + 1) // 8) * 8 - 1)


def synthetic_table(num_items: int, item_tokens: int, vocab: int, rng: np.random.Generator) -> ItemTable:
    """Random token ids; three attributes per item, each a 2-token key then its value, words of 2 tokens."""
    within = np.arange(item_tokens) % math.ceil(item_tokens / 3)
    return ItemTable(item_ids=[f"i{i}" for i in range(num_items)], domains=["synthetic"] * num_items,
                     offsets=np.arange(num_items + 1, dtype=np.int64) * item_tokens,
                     token_ids=rng.integers(4, vocab - 1, num_items * item_tokens).astype(np.int32),
                     token_types=np.tile(np.where(within < 2, 1, 2), num_items).astype(np.int8),
                     word_starts=np.tile(within % 2 == 0, num_items))


def synthetic_batches(cfg: Config, tok: TokenizerInfo, copies: int, seed: int = 0) -> list[dict]:
    """`copies` pretraining batches through the real collator (pair sampling, whole-word masking):
    histories of exactly `sequence.max_tokens` tokens, next items of one fixed length."""
    batch_size, length, max_items = cfg.loader.batch_size, cfg.sequence.max_tokens, cfg.sequence.max_items
    assert history_layout(length)[0] <= max_items, "sequence.max_items too small to fill the history"
    rng = np.random.default_rng(seed)
    num_items = 4096
    table = synthetic_table(num_items, history_layout(length)[1], tok.vocab_size, rng)
    collator = Collator(table, tok, cfg.sequence, cfg.pretrain.masking, "pretrain", seed=seed)
    n = 2 * max_items + 2  # target index t >= (n - 1) // 2 = max_items: the history is always full
    batches = []
    for c in range(copies):
        examples = [collator.example(f"s{c}-{b}", {"items": rng.integers(0, num_items, n).tolist()}, epoch=0)
                    for b in range(batch_size)]
        batch = collator.batch(examples)
        assert batch["history_input_ids"].shape == (batch_size, length) and batch["history_attention_mask"].all()
        batches.append(batch)
    return batches


# ---------------------------------------------------------------------------------------------------------
# HF peers behind our encoder's interface
# ---------------------------------------------------------------------------------------------------------
class HFEncoder(nn.Module):
    """transformers' LongformerModel / RobertaModel (SDPA) with our encoder's forward and `encode`."""

    def __init__(self, kind: str, cfg: ModelConfig, pad_id: int):
        super().__init__()
        from transformers import LongformerConfig, LongformerModel, RobertaConfig, RobertaModel

        common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      hidden_act="gelu", hidden_dropout_prob=cfg.hidden_dropout,
                      attention_probs_dropout_prob=cfg.attention_dropout,
                      max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
                      layer_norm_eps=cfg.layer_norm_eps, pad_token_id=pad_id)
        if kind == "hf_longformer":  # RecFormer: attention_window 64 = two-sided, i.e. w = 32
            self.model = LongformerModel(LongformerConfig(**common, attention_window=2 * cfg.attention_window),
                                         add_pooling_layer=False)
        elif kind == "hf_roberta_sdpa":
            self.model = RobertaModel(RobertaConfig(**common, attn_implementation="sdpa"), add_pooling_layer=False)
        else:
            raise ValueError(f"unknown HF peer {kind!r}; known: {PEERS}")
        self.kind, self.cfg, self.pad_id = kind, cfg, pad_id
        self.item_position_embeddings = nn.Embedding(cfg.max_item_positions, cfg.hidden_size)

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    def forward(self, input_ids, position_ids, token_type_ids, item_position_ids, attention_mask, global_mask):
        embeds = self.model.embeddings.word_embeddings(input_ids) + self.item_position_embeddings(item_position_ids)
        kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask.long(), token_type_ids=token_type_ids,
                      position_ids=position_ids)
        if self.kind == "hf_longformer":
            kwargs["global_attention_mask"] = global_mask.long()
        # Longformer pads to a multiple of its window internally and strips it again; slice to be sure
        return self.model(**kwargs).last_hidden_state[:, : input_ids.shape[1]]

    encode = Encoder.encode
    pool = Encoder.pool
    represent = Encoder.represent


@torch.no_grad()
def copy_weights(ours: Encoder, peer: HFEncoder) -> None:
    """Our encoder's weights into the peer (our names are BERT's; Longformer's global q/k/v get copies)."""
    state = {}
    for key, value in ours.state_dict().items():
        if key == "embeddings.item_position_embeddings.weight":
            peer.item_position_embeddings.weight.copy_(value)
            continue
        target = key if key.startswith("embeddings.") else "encoder." + key
        state[target] = value
        if peer.kind == "hf_longformer":
            for name in ("query", "key", "value"):
                if f".self.{name}." in target:
                    state[target.replace(f".self.{name}.", f".self.{name}_global.")] = value
    missing, unexpected = peer.model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]  # buffers
    if missing or unexpected:
        raise RuntimeError(f"{peer.kind}: weights did not map 1:1 (missing {missing}, unexpected {unexpected})")


def check_params(encoder: nn.Module) -> list[torch.Tensor]:
    """Two weights whose gradients the numerics checks compare: first layer FFN, embedding LayerNorm."""
    body = encoder.model if isinstance(encoder, HFEncoder) else encoder
    layers = body.encoder.layer if isinstance(encoder, HFEncoder) else body.layer
    return [layers[0].intermediate.dense.weight, body.embeddings.LayerNorm.weight]


def build_pretrain(kind: str, cfg: Config, tok: TokenizerInfo, seed: int = 0) -> PretrainModel:
    """Ours through the library's builder (what `pretrain` runs); a peer with the same head and objective."""
    torch.manual_seed(seed)
    if kind == "ours":
        return build_pretrain_model(cfg, tok)
    encoder = HFEncoder(kind, replace(cfg.model, vocab_size=cfg.model.vocab_size or tok.vocab_size), tok.pad_id)
    if cfg.train.freeze_word_embeddings:
        encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    return PretrainModel(encoder, MLMHead(encoder.cfg, encoder.embeddings.word_embeddings), cfg.pretrain)


# ---------------------------------------------------------------------------------------------------------
# the pretraining step
# ---------------------------------------------------------------------------------------------------------
class PretrainStep:
    """One step exactly as `pretrain()` runs it: losses, backward, (clip +) optimizer step, EMA update.
    `zero_stage=None`: TorchEngine; 0-3: DeepSpeed (needs an initialised process group)."""

    def __init__(self, kind: str, cfg: Config, tok: TokenizerInfo, device: torch.device, dtype: torch.dtype,
                 zero_stage: int | None = None):
        self.model = build_pretrain(kind, cfg, tok)
        # the EMA target: a full fp32 copy outside the engine, made before ZeRO partitions anything
        self.target = make_target_encoder(self.model.encoder).to(device) if self.model.jepa else None
        self.momentum = cfg.pretrain.ema_momentum
        t = cfg.train
        if zero_stage is None:
            self.engine = TorchEngine(self.model, t.lr, t.weight_decay, t.warmup_steps, t.max_steps, t.clip_norm,
                                      1, device, dtype)
            self.ops = LocalOps()
        else:
            from jepa4rec_dist.train.distributed import DeepSpeedEngine, DistOps, OptimSpec

            spec = replace(OptimSpec.pretraining(cfg), grad_accum=1, zero_stage=zero_stage)
            self.engine = DeepSpeedEngine(self.model.to(device), spec, 1, bf16=dtype == torch.bfloat16)
            self.ops = DistOps()

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        losses = self.engine(batch, self.target, self.ops)
        self.engine.backward(losses["loss"])
        if self.engine.step() and self.target is not None:
            with self.engine.gathered(self.model.encoder.parameters()):
                ema_update(self.target, self.model.encoder.parameters(), self.momentum)
        return losses


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------
def _pass_flops(tokens: int, length: int, cfg: ModelConfig, dense: bool) -> float:
    h, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    l_att = length if dense else min(length, 2 * cfg.attention_window + 2)
    return 2.0 * tokens * layers * (4 * h * h + 2 * h * f) + 4.0 * tokens * layers * h * l_att


def encoder_flops(batch: dict, cfg: ModelConfig, dense: bool) -> float:
    """Forward + backward of one history pass."""
    tokens = int(batch["history_attention_mask"].sum())
    return 3 * _pass_flops(tokens, batch["history_input_ids"].shape[1], cfg, dense)


def step_flops(batch: dict, cfg: ModelConfig, dense: bool) -> float:
    """A JEPA step: context passes forward + backward, target passes forward only, MLM head."""
    passes = sum(_pass_flops(int(batch[f"{side}_attention_mask"].sum()), batch[f"{side}_input_ids"].shape[1],
                             cfg, dense) for side in ("history", "next"))
    masked = sum(int((batch[f"{side}_mlm_labels"] != IGNORE_INDEX).sum()) for side in ("history", "next"))
    h = cfg.hidden_size
    return 3 * (passes + 2.0 * masked * (h * h + h * cfg.vocab_size)) + passes


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense bf16 peak of the GPU, or None (CPU, fp32, a GPU not in the table)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16 if key in name), None)
