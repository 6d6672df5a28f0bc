"""MPT's distillation (docs/algorithms.md §3): a shared S and per-task U_k [l, r], V_k [r, d]
(prompt.factors.rank, default 1) distilled from the teachers of an mpt-teachers run; the `target`
stage then adapts the shared prompt.

The student S ∘ (U_k V_k) learns L_PLM + λ (L_logits + L_hidden) from teacher k
(model.DistilledT5), averaged over the global batch's target tokens; the teacher pass runs in
evaluation mode (no dropout), the student's in training mode. Each step draws K' from
[distill.min_tasks, K] and K' tasks (TaskSubsetSampler), sharing the batch equally or in
proportion to their sizes (distill.task_mix). TensorBoard: train/plm,
train/logits_kl, train/hidden_mse (per target token), overall and per task.
"""
from __future__ import annotations

import torch

from ..config import RunConfig
from ..data.batching import TaskSubsetSampler
from ..errors import ConfigError
from ..model import DistilledT5
from ..prompts import load_prompts_file
from .base import Stage, require


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


class MPTDistill(Stage):
    name = "mpt-distill"
    samples_per_task = True

    @classmethod
    def defaults(cls, raw: dict) -> None:
        super().defaults(raw)
        if isinstance(raw.get("prompt", {}), dict) and isinstance(raw.get("prompt", {}).get("factors", {}), dict):
            raw.setdefault("prompt", {}).setdefault("factors", {}).setdefault("rank", 1)  # MPT's rank-one factors

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        super().validate(cfg)
        p, d, di = cfg.prompt, cfg.data, cfg.distill
        require(di.teachers is not None, "stage 'mpt-distill' needs distill.teachers: the output directory "
                                         "(or prompts.safetensors) of an mpt-teachers run")
        require(p.particles == 1, "stage 'mpt-distill' learns one shared prompt: set prompt.particles=1")
        require(p.factors.rank >= 1, "stage 'mpt-distill' learns S ∘ (U_k V_k): prompt.factors.rank must be "
                                     ">= 1 (MPT uses 1)")
        require(2 <= di.min_tasks <= max(2, len(d.tasks)),
                f"config key 'distill.min_tasks' must be in 2..{len(d.tasks)} (the number of data.tasks); "
                f"got {di.min_tasks}")
        require(len(d.tasks) >= 2, "stage 'mpt-distill' mixes at least 2 source tasks per batch: "
                                   "data.tasks needs 2 or more")
        require(cfg.train.global_batch_size >= len(d.tasks),
                f"stage 'mpt-distill': train.global_batch_size ({cfg.train.global_batch_size}) must be at least the "
                f"{len(d.tasks)} tasks of data.tasks, so that every task a step draws gets an example")

    @classmethod
    def input_files(cls, cfg: RunConfig) -> list[str]:
        return super().input_files(cfg) + ([cfg.distill.teachers] if cfg.distill.teachers else [])

    def sampler(self, sizes: list[int], source_length):
        d = self.cfg.distill
        return TaskSubsetSampler(sizes, self.cfg.train.global_batch_size, self.cfg.seed, d.min_tasks,
                                 proportional=d.task_mix == "proportional")

    def read_inputs(self, bank, train_examples: int, init_tensors,
                    train_tokens: int = 0) -> None:
        self.teachers = load_teachers(self.cfg.distill.teachers, self.cfg.data.tasks, bank.length, bank.dim)

    def model(self, backbone, bank) -> DistilledT5:
        table = torch.zeros(len(bank.tasks), bank.length, bank.dim)
        for i, name in enumerate(bank.tasks):
            if name in self.teachers:
                table[i] = self.teachers[name]
        d = self.cfg.distill
        return DistilledT5(backbone, bank, table, d.weight, d.temperature, d.hidden)

    def describe(self, bank) -> list[str]:
        d, k = self.cfg.distill, len(self.cfg.data.tasks)
        return [f"MPT distillation from {d.teachers}: loss = PLM + {d.weight:g} x (KL at temperature "
                f"{d.temperature:g} + hidden MSE ({d.hidden})); K' drawn from [{d.min_tasks}, {k}] tasks per "
                f"step ({d.task_mix} shares); shared prompt {bank.length}x{bank.dim} + rank-{bank.rank} factors for {len(bank.tasks)} "
                "task(s)"]
