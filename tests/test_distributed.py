"""Real multi-process runs: the deepspeed launcher, 1 and 2 CPU ranks over gloo, ZeRO-3; two
simulated nodes through launch/slurm.sbatch, and launch/torchrun.sh."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bpt_ds import checkpoints
from jobs import ROOT, TRAIN, ds_command, ds_env, dropout_backbone, run_ds, signal_when, stopped_on

pytestmark = pytest.mark.distributed

# fp32 so that 1-rank and 2-rank runs can be held to a tight tolerance; a bf16 run is
# checked for learning in test_two_ranks_learn_and_backbone_is_untouched.
SHORT_RUN = ["model.dtype=fp32", "train.steps=24", "train.global_batch_size=16", "train.micro_batch_size=8",
             "train.eval_every=0", "train.save_every=6", "train.log_every=4", "prompt.length=8",
             "train.lr=0.3", "seed=3",
             # These runs compare prompts, not scores: a short final evaluation.
             "data.max_eval_examples=16"]


@pytest.fixture(scope="module")
def cache(tiny_backbone_path) -> Path:
    return Path(tiny_backbone_path).parent


def prompts(run_dir: Path, name: str = "prompts.safetensors") -> torch.Tensor:
    return load_file(str(run_dir / name))["particles"]


def test_two_ranks_learn_and_backbone_is_untouched(cache, tmp_path):
    out = tmp_path / "run"
    proc = run_ds(2, str(ROOT / "tests/dist/train_and_check.py"), str(tmp_path / "check.json"),
                  f"output_dir={out}", "model.dtype=bf16", "prompt.init=random", "train.steps=120", "train.eval_every=40",
                  "train.log_every=10", "train.lr=0.3", "train.global_batch_size=32",
                  "train.micro_batch_size=16", "data.max_eval_examples=200", cache=cache)
    assert proc.returncode == 0
    check = json.loads((tmp_path / "check.json").read_text())
    # The backbone is partitioned, frozen and bit-identical after training.
    assert check["changed_backbone_weights"] == []
    assert check["partitioned_backbone_weights"] == check["backbone_weights"] > 0
    # Only the prompt bank trains: 1 particle x 16 tokens x d_model 128.
    assert check["trainable"] == check["bank_size"] == 16 * 128
    # It learns from random init: from near chance (0.5) to well above it on the held-out task.
    assert check["initial"]["polarity"]["accuracy"] < 0.7
    assert check["final"]["polarity"]["accuracy"] >= 0.9
    assert json.loads((out / "metrics.json").read_text())["final"]["dev"] == check["final"]
    # TensorBoard got the scalars a user watches, and the loss fell.
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
            "perf/peak_memory_mb", "dev/polarity/accuracy", "test/polarity/accuracy"} <= tags
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert len(loss) == 12 and loss[-1] < 0.5 * loss[0]
    assert "config" in " ".join(acc.Tags()["tensors"])
    assert (out / "config.yaml").is_file()


FAKE_SLURM = {
    # Two nodes of the fake allocation; the first one's name is the rendezvous address.
    "scontrol": '[ "$1 $2" = "show hostnames" ] || exit 9\necho localhost\necho 127.0.0.1\n',
    # One task per node, run side by side with SLURM_NODEID set, as srun does.
    "srun": ('while [[ "$1" == --* ]]; do shift; done\n'
             'SLURM_NODEID=0 "$@" > "$FAKE_SLURM_LOG.0" 2>&1 &\nzero=$!\n'
             'SLURM_NODEID=1 "$@" > "$FAKE_SLURM_LOG.1" 2>&1 &\none=$!\n'
             'rc=0; wait "$zero" || rc=$?; wait "$one" || rc=$?; exit "$rc"\n'),
}


def test_one_and_two_ranks_and_nodes_agree_and_resume_after_kill_matches(cache, tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert run_ds(1, TRAIN, f"output_dir={one}", *SHORT_RUN, cache=cache).returncode == 0
    assert run_ds(2, TRAIN, f"output_dir={two}", *SHORT_RUN, cache=cache).returncode == 0
    p1, p2 = prompts(one), prompts(two)
    assert p1.shape == (1, 8, 128)
    # Same global batch, same data order: the same prompts up to float summation order.
    torch.testing.assert_close(p2, p1, rtol=0, atol=2e-5)

    # launch/slurm.sbatch under a fake SLURM: two deepspeed launchers (--no_ssh, node ranks 0
    # and 1, one CPU rank each) form one job of world size 2.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = ds_env(cache, 2)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_NODELIST="fake[1-2]", SLURM_JOB_ID="7",
               SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="1", MASTER_PORT="29611",
               FAKE_SLURM_LOG=str(tmp_path / "node"))
    two_nodes = tmp_path / "two-nodes"
    # (A checkpoint every 2 steps: when to save does not change what is computed.)
    sbatch = ["bash", str(ROOT / "launch/slurm.sbatch"), f"output_dir={two_nodes}", *SHORT_RUN, "train.save_every=2"]
    # Preempted once it has a checkpoint: SIGTERM to every process of the job step, as SLURM
    # sends it (the batch script itself is not signalled). Each node's task passes it on and
    # waits for its rank, which saves at the next step boundary.
    job = subprocess.Popen(sbatch, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (two_nodes / "checkpoints" / "latest").is_file() and time.time() < deadline and job.poll() is None:
            time.sleep(0.1)
        [srun] = [p for p in psutil.Process(job.pid).children() if "srun" in " ".join(p.cmdline())]
        step = srun.children(recursive=True)
        for process in step:
            process.send_signal(signal.SIGTERM)
        assert job.wait(timeout=120) == 143
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert not any(process.is_running() for process in step)  # no rank outlives its task
    node0 = (tmp_path / "node.0").read_text()
    stop = re.search(r"stopped at step (\d+) on SIGTERM after saving checkpoint", node0)
    assert stop and int(stop.group(1)) < 24, node0[-3000:]
    # Submitted again, it resumes there.
    proc = subprocess.run(sbatch, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    node0 = (tmp_path / "node.0").read_text()
    assert proc.returncode == 0, node0[-3000:] + (tmp_path / "node.1").read_text()[-3000:]
    assert f"resumed from step {stop.group(1)}" in node0
    assert "nnodes=2, num_local_procs=1, node_rank=0" in node0
    assert "nnodes=2, num_local_procs=1, node_rank=1" in (tmp_path / "node.1").read_text()
    assert "2 rank(s), global batch 16 = micro 8 x accumulation 1 x ranks 2" in node0
    # Same ranks, same data, same reductions: bit for bit the single-node 2-rank result.
    assert torch.equal(prompts(two_nodes), p2)

    # launch/torchrun.sh: torchrun instead of the deepspeed launcher.
    torchrun = tmp_path / "torchrun"
    env = dict(ds_env(cache, 2), GPUS_PER_NODE="2", MASTER_PORT="29613")
    proc = subprocess.run(["bash", str(ROOT / "launch/torchrun.sh"), f"output_dir={torchrun}", *SHORT_RUN], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert torch.equal(prompts(torchrun), p2)

    # How a step runs changes nothing but rounding: non-reentrant activation checkpointing of the
    # frozen, partitioned backbone, torch.compile (graph capture) and torch's fused AdamW.
    checkpointed = tmp_path / "checkpointed"
    proc = run_ds(2, TRAIN, f"output_dir={checkpointed}", *SHORT_RUN, "model.gradient_checkpointing=true",
                  "model.compile=eager", "train.fused_adamw=true", cache=cache)
    assert proc.returncode == 0
    assert "[bpt_ds] model.compile=eager: the prompted model runs under torch.compile" in proc.stdout
    assert "[bpt_ds] warning: under ZeRO-3 the compiled graph breaks at every module" in proc.stderr
    # (Recomputation reorders float sums; Adam magnifies that on near-zero gradients. Measured:
    # 7e-5 with all three on.)
    torch.testing.assert_close(prompts(checkpointed), p2, rtol=0, atol=1e-3)

    # The runs below against `two`, their uninterrupted reference. (The default linear schedule:
    # its state must come back with the optimizer's.)
    # kill -9 one rank once the run has written a checkpoint: the job ends on its own, naming the
    # lost rank, and the newest checkpoint is intact.
    cmd = ds_command(2, TRAIN, f"output_dir={killed}", *SHORT_RUN)
    # (A collective timeout of 24 s: the survivor ends soon after the kill; it also bounds start-up,
    # where ranks of a loaded 2-core machine can be 12 s apart.)
    rc, log = interrupt(cmd + ["deepspeed.timeout_minutes=0.4"], killed, signal.SIGKILL, cache, tmp_path / "killed.log")
    assert rc != 0
    assert "bpt_ds: error: rank 0: lost contact with the job: rank(s) 1 did not answer." in log
    newest = max((killed / "checkpoints").glob("step*"))
    assert checkpoints.checkpoint_problem(newest) is None
    assert (killed / "checkpoints" / "latest").read_text() == newest.name
    assert not (killed / "prompts.safetensors").exists(), "the run was not killed mid-way"

    # The same command again resumes from it. Once that run has saved a newer checkpoint, SIGTERM
    # to one rank (as a scheduler preempting the job): at the next step boundary every rank saves,
    # and the job exits with 143.
    rc, log = interrupt(cmd, killed, signal.SIGTERM, cache, tmp_path / "preempted.log", after=newest.name)
    assert f"resumed from step {int(newest.name[4:])} ({newest})" in log
    assert rc == 143, log[-3000:]
    step, checkpoint = stopped_on(log, "SIGTERM", rank=1)
    saved = killed / "checkpoints" / f"step{step:08d}"
    assert checkpoint == str(saved) and checkpoints.checkpoint_problem(saved) is None

    # Once more: it resumes from the step SIGTERM saved, and ends where an uninterrupted run does.
    resumed = subprocess.run(cmd, env=ds_env(cache, 2), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {step} ({saved})" in resumed.stdout
    # Same seed, config and world size, on CPU: bit-identical prompts, interrupted or not.
    assert torch.equal(prompts(killed), p2)
    # Only complete checkpoints remain, no more than train.keep_checkpoints of them.
    names = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step00000018", "step00000024"]


def interrupt(cmd: list[str], out: Path, sig: int, cache: Path, log: Path, after: str = "") -> tuple[int, str]:
    """Starts a 2-rank job, sends sig to its rank 1 once it has written a checkpoint (other than
    `after`), and waits for the job to end on its own (within 2 minutes). Returns its exit code
    and output."""
    latest = out / "checkpoints" / "latest"

    def rank1(job):
        found = [p for p in psutil.Process(job.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
        assert len(found) == 1, "rank 1 is not running"
        return found[0]

    return signal_when(cmd, ds_env(cache, 2), log, lambda _: latest.is_file() and latest.read_text() not in ("", after),
                       rank1, sig)


def test_spot_starts_from_an_earlier_prompt(cache, tmp_path):
    source = tmp_path / "source"
    assert run_ds(1, TRAIN, f"output_dir={source}", "model.dtype=fp32", "train.steps=100", "train.eval_every=0",
                  "train.eval_at_start=true", "train.lr=0.3", cache=cache).returncode == 0
    source_acc = json.loads((source / "metrics.json").read_text())["final"]["dev"]["polarity"]["accuracy"]
    # One step at a tiny learning rate: the target can only be as good as its start.
    target = tmp_path / "target"
    proc = run_ds(1, TRAIN, "stage=spot", f"prompt.init_file={source / 'prompts.safetensors'}",
                  f"output_dir={target}", "model.dtype=fp32", "train.steps=1", "train.lr=1e-6", cache=cache)
    assert proc.returncode == 0
    target_acc = json.loads((target / "metrics.json").read_text())["final"]["dev"]["polarity"]["accuracy"]
    assert source_acc >= 0.85
    assert abs(target_acc - source_acc) <= 0.01
    # The control: the default start (vocabulary init) is near chance; the source's step-0 evaluation.
    acc = EventAccumulator(str(source / "tb"))
    acc.Reload()
    start = [e for e in acc.Scalars("dev/polarity/accuracy") if e.step == 0]
    assert len(start) == 1 and start[0].value < 0.7


def test_untied_lm_head_survives_zero3_loading_on_two_ranks(tiny_backbone_path, cache, tmp_path):
    """transformers 5.x ties lm_head to `shared` when loading under ZeRO-3; we restore it."""
    from transformers import T5ForConditionalGeneration

    ckpt = tmp_path / "untied"
    ckpt.mkdir()
    src = Path(tiny_backbone_path)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json") and f.is_file():
            (ckpt / f.name).write_bytes(f.read_bytes())
    state = load_file(str(src / "model.safetensors"))
    state = {k: v.clone() for k, v in state.items()}
    state["lm_head.weight"] = torch.randn_like(state["shared.weight"], generator=torch.Generator().manual_seed(0))
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (ckpt / "config.json").write_text(json.dumps(config))

    proc = run_ds(2, str(ROOT / "tests/dist/lm_head_check.py"), str(ckpt), str(tmp_path / "r.json"), cache=cache)
    assert proc.returncode == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["world_size"] == 2
    assert r["restored"] and r["head_matches_file"] and r["head_partitioned"]
    assert not r["head_is_shared_object"]
    reference = T5ForConditionalGeneration.from_pretrained(str(ckpt), dtype=torch.float32)
    assert torch.equal(reference.lm_head.weight, state["lm_head.weight"])
    expected = reference(input_ids=torch.tensor([[5, 6, 7, 8, 1]]), decoder_input_ids=torch.tensor([[0, 5, 9]])).logits
    torch.testing.assert_close(torch.tensor(r["logits"]), expected, rtol=1e-5, atol=1e-5)
    # Documents the trap itself (transformers alone); if this starts failing, transformers fixed it.
    assert r["transformers_tied_under_zero3"]


def test_default_command_runs_end_to_end(cache, tmp_path):
    """`deepspeed launch/train.py` with no arguments, as the README says (cwd: an empty dir)."""
    proc = subprocess.run(["deepspeed", TRAIN], env=ds_env(cache, 1), cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "default"
    assert f"Outputs in {out.resolve()}" in proc.stdout
    assert "[bpt_ds] loading backbone " in proc.stdout  # the line test_cli checks is absent on early errors
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"]["dev"]["polarity"]["accuracy"] >= 0.9
    # The reported numbers: the test set at the best dev step, whose prompt is kept too.
    assert metrics["selected"]["test"]["polarity"]["accuracy"] >= 0.85
    assert metrics["selected"]["dev"]["polarity"]["score"] >= metrics["final"]["dev"]["polarity"]["score"]
    assert prompts(out, "prompts_best.safetensors").shape == (1, 16, 128)
    assert prompts(out).shape == (1, 16, 128)
    assert any((out / "tb").iterdir())
    # The embedded default written out continues that run (it was refused for
    # `train.micro_batch_size: None -> 16` before the file said what the default says).
    again = subprocess.run(["deepspeed", "--master_port", "29762", TRAIN, "--config",
                            str(ROOT / "configs" / "tiny_cpu.yaml")], env=ds_env(cache, 1), cwd=tmp_path,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # (Finished with this very config, it is done: said at once, nothing loaded.)
    assert "runs/default already holds this run, finished" in again.stdout
    assert "[bpt_ds] loading backbone" not in again.stdout


def test_particles_factors_and_early_stopping_on_two_ranks(cache, tmp_path):
    out = tmp_path / "run"
    args = [f"output_dir={out}", "model.dtype=fp32", "prompt.particles=2", "prompt.factors.rank=2",
            "data.tasks=[polarity, sentiment]", "train.steps=50", "train.eval_every=1", "train.patience=2",
            "train.log_every=1", "train.lr=1e-9", "train.factor_lr=1e-9", "data.max_eval_examples=63",
            "train.global_batch_size=16", "train.micro_batch_size=4",
            # Length-grouped batches through the config (they cannot change accuracy at lr 1e-9).
            "data.group_by_length=4"]
    proc = run_ds(2, TRAIN, *args, cache=cache)
    assert proc.returncode == 0
    # A learning rate of 1e-9 cannot change accuracy: best at step 1, then two evaluations without gain.
    assert "early stop at step 3: no gain in 2 evaluations" in proc.stdout
    tensors = load_file(str(out / "prompts.safetensors"))
    assert tensors["particles"].shape == (2, 16, 128)
    for task in ("polarity", "sentiment"):
        assert tensors[f"factors.{task}.U"].shape == (16, 2)
        assert tensors[f"factors.{task}.V"].shape == (2, 128)
    metrics = json.loads((out / "metrics.json").read_text())["final"]["dev"]
    # 63 examples over 2 ranks: the padded placeholder of rank 1 is not counted.
    assert metrics == {t: {"accuracy": metrics[t]["accuracy"], "score": metrics[t]["accuracy"], "examples": 63,
                           "invalid": 0} for t in ("polarity", "sentiment")}
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"train/loss_particle_0", "train/loss_particle_1"} <= set(acc.Tags()["scalars"])
    assert "trainable parameters: 4,672 (prompt bank only)" in proc.stdout  # 2·16·128 + 2·(16+128)·2

    # Running the same command again does not train past the early stop.
    again = run_ds(2, TRAIN, *args, cache=cache)
    assert again.returncode == 0
    assert f"{out} already holds this run, finished" in again.stdout and "loading backbone" not in again.stdout
    assert json.loads((out / "metrics.json").read_text())["final"]["dev"] == metrics
    # A checkpoint continues only the computation that wrote it.
    other = run_ds(2, TRAIN, *args, "train.lr=0.1", cache=cache, launcher="deepspeed")  # its exit code
    assert other.returncode == 2
    assert (f"bpt_ds: error: the checkpoint in {out / 'checkpoints'} was written with a different config "
            "(train.lr: 1e-09 -> 0.1); resuming would mix two runs. Use train.resume=never") in other.stderr
    # train.resume=never starts over and sets the earlier checkpoints aside instead of deleting them.
    fresh = run_ds(2, TRAIN, *args, "train.resume=never", "train.patience=0", "train.steps=2", cache=cache)
    assert fresh.returncode == 0 and "train.resume=never: earlier checkpoints moved to" in fresh.stdout
    aside = [d for d in out.iterdir() if d.name.startswith("checkpoints-set-aside-")]
    assert len(aside) == 1 and (aside[0] / "step00000003").is_dir()
    assert len([d for d in out.iterdir() if d.name.startswith("tb-set-aside-")]) == 1  # curves stay apart
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"


def test_resume_replays_dropout_of_a_real_style_backbone(tiny_backbone_path, cache, tmp_path):
    """With dropout on (as in real T5 checkpoints), stopping at step 6 and resuming to step 12
    ends where an uninterrupted 12-step run ends: the masks depend on (seed, step, rank) only."""
    ckpt = dropout_backbone(Path(tiny_backbone_path), tmp_path / "dropout-t5", 0.3)
    common = [f"model.name_or_path={ckpt}", "model.dtype=fp32", "train.schedule=constant", "train.eval_every=0",
              "train.save_every=6", "prompt.length=8", "train.global_batch_size=16",
              "data.max_eval_examples=16"]
    split, whole = tmp_path / "split", tmp_path / "whole"
    assert run_ds(1, TRAIN, f"output_dir={split}", *common, "train.steps=6", cache=cache).returncode == 0
    resumed = run_ds(1, TRAIN, f"output_dir={split}", *common, "train.steps=12", cache=cache)
    assert resumed.returncode == 0 and "resumed from step 6" in resumed.stdout
    assert run_ds(1, TRAIN, f"output_dir={whole}", *common, "train.steps=12", cache=cache).returncode == 0
    # Without the per-step seed in PromptTuning.train the two end up to 1.3 apart (checked by removing it).
    torch.testing.assert_close(prompts(split), prompts(whole), rtol=0, atol=1e-6)
