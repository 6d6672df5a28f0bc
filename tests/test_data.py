"""Local data files through `datasets`, their errors, tokenization and the sampler."""
from __future__ import annotations

import json

import pytest

from bpt_ds.errors import ConfigError
from bpt_ds.runs import load_config
from bpt_ds.data.batching import MixtureSampler, collate, encode_task, encode_texts
from bpt_ds.data.tasks import DataError, load_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_cfg(tmp_path, **local):
    overrides = [f"data.local.mine.{k}={v}" for k, v in local.items()] + ["data.tasks=[mine]"]
    return load_config(None, overrides).data


def test_json_csv_and_parquet_give_the_same_rows(tmp_path):
    import pandas as pd

    rows = [{"text": "good day", "label": 1}, {"text": "bad day", "label": 0}, {"text": "fine", "label": 1}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    loaded = []
    for name in ("t.jsonl", "t.csv", "t.parquet"):
        cfg = data_cfg(tmp_path, train=tmp_path / name, input_column="text", target_column="label")
        loaded.append(load_task("mine", cfg, seed=0))
    for task in loaded:
        assert task.labels == ["0", "1"]
        assert task.train == [{"input": "good day", "target": "1"}, {"input": "bad day", "target": "0"},
                              {"input": "fine", "target": "1"}]


def test_missing_file_column_and_malformed_rows(tmp_path):
    cfg = data_cfg(tmp_path, train=tmp_path / "none.jsonl")
    with pytest.raises(DataError) as e:
        load_task("mine", cfg, 0)
    assert str(e.value) == f"data.local.mine.train: file '{tmp_path / 'none.jsonl'}' does not exist"

    f = write_jsonl(tmp_path / "a.jsonl", [{"sentence": "x", "target": "y"}])
    with pytest.raises(DataError) as e:
        load_task("mine", data_cfg(tmp_path, train=f), 0)
    assert str(e.value) == (f"data.local.mine.train: '{f}' has no column 'input' (data.local.mine.input_column); "
                            "its columns are: sentence, target")

    f = write_jsonl(tmp_path / "b.jsonl", [{"input": "ok", "target": "y"}, {"input": "", "target": "y"}])
    with pytest.raises(DataError) as e:
        load_task("mine", data_cfg(tmp_path, train=f), 0)
    assert str(e.value) == f"{f}, row 2: column 'input' must be non-empty text; got ''"

    f = write_jsonl(tmp_path / "c.jsonl", [{"input": "ok", "target": "y"}, {"input": "ok", "target": None}])
    with pytest.raises(DataError) as e:
        load_task("mine", data_cfg(tmp_path, train=f), 0)
    assert str(e.value) == f"{f}, row 2: column 'target' must be a label; got None"

    f = write_jsonl(tmp_path / "d.jsonl", [{"input": "ok", "target": "maybe"}])
    with pytest.raises(DataError) as e:
        load_task("mine", data_cfg(tmp_path, train=f, labels='["yes", "no"]'), 0)
    assert str(e.value) == (f"{f}, row 1: target 'maybe' is not one of data.local.mine.labels ['yes', 'no']; "
                            "add it there or fix the row")

    with pytest.raises(ConfigError) as e:
        data_cfg(tmp_path, train=f, labels="[yes, no]")
    assert str(e.value) == ("config key 'data.local.mine.labels[0]' expects text; got True: YAML reads "
                            'yes/no/on/off/true/false as booleans, so quote it ("true")')

    f = tmp_path / "e.jsonl"
    f.write_text('{"input": "ok", "target": "y"}\n{"input": broken\n')
    with pytest.raises(DataError) as e:
        load_task("mine", data_cfg(tmp_path, train=f), 0)
    assert str(e.value) == (f"data.local.mine.train: '{f}', row 2: not valid JSON (Expecting value at character 11); "
                            "each line of a JSON Lines file is one JSON object: fix or remove the row")

    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="cannot read .* use one of the suffixes .json, .jsonl, .csv, .parquet"):
        load_task("mine", data_cfg(tmp_path, train=f), 0)


