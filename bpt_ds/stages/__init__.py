"""The stages, found by name: `stage: pt` in a config runs STAGES["pt"] through bpt_ds.runner.
A new method is one file in this directory (a Stage subclass, stages/base.py) and one line here.
"""
from __future__ import annotations

from .base import Stage
from .bmtpt_source import BMTPTSource
from .mpt_distill import MPTDistill
from .mpt_teachers import MPTTeachers
from .pt import PromptTuning, SPoT
from .target import Target

STAGES: dict[str, type[Stage]] = {cls.name: cls for cls in (
    PromptTuning, SPoT, BMTPTSource, Target, MPTTeachers, MPTDistill)}
