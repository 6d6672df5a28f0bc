"""A short run of any stage that records, per rank, what a real-size backbone must satisfy:
partitioned (each rank's share of every weight), frozen, bit-unchanged after training (sha256 of
each rank's own partition before and after), v1.1's untied lm_head intact, and the memory and
gathers that loading the backbone took.

usage: deepspeed --num_gpus N tests/dist/backbone_check.py RESULT_PREFIX key=value ...
(rank r writes RESULT_PREFIX.rank<r>.json)
"""
from __future__ import annotations

import hashlib
import json
import os

import deepspeed
import torch

from _common import script_args
import bpt_ds.runner as runner
from bpt_ds.runs import load_config
from bpt_ds.stages import STAGES


def status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def partition_digests(model) -> dict[str, str]:
    """sha256 of this rank's own values of each weight (no gather)."""
    return {n: hashlib.sha256(p.ds_tensor.detach().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, p in model.named_parameters()}


def main() -> None:
    prefix, *overrides = script_args()
    rank = int(os.environ.get("RANK", "0"))
    load = {}
    gathers = [0]
    real_gathered = deepspeed.zero.GatheredParameters

    class Counting(real_gathered):
        def __init__(self, params, *a, **k):
            gathers[0] += 1
            super().__init__(params, *a, **k)

    def measured_load(*a, **k):
        load["rss_before_mb"] = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        deepspeed.zero.GatheredParameters = Counting
        try:
            backbone = real_load(*a, **k)
        finally:
            deepspeed.zero.GatheredParameters = real_gathered
        load["peak_mb"] = status_mb("VmHWM")
        load["gathers"] = gathers[0]
        return backbone

    real_load = runner.load_backbone
    runner.load_backbone = measured_load
    cfg = load_config(None, overrides)
    recipe = runner.Runner(cfg, STAGES[cfg.stage](cfg))
    recipe.setup()
    model = recipe.deepspeed.model.backbone
    params = dict(model.named_parameters())
    before = partition_digests(model)
    recipe.train()
    recipe.finish()
    after = partition_digests(model)
    head, shared = model.lm_head.weight, model.shared.weight
    with deepspeed.zero.GatheredParameters([head, shared]):
        head_differs = not torch.equal(head.detach(), shared.detach())
    result = {
        "rank": rank,
        "load": load,
        "local_numel": sum(p.ds_tensor.numel() for p in params.values()),
        "total_numel": sum(p.ds_numel for p in params.values()),
        "local_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params.values()),
        "partitioned": sorted(n for n, p in params.items() if hasattr(p, "ds_id")),
        "unevenly_partitioned": sorted(n for n, p in params.items()
                                       if p.ds_tensor.numel() != -(-p.ds_numel // int(os.environ["WORLD_SIZE"]))),
        "weights": sorted(params),
        "trainable_backbone": sorted(n for n, p in params.items() if p.requires_grad),
        "dtypes": sorted({str(p.ds_tensor.dtype) for p in params.values()}),
        "changed": sorted(n for n in before if before[n] != after[n]),
        "head_is_shared": head is shared,
        "head_is_output_embedding": model.get_output_embeddings().weight is head,
        "head_differs_from_shared": head_differs,
    }
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(result, f, indent=1)
    recipe.cleanup()


if __name__ == "__main__":
    main()
