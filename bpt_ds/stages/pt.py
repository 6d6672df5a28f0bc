"""Prompt tuning (stage `pt`) and SPoT (stage `spot`) on a frozen T5: every part is the Stage
default (stages/base.py).

- M prompt particles in one forward pass (particle index folded into the batch): prompt.particles,
  each seeing the whole global batch (independent prompts)
- per-task low-rank factors, prompt = S ∘ (U_t V_t): prompt.factors.rank > 0, their lr train.factor_lr
- prompt init: prompt.init = random | vocab | file (prompt.init_file); SPoT starts from a file
- the loss: token cross-entropy averaged over the global batch's target tokens
"""
from __future__ import annotations

from .base import Stage


class PromptTuning(Stage):
    name = "pt"


class SPoT(Stage):
    """SPoT: prompt tuning whose prompt starts from an earlier run's prompt file."""

    name = "spot"
    starts_from_file = True
