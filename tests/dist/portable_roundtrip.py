"""Loads a checkpoint written by another number of ranks (its rank-independent trainable_state.pt)
and gathers the state straight back, before any step: what every rank holds must be exactly what
was saved (fp32 values, each optimizer moment, the optimizer's scalars, the LR schedule), and the
model's low-precision copy must be the saved values cast to its dtype. Rounding-free, so it is
sharp where the training trajectory is not (bf16, where Adam turns rounding into whole steps).

usage: deepspeed --num_gpus N tests/dist/portable_roundtrip.py RESULT.json key=value ...
"""
from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

from _common import script_args, write_result
from bpt_ds.checkpoints import PORTABLE
from bpt_ds.runner import Runner
from bpt_ds.runs import load_config
from bpt_ds.stages import STAGES


def main() -> None:
    result_path, *overrides = script_args()
    cfg = load_config(None, overrides)
    recipe = Runner(cfg, STAGES[cfg.stage](cfg))
    recipe.setup()  # resumes: train.resume=auto finds the checkpoint
    ck = recipe.checkpointer
    saved = torch.load(Path(ck.newest) / PORTABLE, map_location="cpu", weights_only=True)
    again = ck.portable_state(saved["client_state"])  # collective
    zero3 = recipe.deepspeed.ds.zero_optimization_stage() == 3
    low, dtypes = {}, set()
    for name, param in ck._trainable():
        with deepspeed.zero.GatheredParameters([param], enabled=zero3):
            dtypes.add(str(param.dtype))
            want = saved["values"][name].to(param.dtype)
            low[name] = (param.detach().cpu() != want).sum().item()
    diff = {f"values/{k}": (again["values"][k] - v).abs().max().item() for k, v in saved["values"].items()}
    diff.update({f"optimizer/{k}": (again["optimizer"][k] - v).abs().max().item()
                 for k, v in saved["optimizer"].items()})
    write_result(result_path, {
        "written_by": ck.written_by,
        "optimizer_type": type(recipe.deepspeed.ds.optimizer).__name__,
        "model_dtype": " ".join(sorted(dtypes)),
        "max_abs_diff": diff,
        "keys_saved": sorted(saved["optimizer"]), "keys_again": sorted(again["optimizer"]),
        "scalars_equal": again["optimizer_scalars"] == saved["optimizer_scalars"],
        "scheduler_equal": again["lr_scheduler"] == saved["lr_scheduler"],
        "step": recipe.state.step,
        "low_precision_copy_mismatches": low,
    })
    recipe.cleanup()


if __name__ == "__main__":
    main()
