"""Probe (validation only; benchmarks/EXPERIMENTS.md, 2026-11-30): route never-trained items to the
text-only model's scores. Reads the quality runner's new-items folders:

    python benchmarks/quality/probe_routed.py configs/experiments/quality-ml1m.yaml runs/quality/ml-1m/new-items

score(u, i) = hybrid(u, i)               for items with training interactions
            = text(u, i) + offset        for items without (new items)
Prints the validation curve (all users, new-item users, warm-item users) over a grid of offsets.
"""
import itertools
import json
import sys
from pathlib import Path

import torch

from jepa4rec_dist.config import load_config
from jepa4rec_dist.eval.context import EvalContext
from jepa4rec_dist.eval.harness import evaluate
from jepa4rec_dist.hybrid.scorer import hybrid_scorer
from jepa4rec_dist.train.finetune import eval_loader

recipe, folder = sys.argv[1], Path(sys.argv[2])
torch.set_num_threads(2)
cfg = load_config([recipe], [f"--data.out_dir={folder / 'data'}", "--data.new_items.fraction=0.2"])
ctx = EvalContext.build(cfg)
untrained = torch.from_numpy(ctx.train_counts == 0)
hyb = hybrid_scorer(folder / "hybrid/hybrid/best", ctx.table.num_items)
txt = hybrid_scorer(folder / "hybrid/hybrid-text/best", ctx.table.num_items)
for s in (hyb, txt):  # their own offsets off: the route has its own
    s.model.new_offset.fill_(0.0)
    s.refresh()


class Routed:
    name = "routed"

    def __init__(self):
        self.num_items, self.offset, self.cache = hyb.num_items, 0.0, {}

    def user_state(self, batch):
        if id(batch) not in self.cache:
            self.cache[id(batch)] = (hyb.user_state(batch), txt.user_state(batch))
        return self.cache[id(batch)]

    def item_scores(self, state, lo, hi):
        h, t = hyb.item_scores(state[0], lo, hi), txt.item_scores(state[1], lo, hi) + self.offset
        return torch.where(untrained[lo:hi], t, h)

    def target_scores(self, state, targets):
        h, t = hyb.target_scores(state[0], targets), txt.target_scores(state[1], targets) + self.offset
        return torch.where(untrained[targets.long()], t, h)


loader = eval_loader(cfg, ctx.root, ctx.tok, ctx.table, "valid")
batches = list(itertools.islice(loader, len(loader)))
r = Routed()
with torch.no_grad():
    st = [r.user_state(b) for b in batches[:1]][0]
    scale = float((st[1] @ txt.table.T).std(dim=1).mean())
    shift = float((st[0] @ hyb.table.T).mean() - (st[1] @ txt.table.T).mean())
curve = []
for step in range(-8, 17):
    r.offset = shift + scale * step / 4
    res = evaluate(r, batches, exclude_history=ctx.exclude_history, progress=False)
    new = untrained[torch.as_tensor(res.targets)].numpy()
    curve.append({"offset": r.offset, "all": res.metrics["ndcg@10"], "new": res.subset(new)["ndcg@10"],
                  "warm": res.subset(~new)["ndcg@10"]})
    print(json.dumps(curve[-1]), flush=True)
