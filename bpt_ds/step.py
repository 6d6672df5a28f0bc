"""One optimizer step: which rows and particles a rank runs (Placement), its micro-batches with
their loss weights, the forward/backward passes under DeepSpeed, the one all-reduce that agrees on
skipping a non-finite step or stopping on a signal, and the stage's gradient transform (SVGD, a
prior, per-teacher clipping) applied to the full, reduced gradient before the optimizer.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Protocol

import torch
import torch.distributed as dist

from .config import require_batch_per_particle
from .data.batching import collate
from .distributed import StopFlag, world_size
from .errors import ConfigError

if TYPE_CHECKING:
    from .deepspeed_setup import DeepSpeedModel


class PlacementMode(str, enum.Enum):
    """EVERY: every particle sees the whole global batch (independent prompts); SPLIT: particle m
    owns block m of the global batch (SVGD, MPT's teachers; Placement explains)."""

    EVERY = "every"
    SPLIT = "split"


class LossUnit(str, enum.Enum):
    """What a particle's loss averages over its share of the global batch: TOKEN, its target tokens
    (Hugging Face's and peft's mean token loss); EXAMPLE, its examples, each example's token NLL
    summed (SVGD's likelihood)."""

    TOKEN = "token"
    EXAMPLE = "example"


class SkipReason(str, enum.Enum):
    """Why a step moved nothing: a non-finite loss, gradient or gradient transform (SVGD direction)."""

    LOSS = "loss"
    GRADIENT = "gradient"
    DIRECTION = "direction"

    def describe(self) -> str:
        return {"loss": "loss", "gradient": "gradient of the prompts", "direction": "SVGD direction"}[self.value]


class GradTransform(Protocol):
    """A stage's change to the particles' gradient, once per step: called with the full fp32
    particles θ [M, l, d] and their full reduced gradient G (the same on every rank), it returns the
    gradient the optimizer uses. `scalars`: what its latest call measured, for TensorBoard."""

    scalars: dict[str, float]

    def __call__(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor: ...


@dataclass
class StepStats:
    """Loss sums and their units of one rank, per particle and per task, and per task for each
    extra loss term a model reports (mpt-distill's plm / logits_kl / hidden_mse), for logging.
    A row's loss is summed over its target tokens; its units are its target tokens (per-token
    convention) or 1 (per-example: bmtpt-source), so a reduced mean is the loss the stage
    minimizes: mean token cross-entropy, or mean summed negative log-likelihood per example."""

    particle_sum: torch.Tensor
    particle_units: torch.Tensor
    task_sum: torch.Tensor
    task_units: torch.Tensor
    terms: tuple = ()
    term_sum: Optional[torch.Tensor] = None   # [len(terms), tasks]

    @classmethod
    def zeros(cls, particles: int, tasks: int, device, terms: tuple = ()) -> "StepStats":
        z = lambda *n: torch.zeros(*n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(particles), z(particles), z(tasks), z(tasks), tuple(terms), z(len(terms), tasks))

    def add(self, rows: torch.Tensor, units: torch.Tensor, particles: torch.Tensor, tasks: torch.Tensor,
            extra: Optional[dict] = None) -> None:
        rows, units = rows.double(), units.double()
        self.particle_sum.index_add_(0, particles, rows)
        self.particle_units.index_add_(0, particles, units)
        self.task_sum.index_add_(0, tasks, rows)
        self.task_units.index_add_(0, tasks, units)
        for i, name in enumerate(self.terms):
            self.term_sum[i].index_add_(0, tasks, extra[name].double())

    def merge(self, other: "StepStats") -> None:
        for f in ("particle_sum", "particle_units", "task_sum", "task_units", "term_sum"):
            getattr(self, f).add_(getattr(other, f))

    def reduced(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[float, torch.Tensor]]]:
        """(mean loss per particle, mean loss per task, {term: (mean, mean per task)}) over all
        ranks (collective), per unit; NaN where no rows."""
        packed = torch.cat([self.particle_sum, self.particle_units, self.task_sum, self.task_units,
                            self.term_sum.flatten()])
        if world_size() > 1:
            dist.all_reduce(packed)
        m, t = self.particle_sum.numel(), self.task_sum.numel()
        ps, pr, ts, tr, terms = packed.split([m, m, t, t, len(self.terms) * t])
        nan = torch.tensor(float("nan"), dtype=packed.dtype, device=packed.device)
        per_task = lambda sums: torch.where(tr > 0, sums / tr.clamp(min=1), nan).float().cpu()  # noqa: E731
        out = {name: ((row.sum() / tr.sum().clamp(min=1)).item(), per_task(row))
               for name, row in zip(self.terms, terms.view(len(self.terms), t))}
        return torch.where(pr > 0, ps / pr.clamp(min=1), nan).float().cpu(), per_task(ts), out


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Placement:
    """Which rows of the global batch a rank runs, and under which particle.

    mode "every": every rank runs every particle on its 1/R share of the global batch
    (independent particles, as in stage pt: each particle sees the whole global batch).
    mode "split" (SVGD): the global batch is cut into M consecutive blocks of B/M
    examples, block m belonging to particle m; rank r runs rows [r·B/R, (r+1)·B/R). With
    M a multiple of R a rank holds M/R whole particles; with R a multiple of M, R/M ranks
    share a particle and split its block. The assignment depends on (B, M) only, never on
    R, so 1 rank and R ranks compute the same thing.
    """

    mode: PlacementMode
    particles: int
    world: int
    global_batch: int

    @classmethod
    def make(cls, mode: "PlacementMode | str", particles: int, world: int, global_batch: int) -> "Placement":
        mode = PlacementMode(mode)
        if mode == PlacementMode.SPLIT:
            if particles % world and world % particles:
                fits = sorted({m for m in (world // 2, world, 2 * world, 4 * world) if m >= 1 and
                               (m % world == 0 or world % m == 0)})
                raise ConfigError(
                    f"prompt.particles ({particles}) and the number of ranks ({world}) do not fit: SVGD "
                    f"places whole particles on ranks, so one must be a multiple of the other; e.g. "
                    f"prompt.particles={' or '.join(map(str, fits))}, or launch a number of ranks that "
                    f"divides or is a multiple of {particles}")
            require_batch_per_particle(global_batch, particles)
        return cls(mode, particles, world, global_batch)

    def examples_per_particle(self) -> int:
        return self.global_batch if self.mode == PlacementMode.EVERY else self.global_batch // self.particles

    def rank_rows(self, r: int) -> tuple[int, int]:
        per_rank = self.global_batch // self.world
        return r * per_rank, (r + 1) * per_rank

    def row_particles(self, r: int) -> Optional[torch.Tensor]:
        """The particle of each of rank r's rows (split), or None (every particle on every row)."""
        if self.mode == PlacementMode.EVERY:
            return None
        lo, hi = self.rank_rows(r)
        return torch.arange(lo, hi) // self.examples_per_particle()

    def local_particles(self, r: int) -> list[int]:
        rows = self.row_particles(r)
        return list(range(self.particles)) if rows is None else sorted(set(rows.tolist()))

    @property
    def particles_per_example(self) -> int:
        """How many particles each example of the global batch runs under: all M (every), or its block's one (split)."""
        return self.particles if self.mode == PlacementMode.EVERY else 1

    def row_weight(self, accumulation: int) -> float:
        """R · accumulation: what undoes DeepSpeed's division by the accumulation steps and its
        average over R ranks. train_step divides it by each row's `loss_denominator` (row_weights)."""
        return float(self.world * accumulation)

    def particle_denominators(self, units: torch.Tensor) -> torch.Tensor:
        """For each example of the global batch ([B] units: its target tokens, or 1), the units of
        its particle's share of the global batch: the whole batch ("every"), or its block
        ("split"). Every rank computes the same global batch, so the same counts."""
        if self.mode == PlacementMode.EVERY:
            return units.sum().expand(units.shape[0]).clone()
        e = self.examples_per_particle()
        return units.view(self.particles, e).sum(1).repeat_interleave(e)


def row_weights(mb: dict, row_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pops the micro-batch's `loss_units` and `loss_denominator` (micro_batches) and
    returns (weight of each example's summed loss, its units): row_weight / denominator. With
    Placement.row_weight, each particle's gradient after DeepSpeed's reduction is that of its
    summed loss over its share of the global batch divided by that share's units (target tokens,
    or examples), on any number of ranks and micro-batches."""
    units, denominator = mb.pop("loss_units"), mb.pop("loss_denominator")
    return row_weight / denominator.double(), units


def placement_line(pl: Placement, bank) -> str:
    """Where the particles live: which ranks run which, and whether ZeRO-3 partitions them."""
    shape = "x".join(map(str, bank.shape))
    part = getattr(bank.particles, "ds_tensor", None)
    stored = (f"partitioned by ZeRO-3 ({part.numel():,} of {bank.particles.ds_numel:,} values on rank 0)"
              if part is not None and part.numel() < bank.particles.ds_numel else "stored whole on every rank")
    if pl.mode == "every":
        where = f"every rank runs all {pl.particles} on its share of the batch"
    else:
        where = (f"{pl.examples_per_particle()} examples per particle per step; rank 0 runs particle(s) "
                 f"{pl.local_particles(0)}")
    return f"particles [{shape}]: {where}; {stored}"


def micro_batches(picks: list, placement: Placement, r: int, micro: int, loss_unit: LossUnit,
                  train_tasks: list, pad_id: int) -> list[dict]:
    """Rank r's micro-batches of a step's global batch `picks` [(task, example)].

    Each micro-batch carries `loss_units` (each row's target tokens, or 1 under LossUnit.EXAMPLE)
    and `loss_denominator` (the units of the row's particle in the whole global batch, the same on
    every rank), which row_weights turns into row weights: exact per-token or per-example means on
    any ranks and micro-batches."""
    lo, hi = placement.rank_rows(r)
    row_particles = placement.row_particles(r)
    if LossUnit(loss_unit) == LossUnit.TOKEN:
        units = torch.tensor([len(train_tasks[k].targets[i]) for k, i in picks], dtype=torch.long)
    else:
        units = torch.ones(len(picks), dtype=torch.long)
    denominators = placement.particle_denominators(units)
    mine = picks[lo:hi]
    out = []
    for i in range(0, len(mine), micro):
        batch = collate(train_tasks, mine[i:i + micro], pad_id)
        if row_particles is not None:
            batch["particle_ids"] = row_particles[i:i + micro]
        batch["loss_units"] = units[lo + i:lo + i + micro]
        batch["loss_denominator"] = denominators[lo + i:lo + i + micro]
        out.append(batch)
    return out


def set_full_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Replaces the (reduced) gradient of param by value, the full unpadded tensor that every rank
    computed alike, kept in the accumulation dtype (fp32: no rounding of value).

    Under ZeRO-3 each rank writes its own partition through DeepSpeed's local API. ZeRO-3 pads a
    parameter's partitions to ceil(numel / ranks) values, and DeepSpeed 0.19.8's full-tensor
    setter (safe_set_full_grad -> set_fp32_grad_for_param) cuts the unpadded value at rank x
    partition size: whenever numel does not divide by the ranks, the last rank's cut runs past
    the end ("start (684) + length (342) exceeds dimension size (1024)" for 1,024 values on 3
    ranks). Here the cut stops at numel and the padding is written as zeros, as DeepSpeed's
    reduce-scatter leaves it."""
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

    if not hasattr(param, "ds_id"):
        safe_set_full_grad(param, value)  # ZeRO-1/2 or none: DeepSpeed cuts by fragment address
        return
    flat = value.reshape(-1)
    if flat.numel() != param.ds_numel:
        raise RuntimeError(f"gradient hook returned {flat.numel()} values for a parameter of {param.ds_numel}")
    part = param.ds_tensor.numel()
    group = getattr(param, "ds_process_group", None)
    start = min(flat.numel(), dist.get_rank(group=group) * part if dist.is_initialized() else 0)
    mine = flat[start:start + part]
    if mine.numel() < part:
        mine = torch.cat([mine, mine.new_zeros(part - mine.numel())])
    safe_set_local_grad(param, mine)


class Stepper:
    """Runs optimizer steps of `model` (deepspeed_setup.initialize), applying `transform` (or none)
    to the reduced gradient, and reading `stop` (or no flag) at every step boundary."""

    def __init__(self, model: "DeepSpeedModel", transform: Optional[GradTransform] = None,
                 stop: Optional[StopFlag] = None):
        self.model, self.transform, self.stop = model, transform, stop or StopFlag()
        self.device = model.device
        self.hook_seconds = 0.0  # wall time in the gradient transform (gathers + SVGD), for perf logging
        # Of the latest step: why it was skipped, or None; and whether a rank asked the run to stop
        # (SIGTERM or SIGINT), and which signal: each rank keeps the first it got, and across ranks
        # SIGTERM wins (the all-reduce takes the largest number).
        self.skipped: Optional[SkipReason] = None
        self.stop_requested = False
        self.stop_signal: Optional[int] = None

    def step(self, micro: list[dict], row_weight: float) -> StepStats:
        """One optimizer step over this rank's micro-batches (micro_batches).

        Each row's loss (summed over its target tokens) is multiplied by row_weight divided by
        its micro-batch's `loss_denominator` before backward (row_weights). DeepSpeed divides
        by the accumulation steps and averages over ranks; Placement.row_weight undoes exactly
        that, so the particles' gradient is, row by row, the gradient of each particle's loss
        per unit (target token or example) over its share of the step's global batch.

        The transform runs once per optimizer step, after the last backward (gradients reduced
        over ranks) and before the optimizer (_check_step)."""
        ds, bank = self.model.ds, self.model.model.bank
        ds.train()
        stats = None
        bad_loss = torch.zeros((), device=self.device)
        for mb in micro:
            mb = {k: v.to(self.device) for k, v in mb.items()}
            weights, units = row_weights(mb, row_weight)
            rows, particles, terms = ds(**mb)
            if stats is None:
                stats = StepStats.zeros(bank.num_particles, len(bank.tasks) or 1, self.device, tuple(terms))
            bad_loss = torch.maximum(bad_loss, (~torch.isfinite(rows.detach())).any().float())
            reps = rows.shape[0] // weights.shape[0]  # placement "every": M rows per example
            weights, units = weights.repeat(reps), units.repeat(reps)
            ds.backward((rows * weights.to(rows.dtype)).sum())
            boundary = ds.is_gradient_accumulation_boundary()
            if boundary:
                self.skipped = self._check_step(bad_loss)
                # A skipped step: DeepSpeed still clips and clears the gradients, the optimizer moves nothing.
                self.model.base_optimizer.skip = self.skipped is not None
            skipped_by_deepspeed = ds.skipped_steps
            try:
                ds.step()
            finally:
                self.model.base_optimizer.skip = False
            if boundary and ds.skipped_steps > skipped_by_deepspeed:
                # DeepSpeed's ZeRO optimizers also drop a step whose gradient norm is not finite, and
                # then do not step the schedule; a skipped SVGD direction does. The schedule follows
                # the data steps in both cases.
                self.skipped = self.skipped or SkipReason.GRADIENT
                self.model.scheduler.step()
            stats.add(rows.detach(), units, particles, mb["task_ids"].repeat(reps), terms)
        return stats

    def _check_step(self, bad_loss: torch.Tensor) -> Optional[SkipReason]:
        """At the accumulation boundary, before the optimizer: one all-reduce tells every rank
        whether any rank saw a non-finite loss or gradient, and whether any rank was asked to stop.
        Then the gradient transform runs (SVGD, a prior), and its direction is checked too."""
        flags = torch.stack([bad_loss.float(),
                             torch.tensor(0.0 if self._local_grads_finite() else 1.0, device=self.device),
                             torch.tensor(float(self.stop.signum or 0), device=self.device)])
        if world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss_any, bad_grad_any, stop_any = flags.tolist()
        if stop_any > 0 and not self.stop_requested:
            self.stop_requested, self.stop_signal = True, int(stop_any)
        if bad_loss_any > 0:
            return SkipReason.LOSS
        if bad_grad_any > 0:
            return SkipReason.GRADIENT
        if self.transform is not None:
            started = time.perf_counter()
            finite = self._apply_transform()
            self.hook_seconds += time.perf_counter() - started
            if not finite:
                return SkipReason.DIRECTION
        return None

    def _local_grads_finite(self) -> bool:
        """Whether this rank's share of the trainable gradients is finite (ZeRO-3: its partition;
        otherwise the full gradient, which every rank assembles alike)."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        for param in self.model.model.bank.parameters():
            if not param.requires_grad:
                continue
            grad = safe_get_local_grad(param) if hasattr(param, "ds_id") else safe_get_full_grad(param)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return False
        return True

    def _apply_transform(self) -> bool:
        # DeepSpeed documents these for "modifying partitioned states": after backward, before
        # step. Under ZeRO-3 the getters all-gather the fp32 partitions (gradients: in the
        # accumulation dtype, fp32 by resolve_ds_config); every rank computes the same full
        # tensor and writes back its own partition (set_full_grad).
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        bank = self.model.model.bank
        param = bank.particles
        theta = safe_get_full_fp32_param(param)
        if theta is None:
            theta = param.detach()
        grad = safe_get_full_grad(param)
        if grad is None:
            raise RuntimeError("the particles have no gradient after backward; is the prompt bank frozen?")
        new = self.transform(theta.float().reshape(bank.shape), grad.float().reshape(bank.shape))
        # Every rank computes the same direction; the all-reduce only makes the verdict certain.
        bad = torch.tensor(0.0 if bool(torch.isfinite(new).all()) else 1.0, device=self.device)
        if world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            return False
        set_full_grad(param, new.to(torch.float32).reshape(grad.shape))
        return True
