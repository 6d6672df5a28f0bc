"""The papers' tables as commands (configs/paper): every stage of the three commands builds and
validates, they share one set of sources, and each command runs end to end on the tiny backbone
from fixture files in the hub's columns, with the table written by python -m bpt_ds.results."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bpt_ds.config import config_fingerprint
from bpt_ds.data.registry import REGISTRY
from bpt_ds.runs import load_runs
from jobs import ROOT, TRAIN, ds_env
from suite_fixtures import write_suite

PAPER = ROOT / "configs" / "paper"
SOURCES = ["pt-source", "teachers", "mpt-shared", "bmtpt-source"]
METHODS = ["pt", "spot", "mpt", "bmtpt"]
GLUE_SMALL = ["stsb", "mrpc", "rte", "cola", "boolq", "cb", "wic", "wsc"]
GLUE_LARGE = ["mnli", "qqp", "qnli", "sst2", "multirc"]  # MultiRC: 27k training examples
OTHERS = ["newsqa", "searchqa", "hotpotqa", "nq", "scitail", "paws", "winogrande", "yelp_polarity"]


def test_the_three_table_commands_expand_to_every_method_task_and_seed():
    glue = load_runs(str(PAPER / "glue_superglue.yaml"))
    others = load_runs(str(PAPER / "mrqa_others.yaml"))
    few = load_runs(str(PAPER / "few_shot.yaml"))
    # One set of sources, the same in all three (the second command skips them as finished).
    for runs in (glue, others, few):
        assert [n for n, _ in runs[:4]] == SOURCES
        assert [config_fingerprint(c) for _, c in runs[:4]] == [config_fingerprint(c) for _, c in glue[:4]]
        assert [c.output_dir for _, c in runs[:4]] == [f"runs/paper/sources/{d}" for d in
                                                      ("pt", "teachers", "mpt-shared", "bmtpt")]
    _, bmtpt_source = glue[3]
    assert bmtpt_source.prompt.particles == 6 and bmtpt_source.svgd.init == "shared"
    assert glue[2][1].distill.hidden == "both" and glue[2][1].distill.teachers == "runs/paper/sources/teachers"

    def targets(runs):
        return {(c.method, c.data.tasks[0], c.data.few_shot, c.seed): c for _, c in runs[4:]}

    table = targets(glue)
    assert set(table) == {(m, t, 0, 42) for m in METHODS for t in GLUE_SMALL + GLUE_LARGE}
    assert set(targets(others)) == {(m, t, 0, 42) for m in METHODS for t in OTHERS}
    assert set(targets(few)) == {(m, t, k, s) for m in METHODS for t in ["boolq", "cb", "scitail"]
                                 for k in (4, 16, 32) for s in (1, 2, 3)}
    rte, mnli = table[("bmtpt", "rte", 0, 42)], table[("bmtpt", "mnli", 0, 42)]
    # 20 epochs under 10k training examples, 10 above (every "other" target has over 10k).
    assert (rte.train.epochs, mnli.train.epochs) == (20, 10)
    assert {c.train.epochs for c in targets(others).values()} == {10}
    assert rte.output_dir == "runs/paper/glue_superglue/bmtpt/rte"
    assert rte.prompt.init_file == "runs/paper/sources/bmtpt" and rte.prior.beta == 1.0
    assert table[("mpt", "rte", 0, 42)].prompt.factors.init_from == "mean"
    assert table[("spot", "rte", 0, 42)].prompt.init_file == "runs/paper/sources/pt"
    for c in table.values():
        assert c.train.weight_decay == 1e-5 and c.data.eval_mode == "generate" and c.prompt.length == 100
    assert targets(few)[("pt", "cb", 16, 2)].output_dir == "runs/paper/few_shot/pt-k16/cb/seed2"
    # Every stage fits every GPU count the README offers: particles and teachers whole on ranks,
    # the global batch a multiple of the ranks (checked before the first stage trains).
    from bpt_ds.deepspeed_setup import micro_batch_size
    from bpt_ds.stages import STAGES

    for world in (1, 2, 3, 6, 12):
        for _, c in glue + others + few:
            STAGES[c.stage].placement(c, world)
            micro_batch_size(c.train.global_batch_size, c.train.micro_batch_size, world)


def test_each_task_and_each_seed_errors_name_the_stage(tmp_path):
    from bpt_ds.errors import ConfigError

    f = tmp_path / "p.yaml"
    f.write_text("stages:\n  - {name: t, stage: pt, each_task: [rte, rte]}\n")
    with pytest.raises(ConfigError, match=r"stage 't': 'each_task' must be a non-empty list without repeats; "
                                          r"got \['rte', 'rte'\]"):
        load_runs(str(f))
    f.write_text("stages:\n  - {name: t, stage: pt, each_seed: [1, x]}\n")
    with pytest.raises(ConfigError, match=r"stage 't': 'each_seed' must list integer seeds; got \[1, 'x'\]"):
        load_runs(str(f))
    f.write_text("output_dir: r\nstages:\n  - {name: t, stage: pt, each_task: [polarity, mood], each_seed: [1, 2]}\n")
    with pytest.raises(ConfigError, match=r"--seeds and a stage's each_seed both set the seeds; use one"):
        load_runs(str(f), seed=3)
    for override, listed in [("seed=5", "each_seed"), ("data.tasks=[mood]", "each_task")]:
        with pytest.raises(ConfigError, match=re.escape(f"stage 't-polarity-seed1': '{override}' would override "
                                                        f"what its {listed} list sets; change the list instead "
                                                        f"(t.{listed}=[...])")):
            load_runs(str(f), [override])
    f2 = tmp_path / "q.yaml"
    f2.write_text("stages:\n  - {name: t, stage: pt, each_task: [polarity]}\n"
                  "  - {name: u, stage: spot, prompt: {init_file: '{t}'}}\n")
    with pytest.raises(ConfigError, match=re.escape("'{t}' refers to stage 't', which does not run before it (or "
                                                    "runs once per task or seed: refer to one of the stages it "
                                                    "becomes)")):
        load_runs(str(f2))
    runs = load_runs(str(f), ["t.each_task=[mood]", "t.train.steps=7"])
    assert [(n, c.output_dir, c.seed, c.train.steps) for n, c in runs] == [
        ("t-mood-seed1", "r/t/mood/seed1", 1, 7), ("t-mood-seed2", "r/t/mood/seed2", 2, 7)]


# The tiny stand-in for T5-Base and the hub, and short runs: what the end-to-end test changes.
TINY = ["model.name_or_path=tiny", "model.dtype=auto", "deepspeed.config=auto", "prompt.length=4",
        "train.epochs=null", "train.steps=2", "train.micro_batch_size=null", "train.eval_every=0",
        "train.warmup_steps=0", "data.max_eval_examples=4", "data.max_new_tokens=4", "data.max_source_length=48"]


@pytest.mark.slow
def test_each_table_command_runs_end_to_end_on_the_tiny_backbone_and_fills_its_table(tiny_backbone_path, tmp_path):
    """Every command as written, with one small and one large target per table (two tasks and two
    seeds for few-shot): the sources run once (the second and third commands skip them), every
    target runs, and every cell of each table has a score (the few-shot cells over 2 seeds)."""
    files = write_suite(tmp_path / "data", train=24, validation=13)
    data = [f"data.files.{t}.{s}={p}" for t, splits in files.items() for s, p in splits.items()]
    picks = {"glue_superglue": ("rte", "sst2"), "mrqa_others": ("scitail", "newsqa")}
    env = ds_env(Path(tiny_backbone_path).parent, 1)

    def command(name, *restrict):
        proc = subprocess.run([sys.executable, TRAIN, "--config", str(PAPER / f"{name}.yaml"), *TINY, *data,
                               *restrict], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        table = subprocess.run([sys.executable, "-m", "bpt_ds.results", f"runs/paper/{name}"], env=env,
                               cwd=tmp_path, capture_output=True, text=True)
        assert table.returncode == 0, table.stderr
        return proc.stdout, table.stdout

    for name, (small, large) in picks.items():
        restrict = ([f"{m}-{size}.each_task=[{task}]" for m in METHODS for size, task in
                     (("small", small), ("large", large))] if name == "glue_superglue" else
                    [f"{m}.each_task=[{small}, {large}]" for m in METHODS])
        log, table = command(name, *restrict)
        ran_sources = "pipeline stage 1/12: pt-source (pt) -> runs/paper/sources/pt\n" in log
        assert ran_sources == (name == "glue_superglue")
        assert ("already finished" in log) == (name != "glue_superglue")
        lines = table.strip().splitlines()
        first, second = sorted((small, large), key=list(REGISTRY).index)  # columns in the suite's order
        assert lines[0] == f"| Method | {first} | {second} | Avg |"
        assert sorted(line.split(" | ")[0] for line in lines[2:]) == sorted(f"| {m}" for m in METHODS)
        assert "–" not in table
    restrict = [f"{m}-k{k}.{key}" for m in METHODS for k in (4, 16, 32)
                for key in ("each_task=[cb, scitail]", "each_seed=[1, 2]")]
    log, table = command("few_shot", *restrict)
    lines = table.strip().splitlines()
    assert lines[0] == "| Method | cb | scitail | Avg |"
    assert sorted(line.split(" | ")[0] for line in lines[2:]) == sorted(f"| {m} k={k}" for k in (4, 16, 32)
                                                                       for m in METHODS)
    assert "–" not in table and all(" ± " in line for line in lines[2:])  # every cell: mean ± std of 2 seeds
    assert (tmp_path / "runs/paper/few_shot/bmtpt-k32/scitail/seed2/metrics.json").is_file()
