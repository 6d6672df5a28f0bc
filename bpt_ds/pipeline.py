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

from .config import RunConfig, config_fingerprint
from .distributed import StopFlag
from .files import DONE_FILE
from .runner import run_stage
from .stages import STAGES


def finished(cfg: RunConfig) -> Optional[str]:
    """What output_dir holds for this config (runner.Runner.finish writes it): "done" (finished
    outputs of this config and these input files), "other" (finished outputs of another config or
    other inputs), "short" (finished outputs of this config with fewer steps than train.steps now
    asks for), or None (no finished outputs)."""
    marker = Path(cfg.output_dir) / DONE_FILE
    if not marker.is_file() or not (Path(cfg.output_dir) / "prompts.safetensors").is_file():
        return None
    try:
        done = json.loads(marker.read_text())
        if done["fingerprint"] != config_fingerprint(cfg) or done["inputs"] != STAGES[cfg.stage].input_digests(cfg):
            return "other"
        return "done" if done["stopped"] or done["step"] >= cfg.train.steps else "short"
    except (ValueError, KeyError, TypeError):
        return "other"


def run_pipeline(runs: list, say: Callable[[str], None] = print, stop: Optional[StopFlag] = None) -> None:
    """Runs (name, config) stages in order.

    On a rerun, a stage whose output_dir holds the finished outputs of the same config and the
    same input files (done.json) is skipped. A stage that finished with another config or other
    inputs starts fresh (train.resume=never: its old checkpoints are set aside), and so does
    every stage after a stage that ran, since its input may have changed. A stage that never
    finished, or finished fewer steps than train.steps now asks for, resumes from its checkpoint.
    stop: the process's stop flag (SIGTERM, SIGINT), read at every step boundary.
    """
    # Particles against ranks, for every stage before the first one runs (the launcher sets
    # WORLD_SIZE; a plain python run is one rank).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for _, cfg in runs:
        STAGES[cfg.stage].placement(cfg, world)
    rerun = False
    for i, (name, cfg) in enumerate(runs):
        if len(runs) > 1:
            done = finished(cfg) if cfg.train.resume == "auto" else None
            if not rerun and done == "done":
                say(f"[bpt_ds] pipeline stage {i + 1}/{len(runs)}: {name} ({cfg.stage}) already finished in "
                    f"{cfg.output_dir} with this config and these inputs; skipped")
                continue
            why = ("an earlier stage ran" if rerun else
                   "its earlier finished run used another config or other inputs" if done == "other" else "")
            if why and cfg.train.resume == "auto":
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="never"))
            say(f"[bpt_ds] pipeline stage {i + 1}/{len(runs)}: {name} ({cfg.stage}) -> {cfg.output_dir}"
                f"{f' (fresh: {why})' if why else ''}")
        run_stage(cfg, STAGES[cfg.stage](cfg), stop)
        rerun = True
