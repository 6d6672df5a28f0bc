"""The task suite in real runs: generation under ZeRO-3 on 1 and 2 ranks, invalid predictions,
few-shot over several seeds in one command, and the results table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bpt_ds.results import render
from jobs import TRAIN, run_ds
from suite_fixtures import write_suite

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cache(tiny_backbone_path) -> Path:
    return Path(tiny_backbone_path).parent


def file_args(files: dict, tasks) -> list[str]:
    return [f"data.files.{t}.{s}={p}" for t in tasks for s, p in files[t].items()]


def test_generation_is_scored_the_same_on_one_and_two_ranks(cache, tmp_path):
    """With 2 particles generation scores their posterior predictive (each particle's greedy output
    scored under both, the more probable on average wins: PromptedT5.generate), as classification
    does, and gives the same predictions on 1 and 2 ranks under ZeRO-3."""
    files = write_suite(tmp_path / "data", train=24, validation=13)
    evals = ["data.eval_tasks=[polarity, squad, rte]", "data.eval_mode=generate", "data.max_new_tokens=6",
             "data.max_eval_examples=63", "model.dtype=fp32", "train.global_batch_size=16",
             "train.micro_batch_size=8", "prompt.particles=2", *file_args(files, ["squad", "rte"])]
    one = tmp_path / "one"
    proc = run_ds(1, TRAIN, f"output_dir={one}", "train.steps=80", "train.eval_every=0", "train.lr=0.3", *evals,
                  cache=cache, port=29740)
    assert proc.returncode == 0
    assert "step 80 dev (posterior predictive over 2 particles): polarity accuracy" in proc.stdout
    first = json.loads((one / "metrics.json").read_text())["final"]["dev"]
    # Decoding the trained prompt's output gives the label words: generation works end to end.
    assert first["polarity"]["accuracy"] >= 0.9
    assert first["polarity"]["examples"] == 63
    # The tiny backbone cannot write RTE's labels "0"/"1": those predictions are invalid, counted
    # as wrong and reported on the log line.
    rte = first["rte"]
    assert rte["examples"] == 7 and rte["invalid"] > 0
    assert rte["accuracy"] <= (rte["examples"] - rte["invalid"]) / rte["examples"]
    assert f"({rte['invalid']} of 7 predictions invalid)" in proc.stdout
    assert set(first["squad"]) == {"squad_f1", "squad_em", "score", "examples", "invalid"}

    # The same particles scored on 2 ranks (stage spot from them, one step at lr 1e-9): generate()
    # runs with synced_gpus under ZeRO-3, the candidates are scored on the rank that generated
    # them, and each example is predicted exactly once (63 and 13 are odd).
    two = tmp_path / "two"
    proc = run_ds(2, TRAIN, f"output_dir={two}", "stage=spot", f"prompt.init_file={one}", "train.steps=1",
                  "train.lr=1e-9", "train.eval_every=1", *evals, cache=cache, port=29741)
    assert proc.returncode == 0
    assert "step 1 dev (posterior predictive over 2 particles): polarity accuracy" in proc.stdout
    second = json.loads((two / "metrics.json").read_text())
    assert second["final"]["dev"] == first
    assert second["selected"]["test"]["squad"]["examples"] == 13


def test_few_shot_over_seeds_in_one_command_gives_a_table(cache, tmp_path):
    files = write_suite(tmp_path / "data", train=24, validation=13)
    out = tmp_path / "fs"
    proc = run_ds(1, TRAIN, "--seeds", "1,2", f"output_dir={out}", "data.tasks=[rte]", "data.few_shot=4",
                  "train.steps=4", "train.eval_every=2", "train.global_batch_size=8", "model.dtype=fp32",
                  *file_args(files, ["rte"]), cache=cache)
    assert proc.returncode == 0
    for seed in (1, 2):
        assert (f"task rte (classification, accuracy): 8 train (few-shot: 4 per class, seed {seed}) / 7 dev / "
                "6 test examples") in proc.stdout
        run = json.loads((out / f"seed{seed}" / "metrics.json").read_text())
        assert (run["method"], run["seed"], run["few_shot"]) == ("pt", seed, 4)
        assert run["selected"]["test"]["rte"]["examples"] == 6
    table = (out / "results.md").read_text()
    assert table == render([str(out)])
    assert table.splitlines()[0] == "| Method | rte | Avg |"
    assert table.splitlines()[2].startswith("| pt k=4 | ")
    assert table in proc.stdout
