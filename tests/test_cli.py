"""The entry point's error path: bad input stops the run before any model is built or loaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from jobs import ROOT, TRAIN


def run_cli(*args, cache):
    env = dict(os.environ, BPT_DS_CACHE=str(cache))
    return subprocess.run([sys.executable, TRAIN, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_config_typo_fails_at_once(tmp_path):
    proc = run_cli("train.stpes=3", cache=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("bpt_ds: error: unknown config key 'train.stpes'. Did you mean 'train.steps'?")
    assert not any(tmp_path.iterdir())


def test_bad_data_file_fails_before_the_model_is_built(tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(json.dumps({"input": "fine", "target": "a"}) + "\n" + json.dumps({"input": None, "target": "b"}) + "\n")
    cache = tmp_path / "cache"
    proc = run_cli("data.tasks=[mine]", f"data.local.mine.train={bad}", f"data.local.mine.validation={bad}",
                   f"output_dir={tmp_path / 'out'}", cache=cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"bpt_ds: error: {bad}, row 2: column 'input' must be non-empty text; got None" in proc.stderr
    # Nothing expensive happened: no tiny backbone was built.
    assert not cache.exists() or not any(cache.iterdir())


def test_missing_init_file_is_named(tmp_path):
    proc = run_cli("stage=spot", "prompt.init_file=nowhere/prompts.safetensors", f"output_dir={tmp_path / 'o'}",
                   cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert ("bpt_ds: error: prompt.init_file: prompt file 'nowhere/prompts.safetensors' does not exist; "
            "point it at the prompts.safetensors of an earlier run (or at that run's output directory)") in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_over_long_labels_and_misshapen_prompt_files_fail_before_the_backbone_loads(tiny_backbone_path, tmp_path):
    from safetensors.torch import save_file
    import torch

    cache = tiny_backbone_path.parent
    proc = run_cli("data.max_target_length=1", f"output_dir={tmp_path / 'a'}", cache=cache)
    assert proc.returncode == 2
    assert "bpt_ds: error: task polarity: 2 labels are longer than data.max_target_length=1; raise it" in proc.stderr
    wrong = tmp_path / "prompts.safetensors"
    save_file({"particles": torch.zeros(1, 7, 128)}, str(wrong))
    proc = run_cli("stage=spot", f"prompt.init_file={wrong}", f"output_dir={tmp_path / 'b'}", cache=cache)
    assert proc.returncode == 2
    assert (f"bpt_ds: error: prompt.init_file: {wrong}: particles have shape (1, 7, 128), this run needs "
            "[F, 16, 128]; set prompt.length to match the file (and use a backbone with d_model=128)") in proc.stderr
    assert "[bpt_ds] loading backbone" not in proc.stdout


def test_bad_seeds_and_a_bad_second_seed_config_fail_before_any_run(tmp_path):
    proc = run_cli("--seeds", "1,x", cache=tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr == "bpt_ds: error: --seeds expects comma-separated integers such as 1,2,3; got '1,x'\n"
    proc = run_cli("--seeds", "2,2", cache=tmp_path / "cache")
    assert proc.stderr == "bpt_ds: error: --seeds expects distinct integers such as 1,2,3; got '2,2'\n"
    assert not (tmp_path / "cache").exists()


def test_results_command_runs_as_a_module(tmp_path):
    run = {"method": "pt", "seed": 1, "selected": {"step": 1, "test": {"rte": {"accuracy": 0.5, "score": 0.5}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(run))
    proc = subprocess.run([sys.executable, "-m", "bpt_ds.results", str(tmp_path), "--format", "csv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "method,column,mean,std,seeds\npt,rte,50.0000,0.0000,1\npt,Avg,50.0000,0.0000,1\n"
