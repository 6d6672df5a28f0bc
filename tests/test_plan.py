"""The memory planner (bpt_ds.plan): DeepSpeed's own estimator where both apply, parameter
counts of real T5 models, activations against what autograd actually keeps, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from bpt_ds import plan
from jobs import ROOT

SMALL = dict(d_model=64, d_ff=160, num_heads=4, d_kv=16, num_layers=3, num_decoder_layers=2, vocab_size=512,
             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def small_config(gated: bool, tied: bool, **kw) -> T5Config:
    return T5Config(**{**SMALL, **kw}, feed_forward_proj="gated-gelu" if gated else "relu",
                    tie_word_embeddings=tied)


@pytest.mark.parametrize("gated,tied", [(True, False), (False, True)])
def test_parameter_counts_are_deepspeeds_count_of_the_real_model(gated, tied):
    from deepspeed.runtime.zero.stage3 import model_to_params

    config = small_config(gated, tied)
    model = T5ForConditionalGeneration(config)
    if not tied:  # as backbone.restore_untied_lm_head leaves a v1.1 checkpoint: its own lm_head
        model.lm_head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
    assert plan.dims_from_config(config).tied is tied
    assert plan.param_counts(plan.dims_from_config(config)) == model_to_params(model)


@pytest.mark.parametrize("name", ["t5-v1_1-base", "t5-v1_1-xl", "flan-t5-xxl", "t5-3b", "t5-11b"])
def test_preset_counts_match_the_model_transformers_builds(name):
    d = plan.PRESETS[name]
    config = T5Config(d_model=d.d_model, d_ff=d.d_ff, d_kv=d.d_kv, num_heads=d.num_heads, num_layers=d.num_layers,
                      num_decoder_layers=d.num_decoder_layers, vocab_size=d.vocab_size,
                      feed_forward_proj="gated-gelu" if d.gated else "relu", tie_word_embeddings=d.tied)
    assert plan.dims_from_config(config) == d
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
        if not d.tied:
            model.lm_head = torch.nn.Linear(d.d_model, d.vocab_size, bias=False)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert plan.param_counts(d) == (total, largest)
    # The published sizes, for orientation: t5-v1_1-xl has 2.85B parameters, t5-11b 11.3B.
    assert {"t5-v1_1-xl": 2.85e9, "t5-11b": 11.31e9}.get(name, total) == pytest.approx(total, rel=0.01)


@pytest.mark.parametrize("gpn,nodes", [(1, 1), (8, 1), (4, 2), (8, 16)])
def test_model_states_with_everything_trainable_are_deepspeeds_estimates(gpn, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    for name in ("t5-v1_1-base", "t5-v1_1-xxl", "t5-11b"):
        total, largest = plan.param_counts(plan.PRESETS[name])
        for offload_opt, offload_param in [(False, False), (True, False), (True, True)]:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                total, largest, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=offload_opt,
                cpu_offload_params=offload_param, zero_init=True)
            assert plan.model_states(total, largest, total, num_gpus_per_node=gpn, num_nodes=nodes, zero=3,
                                     offload_optimizer=offload_opt, offload_param=offload_param) == (cpu, gpu)
        for offload in (False, True):
            expected = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpn, num_nodes=nodes,
                                                             cpu_offload=offload)
            assert plan.model_states(total, largest, total, num_gpus_per_node=gpn, num_nodes=nodes, zero=2,
                                     offload_optimizer=offload) == expected


def test_frozen_weights_cost_only_their_bf16_bytes():
    total, largest = plan.param_counts(plan.PRESETS["t5-v1_1-xl"])
    prompt = 4 * 100 * 2048
    _, replicated = plan.model_states(total + prompt, largest, prompt, num_gpus_per_node=8, zero=2)
    _, zero3 = plan.model_states(total + prompt, largest, prompt, num_gpus_per_node=8, zero=3)
    assert replicated == 2 * total + 2 * prompt + 18 * prompt // 8
    assert zero3 == 4 * largest + (2 * total + 18 * prompt) // 8


def saved_activation_bytes(config: T5Config, rows: int, source: int, prompt: int, target: int,
                           checkpointing: bool, dtype=torch.float32) -> int:
    """Bytes of the distinct storages autograd keeps for backward, prompt-tuning a frozen T5
    (the frozen weights it also keeps references to are not activations: left out)."""
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = T5ForConditionalGeneration(config).to(dtype).train().requires_grad_(False)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    soft = torch.randn(prompt, config.d_model, dtype=dtype, requires_grad=True)
    ids = torch.randint(3, config.vocab_size, (rows, source))
    labels = torch.randint(3, config.vocab_size, (rows, target))
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = torch.cat([soft.expand(rows, -1, -1), model.get_input_embeddings()(ids)], 1)
        model(inputs_embeds=x, labels=labels, use_cache=False).loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("gated,dropout,dtype", [(True, 0.1, torch.float32), (False, 0.1, torch.float32),
                                                 (True, 0.0, torch.float32), (True, 0.1, torch.bfloat16)])
def test_activation_estimate_covers_what_autograd_keeps(gated, dropout, dtype):
    config = small_config(gated, tied=False, dropout_rate=dropout)
    rows, source, prompt, target = 4, 40, 8, 8
    w = 2 if dtype == torch.bfloat16 else 4
    measured = saved_activation_bytes(config, rows, source, prompt, target, checkpointing=False, dtype=dtype)
    est = plan.activation_bytes(plan.dims_from_config(config), rows, source + prompt, target, checkpointing=False,
                                act_bytes=w, dropout=dropout > 0, attention="eager")
    # Safe side, but not wildly so.
    assert measured <= est <= 1.6 * measured
    kept = saved_activation_bytes(config, rows, source, prompt, target, checkpointing=True, dtype=dtype)
    est_ckpt = plan.activation_bytes(plan.dims_from_config(config), rows, source + prompt, target,
                                     checkpointing=True, act_bytes=w, dropout=dropout > 0, attention="eager")
    assert kept <= est_ckpt < est


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "bpt_ds.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_picks_the_fastest_setup_that_fits_and_writes_its_ds_config(tmp_path):
    out = tmp_path / "ds.json"
    # XXL on 8 x 24 GiB: 22 GiB of replicated bf16 weights leave no room; ZeRO-3 does.
    proc = run_plan("--model", "google/flan-t5-xxl", "--gpus", "8", "--gpu-mem", "24", "--cpu-mem", "1024",
                    "--batch", "4", "--seq", "256", "--particles", "4", "--write", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "fastest that fits: ZeRO-3 (backbone partitioned), activation checkpointing off" in proc.stdout
    lines = {tuple(line.split()[:2]): line for line in proc.stdout.splitlines()[4:10]}
    assert lines[("replicated", "no")].endswith("does not fit (GPU)")
    assert json.loads(out.read_text()) == json.loads((ROOT / "ds_configs/zero3_bf16.json").read_text())
    # The same numbers as JSON, and as the library computes them.
    proc = run_plan("--model", "google/flan-t5-xxl", "--gpus", "8", "--gpu-mem", "24", "--cpu-mem", "1024",
                    "--batch", "4", "--seq", "256", "--particles", "4", "--write", "-", "--json")
    got = json.loads(proc.stdout)
    req = plan.Request(plan.PRESETS["flan-t5-xxl"], gpus=8, gpu_mem_gb=24, cpu_mem_gb=1024, batch=4, seq=256,
                       particles=4)
    assert [e["total"] for e in got["estimates"]] == [e.total for e in plan.plan(req)]
    assert got["choice"]["name"] == "zero3" and got["choice"]["checkpointing"] is False
    # Host memory: eight replicated XL copies need ~64 GiB to load; with 32 GiB per node, ZeRO-3.
    proc = run_plan("--model", "t5-v1_1-xl", "--gpus", "8", "--gpu-mem", "80", "--cpu-mem", "32", "--write", "-")
    assert "fastest that fits: ZeRO-3 (backbone partitioned), activation checkpointing off" in proc.stdout
    assert "  63.71  does not fit (host)" in proc.stdout


def test_a_question_writes_nothing(tmp_path, monkeypatch, capsys):
    """Asked only what fits, the planner writes no file (here: into the working directory)."""
    monkeypatch.chdir(tmp_path)
    assert plan.main(["--model", "t5-base", "--gpus", "2"]) == 0
    assert "; --write FILE saves its DeepSpeed config" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_scale_configs_name_the_setup_the_planner_picks_for_their_hardware():
    from bpt_ds.runs import load_runs

    configs = sorted((ROOT / "configs/scale").glob("*.yaml"))
    assert len(configs) == 8
    for path in configs:
        (_, cfg), = load_runs(str(path), [], None)
        size = cfg.model.name_or_path.split("/")[-1]
        assert f"--model {size} --gpus 8 --gpu-mem 80 --cpu-mem 192 --batch 4 --seq 256" in path.read_text()
        req = plan.Request(plan.PRESETS[size], gpus=8, gpu_mem_gb=80, cpu_mem_gb=192,
                           batch=cfg.train.micro_batch_size, seq=cfg.data.max_source_length,
                           target_len=cfg.data.max_target_length, prompt_length=cfg.prompt.length)
        choice = plan.best(plan.plan(req))
        assert (choice.setup.template, choice.setup.checkpointing) == (cfg.deepspeed.config,
                                                                      cfg.model.gradient_checkpointing), path.name


def test_cli_says_when_nothing_fits_and_rejects_unknown_dims(tmp_path):
    proc = run_plan("--model", "t5-v1_1-xxl", "--gpu-mem", "8", "--batch", "64", "--seq", "2048",
                    "--write", str(tmp_path / "x.json"))
    assert proc.returncode == 1
    assert "nothing fits: lower --batch (gradient accumulation keeps the global batch)" in proc.stderr
    assert not (tmp_path / "x.json").exists()
    proc = run_plan("--model", "d_model=512,layers=6")
    assert proc.returncode == 2
    assert proc.stderr.startswith("bpt_ds.plan: error: --model: unknown T5 dimension 'layers'; use d_ff, d_kv,")
    # Dimensions not given come from t5-v1_1-base; num_decoder_layers follows num_layers.
    assert plan.resolve_dims("d_model=512,num_layers=6") == plan.replace(
        plan.PRESETS["t5-v1_1-base"], d_model=512, num_layers=6, num_decoder_layers=6)
    proc = run_plan("--model", "d_model=512,num_layers=6", "--write", "-")
    assert proc.returncode == 0 and "backbone: 99.0M parameters" in proc.stdout


def plan_output(monkeypatch, capsys, *args, host_gib: float = 23.4) -> tuple[int, str, str]:
    """plan.main in this process, on a machine with host_gib of memory."""
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=int(host_gib * 2**30)))
    code = plan.main([*args, "--write", "-"])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict:
    return {tuple(line.split()[:2]): line for line in out.splitlines() if line.split()[:1] in
            (["replicated"], ["zero3"], ["zero3-offload"])}


def test_cli_checks_host_memory_by_default_and_says_which_it_assumed(monkeypatch, capsys):
    # Eight replicated XXL copies cannot be loaded with 80 GiB per node: ZeRO-3 is the answer.
    code, out, _ = plan_output(monkeypatch, capsys, "--model", "t5-v1_1-xxl", "--gpus", "8", "--gpu-mem", "80",
                            "--cpu-mem", "80")
    assert code == 0
    assert "; host memory: 80 GiB per node (--cpu-mem); " in out
    rows = table(out)
    assert rows[("replicated", "no")].endswith("does not fit (host)")
    assert rows[("replicated", "yes")].endswith("does not fit (host)")
    assert rows[("zero3", "no")].endswith(" fits")
    assert "fastest that fits: ZeRO-3 (backbone partitioned), activation checkpointing off" in out
    # No --cpu-mem: this machine's memory is assumed, and said so.
    code, out, _ = plan_output(monkeypatch, capsys, "--model", "t5-v1_1-xxl", "--gpus", "8", "--gpu-mem", "80")
    assert code == 0
    assert "; host memory: 23.4 GiB per node (this machine; --cpu-mem to plan for another); " in out
    assert table(out)[("replicated", "no")].endswith("does not fit (host)")
    assert "fastest that fits: ZeRO-3 (backbone partitioned), activation checkpointing off" in out
    # The same figures in --json, with their source.
    code, out, _ = plan_output(monkeypatch, capsys, "--model", "t5-v1_1-xxl", "--gpus", "8", "--json")
    got = json.loads(out)
    assert got["request"]["cpu_mem_gb"] == pytest.approx(23.4)
    assert got["request"]["cpu_mem_source"] == "this machine; --cpu-mem to plan for another"
    assert [e["fits_host"] for e in got["estimates"]][:4] == [False, True, False, True]
    # A run that fits: one replicated Base copy on the same machine.
    code, out, _ = plan_output(monkeypatch, capsys, "--model", "t5-v1_1-base", "--gpus", "1", "--gpu-mem", "80")
    assert code == 0
    assert table(out)[("replicated", "no")].endswith(" fits")
    assert "fastest that fits: replicated bf16 backbone" in out
    # A small machine: nothing fits in host memory, and the fix names the flag.
    code, out, err = plan_output(monkeypatch, capsys, "--model", "t5-v1_1-xxl", "--gpus", "8", host_gib=0.5)
    assert code == 1
    assert "host memory: 0.5 GiB per node (this machine; --cpu-mem to plan for another)" in out
    assert all(line.endswith("(host)") for line in table(out).values())
    assert err.startswith("nothing fits: ")


def xxl_run(tmp_path, *overrides):
    """A run config for t5-v1_1-xxl (its config.json only) and its resolved DeepSpeed config."""
    from bpt_ds import deepspeed_setup
    from bpt_ds.runs import load_config

    d = plan.PRESETS["t5-v1_1-xxl"]
    T5Config(d_model=d.d_model, d_ff=d.d_ff, d_kv=d.d_kv, num_heads=d.num_heads, num_layers=d.num_layers,
             num_decoder_layers=d.num_decoder_layers, vocab_size=d.vocab_size, feed_forward_proj="gated-gelu",
             tie_word_embeddings=False).save_pretrained(tmp_path / "xxl")
    cfg = load_config(None, [f"model.name_or_path={tmp_path / 'xxl'}", "model.dtype=bf16",
                             "train.global_batch_size=32", "train.micro_batch_size=4",
                             "data.max_source_length=256", *overrides])
    return cfg, deepspeed_setup.resolve_ds_config(cfg, 8), str(tmp_path / "xxl")


def test_the_trainer_checks_host_memory_and_names_the_figure_it_assumed(tmp_path):
    from bpt_ds.errors import ConfigError

    cfg, ds, path = xxl_run(tmp_path, "deepspeed.config=ds_configs/replicated_bf16.json")
    with pytest.raises(ConfigError) as e:
        plan.check_run(cfg, ds, path, "every", 8, 8, 80 * 2**30, 80 * 2**30, "deepspeed.host_memory_gb")
    message = str(e.value)
    assert message.startswith("this run needs about ")
    assert (" GiB of host memory per node (replicated, activation checkpointing off) but a node has 80.0 GiB "
            "(deepspeed.host_memory_gb); the fastest setup that fits is ZeRO-3 (backbone partitioned): "
            "deepspeed.config=ds_configs/zero3_bf16.json model.gradient_checkpointing=false.") in message
    assert "host memory: 80 GiB per node (deepspeed.host_memory_gb)" in message
    # This machine's figure by default (check_memory passes psutil's), named as such.
    with pytest.raises(ConfigError) as e:
        plan.check_run(cfg, ds, path, "every", 8, 8, 80 * 2**30, 23 * 2**30)
    assert ("but a node has 23.0 GiB (this machine; deepspeed.host_memory_gb to plan for another)") in str(e.value)
    # ZeRO-3 fits in the same 80 GiB.
    cfg, ds, path = xxl_run(tmp_path, "deepspeed.config=ds_configs/zero3_bf16.json")
    fit = plan.check_run(cfg, ds, path, "every", 8, 8, 80 * 2**30, 80 * 2**30, "deepspeed.host_memory_gb")
    assert fit is not None and fit.fits_host and fit.setup.name == "zero3"


def test_on_cpu_the_ranks_of_a_node_share_its_memory(tmp_path, monkeypatch):
    """Without a GPU the backbone's states and activations live in host memory: check_memory
    checks what every rank of the node holds there, against this machine's memory."""
    import psutil

    from bpt_ds import deepspeed_setup
    from bpt_ds.errors import ConfigError

    cfg, ds, path = xxl_run(tmp_path, "deepspeed.config=ds_configs/zero3_bf16.json")
    monkeypatch.setattr(deepspeed_setup, "on_gpu", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(deepspeed_setup, "world_size", lambda: 8)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=64 * 2**30))
    with pytest.raises(ConfigError) as e:
        deepspeed_setup.check_memory(cfg, ds, path, "every")
    one = plan.check_run(cfg, ds, path, "every", 8, 8, 80 * 2**30, 10**15)  # the same run on a GPU
    need = (8 * one.total + one.cpu_per_node) / 2**30
    assert str(e.value).startswith(
        f"this run needs about {need:.1f} GiB of host memory per node (8 rank(s) x {one.total / 2**30:.2f} GiB of "
        f"model states, activations and reserve on CPU + {one.cpu_per_node / 2**30:.2f} GiB to load; zero3, "
        "activation checkpointing off) but a node has 64.0 GiB (this machine; deepspeed.host_memory_gb to plan "
        "for another)")
    # With room for it, the estimate comes back (it used to be skipped on CPU).
    big = dict(cfg=cfg, ds_config=ds, model_path=path, placement="every")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=2**50))
    fit = deepspeed_setup.check_memory(**big)
    assert fit is not None and fit.total == one.total
    # An explicit figure replaces this machine's, and is named.
    cfg, ds, path = xxl_run(tmp_path, "deepspeed.config=ds_configs/zero3_bf16.json", "deepspeed.host_memory_gb=48")
    with pytest.raises(ConfigError) as e:
        deepspeed_setup.check_memory(cfg, ds, path, "every")
    assert "but a node has 48.0 GiB (deepspeed.host_memory_gb); " in str(e.value)


