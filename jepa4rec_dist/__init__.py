"""jepa4rec-dist: distributed pretraining of text-based sequential recommenders (JEPA4Rec, RecFormer)."""

__version__ = "0.1.0"


def _register_with_transformers() -> None:
    """Exports are Hugging Face models of model_type "jepa4rec": after `import jepa4rec_dist`,
    AutoConfig / AutoModel / AutoTokenizer.from_pretrained(export) work (jepa4rec_dist/hf.py)."""
    try:
        from jepa4rec_dist.hf import register
    except ImportError:  # transformers missing: nothing to register with
        return
    register()


_register_with_transformers()
