"""Property-based tests (hypothesis) of bad input: config overrides, data rows and prompt files.
Whatever is thrown at them, the outcome is a run config, rows, or a prompt bank, or bpt_ds's
own error naming the key or the file; never an exception from deep inside yaml, datasets,
safetensors or torch."""
from __future__ import annotations

import json
import math
import uuid

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import AutoTokenizer

from bpt_ds.config import DataConfig, LocalTaskConfig, RunConfig, to_dict
from bpt_ds.errors import ConfigError
from bpt_ds.runs import load_config
from bpt_ds.data.batching import encode_task
from bpt_ds.data.tasks import DataError, load_task
from bpt_ds.prompts import PromptBank, load_prompts_file

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


KEYS = flat_keys(to_dict(RunConfig()))

# What a user may type after `key=`: numbers, words, YAML's specials, broken YAML, anything.
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([".nan", ".inf", "-.inf", "null", "~", "[]", "{}", "[1, 2]", "[a, b]", "true", "no", "''",
                     "[", "{a: ", "a: b", "- x", "!!python/object:os.system ls", "&a [*a]", "0x1F", "1e999",
                     "polarity", "auto", "file", "[polarity, nosuchtask]", "[]"]),
    st.text(max_size=40),
)


def typo(key: str, data) -> str:
    head, _, last = key.rpartition(".")
    i = data.draw(st.integers(0, len(last) - 1))
    changed = last[:i] + data.draw(st.sampled_from("xz_")) + last[i + 1:]
    return f"{head}.{changed}" if head else changed


@settings(max_examples=250, **SETTINGS)
@given(st.data())
def test_any_override_gives_a_config_or_an_error_naming_the_key(data):
    key = data.draw(st.sampled_from(KEYS))
    if data.draw(st.booleans()) and data.draw(st.booleans()):
        key = typo(key, data)
    value = data.draw(VALUES)
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError as e:
        event("refused")
        assert key in str(e), str(e)
        return
    event("accepted")
    assert isinstance(cfg, RunConfig)
    assert key in KEYS  # an unknown key never passes


# ----------------------------------------------------------------------------- data rows

TEXT = st.one_of(st.text(max_size=30), st.just(""), st.just("   "), st.text(min_size=2000, max_size=3000))
CELL = st.one_of(TEXT, st.integers(-5, 5), st.floats(allow_nan=True), st.none(), st.booleans(),
                 st.lists(st.integers(0, 3), max_size=2), st.sampled_from(["good", "bad"]))
GOOD_ROW = st.fixed_dictionaries({"input": st.text(min_size=1, max_size=30).filter(str.strip),
                                  "target": st.sampled_from(["good", "bad"])})
ANY_ROW = st.dictionaries(st.sampled_from(["input", "target", "extra", "Input"]), CELL, max_size=4)
# Mostly good rows, so that files that load are drawn as well as files that do not.
ROW = st.one_of(GOOD_ROW, GOOD_ROW, GOOD_ROW, GOOD_ROW, ANY_ROW)


@pytest.fixture(scope="module")
def tokenizer(tiny_backbone_path):
    return AutoTokenizer.from_pretrained(tiny_backbone_path)


@settings(max_examples=60, **SETTINGS)
@given(rows=st.lists(ROW, max_size=6), raw=st.one_of(st.none(), st.none(), st.binary(min_size=1, max_size=40)),
       fmt=st.sampled_from(["jsonl", "csv"]))
