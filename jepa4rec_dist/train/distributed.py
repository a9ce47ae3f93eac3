"""Data-parallel plumbing: collectives for the losses, the DeepSpeed config and engine adapter.

- `all_gather_with_grad`: every rank's rows, with a backward that sums the incoming gradient over ranks
  and hands each rank its own slice. With data-parallel gradient averaging (1/world), this gives exactly
  the gradient of the mean of the ranks' losses, i.e. the single-process loss on the global batch.
- `DistOps`: the loss hooks (`gather_with_grad`, `all_gather`, `all_reduce_sum`) over torch.distributed.
- `deepspeed_config`: the DeepSpeed JSON from the typed config: batch size and accumulation live in one
  place (`loader.batch_size` per rank, `train.grad_accum`), so ZeRO 1/2/3 configs never duplicate numbers.
- `DeepSpeedEngine`: the calls the training loop makes (`__call__`, `backward`, `step() -> bool`,
  checkpoints), answered by a real DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from jepa4rec_dist.config import Config
from jepa4rec_dist.train.engine import linear_schedule


def init_process_group(timeout_s: int, cuda: bool) -> None:
    """Start torch.distributed through DeepSpeed (it reads the launcher's RANK / WORLD_SIZE / MASTER_*).
    The collective timeout turns a dead peer into an error instead of a hang."""
    import datetime

    import deepspeed

    # The shared-memory CPU communication op would be compiled at start-up (~100 s on 2 cores): gloo suffices.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def broadcast_value(value, src: int = 0):
    """A picklable value from `src` to every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank (equal row counts), gradients routed back to their owners."""
    return _AllGatherWithGrad.apply(x)


class DistOps:
    """Collective hooks of the pretraining loss over the default process group."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather_with_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return all_gather_with_grad(x), self.rank * x.shape[0]

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of `x` (equal row counts), in rank order; no gradient (ids, labels)."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x


@dataclass
class OptimSpec:
    """What one engine optimises with. Pretraining takes it from `train`, finetuning from `finetune`."""

    lr: float
    weight_decay: float
    warmup_steps: int
    total_steps: int
    clip_norm: float
    micro_batch: int  # per rank
    grad_accum: int
    zero_stage: int

    @classmethod
    def pretraining(cls, cfg: Config) -> OptimSpec:
        t = cfg.train
        return cls(t.lr, t.weight_decay, t.warmup_steps, t.max_steps, t.clip_norm, cfg.loader.batch_size,
                   t.grad_accum, t.zero_stage)


def merge_config(base: dict, user: dict) -> dict:
    """`user` over `base`: nested dicts merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in user.items():
        out[key] = merge_config(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def user_deepspeed_json(path: str | None) -> dict:
    """The user's DeepSpeed JSON (`train.deepspeed_config`), or {} (errors name the file)."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"train.deepspeed_config: {file} not found")
    try:
        user = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"train.deepspeed_config: {file} is not valid JSON ({exc})") from exc
    if not isinstance(user, dict):
        raise ValueError(f"train.deepspeed_config: {file} must hold a JSON object")
    return user


def engine_options(cfg: Config, dtype: torch.dtype, runtime, output_dir: str | Path) -> dict:
    """DeepSpeedEngine keywords from the config: precision, the user's JSON, where rank 0 writes the merged one."""
    return dict(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                user=user_deepspeed_json(cfg.train.deepspeed_config),
                write_to=Path(output_dir) if runtime.is_main else None)


def deepspeed_config(spec: OptimSpec, world: int, bf16: bool, fp16: bool = False, user: dict | None = None) -> dict:
    """The DeepSpeed JSON generated from the typed config, with the user's own JSON merged over it."""
    ds = {
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch * spec.grad_accum * world,
        "gradient_clipping": spec.clip_norm,
        # torch's AdamW: the same optimizer as the single-process engine; no op build on CPU
        "optimizer": {"type": "AdamW", "params": {"lr": spec.lr, "weight_decay": spec.weight_decay, "torch_adam": True,
                                                  "betas": [0.9, 0.999], "eps": 1e-8}},
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # our logger reports; DeepSpeed's own prints stay off
        "wall_clock_breakdown": False,
    }
    if fp16:  # dynamic loss scaling from 2^16, as torch's GradScaler starts
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if spec.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    return merge_config(ds, user or {})


