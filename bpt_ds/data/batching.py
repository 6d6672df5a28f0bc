"""Token ids, the deterministic multitask sampler and padded batches.

The sampler is a pure function of (seed, step): resuming at step s replays exactly the
batches an uninterrupted run would have seen, and every rank agrees on the global batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .. import report
from ..likelihood import IGNORE
from .tasks import DataError, TaskData


@dataclass
class EncodedTask:
    name: str
    task_id: int
    labels: list[str]
    inputs: list[list[int]]
    targets: list[list[int]]
    target_index: list[int]          # index into labels of each example's target (none for QA)
    label_ids: list[list[int]]       # token ids of each verbalized label (none for QA)
    kind: str = "classification"     # classification | regression | qa
    metrics: tuple = ("accuracy",)
    rows: list = None                # the examples: gold targets, QA answers, MultiRC groups


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids ending in eos, cut to max_length (keeping eos); returns (ids, truncated count)."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    out, cut = [], 0
    for row in ids:
        if len(row) > max_length:
            row = row[: max_length - 1] + [eos]
            cut += 1
        out.append(row)
    return out, cut


def encode_task(tokenizer, task: TaskData, task_id: int, split: str, max_source_length: int,
                max_target_length: int, warn: Callable[[str], None] = report.warn) -> EncodedTask:
    """split: train, validation (the dev set) or test. warn: says what was truncated (RunData
    passes its reporter's, which speaks on rank 0 only)."""
    rows = getattr(task, split)
    inputs, cut_in = encode_texts(tokenizer, [r["input"] for r in rows], max_source_length)
    if cut_in:
        warn(f"task {task.name} ({split}): {cut_in} of {len(rows)} inputs longer than "
             f"data.max_source_length={max_source_length} were truncated")
    if task.kind == "qa":
        targets, cut_out = encode_texts(tokenizer, [r["target"] for r in rows], max_target_length)
        if cut_out and split == "train":
            warn(f"task {task.name}: {cut_out} of {len(rows)} answers longer than "
                 f"data.max_target_length={max_target_length} were truncated")
        return EncodedTask(task.name, task_id, [], inputs, targets, [], [], task.kind, task.metrics, rows)
    label_ids, cut_lab = encode_texts(tokenizer, task.labels, max_target_length)
    if cut_lab:
        raise DataError(f"task {task.name}: {cut_lab} labels are longer than "
                         f"data.max_target_length={max_target_length}; raise it")
    index = [task.labels.index(r["target"]) for r in rows]
    return EncodedTask(task.name, task_id, task.labels, inputs, [label_ids[i] for i in index],
                       index, label_ids, task.kind, task.metrics, rows)


class MixtureSampler:
    """Examples-proportional mixing over the concatenated training sets.

    Position p of the stream (p = step * global_batch + i) is example perm_e[p mod N] of
    epoch e = p // N, where perm_e is a permutation seeded by (seed, e).
    """

    def __init__(self, sizes: list[int], global_batch: int, seed: int):
        if sum(sizes) == 0:
            raise ValueError("no training examples in any task of data.tasks")
        self.offsets = np.cumsum([0] + sizes)
        self.total = int(self.offsets[-1])
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.total)}
        return self._perms[epoch]

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        """(task index, example index) pairs of the global batch of `step`."""
        out = []
        for p in range(step * self.global_batch, (step + 1) * self.global_batch):
            flat = int(self._perm(p // self.total)[p % self.total])
            task = int(np.searchsorted(self.offsets, flat, side="right") - 1)
            out.append((task, flat - int(self.offsets[task])))
        return out


def collate(tasks: list[EncodedTask], picks: list[tuple[int, int]], pad_id: int) -> dict[str, torch.Tensor]:
    inputs = [tasks[t].inputs[i] for t, i in picks]
    targets = [tasks[t].targets[i] for t, i in picks]
    return {
        "input_ids": _pad(inputs, pad_id),
        "attention_mask": _pad([[1] * len(x) for x in inputs], 0),
        "labels": _pad(targets, IGNORE),
        "task_ids": torch.tensor([tasks[t].task_id for t, _ in picks], dtype=torch.long),
    }


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def pad_candidates(label_ids: list[list[int]]) -> torch.Tensor:
    return _pad(label_ids, IGNORE)


class LengthGroupedSampler:
    """Length-grouped batches over another sampler's stream (data.group_by_length = W).

    The global batches of steps [k·W, (k+1)·W) are pooled, sorted by input length (ties by
    stream position) and cut into W batches of similar lengths, so padding to the longest
    row of a micro-batch wastes little; the W batches go to the W steps in an order seeded by
    (seed, k), and each batch's rows are shuffled (seeded by (seed, k, b)) so that no particle
    block of a batch always gets its shortest rows. Every example is used within the same W
    steps as without grouping, and the batch of a step is still a pure function of
    (seed, step): a resumed run needs no state.
    """

    def __init__(self, base, lengths, window: int, seed: int):
        self.base = base
        self.lengths = lengths          # (task, example) -> input length in tokens
        self.window = window
        self.seed = seed
        self._cache: dict[int, list[list[tuple[int, int]]]] = {}

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        k, w = divmod(step, self.window)
        if k not in self._cache:
            pool = [pair for s in range(k * self.window, (k + 1) * self.window)
                    for pair in self.base.global_batch_at(s)]
            size = len(pool) // self.window
            order = sorted(range(len(pool)), key=lambda j: (self.lengths(pool[j]), j))
            batches = [[pool[j] for j in order[b * size:(b + 1) * size]] for b in range(self.window)]
            for b, batch in enumerate(batches):
                np.random.default_rng([self.seed, 7919, k, b]).shuffle(batch)
            steps = np.random.default_rng([self.seed, 7919, k]).permutation(self.window)
            self._cache = {k: [batches[int(b)] for b in steps]}
        return list(self._cache[k][w])


class TaskBlockSampler:
    """Block k of the global batch comes from task k (stage mpt-teachers: teacher k = particle k
    owns block k, engine.Placement "split"). Block positions p = step·b + i walk task k's own
    epoch permutations, seeded by (seed, k, epoch): a pure function of (seed, step)."""

    def __init__(self, sizes: list[int], global_batch: int, seed: int):
        if any(n == 0 for n in sizes):
            raise ValueError("every task of data.tasks needs training examples")
        if global_batch % len(sizes):
            raise ValueError(f"train.global_batch_size ({global_batch}) must be a multiple of the "
                             f"{len(sizes)} tasks")
        self.sizes, self.block, self.seed = sizes, global_batch // len(sizes), seed
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, task: int, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.sizes):
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, task, epoch]).permutation(self.sizes[task])
        return self._perms[key]

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        out = []
        for task, n in enumerate(self.sizes):
            for p in range(step * self.block, (step + 1) * self.block):
                out.append((task, int(self._perm(task, p // n)[p % n])))
        return out


class TaskSubsetSampler:
    """MPT's multitask batches (stage mpt-distill): each step draws K' uniformly from
    [min_tasks, K], then K' distinct tasks, and fills the global batch with examples drawn from
    them, in equal shares (the first tasks take the remainder) or, proportional, in shares of
    their training-set sizes (largest remainders; every drawn task gets at least one example).
    A pure function of (seed, step)."""

    def __init__(self, sizes: list[int], global_batch: int, seed: int, min_tasks: int = 2,
                 proportional: bool = False):
        if any(n == 0 for n in sizes):
            raise ValueError("every task of data.tasks needs training examples")
        self.sizes, self.global_batch, self.seed = sizes, global_batch, seed
        self.min_tasks = min(min_tasks, len(sizes))
        self.proportional = proportional

    def shares(self, tasks: list[int]) -> list[int]:
        """Examples of the global batch for each of the step's tasks."""
        b, k = self.global_batch, len(tasks)
        if not self.proportional:
            base, extra = divmod(b, k)
            return [base + (j < extra) for j in range(k)]
        # One example each, then the rest by largest remainder of the size shares.
        weights = np.array([self.sizes[t] for t in tasks], dtype=np.float64)
        exact = (b - k) * weights / weights.sum()
        counts = np.floor(exact).astype(int)
        for j in np.argsort(-(exact - counts), kind="stable")[: b - k - counts.sum()]:
            counts[j] += 1
        return [int(c) + 1 for c in counts]

    def tasks_at(self, step: int) -> list[int]:
        rng = np.random.default_rng([self.seed, step, 7])
        k = int(rng.integers(self.min_tasks, len(self.sizes) + 1))
        return sorted(int(t) for t in rng.choice(len(self.sizes), size=k, replace=False))

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        tasks = self.tasks_at(step)
        rng = np.random.default_rng([self.seed, step, 11])
        out = []
        for task, count in zip(tasks, self.shares(tasks)):
            n = self.sizes[task]
            picks = rng.choice(n, size=count, replace=count > n)
            out += [(task, int(i)) for i in picks]
        return out
