"""What a new user meets in the first hour: --help and --show-config, the hints of common
mistakes, readable output files, and exports that say what they wrote."""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
import typing

import pytest
import torch
import yaml
from safetensors.torch import save_file

from bpt_ds.config import RunConfig, to_dict
from bpt_ds.config_keys import keys
from bpt_ds.errors import ConfigError
from bpt_ds.files import atomic_write
from bpt_ds.runs import load_config, load_runs
from jobs import ROOT, TRAIN


def leaf_keys(cls, prefix: str = "") -> list[str]:
    """Every key of a dataclass tree, walked independently of config_keys."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
            args = typing.get_args(tp)
            if typing.get_origin(tp) is dict and dataclasses.is_dataclass(args[1]):
                out += leaf_keys(args[1], f"{prefix}{f.name}.<task>.")
    return out


def test_every_config_key_is_listed_once_with_a_meaning():
    listed = keys()
    assert [k.name for k in listed] == leaf_keys(RunConfig)
    assert [k.name for k in listed if not k.meaning] == []
    by_name = {k.name: k for k in listed}
    assert (by_name["train.lr"].type, by_name["train.lr"].default) == ("float", "0.3")
    assert by_name["svgd.init"].type == "one of 'shared', 'independent'" and by_name["svgd.init"].default == "shared"
    assert by_name["prompt.init_file"].default == "null"
    # The first sentence, not cut inside parentheses or at "e.g.".
    assert by_name["prompt.factors.init_from"].summary.startswith(
        "When prompt.init_file holds factors of other (source) tasks, e.g. an mpt-distill run: null starts")


def test_help_lists_the_keys_and_show_config_prints_the_resolved_config_without_running(tmp_path):
    env = dict(os.environ, BPT_DS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, TRAIN, "--help"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "  train.optimizer (one of 'adamw', 'sgd', 'svgd-adagrad'; default adamw)\n" in proc.stdout
    assert "  prior.beta (float; default 0.0)\n      The prior's weight in natural units" in proc.stdout
    assert sum(line.startswith("  ") and "; default " in line for line in proc.stdout.splitlines()) == len(keys())

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, TRAIN, "--show-config", "--config", "configs/tiny_bmtpt_pipeline.yaml",
                           f"output_dir={out}", "train.steps=7"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing ran, nothing was built
    docs = proc.stdout.split("# run '")[1:]
    runs = load_runs("configs/tiny_bmtpt_pipeline.yaml", [f"output_dir={out}", "train.steps=7"])
    assert [d.split("'")[0] for d in docs] == [name for name, _ in runs]
    for doc, (_, cfg) in zip(docs, runs):
        assert yaml.safe_load(doc.split("\n", 1)[1]) == to_dict(cfg)


def test_a_list_key_given_one_word_says_how_to_write_the_list():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.tasks=polarity"])
    assert str(e.value) == ("config key 'data.tasks' expects a list of str; got 'polarity': write a list, "
                            "data.tasks=[polarity] (several: data.tasks=[polarity,...])")


def test_outputs_are_readable_by_the_group_whatever_the_writer_makes_them(tmp_path):
    """safetensors writes its files 0600; the outputs get the umask's mode (0644 under 022).
    Without the chmod in atomic_write this is 0o600."""
    old = os.umask(0o022)
    try:
        import importlib

        import bpt_ds.files
        importlib.reload(bpt_ds.files)  # FILE_MODE is read from the umask at import
        path = tmp_path / "p.safetensors"
        bpt_ds.files.atomic_write(path, lambda f: save_file({"x": torch.zeros(2)}, str(f)))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(old)
        importlib.reload(bpt_ds.files)
    assert atomic_write  # the module's own name still imports


def test_peft_export_says_it_wrote_the_mean_and_names_the_backbone_the_run_loaded(tmp_path, capsys):
    pytest.importorskip("peft")
    from bpt_ds.peft_io import main

    run = tmp_path / "run"
    run.mkdir()
    save_file({"particles": torch.randn(3, 4, 8)}, str(run / "prompts.safetensors"))
    (run / "config.yaml").write_text("stage: bmtpt-source\nmodel:\n  name_or_path: tiny\n")
    (run / "done.json").write_text(json.dumps({"backbone": "/models/tiny-t5-abc"}))
    assert main(["export", str(run), str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "the mean of 3 particles (--particle K exports one); base model /models/tiny-t5-abc;" in said
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/models/tiny-t5-abc"
    assert stat.S_IMODE((tmp_path / "a" / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~_umask()
    # MPT teachers are one prompt per task: their mean is nobody's prompt.
    (run / "config.yaml").write_text("stage: mpt-teachers\nmodel:\n  name_or_path: tiny\n")
    assert main(["export", str(run), str(tmp_path / "b")]) == 2
    assert "export one with --particle K (0..2)" in capsys.readouterr().err
    assert main(["export", str(run), str(tmp_path / "b"), "--particle", "2"]) == 0
    assert "particle 2 of 3" in capsys.readouterr().out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_registry_lists_the_synthetic_tasks_too():
    proc = subprocess.run([sys.executable, "-m", "bpt_ds.data.registry"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "polarity   labels positive, negative" in proc.stdout and "held out (the transfer target)" in proc.stdout
    assert "contrary   labels positive, negative" in proc.stdout


def test_docstrings_cite_a_page_that_exists():
    cited = subprocess.run(["grep", "-rhoE", r"[a-z/]*algorithms\.md", "bpt_ds", "configs", "README.md"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert cited and set(cited) == {"docs/algorithms.md"}
    assert (ROOT / "docs" / "algorithms.md").is_file()


def test_deepspeeds_autotuner_does_not_import_mlflow_at_start_up_and_the_tracker_still_can():
    """Start-up cost: DeepSpeed's autotuner (unused) imports mlflow, 1.2 s a process, when it is
    installed; bpt_ds refuses that one import, and report_to=[mlflow] still imports it."""
    pytest.importorskip("mlflow")
    code = ("import sys, bpt_ds, deepspeed\n"
            "from deepspeed.autotuning import autotuner\n"
            "print('mlflow' in sys.modules, autotuner.has_mlflow)\n"
            "from bpt_ds.trackers import MlflowTracker\n"
            "from mlflow.tracking import MlflowClient\n"
            "print('mlflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False", "True"]
