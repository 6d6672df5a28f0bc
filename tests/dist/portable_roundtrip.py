"""Loads a checkpoint written by another number of ranks (its rank-independent trainable_state.pt)
and gathers the state straight back, before any step: what every rank holds must be exactly what
was saved (fp32 values, each optimizer moment, the optimizer's scalars, the LR schedule), and the
model's low-precision copy must be the saved values cast to its dtype. Rounding-free, so it is
sharp where the training trajectory is not (bf16, where Adam turns rounding into whole steps).
The saved values are also compared with REFERENCE, the prompts file the writing run produced at
that step through DeepSpeed's own gather (safe_get_full_fp32_param): a tensor cut from the flat
buffer at a wrong offset would round-trip exactly and still differ there; and what this rank
count holds after the load is gathered by DeepSpeed's own getter too. Then it trains on to
train.steps from the loaded state.

usage: deepspeed --num_gpus N tests/dist/portable_roundtrip.py RESULT.json REFERENCE.safetensors key=value ...
"""
from __future__ import annotations

from pathlib import Path

import deepspeed
import torch
from safetensors.torch import load_file

from _common import script_args, write_result
from bpt_ds.checkpoints import PORTABLE
from bpt_ds.runner import Runner
from bpt_ds.runs import load_config
from bpt_ds.stages import STAGES


def main() -> None:
    result_path, reference, *overrides = script_args()
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
    # DeepSpeed's own gather of what this rank count holds now (not our layout code).
    theirs = recipe.deepspeed.full_trainable_tensors()
    loaded_vs_deepspeed = {k: (theirs[k] - v).abs().max().item() for k, v in saved["values"].items()}
    diff.update({f"optimizer/{k}": (again["optimizer"][k] - v).abs().max().item()
                 for k, v in saved["optimizer"].items()})
    written = load_file(reference)  # particles, factors.<task>.U / .V (the bank's factor_u / factor_v rows)
    mine = {"particles": saved["values"]["particles"]}
    for i, task in enumerate(recipe.data.task_names):
        if "factor_u" in saved["values"]:
            mine[f"factors.{task}.U"], mine[f"factors.{task}.V"] = (saved["values"]["factor_u"][i],
                                                                   saved["values"]["factor_v"][i])
    assert mine.keys() == written.keys(), (sorted(mine), sorted(written))
    saved_vs_reference = {k: (mine[k] - written[k]).abs().max().item() for k in written}
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
        "saved_vs_reference": saved_vs_reference,
        "loaded_vs_deepspeed": loaded_vs_deepspeed,
    })
    recipe.train()
    recipe.finish()
    recipe.cleanup()


if __name__ == "__main__":
    main()