NOT_UTF8 = "is not UTF-8 text; save the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"


def load_error(cfg, name="mine") -> str:
    with pytest.raises(DataError) as e:
        load_task(name, cfg, 0)
    return str(e.value)


def test_a_non_utf8_byte_or_a_cut_off_row_names_the_file_and_row(tmp_path):
    good = '{"input": "good movie", "target": "positive"}\n'
    # A Latin-1 byte inside a string (datasets loads it; reading the row would raise UnicodeDecodeError).
    f = tmp_path / "latin.jsonl"
    f.write_bytes(good.encode() + b'{"input": "caf\xe9 bad", "target": "negative"}\n' + good.encode())
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', row 2: byte 15 of the line (0xe9) {NOT_UTF8}")
    # The last row cut off (a copy that stopped mid-file).
    f = tmp_path / "cut.jsonl"
    f.write_text(good * 2 + '{"input": "ok", "tar')
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', row 3: not valid JSON (Unterminated string starting at character 17); "
        "the file ends inside this row: was it cut off? Fix or remove the row")
    # Blank lines are not rows: both numbers are given when they differ.
    f = tmp_path / "blank.jsonl"
    f.write_bytes(good.encode() + b"\n" + b'{"input": "\xe9", "target": "negative"}\n')
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', row 2 (line 3): byte 12 of the line (0xe9) {NOT_UTF8}")
    f = tmp_path / "array.jsonl"
    f.write_text(good + "[1, 2]\n")
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', row 2: a JSON array where an object "
        '{"column": value, ...} was expected; fix or remove the row')
    # A JSON document (an array of rows): its line.
    f = tmp_path / "rows.json"
    f.write_bytes(b'[{"input": "good", "target": "positive"},\n {"input": "b\xe9d", "target": "negative"}]\n')
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', line 2: byte 14 of the line (0xe9) {NOT_UTF8}")
    # CSV: row 1 is the first after the header.
    f = tmp_path / "latin.csv"
    f.write_bytes(b"input,target\ngood,positive\ncaf\xe9 bad,negative\n")
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', row 2 (line 3): byte 4 of the line (0xe9) {NOT_UTF8}")
    f = tmp_path / "cut.csv"
    f.write_text('input,target\ngood,positive\n"caf bad,negative\n')
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', row 2 (line 3): a quoted field starting here is never closed; the file "
        "ends inside it: was it cut off?")
    # Parquet: the row and column of the bytes.
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "latin.parquet"
    text = pa.array([b"good", b"caf\xe9"], pa.binary()).view(pa.string())  # no UTF-8 check on the way in
    pq.write_table(pa.table({"input": text, "target": ["positive", "negative"]}), f)
    assert load_error(data_cfg(tmp_path, train=f)) == (
        f"data.local.mine.train: '{f}', row 2: column 'input' holds byte 0xe9 (byte 4 of the value), which is "
        "not UTF-8 text; write the column as UTF-8")


def test_the_trainer_names_a_non_utf8_row_and_exits_2_without_a_traceback(tmp_path):
    from test_cli import run_cli

    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(b'{"input": "fine", "target": "a"}\n{"input": "na\xefve", "target": "b"}\n')
    cache = tmp_path / "cache"
    proc = run_cli("data.tasks=[mine]", f"data.local.mine.train={bad}", f"data.local.mine.validation={bad}",
                   f"output_dir={tmp_path / 'out'}", cache=cache)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"bpt_ds: error: data.local.mine.train: '{bad}', row 2: byte 14 of the line (0xef) {NOT_UTF8}\n" \
        in proc.stderr
    assert "Traceback" not in proc.stderr and "UnicodeDecodeError" not in proc.stderr
    assert not cache.exists() or not any(cache.iterdir())  # before any model work


