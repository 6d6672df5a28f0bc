"""launch/train.py with faults injected, for tests/test_reliability.py. The faults come from the
environment variable BPT_DS_FAULTS, a JSON object whose keys are all optional:

  {"nan_loss":      {"<rank>": [steps]},  # the step's per-row losses become NaN on that rank
   "nan_grad":      {"<rank>": [steps]},  # the losses stay finite, their gradient becomes NaN
   "nan_direction": [steps],              # the SVGD direction (stage bmtpt-source) becomes NaN
   "no_space":      {"<rank>": [saves]},  # the n-th checkpoint save (1-based) finds the disk full
   "no_space_at_start": ["<rank>"]}       # setup's free-space check finds the disk full

Always: torch.load refuses to unpickle with weights_only=False (so a test that resumes through
this script proves that checkpoints are loaded with weights_only=True).

Steps are 1-based optimizer steps of this process (one forward per step: no accumulation).

usage: deepspeed --num_gpus N tests/dist/faults.py key=value ...
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

from _common import script_args  # noqa: E402

import train  # noqa: E402  launch/train.py
from bpt_ds import checkpoints, files, model, runner, svgd  # noqa: E402

FAULTS = json.loads(os.environ.get("BPT_DS_FAULTS", "{}"))
RANK = os.environ.get("RANK", "0")
steps_seen = {"forward": 0, "svgd": 0, "save": 0}

forward = model.PromptedT5.forward


def faulty_forward(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    if not self.training:
        return out
    steps_seen["forward"] += 1
    step = steps_seen["forward"]
    rows, *rest = out
    if step in FAULTS.get("nan_loss", {}).get(RANK, []):
        rows = rows * float("nan")
    if step in FAULTS.get("nan_grad", {}).get(RANK, []):
        rows = rows.clone()
        rows.register_hook(lambda g: torch.full_like(g, float("nan")))
    return (rows, *rest)


terms = svgd.svgd_terms


def faulty_terms(*args, **kwargs):
    out = terms(*args, **kwargs)
    steps_seen["svgd"] += 1
    if steps_seen["svgd"] in FAULTS.get("nan_direction", []):
        out = dataclasses.replace(out, phi=torch.full_like(out.phi, float("nan")))
    return out


free_bytes = files.free_bytes


def full_disk_when(full, fn):
    """fn, seeing no free space (free_bytes 0, where files and checkpoints read it) on the calls
    where full() says so."""
    def wrapped(*args, **kwargs):
        files.free_bytes = checkpoints.free_bytes = (lambda path: 0) if full() else free_bytes
        try:
            return fn(*args, **kwargs)
        finally:
            files.free_bytes = checkpoints.free_bytes = free_bytes

    return wrapped


def nth_save() -> bool:
    steps_seen["save"] += 1
    return steps_seen["save"] in FAULTS.get("no_space", {}).get(RANK, [])


load = torch.load


def weights_only_load(*args, **kwargs):
    if kwargs.get("weights_only") is not True:
        raise RuntimeError(f"torch.load called with weights_only={kwargs.get('weights_only')!r}")
    return load(*args, **kwargs)


model.PromptedT5.forward = faulty_forward
runner.check_free_space = full_disk_when(lambda: RANK in FAULTS.get("no_space_at_start", []), files.check_free_space)
checkpoints.Checkpointer.save = full_disk_when(nth_save, checkpoints.Checkpointer.save)
torch.load = weights_only_load
svgd.svgd_terms = faulty_terms

if __name__ == "__main__":
    sys.exit(train.main(script_args()))
