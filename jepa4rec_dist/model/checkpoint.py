"""Weights in and out: import from local HF BERT / RoBERTa / Longformer folders, export our own format.

Import (docs/method.md, section 2): layer weights map 1:1 (our parameter names are BERT's). New tables: the 4-row
token-type table starts as copies of the checkpoint's first type row (RoBERTa/Longformer have only one),
item positions zero (RecFormer starts them random; zero keeps an import exactly the checkpoint's function). A position table shorter than ours is tiled Longformer-style
(RoBERTa keeps its two reserved rows in front). Longformer's separate global q/k/v projections are not
used: our global tokens share the local projections (a documented difference from RecFormer).

Export: a Hugging Face model folder (jepa4rec_dist/hf.py: model_type "jepa4rec"): `model.safetensors` (encoder,
MLM head when present, extra tensors such as a finetuned item table), `config.json` (model_type, the model section,
pad id, tokenizer facts, how an item becomes a sentence: `item_text`, `sequence`) and the tokenizer's files.
`load_export` rebuilds exactly what was saved; `AutoModel.from_pretrained` loads the encoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jepa4rec_dist.config import ModelConfig, _build
from jepa4rec_dist.data.tokenization import minilm_model_dir

EXPORT_FORMAT = "jepa4rec-encoder"
MODEL_TYPE = "jepa4rec"  # the Hugging Face model_type (jepa4rec_dist/hf.py registers it)
SUPPORTED = ("bert", "roberta", "longformer", "xlm-roberta")


def _resolve(path: str) -> Path:
    folder = minilm_model_dir() if path == "minilm" else Path(path)
    if not folder.is_dir():
        raise ValueError(f"model.init_from: {path!r} is not 'minilm' nor a checkpoint directory")
    return folder


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{folder}: no model.safetensors or pytorch_model.bin")


def hf_model_config(path: str, base: ModelConfig) -> tuple[ModelConfig, int, dict]:
    """Our model config with the checkpoint's shape; plus the checkpoint's pad id and raw config."""
    folder = _resolve(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no config.json")
    hf = json.loads(config_path.read_text())
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"{config_path}: model_type {kind!r} is not one of {SUPPORTED}")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{config_path}: hidden_act {act!r} (this encoder implements exact GELU only)")
    cfg = replace(base, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                  num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                  layer_norm_eps=hf.get("layer_norm_eps", 1e-12))
    return cfg, int(hf.get("pad_token_id", 0) or 0), hf


def _strip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in weights.items():
        for prefix in ("bert.", "roberta.", "longformer.", "model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def _tile_positions(src: torch.Tensor, rows: int, roberta: bool) -> torch.Tensor:
    if src.shape[0] >= rows:
        return src[:rows].clone()
    keep = 2 if roberta else 0  # RoBERTa's rows 0-1 are reserved for padding
    body = src[keep:]
    reps = -(-(rows - keep) // body.shape[0])
    return torch.cat([src[:keep], body.repeat(reps, 1)])[:rows].clone()


@torch.no_grad()
def import_hf_weights(encoder, mlm_head, path: str, hf_config: dict) -> dict[str, list[str]]:
    """Copy a HF checkpoint into our encoder (and MLM head when the checkpoint has one)."""
    weights = _strip(_read_weights(_resolve(path)))
    roberta = hf_config.get("model_type") != "bert"
    own = encoder.state_dict()
    loaded, skipped = [], []
    for key, value in weights.items():
        if key.startswith("encoder."):
            target = key[len("encoder."):]
        elif key.startswith("embeddings."):
            target = key
        else:
            continue
        if target == "embeddings.position_embeddings.weight":
            value = _tile_positions(value, own[target].shape[0], roberta)
        elif target == "embeddings.token_type_embeddings.weight":
            value = value[:1].expand_as(own[target]).clone()
        if target not in own:
            skipped.append(key)  # e.g. Longformer's query_global/key_global/value_global, position_ids
            continue
        if own[target].shape != value.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[target].shape)}")
        own[target].copy_(value)
        loaded.append(target)
    missing = [k for k in own if k not in loaded and not k.startswith("embeddings.item_position_embeddings")]
    # item positions are ours (no HF checkpoint has them): zero, so the imported encoder computes exactly the
    # checkpoint's function (a random init added seed-dependent noise to every token: raw MiniLM's zero-shot
    # NDCG@10 on ml-100k validation moved between 0.016 and 0.020 from one process to the next)
    own["embeddings.item_position_embeddings.weight"].zero_()
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    head_map = {"cls.predictions.transform.dense.weight": "dense.weight", "cls.predictions.transform.dense.bias": "dense.bias",
                "cls.predictions.transform.LayerNorm.weight": "layer_norm.weight",
                "cls.predictions.transform.LayerNorm.bias": "layer_norm.bias", "cls.predictions.bias": "bias",
                "lm_head.dense.weight": "dense.weight", "lm_head.dense.bias": "dense.bias",
                "lm_head.layer_norm.weight": "layer_norm.weight", "lm_head.layer_norm.bias": "layer_norm.bias",
                "lm_head.bias": "bias"}
    if mlm_head is not None:
        head = mlm_head.state_dict()
        for key, target in head_map.items():
            if key in weights and target in head and head[target].shape == weights[key].shape:
                head[target].copy_(weights[key])
                loaded.append("mlm_head." + target)
    return {"loaded": loaded, "skipped": skipped}


def save_export(folder: str | Path, model_cfg: ModelConfig, pad_id: int, tensors: dict[str, torch.Tensor],
                tokenizer: dict | None = None, extra: dict | None = None, item_text: dict | None = None,
                sequence: dict | None = None) -> Path:
    """Write `tensors` (flat name -> tensor, e.g. `encoder.*`, `mlm_head.*`, `item_table`), config.json (a Hugging
    Face config of model_type "jepa4rec") and, when `tokenizer` names one this machine has, its files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(flat, str(folder / "model.safetensors"), metadata={"format": "pt"})
    meta = {"model_type": MODEL_TYPE, "architectures": ["Jepa4RecModel"], "format": EXPORT_FORMAT,
            "model": asdict(model_cfg), "pad_id": pad_id, "pad_token_id": pad_id, "tokenizer": tokenizer,
            "item_text": item_text, "sequence": sequence, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(meta, indent=1))
    if tokenizer:
        save_tokenizer_files(folder, tokenizer["name"])
    return folder


