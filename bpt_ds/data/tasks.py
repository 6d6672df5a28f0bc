"""Where a task's examples come from: the task suite (hub or local files in the hub's columns),
the synthetic generator, or your own {input, target} files; all read through `datasets`.

Every example is {"input": str, "target": str} (QA rows add "answers", MultiRC rows "group");
every task has its kind, verbalized labels, metrics and train / dev ("validation") / test splits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DataConfig, LocalTaskConfig
from .registry import REGISTRY, RowError, few_shot, make_splits
from .synthetic import SYNTHETIC_TASKS, make_examples

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, row and fix."""


@dataclass
class TaskData:
    name: str
    labels: list[str]
    train: list[dict]
    validation: list[dict]   # the dev set: periodic evaluation, early stopping, the reported step
    test: list[dict] = field(default_factory=list)
    kind: str = "classification"          # classification | regression | qa
    metrics: tuple[str, ...] = ("accuracy",)


def check_task_names(cfg: DataConfig) -> None:
    """Fails on an unknown task name before anything expensive starts."""
    for key, names in [("data.tasks", cfg.tasks), ("data.eval_tasks", cfg.eval_tasks or [])]:
        for name in names:
            if name not in cfg.local and name not in REGISTRY and name not in SYNTHETIC_TASKS:
                raise ConfigError(
                    f"unknown task '{name}' in {key}. Suite tasks: {', '.join(REGISTRY)}; synthetic tasks: "
                    f"{', '.join(sorted(SYNTHETIC_TASKS))}; for your own files define "
                    f"data.local.{name}.train / .validation")


def check_data_files(cfg: DataConfig) -> None:
    """data.files names suite tasks, their hub splits and files that exist."""
    for name, splits in cfg.files.items():
        if name not in REGISTRY:
            raise ConfigError(f"data.files.{name}: '{name}' is not a suite task ({', '.join(REGISTRY)}); "
                              f"for your own {{input, target}} files use data.local.{name}")
        spec = REGISTRY[name]
        for split, path in splits.items():
            if split not in spec.hub_splits:
                raise ConfigError(f"data.files.{name}.{split}: {name} reads the hub splits "
                                  f"{', '.join(spec.hub_splits)}; name its files by those")
            if not Path(path).is_file():
                raise ConfigError(f"data.files.{name}.{split}: file '{path}' does not exist")
        missing = [s for s in spec.hub_splits if s not in splits]
        if missing:
            raise ConfigError(f"data.files.{name} lacks {', '.join(missing)}: {name} needs files for the hub "
                              f"splits {', '.join(spec.hub_splits)} (dev and test are made from them)")
    for name, source in cfg.hub.items():
        if name not in REGISTRY:
            raise ConfigError(f"data.hub.{name}: '{name}' is not a suite task ({', '.join(REGISTRY)})")
        if not source.split(":")[0].strip() or source.count(":") > 1:
            raise ConfigError(f"data.hub.{name}: expected 'owner/name' or 'owner/name:config'; got {source!r}")
    if cfg.datasets_dir is not None and not Path(cfg.datasets_dir).is_dir():
        raise ConfigError(f"data.datasets_dir: directory '{cfg.datasets_dir}' does not exist")


def load_task(name: str, cfg: DataConfig, seed: int) -> TaskData:
    if name in cfg.local:
        task = _load_local(name, cfg.local[name])
    elif name in REGISTRY:
        task = _load_suite(name, cfg)
    else:
        spec = SYNTHETIC_TASKS[name]
        task = TaskData(
            name=name,
            labels=list(spec.labels),
            train=make_examples(name, cfg.synthetic_train_examples, seed, "train"),
            validation=make_examples(name, cfg.synthetic_eval_examples, seed, "validation"),
            test=make_examples(name, cfg.synthetic_eval_examples, seed, "test"),
        )
    if cfg.few_shot:
        task.train = few_shot(task.train, cfg.few_shot, seed, by_class=task.kind == "classification")
    return task


def _load_suite(name: str, cfg: DataConfig) -> TaskData:
    spec = REGISTRY[name]
    hub = {split: _suite_rows(spec, split, cfg) for split in spec.hub_splits}
    splits = make_splits(spec, hub, cfg.split_seed)
    return TaskData(name, list(spec.labels), splits["train"], splits["dev"], splits["test"], spec.kind,
                    spec.metrics)


