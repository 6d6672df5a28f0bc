"""Stage recipes, found by name: `stage: pt` in a config runs STAGES["pt"]."""
from __future__ import annotations

from .bmtpt import BMTPTSource, Target
from .prompt_tuning import PromptTuning, finished

STAGES = {
    "pt": PromptTuning,
    "spot": PromptTuning,  # SPoT is prompt tuning whose prompt starts from an earlier run's file
    "bmtpt-source": BMTPTSource,
    "target": Target,
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
    """Runs (name, config) stages in order. On a rerun, a stage whose output_dir holds the
    finished outputs of the same config is skipped; once a stage runs, every later stage
    starts fresh (train.resume=never: earlier checkpoints set aside), since its input may
    have changed."""
    import dataclasses

    rerun = False
    for i, (name, cfg) in enumerate(runs):
        if len(runs) > 1:
            if not rerun and cfg.train.resume == "auto" and finished(cfg):
                say(f"[bpt_ds] pipeline stage {i + 1}/{len(runs)}: {name} ({cfg.stage}) already finished in "
                    f"{cfg.output_dir} with this config; skipped")
                continue
            if rerun and cfg.train.resume == "auto":
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="never"))
            say(f"[bpt_ds] pipeline stage {i + 1}/{len(runs)}: {name} ({cfg.stage}) -> {cfg.output_dir}"
                f"{' (fresh: an earlier stage ran)' if rerun else ''}")
        run_stage(cfg)
        rerun = True
