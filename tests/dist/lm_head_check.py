"""Loads an untied T5 checkpoint under ZeRO-3 the way transformers does alone and the way
bpt_ds does, and records lm_head and logits, gathered from the partitions.

usage: deepspeed --num_gpus 2 tests/dist/lm_head_check.py CHECKPOINT_DIR RESULT.json
"""
from __future__ import annotations

import deepspeed
import torch
from transformers import T5ForConditionalGeneration
from transformers.integrations import HfDeepSpeedConfig

from _common import script_args, write_result
from bpt_ds.backbone import checkpoint_tensor, load_backbone
from bpt_ds.distributed import init_distributed, world_size

DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False},
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def main() -> None:
    ckpt, result_path = script_args()
    init_distributed()
    stored = checkpoint_tensor(ckpt, "lm_head.weight")

    handle = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 (kept alive while loading)
    plain = T5ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    transformers_tied = plain.lm_head.weight is plain.shared.weight
    del plain, handle

    backbone = load_backbone(ckpt, DS_CONFIG, "fp32")
    model = backbone.model
    head = model.lm_head.weight
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        head_matches_file = torch.equal(head.detach().cpu(), stored)
        logits = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 5, 9]])).logits
    write_result(result_path, {
        "world_size": world_size(),
        "transformers_tied_under_zero3": transformers_tied,
        "restored": backbone.lm_head_restored,
        "head_is_shared_object": head is model.shared.weight,
        "head_partitioned": hasattr(head, "ds_id") and head.ds_tensor.numel() < head.ds_numel,
        "head_matches_file": head_matches_file,
        "logits": logits.tolist(),
    })


if __name__ == "__main__":
    main()