def _suite_rows(spec, split: str, cfg: DataConfig) -> list[dict]:
    """One hub split of a suite task as converted rows, from data.files, data.datasets_dir or the hub."""
    import datasets

    files = cfg.files.get(spec.name)
    path, config = spec.hub
    if spec.name in cfg.hub:
        path, _, other = cfg.hub[spec.name].partition(":")
        config = other or None
    if files:
        where = files[split]
        ds = _read_file(where, f"data.files.{spec.name}.{split}")
    else:
        source = os.path.join(cfg.datasets_dir, path) if cfg.datasets_dir else path
        where = f"{source} ({config or 'default'}, {split})"
        # datasets caches a local copy under its name and config only, so two copies (or an edited
        # one) would share a cache: key the cache by the files' paths, sizes and times instead.
        cache = _local_cache_dir(source) if cfg.datasets_dir else None
        try:
            ds = datasets.load_dataset(source, config, split=split, cache_dir=cache)
        except Exception as e:  # network, missing config or split: all mean "not loadable here"
            raise DataError(
                f"task {spec.name}: could not load {where} with datasets.load_dataset: {e}. Without network, "
                f"give local files in the hub's columns (data.files.{spec.name}.<split>) or a local copy "
                f"of the dataset (data.datasets_dir)") from None
    missing = [c for c in spec.columns if c not in ds.column_names]
    if missing:
        raise DataError(f"{where} has no column {', '.join(repr(c) for c in missing)}, which task {spec.name} "
                        f"reads (the columns of {path}{'/' + config if config else ''}); its columns are: "
                        f"{', '.join(ds.column_names)}")
    if spec.subset is not None:
        ds = ds.filter(lambda s: s == spec.subset, input_columns="subset")
    rows = []
    for i, row in enumerate(ds):
        try:
            rows.append(spec.example(row))
        except RowError as e:
            raise DataError(f"{where}, row {i + 1}: {e}; fix the row (task {spec.name} reads the columns "
                            f"of {path}{'/' + config if config else ''})") from None
    if not rows:
        raise DataError(f"{where}: no rows{' of subset ' + spec.subset if spec.subset else ''}")
    return rows


def _local_cache_dir(directory: str):
    import hashlib

    import datasets

    if not os.path.isdir(directory):
        return None  # load_dataset says what is missing
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(os.path.abspath(directory))):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            digest.update(f"{os.path.join(root, name)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "bpt_ds-local", digest.hexdigest()[:16])


def _read_file(path: str, key: str):
    import datasets

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}: file '{path}' does not exist")
    fmt = FILE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{key}: cannot read '{path}': use one of the suffixes {', '.join(FILE_FORMATS)}")
    try:
        return datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for unparsable files
        raise DataError(f"{key}: '{path}' is not a readable {fmt} file: {e}") from None


def _load_local(name: str, spec: LocalTaskConfig) -> TaskData:
    splits = {}
    for split in ("train", "validation", "test"):
        path = getattr(spec, split)
        splits[split] = read_rows(path, spec, f"data.local.{name}.{split}") if path else []
    labels = spec.labels or sorted({row["target"] for row in splits["train"] or splits["validation"]})
    for split, rows in splits.items():
        for i, row in enumerate(rows):
            if row["target"] not in labels:
                raise DataError(
                    f"{getattr(spec, split)}, row {i + 1}: target {row['target']!r} is not one of "
                    f"data.local.{name}.labels {labels}; add it there or fix the row")
    return TaskData(name, labels, splits["train"], splits["validation"], splits["test"])


def read_rows(path: str, spec: LocalTaskConfig, key: str) -> list[dict]:
    """Reads a JSON/JSONL/CSV/Parquet file through `datasets` into {"input", "target"} rows."""
    ds = _read_file(path, key)
    for column, option in [(spec.input_column, "input_column"), (spec.target_column, "target_column")]:
        if column not in ds.column_names:
            raise DataError(
                f"{key}: '{path}' has no column '{column}' ({key.rsplit('.', 1)[0]}.{option}); "
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