def test_the_trainer_refuses_a_run_that_cannot_fit_before_loading_weights(tiny_backbone_path, tmp_path):
    from test_cli import run_cli

    proc = run_cli("deepspeed.device_memory_gb=0.03", "deepspeed.memory_reserve_gb=0", f"output_dir={tmp_path}",
                   cache=tiny_backbone_path.parent)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("bpt_ds: error: this run needs about 0.04 GiB per GPU (zero3, activation checkpointing off) but a "
            "device has 0.03 GiB; the fastest setup that fits is replicated bf16 backbone (ZeRO-2: only the "
            "prompt's state sharded) with activation checkpointing: deepspeed.config=ds_configs/replicated_bf16.json "
            "model.gradient_checkpointing=true. Set deepspeed.memory_check=false to start anyway.") in proc.stderr
    assert "zero3          no " in proc.stderr
    assert "[bpt_ds] loading backbone" not in proc.stdout
    proc = run_cli("deepspeed.device_memory_gb=0.01", "deepspeed.memory_reserve_gb=0", f"output_dir={tmp_path}",
                   cache=tiny_backbone_path.parent)
    assert proc.returncode == 2
    assert ("but a device has 0.01 GiB; no setup fits: lower train.micro_batch_size (gradient accumulation keeps "
            "the global batch), data.max_source_length or prompt.length, or use more GPUs.") in proc.stderr


