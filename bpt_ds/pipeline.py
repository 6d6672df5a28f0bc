"""The pipeline: the stages of a command run in order (run_pipeline), a rerun skipping each stage
whose done.json matches its config and input files (finished), and continuing or restarting
the others.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

from .config import RunConfig, fingerprint_changes, steps_for_epochs, to_dict
from .deepspeed_setup import micro_batch_size
from .distributed import StopFlag
from .errors import ConfigError
from .files import DONE_FILE
from .runner import run_stage
from .stages import STAGES


def finished(cfg: RunConfig) -> Optional[str]:
    """What output_dir holds for this config (runner.Runner.finish writes it): "done" (finished
    outputs of this config and these input files), "other" (finished outputs of another config or
    other inputs), "short" (finished outputs of this config with fewer steps than train.steps, or
    train.epochs over the run's training examples, now asks for), or None (no finished outputs)."""
    marker = Path(cfg.output_dir) / DONE_FILE
    if not marker.is_file() or not (Path(cfg.output_dir) / "prompts.safetensors").is_file():
        return None
    try:
        done = json.loads(marker.read_text())
        if fingerprint_changes(cfg, done["fingerprint"]) or done["inputs"] != STAGES[cfg.stage].input_digests(cfg):
            return "other"
        if cfg.train.epochs is not None and "train_examples" not in done:
            return "short"  # written before train.epochs: the run resumes and counts its steps itself
        steps = (cfg.train.steps if cfg.train.epochs is None else
                 steps_for_epochs(cfg.train.epochs, done["train_examples"], cfg.train.global_batch_size))
        return "done" if done["stopped"] or done["step"] >= steps else "short"
    except (ValueError, KeyError, TypeError):
        return "other"


def run_pipeline(runs: list, say: Callable[[str], None] = print, stop: Optional[StopFlag] = None) -> None:
    """Runs (name, config) stages in order.

    On a rerun, a stage whose output_dir holds the finished outputs of the same config and the
    same input files (done.json) is skipped (a command of one run, too: it says so and loads nothing). A stage that finished with another config or other
    inputs starts fresh (train.resume=never: its old checkpoints are set aside), and so does
    every stage that reads the output of a stage that ran in this command, since its input
    may have changed; stages that read none of them are left alone (the paper tables' targets). A stage that never
    finished, or finished fewer steps than train.steps now asks for, resumes from its checkpoint.
    stop: the process's stop flag (SIGTERM, SIGINT), read at every step boundary.
    """
    # Particles against ranks, for every stage before the first one runs (the launcher sets
    # WORLD_SIZE; a plain python run is one rank).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name, cfg in runs:
        STAGES[cfg.stage].placement(cfg, world)
        try:  # the batch against the ranks too, before the first stage trains
            micro_batch_size(cfg.train.global_batch_size, cfg.train.micro_batch_size, world)
        except ConfigError as e:
            raise ConfigError(f"stage '{name}': {e}") from None
    ran: dict[Path, str] = {}  # output directories of the stages this command ran -> their names
    for i, (name, cfg) in enumerate(runs):
        if len(runs) == 1 and cfg.train.resume == "auto" and finished(cfg) == "done" and _same_as_done(cfg):
            # Run again as it was: nothing to train, and its outputs already say everything.
            say(f"[bpt_ds] {cfg.output_dir} already holds this run, finished (done.json: this config and these "
                f"inputs); nothing to do. Its results: {Path(cfg.output_dir) / 'metrics.json'}. To train again: "
                "train.resume=never (the old checkpoints are kept aside), or raise train.steps to continue; to "
                "score its prompt on other data: launch/predict.py")
            continue
        if len(runs) > 1:
            done = finished(cfg) if cfg.train.resume == "auto" else None
            # A stage that reads the output of a stage that ran here starts fresh: its input changed
            # (or may have: done.json's digests would say so too once it finishes).
            upstream = [ran[d] for d in _input_dirs(cfg) if d in ran]
            if not upstream and done == "done":
                say(f"[bpt_ds] pipeline stage {i + 1}/{len(runs)}: {name} ({cfg.stage}) already finished in "
                    f"{cfg.output_dir} with this config and these inputs; skipped")
                continue
            why = (f"stage '{upstream[0]}', whose output it reads, ran" if upstream else
                   "its earlier finished run used another config or other inputs" if done == "other" else "")
            if why and cfg.train.resume == "auto":
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="never"))
            say(f"[bpt_ds] pipeline stage {i + 1}/{len(runs)}: {name} ({cfg.stage}) -> {cfg.output_dir}"
                f"{f' (fresh: {why})' if why else ''}")
        run_stage(cfg, STAGES[cfg.stage](cfg), stop)
        ran[Path(cfg.output_dir).resolve()] = name


def _same_as_done(cfg: RunConfig) -> bool:
    """Whether done.json's config is this one in every key, the ones a resume may change too (a
    new data.eval_tasks or report_to re-evaluates and reports instead of being skipped)."""
    try:
        return json.loads((Path(cfg.output_dir) / DONE_FILE).read_text()).get("config") == to_dict(cfg)
    except (OSError, ValueError):
        return False


def _input_dirs(cfg: RunConfig) -> list[Path]:
    """The run directories a stage reads (an input file stands for the directory holding it)."""
    out = []
    for name in STAGES[cfg.stage].input_files(cfg):
        path = Path(name).resolve()
        out.append(path.parent if path.name.endswith(".safetensors") else path)
    return out
