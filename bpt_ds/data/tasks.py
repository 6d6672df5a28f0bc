"""Where a task's examples come from: the synthetic generator or local files via `datasets`.

Every example is {"input": str, "target": str}; every task has its verbalized labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, DataConfig, LocalTaskConfig
from .synthetic import SYNTHETIC_TASKS, make_examples

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, row and fix."""


@dataclass
class TaskData:
    name: str
    labels: list[str]
    train: list[dict]
    validation: list[dict]


def check_task_names(cfg: DataConfig) -> None:
    """Fails on an unknown task name before anything expensive starts."""
    for key, names in [("data.tasks", cfg.tasks), ("data.eval_tasks", cfg.eval_tasks or [])]:
        for name in names:
            if name not in cfg.local and name not in SYNTHETIC_TASKS:
                raise ConfigError(
                    f"unknown task '{name}' in {key}. Known synthetic tasks: "
                    f"{', '.join(sorted(SYNTHETIC_TASKS))}; for your own files define "
                    f"data.local.{name}.train / .validation")


def load_task(name: str, cfg: DataConfig, seed: int) -> TaskData:
    if name in cfg.local:
        return _load_local(name, cfg.local[name])
    task = SYNTHETIC_TASKS[name]
    return TaskData(
        name=name,
        labels=list(task.labels),
        train=make_examples(name, cfg.synthetic_train_examples, seed, "train"),
        validation=make_examples(name, cfg.synthetic_eval_examples, seed, "validation"),
    )


def _load_local(name: str, spec: LocalTaskConfig) -> TaskData:
    splits = {}
    for split in ("train", "validation"):
        path = getattr(spec, split)
        splits[split] = read_rows(path, spec, f"data.local.{name}.{split}") if path else []
    labels = spec.labels or sorted({row["target"] for row in splits["train"] or splits["validation"]})
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            if row["target"] not in labels:
                raise DataError(
                    f"{getattr(spec, split)}, row {i + 1}: target {row['target']!r} is not one of "
                    f"data.local.{name}.labels {labels}; add it there or fix the row")
    return TaskData(name, labels, splits["train"], splits["validation"])


def read_rows(path: str, spec: LocalTaskConfig, key: str) -> list[dict]:
    """Reads a JSON/JSONL/CSV/Parquet file through `datasets` into {"input", "target"} rows."""
    import datasets

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}: file '{path}' does not exist")
    fmt = FILE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{key}: cannot read '{path}': use one of the suffixes {', '.join(FILE_FORMATS)}")
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for unparsable files
        raise DataError(f"{key}: '{path}' is not a readable {fmt} file: {e}") from None
    for column, field in [(spec.input_column, "input_column"), (spec.target_column, "target_column")]:
        if column not in ds.column_names:
            raise DataError(
                f"{key}: '{path}' has no column '{column}' ({key.rsplit('.', 1)[0]}.{field}); "
                f"its columns are: {', '.join(ds.column_names)}")
    rows = []
    for i, (x, y) in enumerate(zip(ds[spec.input_column], ds[spec.target_column])):
        if not isinstance(x, str) or not x.strip():
            raise DataError(f"{path}, row {i + 1}: column '{spec.input_column}' must be non-empty text; got {x!r}")
        if y is None or isinstance(y, (list, dict)) or (isinstance(y, str) and not y.strip()):
            raise DataError(f"{path}, row {i + 1}: column '{spec.target_column}' must be a label; got {y!r}")
        rows.append({"input": x, "target": str(y)})
    if not rows:
        raise DataError(f"{key}: '{path}' has no rows")
    return rows
