"""What a training log line adds up: the steps since the last one (a window), reduced over ranks
into TensorBoard scalars: loss per particle, per task and per extra loss term, LR, gradient norm,
the gradient transform's own scalars, throughput and peak memory.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from .distributed import on_gpu
from .plan import peak_flops, train_step_flops
from .report import Reporter, peak_memory_mb


def flops_counter(dims, prompt_length: int, particles_per_example: int, train_tasks: list) -> Callable[[list], float]:
    """The model FLOPs of a step on `picks` [(task, example)]: every example runs under
    particles_per_example particles (M when each particle sees the whole batch, else 1), with
    the prompt's rows in front of its input (plan.train_step_flops)."""
    def flops(picks: list) -> float:
        rows = [(len(train_tasks[k].inputs[i]) + prompt_length, len(train_tasks[k].targets[i])) for k, i in picks]
        return particles_per_example * train_step_flops(dims, rows)
    return flops


def job_peak_flops(world: int) -> Optional[float]:
    """The summed bf16 peak FLOP/s of the job's accelerators (MFU's denominator), when known."""
    if not (on_gpu() and torch.cuda.is_available()):
        return None
    peak = peak_flops(torch.cuda.get_device_name())
    return None if peak is None else peak * world


class TrainLog:
    """flops(picks): the model FLOPs of a step on those examples (plan.train_step_flops), for
    perf/model_tflops_per_s and, with peak (the accelerators' summed peak FLOP/s), perf/mfu."""

    def __init__(self, report: Reporter, train_tasks: list, flops: Optional[Callable[[list], float]] = None,
                 peak: Optional[float] = None):
        self.report, self.train_tasks, self.flops_of, self.peak = report, train_tasks, flops, peak
        self.reset()

    def reset(self) -> None:
        self.stats, self.samples, self.tokens, self.flops = None, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, stats) -> None:
        """A step that was not skipped: its StepStats join the window's."""
        if self.stats is None:
            self.stats = stats
        else:
            self.stats.merge(stats)

    def count(self, picks: list) -> None:
        """Every step, skipped or not: its examples and tokens."""
        tasks = self.train_tasks
        self.samples += len(picks)
        self.tokens += sum(len(tasks[k].inputs[i]) + len(tasks[k].targets[i]) for k, i in picks)
        if self.flops_of is not None:
            self.flops += self.flops_of(picks)

    def write(self, step: int, skipped_total: int, model, stepper) -> Optional[float]:
        """Reduces the window over ranks (collective: every rank calls it; every rank agrees on
        skipped steps, so the window has stats on all ranks or on none), writes its scalars (rank
        0) and starts a new window. Returns the mean loss, or None when every step was skipped."""
        reduced = self.stats.reduced() if self.stats is not None else None
        elapsed = time.perf_counter() - self.start
        r, s = self.report, step
        if r.is_main:
            r.scalar("train/skipped_steps", skipped_total, s)
            if reduced is not None:
                self._losses(s, *reduced)
            transform = stepper.transform
            if transform is not None:
                r.scalars(transform.scalars, s)
            r.scalar("train/lr", model.lr(), s)
            norm = model.grad_norm()
            if norm is not None:
                r.scalar("train/grad_norm", norm, s)
            r.scalar("perf/samples_per_s", self.samples / elapsed, s)
            r.scalar("perf/tokens_per_s", self.tokens / elapsed, s)
            if self.flops:
                r.scalar("perf/model_tflops_per_s", self.flops / elapsed / 1e12, s)
                if self.peak:
                    r.scalar("perf/mfu", self.flops / elapsed / self.peak, s)
            r.scalar("perf/peak_memory_mb", peak_memory_mb(on_gpu()), s)
            if transform is not None:
                # Share of wall time in the gradient transform: all-gathers of θ and G, SVGD or the prior.
                r.scalar("perf/grad_hook_share", stepper.hook_seconds / elapsed, s)
        stepper.hook_seconds = 0.0
        self.reset()
        return None if reduced is None else reduced[0].mean().item()

    def _losses(self, s: int, loss: torch.Tensor, task_loss: torch.Tensor, terms: Optional[dict] = None) -> None:
        r = self.report
        r.scalar("train/loss", loss.mean().item(), s)
        for name, (mean, per_task) in (terms or {}).items():
            r.scalar(f"train/{name}", mean, s)
            for task in self.train_tasks:
                if not torch.isnan(per_task[task.task_id]):
                    r.scalar(f"train/{name}/{task.name}", per_task[task.task_id].item(), s)
        if loss.numel() > 1:
            for m, value in enumerate(loss.tolist()):
                r.scalar(f"train/loss_particle_{m}", value, s)
        if len(self.train_tasks) > 1:
            for task in self.train_tasks:
                if not torch.isnan(task_loss[task.task_id]):  # mpt-distill: a task may sit out a window
                    r.scalar(f"train/loss_task/{task.name}", task_loss[task.task_id].item(), s)
