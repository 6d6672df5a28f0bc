"""A short prompt-tuning run that records, around training, what a unit test cannot see:
every backbone weight's fingerprint (gathered from its ZeRO-3 partitions), the trainable
parameter count seen by the engine, and dev metrics before training.

usage: deepspeed --num_gpus N tests/dist/train_and_check.py RESULT.json key=value ...
"""
from __future__ import annotations

import hashlib

import deepspeed

from _common import script_args, write_result
from bpt_ds.runner import Runner
from bpt_ds.runs import load_config
from bpt_ds.stages import STAGES


def fingerprints(module) -> dict[str, str]:
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()
    return out


def main() -> None:
    result_path, *overrides = script_args()
    cfg = load_config(None, overrides)
    recipe = Runner(cfg, STAGES[cfg.stage](cfg))
    recipe.setup()
    backbone = recipe.deepspeed.model.backbone
    before = fingerprints(backbone)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in recipe.deepspeed.ds.module.parameters()
                    if p.requires_grad)
    partitioned = sum(1 for p in backbone.parameters() if hasattr(p, "ds_id"))
    initial = recipe.evaluator.scores(recipe.eval_tasks)
    recipe.train()
    final = recipe.finish()["final"]["dev"]
    after = fingerprints(backbone)
    write_result(result_path, {
        "changed_backbone_weights": sorted(n for n in before if before[n] != after[n]),
        "backbone_weights": len(before),
        "partitioned_backbone_weights": partitioned,
        "trainable": trainable,
        "bank_size": recipe.bank_size,
        "initial": initial,
        "final": final,
    })
    recipe.cleanup()


if __name__ == "__main__":
    main()
