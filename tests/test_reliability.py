"""Faults that must not cost a user their trained prompts: damaged checkpoints, checkpoint files
that are more than tensors, full or unwritable disks, and non-finite steps (a real 2-rank run
with faults injected by tests/dist/faults.py). Killed ranks and SIGTERM are in
test_distributed.py, where they share the uninterrupted reference run."""
from __future__ import annotations

import errno
import importlib.util
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bpt_ds import checkpoints, files
from bpt_ds.errors import ConfigError
from jobs import ROOT, TRAIN, ds_env, run_ds, signal_when, stopped_on


def fake_checkpoint(root: Path, step: int, payload: bytes = b"tensors", world_size: int = 1,
                    extra: dict | None = None) -> Path:
    """A checkpoint directory as Engine.save_checkpoint leaves it: files plus their manifest."""
    d = root / f"step{step:08d}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(payload * 100)
    (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(payload)
    for name, content in (extra or {}).items():
        (d / name).write_bytes(content)
    manifest = {"format": 1, "step": step, "world_size": world_size, "files": checkpoints.file_digests(d)}
    (d / checkpoints.MANIFEST).write_text(json.dumps(manifest))
    (root / "latest").write_text(d.name)
    return d


def test_the_newest_intact_checkpoint_is_chosen_and_damaged_ones_are_set_aside(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoints.choose_checkpoint(root) == (None, [])
    fake_checkpoint(root, 6)
    fake_checkpoint(root, 12)
    newest = fake_checkpoint(root, 18)
    assert checkpoints.checkpoint_problem(newest) is None
    assert checkpoints.choose_checkpoint(root) == ("step00000018", [])

    # A truncated file: the one before is used, with a warning; the damaged one is kept aside.
    (newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"tensors" * 10)
    tag, notes = checkpoints.choose_checkpoint(root)
    assert tag == "step00000012"
    [note] = notes
    assert note.startswith(f"checkpoint {newest} is damaged: zero_pp_rank_0_mp_rank_00_optim_states.pt has 70 "
                           "bytes, the manifest says 700 (truncated?). It was moved to ")
    assert note.endswith("and is not loaded; trying the one before it")
    assert not newest.exists() and len(glob.glob(str(root / "damaged-step00000018-*"))) == 1
    assert (root / "latest").read_text() == "step00000012"

    # Same size, other bytes; a missing file; no manifest at all.
    middle = root / "step00000012"
    (middle / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"TENSORS")
    assert checkpoints.checkpoint_problem(middle) == ("zero_pp_rank_0_mp_rank_00_model_states.pt does not match its "
                                                 "sha256 in the manifest (corrupted)")
    (root / "step00000006" / "zero_pp_rank_0_mp_rank_00_model_states.pt").unlink()
    assert checkpoints.checkpoint_problem(root / "step00000006") == "zero_pp_rank_0_mp_rank_00_model_states.pt is missing"
    (root / "step00000003").mkdir()
    assert checkpoints.checkpoint_problem(root / "step00000003") == "it is empty"
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.choose_checkpoint(root)
    assert str(e.value).startswith(f"no intact checkpoint in {root} (step00000012: zero_pp_rank_0_mp_rank_00_model"
                                   "_states.pt does not match its sha256 in the manifest (corrupted); step00000006: ")
    assert str(e.value).endswith("each moved to damaged-*). Rerun to start from step 0, or restore a copy of the "
                                 "checkpoints")
    assert sorted(p.name[:20] for p in root.iterdir() if p.is_dir()) == [
        "damaged-step00000003", "damaged-step00000006", "damaged-step00000012", "damaged-step00000018"]


def test_a_resume_warns_about_damage_and_refuses_another_number_of_ranks_only_without_the_portable_state(
        tmp_path, capsys):
    """pick_checkpoint, which setup calls before the backbone loads (here as a job of one)."""
    root = tmp_path / "checkpoints"
    assert checkpoints.pick_checkpoint(root) is None
    fake_checkpoint(root, 6)
    newest = fake_checkpoint(root, 12)
    (newest / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoints.pick_checkpoint(root) == "step00000006"
    assert capsys.readouterr().err.startswith(
        f"[bpt_ds] warning: checkpoint {newest} is damaged: zero_pp_rank_0_mp_rank_00_model_states.pt has 0 bytes, "
        "the manifest says 7 (truncated?). It was moved to ")
    # Written before manifests existed: loaded, unverified, with a warning.
    legacy = fake_checkpoint(root, 15)
    (legacy / checkpoints.MANIFEST).unlink()
    assert checkpoints.pick_checkpoint(root) == "step00000015"
    assert capsys.readouterr().err == (f"[bpt_ds] warning: checkpoint {legacy} has no manifest.json (written by an "
                                       "earlier bpt_ds): it is loaded without checking its files\n")
    fake_checkpoint(root, 18, world_size=2)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.pick_checkpoint(root)
    assert str(e.value) == (f"checkpoint {root / 'step00000018'} was written by 2 rank(s) and this run has 1, and "
                            "it has no rank-independent copy (trainable_state.pt: written by a bpt_ds from "
                            "before 2026-12): its optimizer state is per rank. Launch 2 rank(s) to resume, or start over with "
                            "train.resume=never")
    # With the rank-independent state, another number of ranks resumes (tests/test_resume_ranks.py runs it).
    portable = fake_checkpoint(root, 21, world_size=2, extra={checkpoints.PORTABLE: b"STATE"})
    assert checkpoints.pick_checkpoint(root) == portable.name


class Payload:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_load_as_plain_tensors_only(tmp_path):
    load = checkpoints._weights_only_engine(None).load
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, good)
    assert torch.equal(load(str(good))["module"]["w"], torch.ones(2))

    evil = tmp_path / "evil.pt"
    Payload.marker = tmp_path / "ran"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload()}, evil)
    with pytest.raises(checkpoints.CheckpointError) as e:
        load(str(evil))
    assert str(e.value) == (f"checkpoint file {evil} holds more than tensors and plain values (it needs posix.system); "
                            "bpt_ds loads checkpoints with torch.load(weights_only=True) and runs no code from them. "
                            "Was it written by bpt_ds? Use train.resume=never to start over")
    assert not Payload.marker.exists()


