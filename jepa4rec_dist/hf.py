"""An export as a Hugging Face model: `AutoConfig`, `AutoModel` and `AutoTokenizer.from_pretrained(export)` after
`import jepa4rec_dist` (the registered-custom-model convention: model_type "jepa4rec").

    import jepa4rec_dist
    from transformers import AutoModel
    model = AutoModel.from_pretrained("runs/pretrain/export")            # a Jepa4RecModel
    items = model.encode_items([{"title": "Heat", "genres": "Action, Crime", "year": "1995"}])    # (1, H)
    users = model.encode_histories([[{"title": "Toy Story"}, {"title": "Heat"}]])                # (1, H)

An export folder holds `config.json` (model_type, our model section, pad id, tokenizer facts, and how an item
becomes a sentence: attribute order and lengths, sequence limits), `model.safetensors` (`encoder.*`, plus
`mlm_head.*` / `item_table` / ... that this class does not use) and the tokenizer files, so nothing of this
package's data pipeline is needed to encode raw items. Vectors are L2-normalised pooled states, exactly what
`jepa4rec embed` and evaluation compute (they share `encode_item_dicts`).

`import jepa4rec_dist` does not import transformers: it registers these classes when transformers' own Auto
modules are first imported (`jepa4rec_dist/__init__.py`), the config with `AutoConfig`, a stand-in with
`AutoModel`; the model class itself is imported only when AutoModel first needs it (the stand-in forwards to it).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

MODEL_TYPE = "jepa4rec"
UPGRADE_HINT = "jepa4rec upgrade-export {folder} --data PREPARED_DIR"


class Jepa4RecConfig(PretrainedConfig):
    """config.json of an export. `model`: our ModelConfig as a dict; `tokenizer`: TokenizerInfo as a dict;
    `item_text`: {attributes, max_attr_tokens, max_attrs}; `sequence`: SequenceConfig as a dict."""

    model_type = MODEL_TYPE

    def __init__(self, model: dict | None = None, pad_id: int = 0, tokenizer: dict | None = None,
                 item_text: dict | None = None, sequence: dict | None = None, format: str = "jepa4rec-encoder",
                 **kwargs):
        self.model = dict(model or {})
        self.pad_id = int(pad_id)
        self.tokenizer = tokenizer
        self.item_text = item_text
        self.sequence = sequence
        self.format = format
        kwargs.setdefault("pad_token_id", self.pad_id)
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get("hidden_size", 0))

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config, rest = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config.get("format") == "jepa4rec-encoder" and config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{pretrained_model_name_or_path}: an export written before exports became Hugging "
                             f"Face models (no model_type, no tokenizer files); convert it in place with "
                             f"`{UPGRADE_HINT.format(folder=pretrained_model_name_or_path)}`")
        return config, rest


def _model_class():
    """The real model class (imports transformers' modeling stack and our encoder: done on first use)."""
    import torch
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import BaseModelOutput

    from jepa4rec_dist.config import ModelConfig, SequenceConfig, _build
    from jepa4rec_dist.model.encoder import Encoder

    class Jepa4RecModel(PreTrainedModel):
        """Our local-global encoder as a PreTrainedModel: `forward` returns the hidden states; `encode_items` /
        `encode_histories` turn raw item dicts into L2-normalised vectors with the export's own tokenizer and
        sentence settings."""

        config_class = Jepa4RecConfig
        base_model_prefix = "jepa4rec"
        main_input_name = "input_ids"
        # tensors an export may carry beside the encoder (finetuned item table, MLM head, hybrid tables)
        _keys_to_ignore_on_load_unexpected = [r"^mlm_head\.", r"^item_table$", r"^hybrid\.", r"^extra\."]

        def __init__(self, config: Jepa4RecConfig):
            super().__init__(config)
            self.encoder = Encoder(_build(ModelConfig, config.model, "model"), config.pad_id)
            self._tokenizer = None
            self.post_init()

        def _init_weights(self, module):  # the encoder initialises itself (BERT's scheme); loading overwrites
            return

        def forward(self, input_ids, attention_mask, token_type_ids, position_ids, item_position_ids, global_mask,
                    **_):
            hidden = self.encoder(input_ids, position_ids, token_type_ids, item_position_ids, attention_mask,
                                  global_mask)
            return BaseModelOutput(last_hidden_state=hidden)

        def tokenizer(self):
            """The export's tokenizer (AutoTokenizer over the folder this model was loaded from)."""
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                folder = getattr(self.config, "_name_or_path", None) or getattr(self, "name_or_path", None)
                if not folder or not Path(folder).is_dir():
                    raise ValueError("encode_items needs the tokenizer files of an export folder: load the model "
                                     "with from_pretrained(folder), or pass tokenizer=")
                self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            return self._tokenizer

        @torch.no_grad()
        def encode_items(self, items: list[dict], tokenizer=None, batch_size: int = 128) -> torch.Tensor:
            """(N, H) float32 L2-normalised vectors of raw items (dicts of attribute -> text)."""
            from jepa4rec_dist.eval.model_scorer import encode_item_dicts

            return encode_item_dicts(self.encoder, tokenizer or self.tokenizer(), self._tok_info(),
                                     self.config.item_text, self._sequence(), items, batch_size=batch_size,
                                     device=self.device)

        @torch.no_grad()
        def encode_histories(self, histories: list[list[dict]], tokenizer=None, batch_size: int = 64) -> torch.Tensor:
            """(U, H) float32 L2-normalised vectors of histories (each a list of item dicts, oldest first)."""
            from jepa4rec_dist.eval.model_scorer import encode_history_dicts

            return encode_history_dicts(self.encoder, tokenizer or self.tokenizer(), self._tok_info(),
                                        self.config.item_text, self._sequence(), histories, batch_size=batch_size,
                                        device=self.device)

        def _tok_info(self):
            from jepa4rec_dist.data.tokenization import TokenizerInfo

            if not self.config.tokenizer:
                raise ValueError("this export records no tokenizer facts (config.json 'tokenizer')")
            return TokenizerInfo.from_dict(self.config.tokenizer)

        def _sequence(self):
            return _build(SequenceConfig, self.config.sequence or {}, "sequence")

    Jepa4RecModel.__module__ = __name__
    return Jepa4RecModel


_REAL = None


def model_class():
    global _REAL
    if _REAL is None:
        _REAL = _model_class()
    return _REAL


class Jepa4RecModelStandIn:
    """What AutoModel's registry holds: forwards `from_pretrained` / `_from_config` to the real class, so that
    `import jepa4rec_dist` does not import transformers' modeling stack."""

    config_class = Jepa4RecConfig

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return model_class().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return model_class()._from_config(config, **kwargs)

    from_config = _from_config


def register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, Jepa4RecConfig, exist_ok=True)


def register_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModel

    AutoModel.register(Jepa4RecConfig, Jepa4RecModelStandIn, exist_ok=True)


def __getattr__(name):  # `from jepa4rec_dist.hf import Jepa4RecModel`: the real class
    if name == "Jepa4RecModel":
        return model_class()
    raise AttributeError(name)
