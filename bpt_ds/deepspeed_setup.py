"""DeepSpeed for a run: its JSON config resolved against the run config, the memory check, and
deepspeed.initialize with bpt_ds's optimizer (AdamW with per-part learning rates, whose step a
skipped step turns off) and LR schedule. `initialize` returns the DeepSpeedModel that the step,
evaluation and checkpoints share.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from .config import RunConfig
from .distributed import on_gpu, rank, world_size
from .errors import ConfigError
from .plan import THIS_MACHINE, check_run, machine_memory
from .report import line, warn

if TYPE_CHECKING:
    from .model import PromptedT5

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def find_ds_config(name: str) -> Path:
    if name == "auto":
        name = "ds_configs/zero3_bf16.json" if on_gpu() else "ds_configs/cpu_zero3.json"
    for candidate in (Path(name), PROJECT_ROOT / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"deepspeed.config: file '{name}' does not exist; use one of "
                      f"{', '.join(sorted(p.name for p in (PROJECT_ROOT / 'ds_configs').glob('*.json')))} "
                      "in ds_configs/ or your own DeepSpeed JSON")


def resolve_ds_config(cfg: RunConfig, world: int) -> dict:
    """DeepSpeed's own JSON, with batch sizes, clipping and precision filled from the run config.

    Those keys may say "auto" (or be absent) in the JSON; a concrete value that disagrees
    with the run config is an error rather than a silent override. data_types.grad_accum_dtype
    ("auto" or absent) becomes fp32, also under bf16; any other value is refused.
    """
    path = find_ds_config(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: '{path}' is not valid JSON: {e}") from None
    t = cfg.train
    micro = micro_batch_size(t.global_batch_size, t.micro_batch_size, world)
    filled = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.global_batch_size // (micro * world),
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: '{key}' is {ds[key]} but the run config gives {value}; "
                              "set it to \"auto\" in the JSON and choose it under train.*")
        ds[key] = value
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: fp16 is enabled; T5 overflows in fp16. Use model.dtype=bf16 "
                          "(\"bf16\": {\"enabled\": \"auto\"}) or fp32")
    bf16 = ds.setdefault("bf16", {})
    in_json = bf16.get("enabled", "auto")
    if in_json not in ("auto", True, False):
        raise ConfigError(f"{path}: bf16.enabled must be true, false or \"auto\"; got {in_json!r}")
    if cfg.model.dtype == "auto" and in_json != "auto":
        want = bool(in_json)  # the DeepSpeed JSON decides when the run config leaves it open
    else:
        want = model_dtype(cfg) == "bf16"
        if in_json not in ("auto", want):
            raise ConfigError(f"{path}: bf16.enabled is {in_json} but model.dtype is "
                              f"{cfg.model.dtype}; set bf16.enabled to \"auto\" or change model.dtype")
    bf16["enabled"] = want
    # Gradients accumulate over micro-batches (and reach the gradient hook and the fp32 master
    # weights) in fp32; DeepSpeed's default is the model dtype, i.e. bf16 sums under bf16.
    data_types = ds.setdefault("data_types", {})
    if not isinstance(data_types, dict):
        raise ConfigError(f"{path}: data_types must be an object, e.g. {{\"grad_accum_dtype\": \"auto\"}}; "
                          f"got {data_types!r}")
    accum = data_types.get("grad_accum_dtype", "auto")
    if accum not in ("auto", "fp32", "float32", "float", "torch.float32"):
        raise ConfigError(f"{path}: data_types.grad_accum_dtype is {accum!r}; bpt_ds accumulates gradients in "
                          "fp32 (the gradient hook (SVGD, the prior, per-teacher clipping) and the fp32 master "
                          "weights need them unrounded): set it to \"auto\" (or \"fp32\") in the JSON")
    data_types["grad_accum_dtype"] = "fp32"
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if want and stage in (0, "0"):
        # DeepSpeed 0.19 has no fp32 accumulation for bf16 weights without ZeRO: deepspeed.initialize
        # would fail with "unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32".
        raise ConfigError(f"{path}: bf16 without ZeRO (zero_optimization.stage 0 or absent) would accumulate "
                          "gradients in bf16, which bpt_ds does not do; set zero_optimization.stage to 1, 2 or 3 "
                          "(ds_configs/replicated_bf16.json keeps the whole backbone on every GPU with ZeRO-2), "
                          "or train in fp32 (model.dtype=fp32)")
    # The optimizer is ours (torch AdamW with per-part learning rates), which ZeRO accepts
    # only when told so.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    return ds


def micro_batch_size(global_batch: int, micro: Optional[int], world: int) -> int:
    """The per-rank micro-batch: as configured, or the largest divisor of global/world up to 16."""
    if global_batch % world:
        raise ConfigError(f"train.global_batch_size ({global_batch}) must be a multiple of the world "
                          f"size ({world}); e.g. train.global_batch_size={world * max(1, global_batch // world)}")
    per_rank = global_batch // world
    if micro is None:
        return max(m for m in range(1, min(16, per_rank) + 1) if per_rank % m == 0)
    if per_rank % micro:
        raise ConfigError(
            f"train.global_batch_size ({global_batch}) must be a multiple of train.micro_batch_size "
            f"({micro}) x world size ({world}); e.g. train.micro_batch_size={per_rank} (or null for auto)")
    return micro


def model_dtype(cfg: RunConfig) -> str:
    """The dtype model.dtype asks for; "auto" is bf16 on GPUs and fp32 on CPU."""
    if cfg.model.dtype == "auto":
        return "bf16" if on_gpu() else "fp32"
    return cfg.model.dtype


def check_memory(cfg: RunConfig, ds_config: dict, model_path: str, placement: str):
    """The planner's estimate for this run on this hardware (bpt_ds.plan.check_run): raises
    ConfigError when it cannot fit; None with deepspeed.memory_check=false. Host memory is always
    checked: deepspeed.host_memory_gb, else this machine's total. Without a GPU (and without
    deepspeed.device_memory_gb) there is no device: every local rank's states and activations
    are in host memory, and check_run adds them to what loading takes."""
    ds = cfg.deepspeed
    device_memory = None
    if ds.device_memory_gb is not None:
        device_memory = int(ds.device_memory_gb * 2**30)
    elif on_gpu():
        device_memory = get_accelerator().total_memory()
    if ds.host_memory_gb is not None:
        host_memory, source = int(ds.host_memory_gb * 2**30), "deepspeed.host_memory_gb"
    else:
        host_memory, source = machine_memory(), THIS_MACHINE
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size())
    return check_run(cfg, ds_config, model_path, placement, world_size(), local, device_memory, host_memory,
                     source)


def ds_dtype(ds_config: dict) -> str:
    """The dtype a resolved DeepSpeed config trains in (what the backbone must be loaded as)."""
    return "bf16" if ds_config["bf16"]["enabled"] else "fp32"


# -------------------------------------------------------------------- schedule


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor



def schedule_note(t, saved_steps: Optional[int], step: int, before: float, after: float) -> Optional[str]:
    """What a resume at `step` with train.steps other than the checkpoint's (`saved_steps`; None in
    checkpoints that do not record it) does to the LR: the schedule is rebuilt over the new
    train.steps, so the run goes on as a run of that many steps would from this step (the LR
    going from `before`, the old schedule's, to `after`). None when nothing changes."""
    if step >= t.steps or t.schedule == "constant":
        return None
    if saved_steps is None and before == after:
        return None
    if saved_steps is not None and saved_steps == t.steps:
        return None
    what = (f"train.steps {saved_steps} -> {t.steps}: the {t.schedule} learning-rate schedule is rebuilt over "
            f"{t.steps} steps" if saved_steps is not None else
            f"the {t.schedule} learning-rate schedule is rebuilt over train.steps={t.steps} (the checkpoint does not "
            "record the total it was written under)")
    lr = (f"goes from {before:.4g} to {after:.4g}" if before != after else f"stays {after:.4g}")
    return f"{what}; the LR at step {step} {lr} (as in a run of {t.steps} steps) and follows that schedule from there"


class Skippable:
    """An optimizer whose step becomes a no-op while `skip` is set: a step with a non-finite loss,
    gradient or SVGD direction moves neither the prompts nor the optimizer's state."""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


class SkippableAdamW(Skippable, torch.optim.AdamW):
    """torch's AdamW (train.optimizer=adamw)."""


class SkippableSGD(Skippable, torch.optim.SGD):
    """Plain gradient steps, θ -= lr · g (train.optimizer=sgd)."""


class LiuWangStep(torch.optim.Optimizer):
    """The step of Liu & Wang's reference SVGD code:
        h_1 = g_1²,  h_t = α h_{t-1} + (1 - α) g_t²,  θ -= lr · g_t / (ε + √h_t)
    with α = 0.9 and ε = 1e-6 (their `alpha` and `fudge_factor`); g is -φ here."""

    def __init__(self, params, lr: float, alpha: float = 0.9, eps: float = 1e-6):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if "h" not in state:
                    state["h"] = g.square()
                else:
                    state["h"].mul_(group["alpha"]).addcmul_(g, g, value=1 - group["alpha"])
                p.addcdiv_(g, state["h"].sqrt().add_(group["eps"]), value=-group["lr"])
        return None


class SVGDAdagrad(Skippable, LiuWangStep):
    """Liu & Wang's step (train.optimizer=svgd-adagrad)."""


@dataclass
class DeepSpeedModel:
    """The prompted model under DeepSpeed, its optimizer and LR schedule (what `initialize` built)."""

    ds: "deepspeed.DeepSpeedEngine"
    model: "PromptedT5"                    # the module DeepSpeed wraps (ds.module)
    base_optimizer: Skippable
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lr_factor: Callable[[int], float]      # the schedule's factor at a step

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def lr(self) -> float:
        return self.base_optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def follow_schedule(self) -> tuple[float, float]:
        """After a checkpoint loads: sets every group's LR to this run's schedule at the restored
        step. The optimizer state brings back the LR the checkpoint's schedule had for the next
        step; when train.steps changed, that is not this run's (e.g. 0 after a finished linear
        decay), and the scheduler would only correct it after that step. Returns the particles'
        LR (before, after); equal when the schedule is unchanged (the same expression as LambdaLR's,
        so bit for bit)."""
        sched = self.scheduler
        before = self.lr()
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * self.lr_factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
        return before, self.lr()

    def full_trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The fp32 master values of the prompt bank, gathered in full (collective: all ranks call)."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = {}
        for name, param in self.model.bank.named_parameters():
            value = safe_get_full_fp32_param(param)
            if value is None:  # not under a ZeRO optimizer: the parameter is the master copy
                value = param.detach()
            full[name] = value.float().cpu().clone()
        return full

    def destroy(self) -> None:
        self.ds.destroy()


class _DropUntestedOptimizerWarning(logging.Filter):
    """DeepSpeed warns of every optimizer it did not write ("untested optimizer") on every run;
    ours are torch's AdamW and SGD with a skip check, and Liu & Wang's step, all tested here
    (tests/test_optimizers.py), so the line tells the user nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()


def initialize(cfg: RunConfig, model: "PromptedT5", ds_config: dict) -> DeepSpeedModel:
    """deepspeed.initialize of the prompted model: the optimizer (train.optimizer) over the prompt bank (particles at
    train.lr, factors at train.factor_lr), the LR schedule over this run's train.steps (a resume
    with more or fewer steps rebuilds it: follow_schedule), and torch.compile on request."""
    t, bank = cfg.train, model.bank
    groups = [{"params": [bank.particles], "lr": t.lr, "name": "particles"}]
    if bank.rank > 0:
        groups.append({"params": [bank.factor_u, bank.factor_v],
                       "lr": t.factor_lr if t.factor_lr is not None else t.lr, "name": "factors"})
    if t.optimizer == "sgd":
        optimizer = SkippableSGD(groups, lr=t.lr)
    elif t.optimizer == "svgd-adagrad":
        optimizer = SVGDAdagrad(groups, lr=t.lr)
    else:
        optimizer = SkippableAdamW(groups, lr=t.lr, weight_decay=t.weight_decay,
                                   fused=True if t.fused_adamw else None)
    factor = lr_lambda(t.schedule, t.warmup_steps, t.steps)
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropUntestedOptimizerWarning) for f in ds_logger.filters):
        ds_logger.addFilter(_DropUntestedOptimizerWarning())
    ds, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    if cfg.model.compile != "none":
        # torch.compile of the whole prompted model; the first steps (and new input shapes
        # until dynamo marks them dynamic) pay for the compilation.
        if rank() == 0:
            line(f"[bpt_ds] model.compile={cfg.model.compile}: the prompted model runs under torch.compile")
            if ds.zero_optimization_stage() == 3 and not ds.is_deepcompile_enabled():
                warn("under ZeRO-3 the compiled graph breaks at every module (DeepSpeed gathers each "
                     "module's weights outside it); compile pays with a replicated backbone "
                     "(ds_configs/replicated_bf16.json, when python -m bpt_ds.plan says it fits)")
        ds.compile(backend=cfg.model.compile)
    return DeepSpeedModel(ds, model, optimizer, scheduler, factor)
