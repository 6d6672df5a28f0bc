"""Loads a random:<size> backbone and records each weight's sha256, gathered from its ZeRO-3
partitions (or whole, without ZeRO-3), so runs on different numbers of ranks can be compared.

usage: deepspeed --num_gpus N tests/dist/random_weights.py RESULT.json MODEL ZERO_STAGE
"""
from __future__ import annotations

import hashlib

import deepspeed

from _common import script_args, write_result
from bpt_ds.backbone import load_backbone
from bpt_ds.distributed import init_distributed, world_size


def main() -> None:
    result_path, model, stage = script_args()
    init_distributed()
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
          "zero_optimization": {"stage": int(stage), "stage3_param_persistence_threshold": 0}}
    backbone = load_backbone(model, ds, "bf16", progress=False).model
    digests, stats = {}, {}
    for name, p in backbone.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            values = p.detach().float()
            digests[name] = hashlib.sha256(values.numpy().tobytes()).hexdigest()
            stats[name] = [values.mean().item(), values.std().item() if values.numel() > 1 else 0.0]
    write_result(result_path, {"world_size": world_size(), "digests": digests, "stats": stats,
                               "d_model": backbone.config.d_model,
                               "head_is_shared": backbone.lm_head.weight is backbone.shared.weight})


if __name__ == "__main__":
    main()
