"""The bidirectional local-global Transformer that encodes items and user histories (docs/method.md, section 2).

Embeddings: token + token position + token type (CLS/key/value/pad) + item position, summed, LayerNorm,
dropout. Layers: post-LN, BERT/RoBERTa-compatible names and shapes, so pretrained weights load 1:1.
Attention: every token sees tokens within one-sided window w plus the global tokens (CLS); global tokens
see everything. The attention math is `jepa4rec_dist.kernels.local_global_attention`, backend chosen by name; this
module only projects and reshapes. The model runs on one device and knows nothing of DeepSpeed or Ray.

Representation of a sequence or an item = final hidden state of CLS, or the mean over non-pad tokens
(`model.pooling`; no pooler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from jepa4rec_dist.config import ModelConfig
from jepa4rec_dist.kernels.local_global_attention import local_global_attention


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, pad_id: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.item_position_embeddings = nn.Embedding(cfg.max_item_positions, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids, position_ids, token_type_ids, item_position_ids):
        x = (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
             + self.token_type_embeddings(token_type_ids) + self.item_position_embeddings(item_position_ids))
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.window = cfg.attention_window
        self.backend = cfg.attention_backend
        self.dropout_p = cfg.attention_dropout

    def forward(self, x, global_mask, padding_mask):
        b, n, _ = x.shape

        def heads(t):  # (B, L, H*D) -> (B, H, L, D)
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        # Attention-probability dropout is not applied (the fused backends have none); hidden dropout is.
        out = local_global_attention(q, k, v, window=self.window, global_mask=global_mask,
                                     padding_mask=padding_mask, backend=self.backend)
        return out.transpose(1, 2).reshape(b, n, -1)


class Layer(nn.Module):
    """Post-LN block with BERT's parameter names: attention.{self,output}, intermediate, output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = SelfAttention(cfg)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention.output.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, global_mask, padding_mask):
        a = self.attention.self(x, global_mask, padding_mask)
        x = self.attention.output.LayerNorm(x + self.dropout(self.attention.output.dense(a)))
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT / RoBERTa
        return self.output.LayerNorm(x + self.dropout(self.output.dense(h)))


class Encoder(nn.Module):
    """(B, L) inputs -> (B, L, H) hidden states."""

    def __init__(self, cfg: ModelConfig, pad_id: int):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (it comes from the checkpoint or the tokenizer)")
        self.cfg = cfg
        self.pad_id = pad_id
        self.embeddings = Embeddings(cfg, pad_id)
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.apply(self._init)

    @staticmethod
    def _init(module):  # BERT's initialiser, for anything not loaded from a checkpoint
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, position_ids, token_type_ids, item_position_ids, attention_mask, global_mask):
        x = self.embeddings(input_ids, position_ids, token_type_ids, item_position_ids)
        padding_mask = ~attention_mask.bool()
        global_mask = global_mask.bool()
        for layer in self.layer:
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, global_mask, padding_mask, use_reentrant=False)
            else:
                x = layer(x, global_mask, padding_mask)
        return x

    def encode(self, batch: dict, prefix: str, input_key: str = "input_ids") -> torch.Tensor:
        """Hidden states of one side of a collated batch (`history_` / `next_`)."""
        return self(batch[prefix + input_key], batch[prefix + "position_ids"], batch[prefix + "token_type_ids"],
                    batch[prefix + "item_position_ids"], batch[prefix + "attention_mask"], batch[prefix + "global_mask"])

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, H): the CLS state, or the mean over non-pad tokens (`model.pooling`)."""
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def represent(self, batch: dict, prefix: str, input_key: str = "input_ids") -> torch.Tensor:
        """The pooled representation of one side of a batch."""
        return self.pool(self.encode(batch, prefix, input_key), batch[prefix + "attention_mask"])


class MLMHead(nn.Module):
    """BERT/RoBERTa-style head: dense -> GELU -> LayerNorm -> decoder tied to the word embeddings."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.word_embeddings = [word_embeddings]  # a list: shared, not registered twice
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm(F.gelu(self.dense(hidden)))
        return h @ self.word_embeddings[0].weight.t() + self.bias


def mlm_loss(head: MLMHead, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over labelled positions (and their count). Only labelled positions reach the
    vocabulary projection, in chunks, so (tokens x vocab) logits never exist for the whole batch."""
    picked = labels.view(-1) != -100
    n = int(picked.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0
    h = hidden.reshape(-1, hidden.shape[-1])[picked]
    y = labels.view(-1)[picked]
    total = hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, n, chunk):
        logits = head(h[lo:lo + chunk]).float()
        total = total + F.cross_entropy(logits, y[lo:lo + chunk], reduction="sum")
    return total, n


def cls(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

