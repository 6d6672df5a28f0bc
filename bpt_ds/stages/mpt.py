"""MPT (algorithms.md §3): teacher prompts, then a shared prompt with rank-one task factors
distilled from them; the `target` stage (bmtpt.Target) adapts the shared prompt.

Stage `mpt-teachers`: one prompt per source task by vanilla prompt tuning, all K in one run as
K particles: particle k is task k's teacher and owns block k of the global batch, drawn from
task k (engine.Placement "split", TaskBlockSampler), so each teacher's gradient is that of its
own task's loss (token cross-entropy averaged over its block's target tokens), whatever the
ranks, and each is clipped by its own norm
(train.max_grad_norm, in the gradient hook; DeepSpeed's joint clipping is off), so a teacher
trains as it would alone. A rank runs its teachers in one forward pass; each task is
evaluated under its own teacher. prompts.safetensors holds `teacher.<task>` [l, d] per
task (and `particles` [K, l, d] in data.tasks order).

Stage `mpt-distill`: a shared S and per-task U_k [l, r], V_k [r, d] (prompt.factors.rank,
default 1); the student S ∘ (U_k V_k) learns L_PLM + λ (L_logits + L_hidden) from teacher k
(model.DistilledT5), averaged over the global batch's target tokens; the teacher pass runs in
evaluation mode (no dropout), the student's in training mode. Each step draws K' from
[distill.min_tasks, K] and K' tasks (TaskSubsetSampler). TensorBoard: train/plm,
train/logits_kl, train/hidden_mse (per target token), overall and per task.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..data.batching import TaskBlockSampler, TaskSubsetSampler
from ..model import DistilledT5
from ..prompts import load_prompts_file
from .prompt_tuning import PromptTuning


def check_teacher_world(cfg, world: int) -> None:
    """K teachers sit whole on ranks: K and the number of ranks must divide one another."""
    k = cfg.prompt.particles
    if k % world and world % k:
        fits = sorted({r for r in range(1, 4 * k + 1) if k % r == 0 or r % k == 0} - {world})
        raise ConfigError(f"stage 'mpt-teachers': its {k} teachers (one per task of data.tasks) are placed whole "
                          f"on ranks, so {k} and the number of ranks ({world}) must divide one another; launch "
                          f"{' or '.join(map(str, fits[:6]))} ranks")


class MPTTeachers(PromptTuning):
    placement_mode = "split"
    # The K particles are K tasks' teachers, not samples of one posterior: each task is scored
    # under its own teacher (bank.task_particles), never their ensemble.
    eval_ensemble = False

    @classmethod
    def placement_for(cls, cfg, world: int):
        check_teacher_world(cfg, world)  # the general message would suggest other particle counts
        return super().placement_for(cfg, world)

    def adjust_ds_config(self, ds_config: dict) -> None:
        # Clipping all teachers by their joint norm would couple K independent runs: clip each
        # teacher's gradient by its own norm in the hook instead.
        ds_config["gradient_clipping"] = 0.0

    def grad_hook(self):
        limit = self.cfg.train.max_grad_norm
        self.last: dict[str, float] = {}
        if limit <= 0:
            return None

        def hook(theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            norms = grad.flatten(1).norm(dim=1)
            self.last = {f"train/grad_norm_teacher/{name}": norms[k].item()
                         for k, name in enumerate(self.cfg.data.tasks)}
            scale = (limit / (norms + 1e-6)).clamp(max=1.0)
            return grad * scale[:, None, None]

        return hook

    def extra_scalars(self) -> dict[str, float]:
        return dict(self.last)

    def make_sampler(self, sizes: list[int]):
        return TaskBlockSampler(sizes, self.cfg.train.global_batch_size, self.cfg.seed)

    def after_init(self, bank) -> None:
        bank.task_particles = True

    def prepare(self) -> None:
        names = ", ".join(f"{k}: {name}" for k, name in enumerate(self.cfg.data.tasks))
        self._info(f"MPT teachers: one prompt per task as particles ({names}); "
                   f"{self.placement.examples_per_particle()} examples per teacher per step")

    def exported(self, tensors: dict) -> dict:
        out = dict(tensors)
        for k, name in enumerate(self.cfg.data.tasks):
            out[f"teacher.{name}"] = tensors["particles"][k].clone()
        return out


def load_teachers(path: str, tasks: list[str], length: int, dim: int) -> dict[str, torch.Tensor]:
    """teacher.<task> [l, d] for every task, from an mpt-teachers run; errors name the file and fix."""
    tensors = load_prompts_file(path, key="distill.teachers")
    have = sorted(k[len("teacher."):] for k in tensors if k.startswith("teacher."))
    missing = [t for t in tasks if t not in have]
    if missing:
        raise ConfigError(f"distill.teachers: {path} has no teacher prompt for {', '.join(missing)} (it has: "
                          f"{', '.join(have) or 'none; is it an mpt-teachers run?'}); train teachers for every "
                          "task of data.tasks")
    out = {}
    for t in tasks:
        p = tensors[f"teacher.{t}"]
        if tuple(p.shape) != (length, dim):
            raise ConfigError(f"distill.teachers: {path}: teacher.{t} has shape {tuple(p.shape)}, this run needs "
                              f"[{length}, {dim}] (prompt.length x the backbone's d_model)")
        out[t] = p.float()
    return out


class MPTDistill(PromptTuning):
    def check_inputs(self, bank) -> None:
        self.teachers = load_teachers(self.cfg.distill.teachers, self.cfg.data.tasks, bank.length, bank.dim)

    def make_sampler(self, sizes: list[int]):
        return TaskSubsetSampler(sizes, self.cfg.train.global_batch_size, self.cfg.seed, self.cfg.distill.min_tasks)

    def make_model(self, backbone, bank) -> DistilledT5:
        table = torch.zeros(len(bank.tasks), bank.length, bank.dim)
        for i, name in enumerate(bank.tasks):
            if name in self.teachers:
                table[i] = self.teachers[name]
        d = self.cfg.distill
        return DistilledT5(backbone, bank, table, d.weight, d.temperature, d.hidden)

    def prepare(self) -> None:
        d, bank = self.cfg.distill, self.engine.model.bank
        k = len(self.cfg.data.tasks)
        self._info(f"MPT distillation from {d.teachers}: loss = PLM + {d.weight:g} x (KL at temperature "
                   f"{d.temperature:g} + hidden MSE ({d.hidden})); K' drawn from [{d.min_tasks}, {k}] tasks per "
                   f"step; shared prompt {bank.length}x{bank.dim} + rank-{bank.rank} factors for {len(bank.tasks)} "
                   f"task(s)")
