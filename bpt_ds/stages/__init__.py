"""Stage recipes, found by name: `stage: pt` in a config runs STAGES["pt"]."""
from __future__ import annotations

from .bmtpt import BMTPTSource, Target
from .mpt import MPTDistill, MPTTeachers
from .prompt_tuning import PromptTuning, finished

STAGES = {
    "pt": PromptTuning,
    "spot": PromptTuning,  # SPoT is prompt tuning whose prompt starts from an earlier run's file
    "bmtpt-source": BMTPTSource,
    "target": Target,
    "mpt-teachers": MPTTeachers,
    "mpt-distill": MPTDistill,
}


def run_stage(cfg) -> dict:
    recipe = STAGES[cfg.stage](cfg)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        recipe.cleanup()


def run_pipeline(runs: list, say=print) -> None:
    """Runs (name, config) stages in order.

    On a rerun, a stage whose output_dir holds the finished outputs of the same config and the
    same input files (done.json) is skipped. A stage that finished with another config or other
    inputs starts fresh (train.resume=never: its old checkpoints are set aside), and so does
    every stage after a stage that ran, since its input may have changed. A stage that never
    finished, or finished fewer steps than train.steps now asks for, resumes from its checkpoint.
    """
    import dataclasses
    import os

    # Particles against ranks, for every stage before the first one runs (the launcher sets
    # WORLD_SIZE; a plain python run is one rank).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for _, cfg in runs:
        STAGES[cfg.stage].placement_for(cfg, world)
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
        run_stage(cfg)
        rerun = True