def save_tokenizer_files(folder: Path, name: str) -> None:
    """The tokenizer's files into an export folder (AutoTokenizer.from_pretrained(folder) then works)."""
    from jepa4rec_dist.data.tokenization import load_tokenizer

    load_tokenizer(name).save_pretrained(str(folder))


def export_context(root: str | Path, sequence) -> dict:
    """`item_text` and `sequence` of save_export for data prepared in `root` (attribute order from its manifest)."""
    from jepa4rec_dist.data.shards import load_manifest

    manifest = load_manifest(root)
    text = manifest.get("config", {}).get("data", {}).get("item_text", {})
    return {"item_text": {"attributes": list(manifest["attributes"]), "max_attr_tokens": text.get("max_attr_tokens", 32),
                          "max_attrs": text.get("max_attrs", 3)},
            "sequence": asdict(sequence)}


def load_export(folder: str | Path) -> tuple[ModelConfig, int, dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: not an export (no config.json)")
    meta = json.loads(path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r} "
                         "(for a HF checkpoint use model.init_from instead)")
    cfg = _build(ModelConfig, meta["model"], "model")
    return cfg, int(meta["pad_id"]), load_file(str(folder / "model.safetensors")), meta


def is_export(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == EXPORT_FORMAT
    except json.JSONDecodeError:
        return False
