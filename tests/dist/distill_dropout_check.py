"""mpt-distill under DeepSpeed (ZeRO-3 partitions the backbone) on a backbone with dropout, the
student prompt equal to its teachers at the start: the teacher pass through the wrapped module is
deterministic while the engine's module is in training mode, the student pass keeps its dropout,
every module's mode is restored, and in evaluation mode KL and hidden MSE are zero. Then a short
training run.

usage: deepspeed --num_gpus N tests/dist/distill_dropout_check.py RESULT.json key=value ...
"""
from __future__ import annotations

import torch

from _common import script_args, write_result
from bpt_ds.evaluation import to_device
from bpt_ds.runner import Runner
from bpt_ds.runs import load_config
from bpt_ds.stages.mpt_distill import MPTDistill
from bpt_ds.step import row_weights


def main() -> None:
    result_path, *overrides = script_args()
    cfg = load_config(None, overrides)
    recipe = Runner(cfg, MPTDistill(cfg))
    recipe.setup()
    ds, model = recipe.deepspeed.ds, recipe.deepspeed.model
    _, micro = recipe.batches_at(0)
    mb = to_device(micro[0], recipe.deepspeed.device)
    row_weights(mb, 1.0)  # drop the loss weights: the model's own inputs remain
    dec = model.backbone.prepare_decoder_input_ids_from_labels(labels=mb["labels"])
    embeds = model.backbone.get_input_embeddings()(mb["input_ids"])

    ds.train()
    modes = [m.training for m in ds.module.modules()]
    with torch.no_grad():
        t1 = model.teacher_outputs(embeds, mb["attention_mask"], mb["task_ids"], dec, True)
        t2 = model.teacher_outputs(embeds, mb["attention_mask"], mb["task_ids"], dec, True)
        torch.manual_seed(1)
        a = ds(**mb)
        torch.manual_seed(1)
        b = ds(**mb)
        torch.manual_seed(2)
        c = ds(**mb)
    restored = [m.training for m in ds.module.modules()] == modes and all(modes)
    ds.eval()
    with torch.no_grad():
        _, _, still = ds(**mb)
    ds.train()
    result = {
        "teacher_max_diff": (t1.logits - t2.logits).abs().max().item(),
        "same_seed_max_diff": (a[0] - b[0]).abs().max().item(),
        "other_seed_max_diff": (a[0] - c[0]).abs().max().item(),
        "train_mode_kl": a[2]["logits_kl"].max().item(),
        "modes_restored": restored,
        "eval_kl": still["logits_kl"].abs().max().item(),
        "eval_mse": still["hidden_mse"].abs().max().item(),
    }
    recipe.train()
    recipe.finish()
    write_result(result_path, result)
    recipe.cleanup()


if __name__ == "__main__":
    main()
