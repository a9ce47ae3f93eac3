"""The item-vector model family: IDs and/or frozen text vectors, one causal Transformer, full softmax.

- `vectors`: item text vectors from any text encoder (our exports, raw MiniLM), cached with identity.
- `model`: `HybridSeqRec` (modes hybrid / text / id; frequency-gated experts; MK-MMD and contrastive
  ID-text alignment).
- `config`: `HybridConfig`, its config section `hybrid` (no torch: `jepa4rec_dist.config` imports it).
- `train`: `train_hybrid(cfg, runtime)`, the training loop behind `jepa4rec finetune --finetune.model=hybrid`
  and `deepspeed launch/finetune.py ... --finetune.model=hybrid`.
- `scorer`: the export folder and the harness `Scorer` (`jepa4rec evaluate --model <export>`).
"""
