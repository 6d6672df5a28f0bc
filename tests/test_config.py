"""Config parsing and validation: bad input fails at once, naming the key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from bpt_ds.config import to_yaml
from bpt_ds.errors import ConfigError
from bpt_ds.runs import load_config, load_runs
from bpt_ds.deepspeed_setup import resolve_ds_config


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
    ("stage=mpt", "config key 'stage' expects one of 'pt', 'spot', 'bmtpt-source', 'target', 'mpt-teachers', "
                  "'mpt-distill'; got 'mpt'"),
    ("train.steps=0", "config key 'train.steps' must be >= 1; got 0"),
    ("data.tasks=[nope]", "unknown task 'nope' in data.tasks. Suite tasks: mnli, qqp, qnli, sst2, stsb, mrpc, rte, "
                          "cola, boolq, cb, wic, wsc, multirc, record, squad, newsqa, searchqa, hotpotqa, nq, scitail, paws, winogrande, yelp_polarity; "
                          "synthetic tasks: contrary, mood, polarity, sentiment, topic; for your own files define "
                          "data.local.nope.train / .validation"),
    ("train.micro_batch_size=6", "train.global_batch_size (32) must be a multiple of train.micro_batch_size (6)"),
    ("train.lr=.inf", "config key 'train.lr' must be a finite number > 0; got inf"),
    ("train.max_grad_norm=-1", "config key 'train.max_grad_norm' must be a finite number >= 0; got -1.0"),
    ("stage=spot", "stage 'spot' with prompt.init=file needs prompt.init_file: the prompts.safetensors of an earlier run"),
    ("data.local.mine.input_column=text", "data.local.mine needs a file: set data.local.mine.train and/or .validation"),
    ("train", "override 'train' must look like key.sub=value (e.g. train.steps=300)"),
    ("train.steps.x=1", "config key 'train.steps' expects int; got {'x': 1}"),
    ("stage=target", "stage 'target' with prompt.init=file needs prompt.init_file: the prompts.safetensors"),
    ("prompt.init_particle=-1", "config key 'prompt.init_particle' must be >= 0; got -1"),
    ("svgd.likelihood_scale=0", "config key 'svgd.likelihood_scale' must be a finite number > 0 (or null); got 0.0"),
    ("svgd.bandwidth=-2", "config key 'svgd.bandwidth' must be a finite number > 0 (or null); got -2.0"),
    ("prior.kind=gauss", "config key 'prior.kind' expects one of 'kde', 'gaussian-isotropic', 'gaussian-diagonal'; "
                         "got 'gauss'"),
    ("prior.beta=0.5", "prior.beta=0.5 applies to stage 'target' only; this run is stage 'pt' (set prior.beta=0)"),
    ("prior.min_var=0", "config key 'prior.min_var' must be a finite number > 0; got 0.0"),
    ("data.group_by_length=-1", "config key 'data.group_by_length' must be >= 0; got -1"),
    ("deepspeed.timeout_minutes=0", "config key 'deepspeed.timeout_minutes' must be a finite number > 0; got 0.0"),
    ("deepspeed.memory_reserve_gb=-1", "config key 'deepspeed.memory_reserve_gb' must be a finite number >= 0; "
                                       "got -1.0"),
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
                                          "cpu_zero3.json, replicated_bf16.json, zero3_bf16.json, zero3_offload_param.json"):
        resolve_ds_config(load_config(None, ["deepspeed.config=missing.json"]), world=1)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    runs = load_runs(str(path))
    from bpt_ds.stages import STAGES

    assert runs and all(cfg.stage in STAGES for _, cfg in runs)


def test_length_grouping_is_refused_where_tasks_are_sampled_on_their_own():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["stage=mpt-teachers", "data.tasks=[sentiment, mood]", "data.group_by_length=5"])
    assert str(e.value) == ("data.group_by_length does not apply to stage 'mpt-teachers', which samples each task "
                            "on its own; set data.group_by_length=0")


def test_bmtpt_source_rejects_weight_decay():
    with pytest.raises(ConfigError, match=r"stage 'bmtpt-source': train.weight_decay=0.01 would pull the particles "
                                          r"toward 0 outside SVGD; set it to 0 and use svgd.prior_std"):
        load_config(None, ["stage=bmtpt-source", "train.weight_decay=0.01"])


def test_bmtpt_source_rejects_factors():
    with pytest.raises(ConfigError, match="stage 'bmtpt-source' samples the base prompt S only: set "
                                          r"prompt.factors.rank=0 \(low-rank factors belong to the target stage\)"):
        load_config(None, ["stage=bmtpt-source", "prompt.factors.rank=1"])


PIPELINE = """
output_dir: runs/p
defaults:
  seed: 7
  train: {steps: 10}
