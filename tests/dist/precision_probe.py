"""launch/train.py with a probe on the gradient hook, for tests/test_precision.py. Every call of
Engine._apply_grad_hook appends one JSON line per rank to $BPT_DS_PROBE/rank<r>.jsonl:

  theta_dtype, grad_dtype  the dtypes the stage's hook receives
  grad_bf16_exact          the fraction of the gradient's values that bf16 holds exactly (a gradient
                           accumulated in bf16 is 1.0; summed in fp32 over micro-batches, well below)
  accum_dtype              DeepSpeed's gradient accumulation dtype (its ZeRO optimizer's)
  written_exact            whether the gradient read back after the write (safe_get_full_grad)
                           equals, bit for bit, the fp32 direction the hook returned
  direction_bf16_exact     the fraction of that direction's values that bf16 holds exactly

usage: deepspeed --num_gpus N tests/dist/precision_probe.py key=value ...
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

from _common import script_args  # noqa: E402

import train  # noqa: E402  launch/train.py
from bpt_ds import distributed, step  # noqa: E402

OUT = Path(os.environ["BPT_DS_PROBE"])
apply_transform = step.Stepper._apply_transform


def bf16_exact(t: torch.Tensor) -> float:
    t = t.detach().float()
    return (t.to(torch.bfloat16).float() == t).float().mean().item()


def probed_apply_transform(self):
    from deepspeed.utils import safe_get_full_grad

    seen = {}
    transform = self.transform

    def recording_transform(theta, grad):
        new = transform(theta, grad)
        seen.update(theta_dtype=str(theta.dtype), grad_dtype=str(grad.dtype), grad_bf16_exact=bf16_exact(grad),
                    direction=new.detach().float().clone())
        return new

    self.transform = recording_transform
    try:
        finite = apply_transform(self)
    finally:
        self.transform = transform
    if finite:
        back = safe_get_full_grad(self.model.model.bank.particles).detach().float().reshape(seen["direction"].shape)
        record = {k: v for k, v in seen.items() if k != "direction"}
        record.update(accum_dtype=str(self.model.ds.optimizer.gradient_accumulation_dtype),
                      written_exact=bool(torch.equal(back, seen["direction"])),
                      direction_bf16_exact=bf16_exact(seen["direction"]))
        OUT.mkdir(parents=True, exist_ok=True)
        with open(OUT / f"rank{distributed.rank()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    return finite


step.Stepper._apply_transform = probed_apply_transform

if __name__ == "__main__":
    sys.exit(train.main(script_args()))