def test_a_suite_task_file_with_a_bad_row_names_the_file_and_row(tmp_path):
    rte = {"sentence1": "A man sleeps.", "sentence2": "A man rests.", "label": 0, "idx": 0}
    f = tmp_path / "rte.jsonl"
    f.write_bytes((json.dumps(rte) + "\n").encode() * 3 + b'{"sentence1": "Caf\xe9", "sentence2": "x", "label": 1}\n')
    cfg = load_config(None, [f"data.files.rte.train={f}", f"data.files.rte.validation={f}"]).data
    assert load_error(cfg, "rte") == f"data.files.rte.train: '{f}', row 4: byte 19 of the line (0xe9) {NOT_UTF8}"
    f.write_text(json.dumps(rte) + "\n" + json.dumps(rte)[:20])
    assert load_error(cfg, "rte") == (
        f"data.files.rte.train: '{f}', row 2: not valid JSON (Unterminated string starting at character 15); "
        "the file ends inside this row: was it cut off? Fix or remove the row")


def test_truncation_keeps_eos_and_is_counted(tiny_backbone_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone_path)
    ids, cut = encode_texts(tok, ["positive", "a b c d e f g h i j k"], max_length=4)
    assert cut == 1 and len(ids[1]) == 4 and ids[1][-1] == tok.eos_token_id and ids[0][-1] == tok.eos_token_id
    cfg = load_config(None, ["data.synthetic_train_examples=20"]).data
    task = load_task("polarity", cfg, seed=0)
    said = []
    enc = encode_task(tok, task, 0, "train", max_source_length=5, max_target_length=8, warn=said.append)
    assert said == ["task polarity (train): 20 of 20 inputs longer than data.max_source_length=5 were truncated"]
    assert all(len(x) == 5 for x in enc.inputs)
    batch = collate([enc], [(0, 0), (0, 1)], tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 5) and batch["labels"].shape[0] == 2
    assert (batch["task_ids"] == 0).all()


def test_sampler_is_a_deterministic_epoch_stream():
    s = MixtureSampler([5, 3], global_batch=4, seed=1)
    stream = [p for step in range(4) for p in s.global_batch_at(step)]  # 16 draws = 2 epochs of 8
    first, second = stream[:8], stream[8:16]
    everything = [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    assert sorted(first) == sorted(everything) == sorted(second)
    assert first != second
    # A fresh sampler (a resumed run) at step 3 sees what the first one saw.
    assert MixtureSampler([5, 3], 4, seed=1).global_batch_at(3) == s.global_batch_at(3)
    assert MixtureSampler([5, 3], 4, seed=2).global_batch_at(0) != s.global_batch_at(0)


def test_length_grouped_batches_regroup_each_window_by_length():
    import random

    from bpt_ds.data.batching import LengthGroupedSampler, MixtureSampler

    rng = random.Random(0)
    lengths = [[rng.randint(3, 120) for _ in range(300)], [rng.randint(3, 40) for _ in range(100)]]
    length = lambda pair: lengths[pair[0]][pair[1]]  # noqa: E731
    base = MixtureSampler([300, 100], global_batch=16, seed=4)
    grouped = LengthGroupedSampler(base, length, window=5, seed=4)
    # A pure function of (seed, step): asked in any order, by a fresh instance, the same.
    again = LengthGroupedSampler(MixtureSampler([300, 100], 16, 4), length, window=5, seed=4)
    assert [again.global_batch_at(s) for s in (12, 3, 0)] == [grouped.global_batch_at(s) for s in (12, 3, 0)]
    for k in range(4):
        steps = range(5 * k, 5 * k + 5)
        batches = [grouped.global_batch_at(s) for s in steps]
        # The same examples within each window of 5 steps, 16 per step.
        assert sorted(p for b in batches for p in b) == sorted(p for s in steps for p in base.global_batch_at(s))
        assert all(len(b) == 16 for b in batches)
        # Contiguous ranges of the window's sorted lengths.
        spans = sorted((min(map(length, b)), max(map(length, b))) for b in batches)
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    # Less padding: each batch padded to its longest row.
    padded = lambda sampler: sum(16 * max(map(length, sampler.global_batch_at(s))) for s in range(20))  # noqa: E731
    assert padded(grouped) < 0.7 * padded(base)
