"""Config parsing and validation: bad input fails at once, naming the key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from bpt_ds.config import ConfigError, load_config, to_yaml
from bpt_ds.engine import resolve_ds_config


def test_defaults_are_the_embedded_tiny_run():
    cfg = load_config()
    assert (cfg.stage, cfg.model.name_or_path, cfg.data.tasks, cfg.prompt.particles) == ("pt", "tiny", ["polarity"], 1)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("train:\n  steps: 10\n  lr: 0.1\nprompt:\n  length: 4\n")
    cfg = load_config(str(f), ["train.steps=30", "train.factor_lr=1e-3", "data.tasks=[sentiment, mood]", "model.dtype=bf16"])
    assert cfg.train.steps == 30 and cfg.train.lr == 0.1 and cfg.train.factor_lr == 1e-3 and cfg.prompt.length == 4
    assert cfg.data.tasks == ["sentiment", "mood"] and cfg.model.dtype == "bf16"
    # The saved config round-trips to the same values.
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(str(saved)) == cfg


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes'. Did you mean 'train.steps'? Accepted keys under 'train': "),
    ("trian.steps=3", "unknown config key 'trian'. Did you mean 'train'? Accepted keys: stage, seed, output_dir, "),
    ("train.steps=abc", "config key 'train.steps' expects int; got 'abc'"),
    ("train.steps=2.5", "config key 'train.steps' expects int; got 2.5"),
    ("train.lr=fast", "config key 'train.lr' expects float; got 'fast'"),
    ("model.dtype=fp16", "config key 'model.dtype' expects one of 'auto', 'bf16', 'fp32'; got 'fp16'"),
    ("stage=mpt", "config key 'stage' expects one of 'pt', 'spot', 'bmtpt-source', 'target'; got 'mpt'"),
    ("train.steps=0", "config key 'train.steps' must be >= 1; got 0"),
    ("data.tasks=[nope]", "unknown task 'nope' in data.tasks. Known synthetic tasks: mood, polarity, sentiment, topic; "
                          "for your own files define data.local.nope.train / .validation"),
    ("train.micro_batch_size=6", "train.global_batch_size (32) must be a multiple of train.micro_batch_size (6)"),
    ("train.lr=.inf", "config key 'train.lr' must be a finite number > 0; got inf"),
    ("train.max_grad_norm=-1", "config key 'train.max_grad_norm' must be a finite number >= 0; got -1.0"),
    ("stage=spot", "stage 'spot' with prompt.init=file needs prompt.init_file: the prompts.safetensors of an earlier run"),
    ("data.local.mine.input_column=text", "data.local.mine needs a file: set data.local.mine.train and/or .validation"),
    ("train", "override 'train' must look like key.sub=value (e.g. train.steps=300)"),
    ("train.steps.x=1", "config key 'train.steps' expects int; got {'x': 1}"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(message)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys, not list"):
        load_config(str(bad))


def test_ds_config_gets_batch_sizes_and_checks_conflicts(tmp_path):
    cfg = load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=8", "model.dtype=fp32"])
    ds = resolve_ds_config(cfg, world=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 8, 2)
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(32\) must be a multiple of "
                                          r"train.micro_batch_size \(16\) x world size \(4\); e.g. train.micro_batch_size=8 "
                                          r"\(or null for auto\)"):
        resolve_ds_config(load_config(None, ["train.global_batch_size=32", "train.micro_batch_size=16"]), world=4)
    with pytest.raises(ConfigError, match=r"train.global_batch_size \(32\) must be a multiple of the world size \(3\)"):
        resolve_ds_config(cfg, world=3)
    # Micro-batch left open: the largest divisor of global / ranks up to 16, whatever the rank count.
    for world, micro, accum in [(1, 16, 2), (2, 16, 1), (4, 8, 1), (8, 4, 1), (32, 1, 1)]:
        ds = resolve_ds_config(load_config(), world)
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
    own = tmp_path / "ds.json"
    own.write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}')
    cfg = load_config(None, [f"deepspeed.config={own}", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="'train_micro_batch_size_per_gpu' is 4 but the run config gives 8"):
        resolve_ds_config(cfg, world=1)
    own.write_text('{"fp16": {"enabled": true}}')
    with pytest.raises(ConfigError, match="fp16 is enabled; T5 overflows in fp16"):
        resolve_ds_config(cfg, world=1)
    with pytest.raises(ConfigError, match="deepspeed.config: file 'missing.json' does not exist; use one of "
                                          "cpu_zero3.json, zero3_bf16.json, zero3_offload_param.json"):
        resolve_ds_config(load_config(None, ["deepspeed.config=missing.json"]), world=1)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(str(path))
    assert cfg.stage in ("pt", "spot")