stages:
  - name: source
    stage: bmtpt-source
    prompt: {particles: 4}
    data: {tasks: [sentiment, mood]}
  - name: target
    stage: target
    prompt: {init_file: "{source}"}
    train: {steps: 20}
"""


def test_pipeline_chains_stages_by_output_path(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(PIPELINE)
    runs = load_runs(str(f), ["train.lr=0.05", "target.prior.beta=0.1", "output_dir=/x"])
    (n1, source), (n2, target) = runs
    assert (n1, source.stage, source.output_dir, source.seed) == ("source", "bmtpt-source", "/x/source", 7)
    assert (n2, target.stage, target.output_dir, target.prompt.init_file) == ("target", "target", "/x/target", "/x/source")
    assert (source.train.steps, target.train.steps) == (10, 20)       # a stage's own keys win over defaults
    assert source.train.lr == target.train.lr == 0.05                  # a plain override sets every stage
    assert (source.prior.beta, target.prior.beta) == (0.0, 0.1)         # <name>.key sets one stage
    assert target.prompt.init == "file"
    assert [n for n, _ in load_runs(None)] == ["run"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("stage: target", "stage: target\n    trian: {}"),
     "pipeline '{f}', stage 'target': unknown config key 'trian'. Did you mean 'train'?"),
    (lambda t: t.replace('"{source}"', '"{target}"'),
     "pipeline '{f}', stage 'target': '{{target}}' refers to stage 'target', which does not run before it"),
    (lambda t: t.replace("name: target", "name: source"), "pipeline '{f}': two stages are named 'source'"),
    (lambda t: t + "extra: 1\n", "pipeline '{f}': unknown top-level key(s) ['extra']; a pipeline has output_dir, "
                                   "defaults, stages"),
    (lambda t: t.replace("  - name: target", "  - name: a b"),
     "pipeline '{f}': stages[1] needs a 'name' of letters, digits, - or _; got 'a b'"),
    (lambda t: t.replace("name: target", "name: train"),
     "pipeline '{f}': stage name 'train' is also a config key, so 'train.x=...' overrides would be ambiguous"),
    (lambda t: t.replace("stage: target", "stage: target\n    output_dir: runs/p/source"),
     "pipeline '{f}': stages 'source' and 'target' both write to runs/p/source; give each stage its own"),
    (lambda t: t.replace("prompt: {particles: 4}", "prompt: {particles: 3}"),
     "pipeline '{f}', stage 'source': train.global_batch_size (32) must be a multiple of prompt.particles (3)"),
])
def test_pipeline_errors_name_the_stage(tmp_path, edit, message):
    """Every stage is checked before the first one runs."""
    f = tmp_path / "p.yaml"
    f.write_text(edit(PIPELINE))
    with pytest.raises(ConfigError) as e:
        load_runs(str(f))
    assert str(e.value).startswith(message.format(f=f))


def test_particle_placement_over_ranks():
    import torch

    from bpt_ds.step import Placement

    # M = 4 on R = 2: whole particles per rank; each particle owns a block of B/M = 4 rows.
    p = Placement.make("split", particles=4, world=2, global_batch=16)
    assert p.row_particles(0).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert p.row_particles(1).tolist() == [2, 2, 2, 2, 3, 3, 3, 3]
    assert p.local_particles(1) == [2, 3] and p.row_weight(accumulation=2) == 2 * 2
    # Each example's particle's units (here target tokens) in the global batch: its block's sum.
    units = torch.arange(1, 17)
    assert p.particle_denominators(units).tolist() == [10] * 4 + [26] * 4 + [42] * 4 + [58] * 4
    # M = 2 on R = 4: two ranks share a particle and split its block.
    q = Placement.make("split", particles=2, world=4, global_batch=16)
    assert [q.local_particles(r) for r in range(4)] == [[0], [0], [1], [1]]
    assert q.rank_rows(3) == (12, 16) and q.row_weight(accumulation=1) == 4
    assert q.particle_denominators(units).tolist() == [36] * 8 + [100] * 8
    # Every rank, every particle (stage pt): rows are (particle, example) pairs over the rank's share.
    e = Placement.make("every", particles=3, world=2, global_batch=16)
    assert e.row_particles(0) is None and e.local_particles(1) == [0, 1, 2] and e.row_weight(1) == 2
    assert e.particle_denominators(units).tolist() == [136] * 16
    with pytest.raises(ConfigError, match=r"^prompt.particles \(3\) and the number of ranks \(2\) do not fit: SVGD "
                                          r"places whole particles on ranks, so one must be a multiple of the other; "
                                          r"e.g. prompt.particles=1 or 2 or 4 or 8"):
        Placement.make("split", particles=3, world=2, global_batch=12)
    with pytest.raises(ConfigError, match=r"^train.global_batch_size \(18\) must be a multiple of prompt.particles "
                                          r"\(4\): each particle gets"):
        Placement.make("split", particles=4, world=2, global_batch=18)