def test_an_unwritable_output_dir_or_a_small_disk_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as e:
        files.check_writable(blocker / "run")
    assert str(e.value) == (f"output_dir: cannot write to '{blocker / 'run'}' (Not a directory); choose a directory "
                            "this job can write to on every node, e.g. output_dir=$HOME/runs/<name>")
    files.check_writable(tmp_path / "new" / "run")  # created, probed, left empty
    assert list((tmp_path / "new" / "run").iterdir()) == []

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 3 * 2**20, 3 * 2**20))
    files.check_free_space(tmp_path / "not-yet" / "run", 3 * 2**20, "the checkpoints")
    with pytest.raises(ConfigError) as e:
        files.check_free_space(tmp_path / "not-yet" / "run", 5 * 2**20, "2 checkpoint(s) and the prompt files")
    assert str(e.value) == (f"output_dir: the file system of '{tmp_path / 'not-yet' / 'run'}' has 3.0 MiB free, and 2 "
                            "checkpoint(s) and the prompt files need about 5.0 MiB; free some space or choose another "
                            "output_dir")


def test_the_trainer_refuses_an_unwritable_output_dir_before_loading_anything(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = ds_env(Path("/nonexistent-cache"), 1)  # the backbone cache is never reached
    proc = subprocess.run([sys.executable, TRAIN, f"output_dir={blocker}/run"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"bpt_ds: error: output_dir: cannot write to '{blocker}/run' (Not a directory)" in proc.stderr
    assert "loading backbone" not in proc.stdout


@pytest.mark.distributed
def test_a_check_that_fails_on_one_rank_ends_every_rank_with_its_message(tiny_backbone_path, tmp_path):
    """Rank 1 alone finds no free space before training: both ranks stop with its error (code 2),
    rather than rank 0 waiting in the next collective."""
    os.environ["BPT_DS_FAULTS"] = json.dumps({"no_space_at_start": ["1"]})
    try:
        # run_ds's own time limit (600 s): the job takes ~1 min on an idle machine and ~3 on a loaded
        # 2-core one, where 300 s was too close. A rank left waiting in the next collective would wait
        # deepspeed.timeout_minutes (30) and still run into it. Its own master port: a job of another
        # test on the default port would make this one fail with "address already in use".
        proc = run_ds(2, str(ROOT / "tests/dist/faults.py"), f"output_dir={tmp_path / 'run'}", "train.steps=2",
                      cache=Path(tiny_backbone_path).parent, port=29782, launcher="deepspeed")  # its exit code
    finally:
        del os.environ["BPT_DS_FAULTS"]
    assert proc.returncode == 2
    message = (f"bpt_ds: error: rank 1: output_dir: the file system of '{tmp_path / 'run'}' has 0.0 MiB free, and "
               "2 checkpoint(s) (train.keep_checkpoints), one being written, and the prompt files need about ")
    assert proc.stderr.count(message) == 2  # printed by both ranks
    assert "loading backbone" not in proc.stdout


def test_an_output_that_cannot_be_written_is_retried_then_rescued(tmp_path, monkeypatch, capsys):
    target = tmp_path / "out" / "prompts.safetensors"
    failures = [OSError(errno.ENOSPC, "No space left on device")] * 2

    def write(path: Path) -> None:
        if failures and path.parent == target.parent:
            raise failures.pop()
        path.write_bytes(b"prompts")

    files.write_with_retry(target, write, minutes=1, interval=0.01)
    assert target.read_bytes() == b"prompts" and not failures
    err = capsys.readouterr().err
    assert err.startswith(f"[bpt_ds] could not write {target}: [Errno 28] No space left on device. Its data stays in "
                          "memory: free space or fix the permissions; retrying every 0 s for 1 min")
    assert err.count("could not write") == 1  # said once, not once per retry

    monkeypatch.setattr(files.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    failures[:] = [OSError(errno.EROFS, "Read-only file system")] * 1000
    with pytest.raises(files.SaveError) as e:
        files.write_with_retry(target, write, minutes=0)
    rescued = tmp_path / "tmp" / f"bpt_ds-rescue-{os.getpid()}" / "prompts.safetensors"
    assert str(e.value) == (f"could not write {target}: [Errno 30] Read-only file system; it was written to {rescued} "
                            f"instead; copy it to {target.parent} once there is room")
    assert rescued.read_bytes() == b"prompts"
    assert not list(target.parent.glob(".tmp-*"))


def optimizer_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's optimizer files: fp32 prompts, Adam's moments and step."""
    torch.serialization.add_safe_globals(checkpoints._checkpoint_globals())
    out = {}

    def walk(obj, key):
        if isinstance(obj, torch.Tensor):
            out[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    for f in sorted(checkpoint.glob("*optim_states.pt")):
        walk(torch.load(f, weights_only=True), f.name)
    return out


@pytest.mark.distributed
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tiny_backbone_path, tmp_path):
    """SVGD over 2 particles on 2 ranks, a checkpoint after every step. Injected: a NaN loss on
    rank 1 (step 3), a NaN gradient on rank 0 (step 5), a NaN SVGD direction (step 7), a NaN
    loss on rank 0 (step 8), and no disk space on rank 1 at the first save."""
    out = tmp_path / "run"
    faults = {"nan_loss": {"1": [3], "0": [8]}, "nan_grad": {"0": [5]},
              # the SVGD hook does not run on steps 3 and 5: its 5th call is step 7
              "nan_direction": [5], "no_space": {"1": [1]}}
    args = [f"output_dir={out}", "stage=bmtpt-source", "model.dtype=fp32", "data.tasks=[sentiment,mood]",
            "prompt.length=8", "prompt.particles=2", "prompt.init=random", "train.steps=10",
            "train.global_batch_size=16", "train.micro_batch_size=8", "train.eval_every=0", "train.save_every=1",
            "train.keep_checkpoints=10", "train.max_bad_steps=2", "train.log_every=2", "train.lr=0.1", "seed=5",
            "data.max_eval_examples=16"]
    cache = Path(tiny_backbone_path).parent
    os.environ["BPT_DS_FAULTS"] = json.dumps(faults)
    try:  # (its own master port, as above)
        proc = run_ds(2, str(ROOT / "tests/dist/faults.py"), *args, cache=cache, port=29781,
                      launcher="deepspeed")  # the launcher passes the rank's exit code
    finally:
        del os.environ["BPT_DS_FAULTS"]
    assert proc.returncode == 4
    log = proc.stderr
    assert ("checkpoint of step 1 not written: 0.0 MiB free on the file system of "
            f"{out}/checkpoints (the fullest a rank writes to)") in log
    for step, what, in_row, in_all in [(3, "loss", 1, 1), (5, "gradient of the prompts", 1, 2),
                                       (7, "SVGD direction", 1, 3), (8, "loss", 2, 4)]:
        assert (f"[bpt_ds] warning: step {step} skipped: non-finite {what} on some rank ({in_row} in a row, "
                f"{in_all} in all; the run stops at train.max_bad_steps=2 in a row)") in log
    assert log.count("bpt_ds: error: training stopped") == 1
    assert (f"bpt_ds: error: training stopped at step 8: 2 steps in a row had a non-finite loss (train.max_bad_steps=2; "
            "4 skipped in all). Skipped steps do not move the prompts. The newest checkpoint is kept: "
            f"{out}/checkpoints/step00000007. Lower train.lr") in log
    # The full disk skipped step 1's checkpoint; the halted step 8 wrote none.
    root = out / "checkpoints"
    assert sorted(p.name for p in root.glob("step*")) == [f"step{s:08d}" for s in range(2, 8)]
    assert all(checkpoints.checkpoint_problem(p) is None for p in root.glob("step*"))
    # A skipped step moves neither the prompts nor Adam's moments and step count; a good one does.
    state = {s: optimizer_state(root / f"step{s:08d}") for s in range(2, 8)}
    assert len(state[2]) == 8  # 2 ranks x (fp32 prompts, exp_avg, exp_avg_sq, step)
    for skipped in (3, 5, 7):
        assert all(torch.equal(state[skipped][k], state[skipped - 1][k]) for k in state[2])
    prompts = [k for k in state[2] if "fp32_flat_groups" in k]
    assert len(prompts) == 2
    for good in (4, 6):
        assert all(torch.isfinite(v).all() for v in state[good].values())
        assert all(not torch.equal(state[good][k], state[good - 1][k]) for k in prompts)
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")] == [
        (2, 0), (3, 1), (4, 1), (5, 2), (6, 2), (7, 3), (8, 4)]
    # The linear schedule follows the data steps, skipped or not (DeepSpeed itself would hold it
    # back on a non-finite gradient, and not on a bad SVGD direction).
    lr = [(e.step, e.value) for e in acc.Scalars("train/lr")]
    assert [s for s, _ in lr] == [2, 4, 6] and all(abs(v - 0.1 * (1 - s / 10)) < 1e-6 for s, v in lr), lr

    # The newest checkpoint damaged (a truncated shard of rank 1), the faults gone: the rerun
    # warns, resumes from the one before with the skip count it had, and finishes.
    shard = root / "step00000007" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    # (faults.py refuses torch.load without weights_only=True: the resume proves how it loads.)
    again = run_ds(2, str(ROOT / "tests/dist/faults.py"), *args, cache=cache, port=29781)
    assert again.returncode == 0
    assert (f"[bpt_ds] warning: checkpoint {root}/step00000007 is damaged: zero_pp_rank_1_mp_rank_00_optim_states.pt "
            "has 100 bytes, the manifest says ") in again.stderr
    assert f"resumed from step 6 ({root}/step00000006)" in again.stdout
    assert len(list(root.glob("damaged-step00000007-*"))) == 1
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/skipped_steps")][-1] == (10, 2)  # steps 3 and 5


def test_ctrl_c_saves_and_stops_and_a_restart_writes_no_step_twice(tiny_backbone_path, tmp_path):
    """`python launch/train.py`, SIGINT (Ctrl-C) mid-run, long before the first train.save_every:
    the run saves a checkpoint at the next step boundary, says it got SIGINT, exits with 130 and
    no traceback; the rerun resumes from that step. TensorBoard then holds every step once, also
    after a restart from step 0 (a run that ended without a checkpoint)."""
    cache = Path(tiny_backbone_path).parent
    out = tmp_path / "run"
    args = [f"output_dir={out}", "train.save_every=100", "train.eval_every=0", "train.log_every=1",
            "prompt.length=4", "train.global_batch_size=8", "data.max_eval_examples=8"]
    # MLflow (when installed) says how each attempt ended, and a restart from step 0 is a new run.
    mlflow = importlib.util.find_spec("mlflow") is not None
    if mlflow:
        from mlflow.tracking import MlflowClient

        args.append("report_to=[tensorboard,mlflow]")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())

        def status() -> str:
            return client.get_run((out / "mlflow_run_id").read_text().strip()).info.status

    def three_steps(text: str) -> bool:
        steps = [int(n) for n in re.findall(r"\| *(\d+)/400", text)]  # the progress bar
        return bool(steps) and max(steps) >= 3

    rc, text = signal_when([sys.executable, TRAIN, *args, "train.steps=400"], ds_env(cache, 1), tmp_path / "run.log",
                           three_steps, lambda job: job, signal.SIGINT)
    assert rc == 130, text[-3000:]
    step, checkpoint = stopped_on(text, "SIGINT", rank=0)
    assert "Traceback" not in text
    assert checkpoint == str(out / "checkpoints" / f"step{step:08d}")
    assert (out / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    if mlflow:
        assert status() == "KILLED"
        first_run = (out / "mlflow_run_id").read_text()

    def loss_steps() -> list[int]:
        acc = EventAccumulator(str(out / "tb"))
        acc.Reload()
        return [e.step for e in acc.Scalars("train/loss")]

    resumed = subprocess.run([sys.executable, TRAIN, *args, f"train.steps={step + 2}"], env=ds_env(cache, 1),
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"[bpt_ds] resumed from step {step} " in resumed.stdout
    assert loss_steps() == list(range(1, step + 3))
    if mlflow:
        assert status() == "FINISHED" and (out / "mlflow_run_id").read_text() == first_run

    # Without a checkpoint (a crash before the first save, so no done.json either) the rerun
    # starts at step 0: the earlier run's steps are hidden, not shown twice.
    shutil.rmtree(out / "checkpoints")
    (out / "done.json").unlink()
    fresh = subprocess.run([sys.executable, TRAIN, *args, "train.steps=2"], env=ds_env(cache, 1), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resumed from" not in fresh.stdout
    assert loss_steps() == [1, 2]
    if mlflow:
        run_id = (out / "mlflow_run_id").read_text().strip()
        assert run_id != first_run.strip() and status() == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]
        assert client.get_run(first_run.strip()).info.status == "FINISHED"  # the earlier run keeps its points
