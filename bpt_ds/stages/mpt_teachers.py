"""MPT's teachers (docs/algorithms.md §3): one prompt per source task by vanilla prompt tuning, all K
in one run as K particles.

Particle k is task k's teacher and owns block k of the global batch, drawn from task k
(step.Placement SPLIT, TaskBlockSampler), so each teacher's gradient is that of its own task's
loss (token cross-entropy averaged over its block's target tokens), whatever the ranks, and each
is clipped by its own norm (train.max_grad_norm, in the gradient transform; DeepSpeed's joint
clipping is off), so a teacher trains as it would alone. A rank runs its teachers in one forward
pass; each task is evaluated under its own teacher. prompts.safetensors holds `teacher.<task>`
[l, d] per task (and `particles` [K, l, d] in data.tasks order).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import RunConfig, require_batch_per_particle
from ..data.batching import TaskBlockSampler
from ..errors import ConfigError
from ..step import Placement, PlacementMode
from .base import Stage, require


class PerTeacherClipping:
    """The gradient transform: each teacher's gradient clipped by its own norm (step.GradTransform)."""

    def __init__(self, limit: float, tasks: list[str]):
        self.limit, self.tasks = limit, tasks
        self.scalars: dict[str, float] = {}

    def __call__(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        norms = grad.flatten(1).norm(dim=1)
        self.scalars = {f"train/grad_norm_teacher/{name}": norms[k].item() for k, name in enumerate(self.tasks)}
        scale = (self.limit / (norms + 1e-6)).clamp(max=1.0)
        return grad * scale[:, None, None]


class MPTTeachers(Stage):
    name = "mpt-teachers"
    placement_mode = PlacementMode.SPLIT
    # The K particles are K tasks' teachers, not samples of one posterior: each task is scored
    # under its own teacher (bank.task_particles), never their ensemble.
    eval_ensemble = False
    # Clipping all teachers by their joint norm would couple K independent runs: each teacher's
    # gradient is clipped by its own norm in the transform instead.
    clip_jointly = False
    samples_per_task = True

    @classmethod
    def defaults(cls, raw: dict) -> None:
        super().defaults(raw)
        if isinstance(raw.get("prompt", {}), dict) and isinstance(raw.get("data", {}), dict) \
                and isinstance(raw.get("data", {}).get("tasks"), list):
            raw.setdefault("prompt", {}).setdefault("particles", len(raw["data"]["tasks"]))  # one teacher per task

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        super().validate(cfg)
        p, d = cfg.prompt, cfg.data
        require(p.particles == len(d.tasks),
                f"stage 'mpt-teachers' trains one teacher prompt per task of data.tasks ({len(d.tasks)}) as "
                f"particles: set prompt.particles={len(d.tasks)} (or leave it unset)")
        require(len(set(d.tasks)) == len(d.tasks), "stage 'mpt-teachers': data.tasks names a task twice")
        require(p.factors.rank == 0, "stage 'mpt-teachers' trains plain prompts: set prompt.factors.rank=0")
        require(all(n in d.tasks for n in d.eval_tasks or []),
                "stage 'mpt-teachers' evaluates each teacher on its own task: data.eval_tasks must be "
                "among data.tasks (or unset)")
        require_batch_per_particle(cfg.train.global_batch_size, p.particles)

    @classmethod
    def placement(cls, cfg: RunConfig, world: int) -> Placement:
        # K teachers sit whole on ranks: K and the number of ranks must divide one another (the
        # general message would suggest other particle counts).
        k = cfg.prompt.particles
        if k % world and world % k:
            fits = sorted({r for r in range(1, 4 * k + 1) if k % r == 0 or r % k == 0} - {world})
            raise ConfigError(f"stage 'mpt-teachers': its {k} teachers (one per task of data.tasks) are placed "
                              f"whole on ranks, so {k} and the number of ranks ({world}) must divide one another; "
                              f"launch {' or '.join(map(str, fits[:6]))} ranks")
        return super().placement(cfg, world)

    def sampler(self, sizes: list[int], source_length):
        return TaskBlockSampler(sizes, self.cfg.train.global_batch_size, self.cfg.seed)

    def init_bank(self, bank) -> list[str]:
        bank.task_particles = True
        return []

    def grad_transform(self, device) -> Optional[PerTeacherClipping]:
        limit = self.cfg.train.max_grad_norm
        return PerTeacherClipping(limit, list(self.cfg.data.tasks)) if limit > 0 else None

    def describe(self, bank) -> list[str]:
        names = ", ".join(f"{k}: {name}" for k, name in enumerate(self.cfg.data.tasks))
        per = self.cfg.train.global_batch_size // self.cfg.prompt.particles
        return [f"MPT teachers: one prompt per task as particles ({names}); {per} examples per teacher per step"]

    def exported(self, tensors: dict) -> dict:
        out = dict(tensors)
        for k, name in enumerate(self.cfg.data.tasks):
            out[f"teacher.{name}"] = tensors["particles"][k].clone()
        return out
