"""A run's tasks: every task's rows loaded and checked (before the backbone loads), then their
splits tokenized, in the order the prompt bank numbers tasks (data.tasks, then data.eval_tasks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import DataError
from .batching import EncodedTask, encode_task
from .tasks import TaskData, load_task

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class RunData:
    raw: dict[str, TaskData]
    train_names: list[str]
    eval_names: list[str]
    task_names: list[str]             # the bank's task order
    train_tasks: list[EncodedTask] = field(default_factory=list)
    eval_tasks: list[EncodedTask] = field(default_factory=list)   # dev
    test_tasks: list[EncodedTask] = field(default_factory=list)

    @classmethod
    def load(cls, cfg: "RunConfig", say: Callable[[str], None]) -> "RunData":
        """Every task's rows, checked (a DataError names the key to set), and one line per task."""
        train_names = cfg.data.tasks
        eval_names = cfg.data.eval_tasks or train_names
        task_names = list(dict.fromkeys(train_names + eval_names))
        raw = {name: load_task(name, cfg.data, cfg.seed) for name in task_names}
        for name in train_names:
            if not raw[name].train:
                raise DataError(f"task {name} is in data.tasks but has no training rows; set data.local.{name}.train")
        for name in eval_names:
            if not raw[name].validation and cfg.train.eval_every:
                raise DataError(f"task {name} is evaluated but has no validation (dev) rows; set "
                                f"data.local.{name}.validation, or train.eval_every=0")
        if cfg.data.max_eval_examples:
            for name in eval_names:
                raw[name].validation = raw[name].validation[:cfg.data.max_eval_examples]
                raw[name].test = raw[name].test[:cfg.data.max_eval_examples]
        k = cfg.data.few_shot
        for name in task_names:
            t = raw[name]
            shots = (f" (few-shot: {k} {'per class' if t.kind == 'classification' else 'in all'}, seed {cfg.seed})"
                     if k and name in train_names else "")
            say(f"task {name} ({t.kind}, {', '.join(t.metrics)}): {len(t.train)} train{shots} / "
                f"{len(t.validation)} dev / {len(t.test)} test examples")
        return cls(raw, list(train_names), list(eval_names), task_names)

    @property
    def train_examples(self) -> int:
        """Σ of the training tasks' sizes."""
        return sum(len(self.raw[n].train) for n in self.train_names)

    def encode(self, tokenizer, max_source_length: int, max_target_length: int,
               warn: Callable[[str], None]) -> None:
        """Token ids of every split (warn: says what was truncated). A task without dev rows
        (allowed when train.eval_every=0) is not evaluated; the test rows of a task are scored
        whenever the mean dev score improves."""
        raw = self.raw

        def encode(name: str, split: str) -> EncodedTask:
            return encode_task(tokenizer, raw[name], self.task_names.index(name), split,
                               max_source_length, max_target_length, warn)

        self.train_tasks = [encode(n, "train") for n in self.train_names]
        self.eval_tasks = [encode(n, "validation") for n in self.eval_names if raw[n].validation]
        self.test_tasks = [encode(n, "test") for n in self.eval_names if raw[n].validation and raw[n].test]
