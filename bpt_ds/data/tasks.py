"""Where a task's examples come from: the task suite (hub or local files in the hub's columns),
the synthetic generator, or your own {input, target} files; all read through `datasets`.

Every example is {"input": str, "target": str} (QA rows add "answers", MultiRC rows "group");
every task has its kind, verbalized labels, metrics and train / dev ("validation") / test splits.
"""
from __future__ import annotations

import codecs
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, DataError  # noqa: F401  (DataError: raised here, importable from here)
from .registry import REGISTRY, RowError, few_shot, make_splits
from .synthetic import SYNTHETIC_TASKS, make_examples

if TYPE_CHECKING:
    from ..config import DataConfig, LocalTaskConfig

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


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
        check_utf8(ds, where)
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
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # datasets raises many types for unparsable files
        # Find the row ourselves: datasets' message has none (or a 0-based one within a block).
        problem = find_bad_row(p, fmt)
        if problem:
            raise DataError(f"{key}: '{path}', {problem}") from None
        raise DataError(f"{key}: '{path}' is not a readable {fmt} file: {_root_cause(e)}") from None
    check_utf8(ds, f"{key}: '{path}'", lambda: find_bad_row(p, fmt))
    return ds


# ------------------------------------------------------------ rows that do not load
# Only called once a file failed to load (or loaded with bytes that are not UTF-8): they read it
# again in Python to name the first bad row. Rows count as `datasets` counts them (JSON Lines:
# objects, blank lines skipped; CSV: records after the header); the line is added when it differs.

_NOT_UTF8 = "is not UTF-8 text; save the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"


def _root_cause(e: BaseException) -> str:
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return str(e) or type(e).__name__


def _at(row: int, line: int) -> str:
    return f"row {row}" if row == line else f"row {row} (line {line})"


def _bad_byte(line: bytes, at: int) -> str:
    return f"byte {at + 1} of the line (0x{line[at]:02x}) {_NOT_UTF8}"


def find_bad_row(path: Path, fmt: str) -> str | None:
    """'row N: what is wrong' for the first row of a JSON/JSONL or CSV file that cannot be read
    (bytes that are not UTF-8, broken or cut-off JSON, an unclosed quote), or None."""
    try:
        if fmt == "json":
            return _bad_json_row(path)
        if fmt == "csv":
            return _bad_csv_row(path)
    except OSError:
        pass
    return None


def _lines(f):
    """(1-based line number, bytes) of a binary file, without a UTF-8 byte order mark."""
    for number, raw in enumerate(f, 1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        yield number, raw


def _bad_json_row(path: Path) -> str | None:
    decoder = json.JSONDecoder()
    kinds = {list: "array", str: "string", bool: "true/false", type(None): "null", int: "number", float: "number"}
    row = 0
    with open(path, "rb") as f:
        for number, raw in _lines(f):
            if row == 0 and raw.strip():
                if not raw.lstrip().startswith(b"{"):
                    return _bad_json_document(path)
                try:
                    _values(decoder, raw.decode("utf-8", "replace"))
                except json.JSONDecodeError:
                    # An object over several lines: a JSON document. A first row that is broken
                    # or cut off on its own line fails on that line either way: a row.
                    if _document_error_line(path) != number:
                        return _bad_json_document(path)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{_at(row + 1, number)}: {_bad_byte(raw, e.start)}"
            try:
                values = _values(decoder, text)
            except json.JSONDecodeError as e:
                done = not raw.endswith(b"\n")  # the last line, cut off before its newline
                return (f"{_at(row + 1, number)}: not valid JSON ({_json_error(e)}); " +
                        ("the file ends inside this row: was it cut off? Fix or remove the row" if done else
                         "each line of a JSON Lines file is one JSON object: fix or remove the row"))
            for value in values:
                row += 1
                if not isinstance(value, dict):
                    return (f"{_at(row, number)}: a JSON {kinds.get(type(value), 'value')} "
                            'where an object {"column": value, ...} was expected; fix or remove the row')
    return None


def _json_error(e: json.JSONDecodeError) -> str:
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} character {e.colno}"  # "Unterminated string starting at"


def _values(decoder: json.JSONDecoder, text: str) -> list:
    """The JSON values on one line (pyarrow reads `{...} {...}` as two rows)."""
    out, pos = [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            return out
        value, pos = decoder.raw_decode(text, pos)
        out.append(value)


def _document_error_line(path: Path) -> int | None:
    """The line where the whole file, read as one JSON document, stops being valid (None: it is valid)."""
    text = path.read_bytes().decode("utf-8", "replace").removeprefix("\ufeff")
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return e.lineno
    return None


def _bad_json_document(path: Path) -> str | None:
    """A .json file that holds one JSON document (an array of rows): the line of its problem."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        start = raw.rfind(b"\n", 0, e.start) + 1
        line = raw.count(b"\n", 0, e.start) + 1
        return f"line {line}: {_bad_byte(raw[start:], e.start - start)}"
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (the file ends there: was it cut off?)" if e.pos >= len(text.rstrip()) else ""
        return f"line {e.lineno}: not valid JSON ({_json_error(e)}){cut}"
    return None


def _bad_csv_row(path: Path) -> str | None:
    bad: dict[int, str] = {}

    def text_lines(f):
        for number, raw in _lines(f):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.setdefault(number, _bad_byte(raw, e.start))
                yield raw.decode("utf-8", "replace")

    with open(path, "rb") as f:
        reader = csv.reader(text_lines(f), strict=True)
        header, row, start = None, 0, 1  # start: the first line of the record being read
        try:
            for record in reader:
                hit = [n for n in bad if start <= n <= reader.line_num]
                if record:  # a blank line is no row (pandas skips it)
                    row += header is not None
                    if hit:
                        where = _at(row, hit[0]) if header is not None else f"the header (line {hit[0]})"
                        return f"{where}: {bad[hit[0]]}"
                    if header is None:
                        header = record
                    elif len(record) > len(header):
                        return (f"{_at(row, start)}: {len(record)} fields, the header has {len(header)}; quote a "
                                'field that holds a comma ("a, b")')
                start = reader.line_num + 1
        except csv.Error as e:
            if "end of data" in str(e):  # strict: EOF inside a quoted field
                where = _at(row + 1, start) if header is not None else f"the header (line {start})"
                return (f"{where}: a quoted field starting here is never closed; the file ends inside it: "
                        "was it cut off?")
    return None


def check_utf8(ds, where: str, locate=None) -> None:
    """pyarrow keeps whatever bytes a JSON or Parquet file holds; a string that is not UTF-8
    only fails when its row is read, deep in a loop. Checked here (one pass in C++), and named."""
    import pyarrow as pa

    table = ds.data.table
    try:
        table.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    problem = locate() if locate else None
    if problem is None:
        for name in table.column_names:
            column = table.column(name)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                continue
            binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
            for i, value in enumerate(column.cast(binary).to_pylist()):
                try:
                    if value is not None:
                        value.decode("utf-8")
                except UnicodeDecodeError as e:
                    problem = (f"row {i + 1}: column '{name}' holds byte 0x{value[e.start]:02x} (byte {e.start + 1} "
                               "of the value), which is not UTF-8 text; write the column as UTF-8")
                    break
            if problem:
                break
    raise DataError(f"{where}, {problem or 'a column holds bytes that are not UTF-8 text; save the file as UTF-8'}")


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