def universal_checkpoint(tag_dir: Path, names: list[str] | None = None) -> Path:
    """DeepSpeed's universal checkpoint of a checkpoint folder (`<tag_dir>/universal/`): parameters and optimizer
    moments whole, loadable on any world size. A ZeRO checkpoint is converted once by
    `deepspeed.checkpoint.ds_to_universal`; a single-process (`TorchEngine`) one is written in the same layout
    (`names`: the trainable parameters' names in the engine's order)."""
    import subprocess
    import sys

    tag_dir = Path(tag_dir)
    out = tag_dir / "universal"
    if (out / "zero").is_dir() and any(out.glob("*mp_rank_00_model_states.pt")):
        return out
    if (tag_dir / "engine.pt").is_file():
        if names is None:
            raise ValueError(f"{tag_dir}: a single-process checkpoint needs the parameter names to convert")
        return _universal_from_single_process(tag_dir, names)
    if not any(tag_dir.glob("*mp_rank_00_model_states.pt")):
        raise ValueError(f"{tag_dir}: neither a DeepSpeed checkpoint (*mp_rank_00_model_states.pt) nor a "
                         "single-process one (engine.pt)")
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(tag_dir), "--output_folder", str(out), "--num_extract_workers", "1",
                           "--num_merge_workers", "1", "--inject_missing_state"], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"{tag_dir}: conversion to a universal checkpoint failed: {done.stderr[-800:]}")
    return out


