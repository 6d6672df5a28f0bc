"""The task suite: every task from local files in its hub columns, the papers' splits, few-shot
sampling, the errors a user sees, and the hub path through a local copy of a hub dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from bpt_ds.errors import ConfigError
from bpt_ds.runs import load_config
from bpt_ds.data.registry import REGISTRY, few_shot, make_splits
from bpt_ds.data.tasks import DataError, load_task
from suite_fixtures import write_jsonl, write_suite

SMALL = {"stsb", "mrpc", "rte", "cola", "boolq", "cb", "wic", "wsc", "multirc"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    return write_suite(tmp_path_factory.mktemp("suite"), train=24, validation=13)


def files_overrides(files: dict, tasks=None) -> list[str]:
    return [f"data.files.{t}.{s}={p}" for t, splits in files.items() if tasks is None or t in tasks
            for s, p in splits.items()]


def data_cfg(files, *extra, tasks=None):
    return load_config(None, files_overrides(files, tasks) + list(extra)).data


def test_the_suite_has_the_papers_tasks():
    assert set(REGISTRY) == {"mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte", "cola", "boolq", "cb", "wic",
                             "wsc", "multirc", "record", "squad", "newsqa", "searchqa", "hotpotqa", "nq",
                             "scitail", "paws", "winogrande", "yelp_polarity"}
    assert {n for n, s in REGISTRY.items() if s.split == "halve-validation"} == SMALL
    assert REGISTRY["mnli"].split == "mnli"
    assert REGISTRY["stsb"].labels[:3] == ("0.0", "0.2", "0.4") and len(REGISTRY["stsb"].labels) == 26


def test_every_task_loads_from_files_in_its_hub_columns(suite):
    cfg = data_cfg(suite)
    for name, spec in REGISTRY.items():
        task = load_task(name, cfg, seed=0)
        assert task.kind == spec.kind and task.metrics == spec.metrics
        if name == "mnli":
            assert (len(task.train), len(task.validation), len(task.test)) == (24, 13, 13)
        elif name == "multirc":
            # 13 answer rows = 4 questions of 3 and one of 1; whole questions go to one half.
            assert len(task.validation) + len(task.test) == 13 and len(task.train) == 24
        elif name in SMALL:
            assert (len(task.train), len(task.validation), len(task.test)) == (24, 7, 6), name
        else:
            # Held out from train: 1000 on the hub, half of these tiny files.
            assert (len(task.train), len(task.validation), len(task.test)) == (12, 12, 13), name
        for row in task.train + task.validation + task.test:
            assert row["input"].startswith(f"{name} ")
            if spec.kind == "qa":
                assert row["target"] == row["answers"][0]
            else:
                assert row["target"] in spec.labels


def test_templates_write_task_and_field_names(suite):
    cfg = data_cfg(suite)
    rte = load_task("rte", cfg, 0)
    row = json.loads(open(suite["rte"]["train"]).readline())
    assert rte.train[0] == {"input": f"rte sentence1: {row['sentence1']} sentence2: {row['sentence2']}",
                            "target": str(row["label"])}
    squad = load_task("squad", cfg, 0)
    ex = next(r for r in squad.test if r["input"].startswith("squad question: what was near in 1000?"))
    assert ex["answers"] == ["river", "the river"] and ex["target"] == "river"
    assert " context: " in ex["input"]
    nq = load_task("nq", cfg, 0)  # the MRQA file holds other subsets too: only NaturalQuestionsShort rows stay
    assert len(nq.train) + len(nq.validation) == 24 and len(nq.test) == 13
    multirc = load_task("multirc", cfg, 0)
    assert multirc.train[0]["group"] == "0-0"
    assert multirc.train[0]["input"].startswith("multirc question: ")


def test_the_other_targets_templates_labels_and_splits(suite):
    """SciTail's string labels, WinoGrande's options and answer "1"/"2", PAWS's pairs, and Yelp's
    test split standing in for the validation split it lacks."""
    cfg = data_cfg(suite)
    first = lambda name, split="train": json.loads(open(suite[name][split]).readline())  # noqa: E731
    find = lambda rows, text: next(r for r in rows if r["input"] == text)  # noqa: E731
    row = first("scitail")
    task = load_task("scitail", cfg, 0)
    assert find(task.train + task.validation, f"scitail premise: {row['sentence1']} hypothesis: {row['sentence2']}"
                )["target"] == "0" and row["gold_label"] == "entailment"
    assert {r["target"] for r in task.train} == {"0", "1"}
    row = first("winogrande")
    task = load_task("winogrande", cfg, 0)
    text = f"winogrande sentence: {row['sentence']} option1: {row['option1']} option2: {row['option2']}"
    assert find(task.train + task.validation, text)["target"] == row["answer"] == "1"
    row = first("paws")
    task = load_task("paws", cfg, 0)
    assert find(task.train + task.validation, f"paws sentence1: {row['sentence1']} sentence2: {row['sentence2']}"
                )["target"] == "0"
    assert REGISTRY["yelp_polarity"].hub_splits == ("train", "test")
    yelp = load_task("yelp_polarity", cfg, 0)
    test_rows = [json.loads(line) for line in open(suite["yelp_polarity"]["test"])]
    assert [r["input"] for r in yelp.test] == [f"yelp_polarity text: {r['text']}" for r in test_rows]


def test_bad_labels_of_the_other_targets_name_the_column(tmp_path, suite):
    from bpt_ds.data.tasks import DataError
    from suite_fixtures import ROWS, write_jsonl

    for name, bad, message in [
            ("scitail", {"gold_label": "contradiction"},
             "column 'gold_label' must be one of entailment, neutral; got 'contradiction'"),
            ("winogrande", {"answer": ""},
             "column 'answer' must be \"1\" or \"2\"; got '' (the hub's unlabeled test split? use train/validation)")]:
        files = dict(suite)
        path = write_jsonl(tmp_path / f"{name}.jsonl", [ROWS[name](0), {**ROWS[name](1), **bad}])
        files[name] = {**suite[name], "train": path}
        with pytest.raises(DataError) as err:
            load_task(name, data_cfg(files), 0)
        assert str(err.value).startswith(f"{path}, row 2: {message}; fix the row (task {name} reads the columns of ")


def test_stsb_targets_are_rounded_to_steps_of_point_two():
    spec = REGISTRY["stsb"]
    row = {"sentence1": "a", "sentence2": "b"}
    # Rounded like T5's np.round(label * 5) / 5 (halves to even: 2.5 -> 12.5 -> 12 -> 2.4).
    for label, target in [(3.77, "3.8"), (0.1, "0.0"), (0.3, "0.4"), (2.5, "2.4"), (5, "5.0"), (4.91, "5.0")]:
        assert spec.example({**row, "label": label})["target"] == target


def test_splits_are_deterministic_disjoint_and_follow_the_seed():
    spec = REGISTRY["rte"]
    hub = {"train": [{"input": f"t{i}", "target": "0"} for i in range(30)],
           "validation": [{"input": f"v{i}", "target": "0"} for i in range(11)]}
    a, b = make_splits(spec, hub, 1), make_splits(spec, hub, 1)
    assert a == b
    assert len(a["dev"]) == 6 and len(a["test"]) == 5
    assert sorted(r["input"] for r in a["dev"] + a["test"]) == sorted(r["input"] for r in hub["validation"])
    assert make_splits(spec, hub, 2)["dev"] != a["dev"]
    # Large tasks: 1,000 training examples become dev, validation is test.
    big = {"train": [{"input": f"t{i}", "target": "0"} for i in range(2500)], "validation": hub["validation"]}
    s = make_splits(REGISTRY["qnli"], big, 1)
    assert len(s["dev"]) == 1000 and len(s["train"]) == 1500 and s["test"] == hub["validation"]
    assert not {r["input"] for r in s["dev"]} & {r["input"] for r in s["train"]}
    m = make_splits(REGISTRY["mnli"], {"train": [1], "validation_matched": [2], "validation_mismatched": [3]}, 0)
    assert m == {"train": [1], "dev": [3], "test": [2]}


def test_multirc_halves_keep_questions_whole(suite):
    task = load_task("multirc", data_cfg(suite), 0)
    assert not {r["group"] for r in task.validation} & {r["group"] for r in task.test}


def test_split_seed_is_not_the_training_seed(suite):
    cfg = data_cfg(suite)
    assert load_task("rte", cfg, seed=1).test == load_task("rte", cfg, seed=2).test
    other = data_cfg(suite, "data.split_seed=7")
    assert load_task("rte", other, seed=1).test != load_task("rte", cfg, seed=1).test


def test_few_shot_draws_k_per_class_with_the_seed(suite):
    rows = [{"input": f"x{i}", "target": str(i % 3)} for i in range(60)]
    picked = few_shot(rows, 4, seed=1, by_class=True)
    assert Counter(r["target"] for r in picked) == {"0": 4, "1": 4, "2": 4}
    assert picked == few_shot(rows, 4, seed=1, by_class=True)
    assert picked != few_shot(rows, 4, seed=2, by_class=True)
    assert len(few_shot(rows, 16, seed=1, by_class=False)) == 16
    assert len(few_shot(rows[:5], 4, seed=1, by_class=True)) == 5  # fewer exist: all of them
    cfg = data_cfg(suite, "data.few_shot=4")
    for name, classes in [("cb", 3), ("rte", 2)]:
        task = load_task(name, cfg, seed=3)
        assert Counter(r["target"] for r in task.train) == {str(c): 4 for c in range(classes)}
        assert len(task.test) == 6  # dev and test stay whole
    assert len(load_task("squad", cfg, seed=3).train) == 4
    assert len(load_task("polarity", cfg, seed=3).train) == 8  # synthetic tasks too


def test_bad_files_and_rows_name_the_file_row_and_fix(tmp_path, suite):
    f = write_jsonl(tmp_path / "rte_train.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 0},
                                                   {"sentence1": "a", "sentence2": "b", "label": -1}])
    cfg = load_config(None, [f"data.files.rte.train={f}", f"data.files.rte.validation={suite['rte']['validation']}"]).data
    with pytest.raises(DataError) as e:
        load_task("rte", cfg, 0)
    assert str(e.value) == (f"{f}, row 2: column 'label' must be an integer class in 0..1; got -1 "
                            "(the hub's unlabeled test split? use train/validation); fix the row (task rte reads "
                            "the columns of nyu-mll/glue/rte)")
    f = write_jsonl(tmp_path / "cola.jsonl", [{"text": "a", "label": 0}])
    cfg = load_config(None, [f"data.files.cola.train={f}", f"data.files.cola.validation={f}"]).data
    with pytest.raises(DataError) as e:
        load_task("cola", cfg, 0)
    assert str(e.value) == (f"{f} has no column 'sentence', which task cola reads (the columns of "
                            "nyu-mll/glue/cola); its columns are: text, label")
    f = write_jsonl(tmp_path / "squad.jsonl", [{"question": "q", "context": "c", "answers": {"text": [],
                                                                                            "answer_start": []}}])
    cfg = load_config(None, [f"data.files.squad.train={f}", f"data.files.squad.validation={f}"]).data
    with pytest.raises(DataError, match=r"row 1: column 'answers' must hold a non-empty list of answer strings"):
        load_task("squad", cfg, 0)


@pytest.mark.parametrize("override, message", [
    ("data.files.imdb.train=x.jsonl", "data.files.imdb: 'imdb' is not a suite task (mnli, qqp, qnli, sst2, stsb, "
     "mrpc, rte, cola, boolq, cb, wic, wsc, multirc, record, squad, newsqa, searchqa, hotpotqa, nq, scitail, paws, winogrande, yelp_polarity); for your own "
     "{input, target} files use data.local.imdb"),
    ("data.files.mnli.validation=x.jsonl", "data.files.mnli.validation: mnli reads the hub splits train, "
     "validation_mismatched, validation_matched; name its files by those"),
    ("data.files.rte.train=/nonexistent/rte.jsonl", "data.files.rte.train: file '/nonexistent/rte.jsonl' does not exist"),
    ("data.hub.imdb=me/imdb", "data.hub.imdb: 'imdb' is not a suite task (mnli, qqp, qnli, sst2, stsb, mrpc, rte, "
     "cola, boolq, cb, wic, wsc, multirc, record, squad, newsqa, searchqa, hotpotqa, nq, scitail, paws, winogrande, yelp_polarity)"),
    ("data.hub.boolq=a:b:c", "data.hub.boolq: expected 'owner/name' or 'owner/name:config'; got 'a:b:c'"),
    ("data.datasets_dir=/nonexistent", "data.datasets_dir: directory '/nonexistent' does not exist"),
    ("data.tasks=[rtee]", "unknown task 'rtee' in data.tasks. Suite tasks: mnli, qqp, qnli, sst2, stsb, mrpc, rte, "
     "cola, boolq, cb, wic, wsc, multirc, record, squad, newsqa, searchqa, hotpotqa, nq, scitail, paws, winogrande, yelp_polarity; synthetic tasks: contrary, mood, "
     "polarity, sentiment, topic; for your own files define data.local.rtee.train / .validation"),
])
def test_config_errors_before_any_loading(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_a_task_needs_all_its_hub_splits(suite):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"data.files.rte.train={suite['rte']['train']}"])
    assert str(e.value) == ("data.files.rte lacks validation: rte needs files for the hub splits train, validation "
                            "(dev and test are made from them)")


def test_hub_path_reads_a_local_copy_of_the_hub_dataset(tmp_path):
    """datasets.load_dataset("<dir>/nyu-mll/glue", "rte", split=...): the code path the hub takes,
    on a directory laid out like the hub repository (parquet files per config, README configs)."""
    import pandas as pd

    root = tmp_path / "hub" / "nyu-mll" / "glue"
    (root / "rte").mkdir(parents=True)
    rows = [{"sentence1": f"premise {i}", "sentence2": f"claim {i}", "label": i % 2, "idx": i} for i in range(10)]
    pd.DataFrame(rows).to_parquet(root / "rte" / "train-00000-of-00001.parquet")
    pd.DataFrame(rows[:6]).to_parquet(root / "rte" / "validation-00000-of-00001.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: rte\n  data_files:\n  - split: train\n"
                                    "    path: rte/train-*\n  - split: validation\n    path: rte/validation-*\n---\n")
    cfg = load_config(None, [f"data.datasets_dir={tmp_path / 'hub'}", "data.tasks=[rte]"]).data
    task = load_task("rte", cfg, 0)
    assert len(task.train) == 10 and len(task.validation) == 3 and len(task.test) == 3
    assert task.train[1] == {"input": "rte sentence1: premise 1 sentence2: claim 1", "target": "1"}
    # data.hub points a task at another dataset in the same columns (here: another local copy).
    (tmp_path / "hub" / "me").mkdir()
    (tmp_path / "hub" / "nyu-mll" / "glue").rename(tmp_path / "hub" / "me" / "glue-copy")
    cfg = load_config(None, [f"data.datasets_dir={tmp_path / 'hub'}", "data.hub.rte=me/glue-copy:rte"]).data
    assert load_task("rte", cfg, 0).train == task.train
    with pytest.raises(DataError, match=r"^task cola: could not load .*nyu-mll/glue \(cola, train\) with "
                                        r"datasets.load_dataset: .*Without network, give local files"):
        load_task("cola", cfg, 0)


def test_hub_without_network_fails_with_the_fix():
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    code = ("from bpt_ds.runs import load_config\nfrom bpt_ds.data.tasks import load_task, DataError\n"
            "try:\n    load_task('boolq', load_config(None, []).data, 0)\n"
            "except DataError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    assert out.startswith("task boolq: could not load aps/super_glue (boolq, train) with datasets.load_dataset: ")
    assert out.rstrip().endswith("Without network, give local files in the hub's columns "
                                 "(data.files.boolq.<split>) or a local copy of the dataset (data.datasets_dir)")