def test_zero3_states_count_the_backbone_deepspeed_keeps_gathered():
    """From its second step DeepSpeed ZeRO-3 keeps a frozen backbone gathered from the forward
    to the backward pass (tests/test_large.py measures it), up to stage3_max_live_parameters +
    2 x the prefetch bucket; DeepSpeed's estimator counts only 4 bytes x the largest layer."""
    assert plan.zero3_gathered_params({}) == 10 ** 9 + 2 * 5 * 10 ** 7  # DeepSpeed's defaults
    assert plan.zero3_gathered_params({"stage3_max_live_parameters": 10 ** 8, "stage3_prefetch_bucket_size": "auto"}) \
        == 10 ** 8 + 10 ** 8
    prompt = 2 * 8 * 768
    total, largest = plan.param_counts(plan.PRESETS["t5-v1_1-base"])
    _, zero3 = plan.model_states(total + prompt, largest, prompt, num_gpus_per_node=2, zero=3,
                                 gathered_params=plan.zero3_gathered_params({}))
    assert zero3 == 2 * (total + prompt) + (2 * total + 18 * prompt) // 2  # the whole backbone, gathered
    # Measured on 2 CPU ranks (bench/RESULTS.md): 219,958,272 values gathered at once in step 2
    # (all but the embedding and lm_head), on top of the rank's partition; the estimate covers
    # that within 1.5x.
    gathered = zero3 - (2 * total + 18 * prompt) // 2
    assert 2 * 219_958_272 <= gathered <= 1.5 * 2 * 219_958_272
    # T5-XL (2.85B values) under the 1e9 default: 1.1e9 of them, 2.2 GB in bf16, on every rank.
    total, largest = plan.param_counts(plan.PRESETS["t5-v1_1-xl"])
    _, xl = plan.model_states(total, largest, 0, num_gpus_per_node=2, zero=3, gathered_params=plan.zero3_gathered_params({}))
    assert xl == 2 * 1_100_000_000 + total
    # The CLI reads the numbers from the setup's ds_configs/ template.
    req = plan.Request(plan.PRESETS["t5-v1_1-base"], gpus=2, batch=1, seq=64, prompt_length=8, particles=2)
    est = plan.estimate(req, plan.SETUPS[1])
    assert est.setup.name == "zero3" and est.states == zero3


