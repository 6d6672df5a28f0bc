"""Stage recipes, found by name: `stage: pt` in a config runs STAGES["pt"]."""
from __future__ import annotations

from .bmtpt import BMTPTSource, Target
from .prompt_tuning import PromptTuning

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