def _universal_from_single_process(tag_dir: Path, names: list[str]) -> Path:
    """A `TorchEngine` checkpoint (`engine.pt`) rewritten as DeepSpeed's universal checkpoint: per parameter
    `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, the optimizer's global state (`zero/optimizer_state.pt`, in
    the keys both the ZeRO-1/2 and the ZeRO-3 loaders read) and the engine's counters and lr schedule
    (`mp_rank_00_model_states.pt`). Written to a temporary folder and renamed: a crash leaves no half checkpoint."""
    import shutil

    import deepspeed

    state = torch.load(tag_dir / "engine.pt", map_location="cpu", weights_only=False)
    module, optim = state["module"], state["optimizer"]
    groups = optim["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(names):
        raise ValueError(f"{tag_dir / 'engine.pt'}: {sum(len(g['params']) for g in groups)} optimizer parameters, "
                         f"the model trains {len(names)} (another model?)")
    group = {k: v for k, v in groups[0].items() if k != "params"}
    step = torch.tensor(float(state["global_steps"]))
    tmp = tag_dir / "universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "zero").mkdir(parents=True)
    for index, name in zip(groups[0]["params"], names, strict=True):
        if name not in module:
            raise ValueError(f"{tag_dir / 'engine.pt'}: parameter {name!r} is missing (another model?)")
        moments = optim["state"].get(index, {})
        folder = tmp / "zero" / name
        folder.mkdir()
        weight = module[name].float()
        for kind, value in (("fp32", weight), ("exp_avg", moments.get("exp_avg")),
                            ("exp_avg_sq", moments.get("exp_avg_sq"))):
            value = torch.zeros_like(weight) if value is None else value  # a parameter not yet stepped
            torch.save({"param": value.float().contiguous(), "cat_dim": 0}, folder / f"{kind}.pt")
        torch.save(step, folder / "step.pt")
    # no loss scaler and no clip_grad: the loading engine keeps its own (the single process had no ZeRO optimizer)
    torch.save({"dynamic_loss_scale": False, "overflow": False, "ds_version": deepspeed.__version__,
                "param_groups": [group],
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": [group]}},
               tmp / "zero" / "optimizer_state.pt")
    torch.save({"module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": state["scheduler"],
                "data_sampler": None, "random_ltd": None, "skipped_steps": int(state.get("skipped_steps", 0)),
                "global_steps": int(state["global_steps"]), "dp_world_size": 1, "mp_world_size": 1,
                "ds_version": deepspeed.__version__}, tmp / "mp_rank_00_model_states.pt")
    # ZeRO-3 engines look for the engine state under their own name
    (tmp / "zero_pp_rank_0_mp_rank_00_model_states.pt").hardlink_to(tmp / "mp_rank_00_model_states.pt")
    tmp.rename(tag_dir / "universal")
    return tag_dir / "universal"


def load_universal_into(engine, universal: Path) -> None:
    """A single-process `TorchEngine` from a universal checkpoint: weights, AdamW moments and step, the lr
    schedule and the step counters, as the DeepSpeed engine had them."""
    universal = Path(universal)
    states = torch.load(sorted(universal.glob("*mp_rank_00_model_states.pt"))[0], map_location="cpu",
                        weights_only=False)
    module = engine.module
    if states.get("module"):  # frozen weights and buffers (ZeRO-3 saves partitioned ones empty: left as built)
        own = module.state_dict()
        module.load_state_dict({k: v for k, v in states["module"].items() if k in own and v.shape == own[k].shape},
                               strict=False)
    names = {id(p): n for n, p in module.named_parameters()}
    # the ZeRO-1/2 layout keeps each parameter's step beside it, the ZeRO-3 one in the optimizer's global state
    global_state = universal / "zero" / "optimizer_state.pt"
    shared_step = None
    if global_state.is_file():
        optim = torch.load(global_state, map_location="cpu", weights_only=False).get("optimizer_state_dict") or {}
        shared_step = (optim.get("state") or {}).get(0, {}).get("step")
    for p in engine.params:
        folder = universal / "zero" / names[id(p)]
        if not (folder / "fp32.pt").is_file():
            raise ValueError(f"{folder}: missing from the universal checkpoint (another model?)")

        def load(kind, p=p, folder=folder):
            value = torch.load(folder / f"{kind}.pt", map_location="cpu", weights_only=False)
            return (value["param"] if isinstance(value, dict) else value).view_as(p)  # ZeRO-3: a flat tensor

        with torch.no_grad():
            p.copy_(load("fp32"))
        step = (torch.load(folder / "step.pt", map_location="cpu", weights_only=False)
                if (folder / "step.pt").is_file() else shared_step)
        if step is None:
            raise ValueError(f"{folder}: no optimizer step in the universal checkpoint")
        engine.optimizer.state[p] = {"step": torch.as_tensor(float(step), dtype=torch.float32),
                                     "exp_avg": load("exp_avg").clone(), "exp_avg_sq": load("exp_avg_sq").clone()}
    if states.get("lr_scheduler"):
        engine.scheduler.load_state_dict(states["lr_scheduler"])
        # LambdaLR's state holds the schedule's position, not the optimizer's current lr: set that too
        for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    engine.global_steps = int(states["global_steps"])
    engine.micro_steps = engine.global_steps * engine.grad_accum


class DeepSpeedEngine:
    """A DeepSpeed engine behind the interface of `TorchEngine`."""

    def __init__(self, model: torch.nn.Module, spec: OptimSpec, world: int, bf16: bool, fp16: bool = False,
                 user: dict | None = None, write_to: Path | None = None):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        self.config = deepspeed_config(spec, world, bf16, fp16, user)
        if write_to is not None:  # the JSON the engine got, beside the run's config.yaml (rank 0 passes it)
            Path(write_to).mkdir(parents=True, exist_ok=True)
            (Path(write_to) / "deepspeed_config.json").write_text(json.dumps(self.config, indent=1))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, config=self.config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(spec.warmup_steps, spec.total_steps)),
        )
        self.module = self.engine.module
        self.zero_stage = spec.zero_stage
        if self.zero_stage == 3 and getattr(model, "mlm_head", None) is not None:
            # the MLM decoder is tied to the word embeddings, a parameter of another module: tell ZeRO-3
            deepspeed.zero.register_external_parameter(model.mlm_head, model.encoder.embeddings.word_embeddings.weight)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    @property
    def global_steps(self) -> int:
        return self.engine.global_steps

    def get_lr(self) -> list[float]:
        return self.engine.get_lr()

    def gathered(self, params):
        """Full tensors of (possibly ZeRO-3-partitioned) parameters inside the block."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    def save_checkpoint(self, folder: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(folder), tag=tag)

    def load_checkpoint(self, folder: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise ValueError(f"{folder / tag}: DeepSpeed could not load this checkpoint")
