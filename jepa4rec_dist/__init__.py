"""jepa4rec-dist: distributed pretraining of text-based sequential recommenders (JEPA4Rec, RecFormer)."""

__version__ = "0.1.0"
