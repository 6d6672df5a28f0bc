"""Running a command again in an output_dir that holds a run: what is continued, what is refused
(before the backbone loads, naming the changed keys, undoing nothing), and what the learning-rate
schedule does when train.steps grows. Single-process runs of launch/train.py."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bpt_ds.runs import load_config, load_runs
from bpt_ds.config import config_fingerprint, fingerprint_changes
from jobs import ROOT, TRAIN, ds_env

# A short run of the tiny T5: 4-token prompt, small batches, a short final evaluation.
QUICK = ["train.eval_every=0", "data.max_eval_examples=8", "prompt.length=4", "train.global_batch_size=8",
         "train.log_every=1"]


def train(out: Path, *args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, f"output_dir={out}", *args], env=ds_env(cache, 1), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the whole output directory: outputs, checkpoints, tb)."""
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_the_tiny_cpu_config_is_the_embedded_default():
    """configs/tiny_cpu.yaml says it is the embedded default, written out: it must be, or the
    default run's output_dir refuses it as another config."""
    assert load_config(str(ROOT / "configs/tiny_cpu.yaml")) == load_config(None)


def readme_run_commands() -> list[list[str]]:
    """The launch/train.py commands of the README's Run section, in order, as argument lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Run\n", 1)[1].split("\n### ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line)
            if "launch/train.py" in words and "--show-config" not in words:  # --show-config runs nothing
                commands.append(words[words.index("launch/train.py") + 1:])
    return commands


def test_the_readme_run_commands_work_in_order():
    """Each command of the README's Run section, run after the ones above it, either writes to
    its own output_dir or continues the same computation (a resume would not be refused)."""
    commands = readme_run_commands()
    assert len(commands) >= 2
    seen: dict[str, tuple[int, dict]] = {}
    for i, words in enumerate(commands):
        config = None
        if words and words[0] == "--config":
            config, words = str(ROOT / words[1]), words[2:]
        for _, cfg in load_runs(config, words):
            key = str(Path(cfg.output_dir))
            if key in seen:
                j, before = seen[key]
                changed = fingerprint_changes(cfg, before)
                assert not changed, (f"README Run command {i + 1} resumes command {j + 1}'s {key} with other "
                                     f"values of {changed}: it would be refused")
            seen[key] = (i, config_fingerprint(cfg))


def test_a_refused_resume_stops_before_the_backbone_and_undoes_nothing(tiny_backbone_path, tmp_path):
    """A finished run, then commands its checkpoint cannot continue: refused (code 2) before the
    backbone loads, naming the changed keys and the fix; done.json and every file of the run stay
    byte-identical (a pipeline rerun still skips it)."""
    cache = Path(tiny_backbone_path).parent
    out = tmp_path / "run"
    first = train(out, *QUICK, "train.steps=2", cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    manifest = json.loads((out / "checkpoints" / "step00000002" / "manifest.json").read_text())
    assert manifest["config"]["prompt.length"] == 4  # the fingerprint travels with the checkpoint
    before = tree_digest(out)
    assert "done.json" in before

    # The same command again: done, said at once; nothing loads, nothing is written (it used to
    # load the backbone, resume the final checkpoint and evaluate again).
    again = train(out, *QUICK, "train.steps=2", cache=cache)
    assert again.returncode == 0
    assert f"[bpt_ds] {out} already holds this run, finished (done.json: this config and these inputs); " \
           "nothing to do." in again.stdout
    assert "[bpt_ds] loading backbone" not in again.stdout and "task polarity" not in again.stdout
    assert tree_digest(out) == before

    refused = train(out, *QUICK, "train.steps=2", "prompt.length=8", "train.lr=0.1", cache=cache)
    assert refused.returncode == 2
    assert (f"bpt_ds: error: the checkpoint in {out / 'checkpoints'} was written with a different config "
            "(prompt.length: 4 -> 8, train.lr: 0.3 -> 0.1); resuming would mix two runs. Use train.resume=never "
            "to start over (the old checkpoints are kept aside), or a new output_dir.") in refused.stderr
    assert "[bpt_ds] loading backbone" not in refused.stdout
    assert tree_digest(out) == before

    # A checkpoint from before manifests carried the config: the check comes after loading (the
    # old, late path), and still undoes nothing.
    path = out / "checkpoints" / "step00000002" / "manifest.json"
    del manifest["config"]
    path.write_text(json.dumps(manifest, indent=1))
    before = tree_digest(out)
    late = train(out, *QUICK, "train.steps=2", "train.lr=0.1", cache=cache)
    assert late.returncode == 2
    assert "was written with a different config (train.lr: 0.3 -> 0.1)" in late.stderr
    assert tree_digest(out) == before


def adam_lr_used(before: Path, after: Path) -> float:
    """The learning rate of the one optimizer step between two checkpoints, measured from their
    fp32 prompts and the later one's Adam moments: p_before - p_after = lr · m̂ / (sqrt(v̂) + eps)
    (torch AdamW defaults, weight decay 0)."""
    from test_reliability import optimizer_state

    a, b = optimizer_state(before), optimizer_state(after)
    key = "zero_pp_rank_0_mp_rank_00_optim_states.pt/optimizer_state_dict"
    p0, p1 = (s[f"{key}/fp32_flat_groups/0"].detach().double() for s in (a, b))
    state = f"{key}/optimizer_state_dict/state/0"
    t = float(b[f"{state}/step"])
    m = b[f"{state}/exp_avg"].double() / (1 - 0.9 ** t)
    v = b[f"{state}/exp_avg_sq"].double() / (1 - 0.999 ** t)
    unit = m / (v.sqrt() + 1e-8)
    return float(((p0 - p1) * unit).sum() / (unit * unit).sum())


def test_more_steps_after_a_finished_run_follow_the_longer_schedule_and_say_so(tiny_backbone_path, tmp_path):
    """4 of 4 linear-decay steps (the LR ends at 0), resumed with train.steps=8: the schedule is
    rebuilt over 8 steps, rank 0 says so with the LR before and after, and the steps from 4 on use
    the 8-step schedule's LR (0.3 · (1 - s/8)), the first resumed step included (measured from the
    Adam update between the checkpoints of steps 4 and 5)."""
    cache = Path(tiny_backbone_path).parent
    out = tmp_path / "run"
    assert train(out, *QUICK, "train.steps=4", cache=cache).returncode == 0
    longer = train(out, *QUICK, "train.steps=8", "train.save_every=5", "train.keep_checkpoints=3", cache=cache)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "[bpt_ds] resumed from step 4" in longer.stdout
    assert ("[bpt_ds] train.steps 4 -> 8: the linear learning-rate schedule is rebuilt over 8 steps; the LR at "
            "step 4 goes from 0 to 0.15 (as in a run of 8 steps) and follows that schedule from there") \
        in longer.stdout
    ckpt = out / "checkpoints"
    assert adam_lr_used(ckpt / "step00000004", ckpt / "step00000005") == pytest.approx(0.15, rel=1e-4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    # train/lr at step s: the LR of the step after s (the scheduler has moved on).
    assert sorted(lr) == list(range(1, 9))
    for s, value in lr.items():
        assert value == pytest.approx(0.3 * (1 - s / (4 if s <= 4 else 8)), abs=1e-7), (s, value)


def test_train_epochs_sets_the_steps_and_a_pipeline_knows_when_they_are_done(tiny_backbone_path, tmp_path):
    """train.epochs=0.5 over 60 examples in batches of 8: ceil(3.75) = 4 steps, said in the log;
    finished() reads the run as done for 0.5 epochs and short for 1, and 1 epoch resumes to 8."""
    from bpt_ds.config import steps_for_epochs
    from bpt_ds.pipeline import finished

    assert (steps_for_epochs(0.5, 60, 8), steps_for_epochs(1, 64, 8), steps_for_epochs(0.01, 60, 8)) == (4, 8, 1)
    cache = Path(tiny_backbone_path).parent
    out = tmp_path / "run"
    args = [*QUICK, "data.synthetic_train_examples=60"]
    half = train(out, *args, "train.epochs=0.5", cache=cache)
    assert half.returncode == 0, half.stderr[-3000:]
    assert ("[bpt_ds] train.epochs=0.5: 4 steps of 8 examples over 60 training examples (train.steps=200 is not "
            "used)") in half.stdout
    assert json.loads((out / "done.json").read_text())["step"] == 4
    assert finished(load_config(None, [f"output_dir={out}", *args, "train.epochs=0.5"])) == "done"
    assert finished(load_config(None, [f"output_dir={out}", *args, "train.epochs=1"])) == "short"
    whole = train(out, *args, "train.epochs=1", cache=cache)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "[bpt_ds] resumed from step 4" in whole.stdout and "train.epochs=1: 8 steps" in whole.stdout
    assert json.loads((out / "done.json").read_text())["step"] == 8


def test_the_schedule_note_speaks_only_when_the_schedule_changes():
    from bpt_ds.config import TrainConfig
    from bpt_ds.deepspeed_setup import schedule_note

    linear = TrainConfig(steps=200)
    assert schedule_note(linear, 200, 100, 0.15, 0.15) is None  # the same total: nothing changes
    assert schedule_note(linear, 100, 200, 0.0, 0.0) is None  # nothing left to train
    assert schedule_note(TrainConfig(steps=200, schedule="constant"), 100, 100, 0.3, 0.3) is None
    assert schedule_note(TrainConfig(steps=80, schedule="cosine"), 100, 50, 0.15, 0.03) == (
        "train.steps 100 -> 80: the cosine learning-rate schedule is rebuilt over 80 steps; the LR at step 50 "
        "goes from 0.15 to 0.03 (as in a run of 80 steps) and follows that schedule from there")
    # A checkpoint that does not record its total (written before it was recorded).
    assert schedule_note(linear, None, 100, 0.0, 0.15) == (
        "the linear learning-rate schedule is rebuilt over train.steps=200 (the checkpoint does not record the "
        "total it was written under); the LR at step 100 goes from 0 to 0.15 (as in a run of 200 steps) and "
        "follows that schedule from there")
    assert schedule_note(linear, None, 100, 0.15, 0.15) is None


def test_a_checkpoint_written_under_the_old_loss_convention_is_refused_by_name(tmp_path):
    """Checkpoints (and done.json) from before the per-token / per-example loss carry no
    loss_convention: continuing one would mix two objectives, so it is refused, naming the entry."""
    from bpt_ds.errors import ConfigError
    from bpt_ds.checkpoints import check_same_config
    from bpt_ds.config import LOSS_CONVENTION

    cfg = load_config(None, [f"output_dir={tmp_path}"])
    now = config_fingerprint(cfg)
    assert now["loss_convention"] == LOSS_CONVENTION
    check_same_config(cfg, dict(now))  # the same computation continues
    old = {k: v for k, v in now.items() if k != "loss_convention"}
    with pytest.raises(ConfigError, match=re.escape(f"(loss_convention: None -> {LOSS_CONVENTION!r}); resuming "
                                                    "would mix two runs")):
        check_same_config(cfg, old)


def test_a_fingerprint_from_before_a_key_existed_reads_as_the_code_that_wrote_it(tmp_path):
    """Keys added since (svgd.init, svgd.init_spread, train.optimizer) are read at the value the
    older code computed with, a removed key at its neutral value is no change, and the sections of
    other stages are no part of a stage's fingerprint: an older pt checkpoint continues; an older
    bmtpt-source one started its particles apart, so the new shared default is named, and the
    old behaviour set explicitly continues it."""
    from bpt_ds.errors import ConfigError
    from bpt_ds.checkpoints import check_same_config

    def written_before(cfg) -> dict:
        old = {k: v for k, v in config_fingerprint(cfg).items() if k not in
               ("svgd.init", "svgd.init_spread", "train.optimizer")}
        old.update({"svgd.init_noise": 0.0, "svgd.repulsive": True, "distill.weight": 1.0, "prior.beta": 0.0})
        return old

    pt = load_config(None, [f"output_dir={tmp_path}"])
    assert not any(k.startswith(("svgd.", "prior.", "distill.")) for k in config_fingerprint(pt))
    check_same_config(pt, written_before(pt))
    source = load_config(None, [f"output_dir={tmp_path}", "stage=bmtpt-source", "prompt.particles=2"])
    with pytest.raises(ConfigError, match=re.escape("(svgd.init: 'independent' -> 'shared', svgd.init_spread: 0.0 -> "
                                                    "None); resuming would mix two runs")):
        check_same_config(source, written_before(source))
    teachers = load_config(None, [f"output_dir={tmp_path}", "stage=mpt-distill", "data.tasks=[sentiment,mood]",
                                  "distill.teachers=t"])
    old = {k: v for k, v in config_fingerprint(teachers).items() if k != "distill.task_mix"}
    check_same_config(teachers, old)  # distill.task_mix came later; equal shares is what older code did
    legacy = load_config(None, [f"output_dir={tmp_path}", "stage=bmtpt-source", "prompt.particles=2",
                                "svgd.init=independent", "svgd.init_spread=0"])
    check_same_config(legacy, written_before(source))
    assert fingerprint_changes(legacy, {**written_before(source), "svgd.init_noise": 0.01}) == ["svgd.init_noise"]