def test_host_memory_is_the_jobs_cgroup_limit_when_it_is_below_the_machines(tmp_path):
    import psutil

    from bpt_ds.plan import machine_memory

    total = psutil.virtual_memory().total
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    v1.write_text(f"{total * 4}\n")  # cgroup v1's "no limit" is a huge number
    assert machine_memory((str(v2), str(v1), str(tmp_path / "absent"))) == total
    v2.write_text(f"{2**30}\n")  # SLURM --mem=1G
    assert machine_memory((str(v2), str(v1))) == 2**30


@pytest.mark.parametrize("gated", [False, True])
def test_train_step_flops_count_the_matmuls_torch_counts(gated):
    """The weights' part of the model FLOPs (perf/model_tflops_per_s, perf/mfu) against
    torch.utils.flop_counter on a real T5 forward and backward with frozen weights and a prompt
    that trains: equal to the FLOP. (torch counts no attention-score matmuls in this path; that
    part is the textbook 4 · inner · q · k per layer, checked by hand below.)"""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5ForConditionalGeneration

    from bpt_ds.model import PromptedT5
    from bpt_ds.prompts import PromptBank

    cfg = T5Config(vocab_size=300, d_model=64, d_ff=96, d_kv=16, num_heads=3, num_layers=2, num_decoder_layers=3,
                   dropout_rate=0.0, feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).requires_grad_(False)
    bank = PromptBank(2, 5, 64)
    bank.init_random(0.5, torch.Generator().manual_seed(0))
    b, s, t = 3, 7, 4
    ids, labels = torch.randint(3, 300, (b, s)), torch.randint(3, 300, (b, t))
    with FlopCounterMode(display=False) as counter:
        losses, _, _ = PromptedT5(model, bank)(ids, torch.ones(b, s, dtype=torch.long), labels,
                                               torch.zeros(b, dtype=torch.long))
        losses.sum().backward()
    rows = [(s + 5, t)] * (2 * b)  # every example under both particles, the prompt's 5 rows in front
    dims = plan.dims_from_config(model.config)
    assert plan.weight_flops(dims, rows) == counter.get_total_flops()
    # 2 encoder layers of 12 x 12 scores, 3 decoder layers of 4 x 4 self and 4 x 12 cross; x3 for backward.
    assert plan.attention_flops(dims, [(12, 4)]) == 3 * 4 * 48 * (2 * 144 + 3 * (16 + 48))