def test_any_data_file_gives_rows_or_an_error_naming_the_file(tmp_path, tokenizer, rows, raw, fmt):
    path = tmp_path / f"{uuid.uuid4().hex}.{fmt}"
    if fmt == "jsonl":
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows).encode()
    else:
        columns = sorted({k for r in rows for k in r})
        text = (",".join(columns) + "\n" + "".join(
            ",".join(json.dumps(r.get(c, ""), allow_nan=True) for c in columns) + "\n" for r in rows)).encode() \
            if columns else b""
    # Bytes that are not UTF-8 (or anything else) in the middle of the file.
    path.write_bytes(text[: len(text) // 2] + (raw or b"") + text[len(text) // 2:])
    cfg = DataConfig(tasks=["mine"], local={"mine": LocalTaskConfig(train=str(path), validation=str(path))})
    try:
        task = load_task("mine", cfg, seed=0)
    except (DataError, ConfigError) as e:
        event("refused")
        assert path.name in str(e), str(e)
        return
    event("loaded")
    assert task.train and all(isinstance(r["input"], str) and r["input"].strip() for r in task.train)
    assert all(r["target"] in task.labels for r in task.train + task.validation)
    try:
        encoded = encode_task(tokenizer, task, 0, "train", 64, 8)
    except DataError as e:
        assert str(e).startswith("task mine: ") and "data.max_target_length" in str(e)
        return
    assert all(len(ids) <= 64 for ids in encoded.inputs)  # very long rows are cut, not fatal


@settings(max_examples=40, **SETTINGS)
@given(rows=st.lists(GOOD_ROW, min_size=1, max_size=8), data=st.data(), fmt=st.sampled_from(["jsonl", "csv"]),
       fault=st.sampled_from(["latin-1", "cut"]), blank=st.booleans())
def test_a_non_utf8_byte_or_a_cut_off_last_row_is_named_by_its_row(tmp_path, rows, data, fmt, fault, blank):
    """The row a DataError names is the row that holds the Latin-1 byte, or the cut-off last row."""
    bad = data.draw(st.integers(0, len(rows) - 1)) if fault == "latin-1" else len(rows) - 1
    if fmt == "jsonl":
        lines = [json.dumps({"input": r["input"], "target": r["target"]}).encode() for r in rows]
        head = b'{"input": "'
    else:
        quoted = lambda text: '"' + text.replace('"', '""') + '"'  # noqa: E731  (CSV's quoting)
        lines = [b"input,target"] + [(quoted(r["input"]) + "," + r["target"]).encode() for r in rows]
        head = b'"'
    rows_at = [k + (fmt == "csv") for k in range(len(rows))]  # 0-based line of each row
    i = rows_at[bad]
    if fault == "latin-1":
        lines[i] = lines[i][:len(head)] + b"\xe9" + lines[i][len(head):]  # inside the input text
    if blank:  # a blank line after the first (or before a lone JSON row): not a row
        at = 1 if len(lines) > 1 else 0
        lines.insert(at, b"")
        rows_at = [k + (k >= at) for k in rows_at]
    text = b"\n".join(lines) + b"\n"
    starts = [sum(len(x) + 1 for x in lines[:k]) for k in rows_at]  # where each row starts in text
    line = text[:starts[bad]].count(b"\n") + 1  # (a CSV field may hold a newline)
    if fault == "cut":  # inside the last row's input text (CSV: an unclosed quote)
        text = text[:starts[-1] + len(head)]
    path = tmp_path / f"{uuid.uuid4().hex}.{fmt}"
    path.write_bytes(text)
    cfg = DataConfig(tasks=["mine"], local={"mine": LocalTaskConfig(train=str(path))})
    with pytest.raises(DataError) as e:
        load_task("mine", cfg, seed=0)
    where = f"row {bad + 1}" if line == bad + 1 else f"row {bad + 1} (line {line})"
    assert str(e.value).startswith(f"data.local.mine.train: '{path}', {where}: "), str(e.value)
    assert {("jsonl", "latin-1"): "byte 12 of the line (0xe9) is not UTF-8", ("jsonl", "cut"): "not valid JSON",
            ("csv", "latin-1"): "byte 2 of the line (0xe9) is not UTF-8", ("csv", "cut"): "is never closed",
            }[fmt, fault] in str(e.value)


@settings(max_examples=10, **SETTINGS)
@given(st.sampled_from(["missing.jsonl", "empty.jsonl", "empty.csv", "data.txt", "dir.jsonl"]))
def test_missing_empty_and_unreadable_files(tmp_path, name):
    path = tmp_path / name
    if name.startswith("empty"):
        path.write_bytes(b"")
    elif name == "data.txt":
        path.write_text("input,target\nx,y\n")
    elif name == "dir.jsonl":
        path.mkdir(exist_ok=True)
    cfg = DataConfig(tasks=["mine"], local={"mine": LocalTaskConfig(train=str(path))})
    with pytest.raises(DataError) as e:
        load_task("mine", cfg, seed=0)
    assert str(path) in str(e.value)


# -------------------------------------------------------------------------- prompt files

DIMS = st.sampled_from([1, 2, 3, 4])


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), m=DIMS, length=DIMS, key=st.sampled_from(["particles", "particles", "particles", "prompt"]),
       poison=st.sampled_from([None, None, None, math.nan, math.inf]), pick=st.one_of(st.none(), st.integers(-1, 5)))
def test_any_source_prompt_file_fits_the_run_or_is_refused_by_name(tmp_path, data, m, length, key, poison, pick):
    # Source artifacts [M, l, d]: mostly of this run's l and d, or any shape at all.
    shape = data.draw(st.one_of(DIMS.map(lambda f: [f, length, 128]), DIMS.map(lambda f: [f, length, 128]),
                                st.lists(st.integers(0, 5), max_size=4).map(lambda s: s[:-1] + [64] if s else s)))
    values = torch.randn(shape) if shape else torch.tensor(1.0)
    if poison is not None and values.numel():
        values.view(-1)[0] = poison
    path = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    save_file({key: values.contiguous()}, str(path))
    bank = PromptBank(m, length, 128)
    before = bank.particles.detach().clone()
    try:
        bank.load_tensors(load_prompts_file(path), str(path), pick=pick)
    except ValueError as e:
        event("refused")
        assert str(e).startswith(str(path)), str(e)
        assert torch.equal(bank.particles.detach(), before)  # nothing half-loaded
        return
    event("loaded")
    assert values.dim() == 3 and values.shape[1:] == (length, 128) and torch.isfinite(values).all()
    assert torch.isfinite(bank.particles).all()


@settings(max_examples=20, **SETTINGS)
@given(st.binary(max_size=200))
def test_a_prompt_file_that_is_not_safetensors_is_refused_by_name(tmp_path, junk):
    path = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    path.write_bytes(junk)
    with pytest.raises(ValueError) as e:
        load_prompts_file(path)
    assert str(e.value).startswith(f"prompt.init_file: '{path}' is not a safetensors file")

