"""Folding M prompt particles into the batch vs one forward/backward pass per particle.

Measured side by side in one run on the tiny backbone (plain torch, on the CPU): the same
particles and the same batch (tests/test_prompts.py checks that both give the same losses and
gradients); prints seconds per step and the ratio.

    python bench/bench_particles.py [--particles 1 4 8] [--batch 32] [--steps 20]
"""
from __future__ import annotations

import argparse
import time

import torch

from bpt_ds.data.batching import collate, encode_task
from bpt_ds.data.tasks import TaskData
from bpt_ds.data.synthetic import SYNTHETIC_TASKS, make_examples
from bpt_ds.model import PromptedT5
from bpt_ds.prompts import PromptBank
from bpt_ds.tiny import build_tiny_backbone
from transformers import AutoTokenizer, T5ForConditionalGeneration


def seconds_per_step(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--particles", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    path = build_tiny_backbone()
    tokenizer = AutoTokenizer.from_pretrained(path)
    backbone = T5ForConditionalGeneration.from_pretrained(path).requires_grad_(False)
    task = TaskData("polarity", list(SYNTHETIC_TASKS["polarity"].labels),
                    make_examples("polarity", args.batch, 0), [])
    enc = encode_task(tokenizer, task, 0, "train", 64, 8)
    batch = collate([enc], [(0, i) for i in range(args.batch)], tokenizer.pad_token_id)

    print(f"tiny T5, batch {args.batch}, prompt length {args.length}, {torch.get_num_threads()} threads")
    print(f"{'M':>3} {'folded s/step':>14} {'per-particle s/step':>20} {'ratio':>7}")
    for m in args.particles:
        bank = PromptBank(m, args.length, backbone.config.d_model)
        bank.init_random(0.5, torch.Generator().manual_seed(0))
        folded = PromptedT5(backbone, bank)
        singles = []
        for i in range(m):
            b = PromptBank(1, args.length, backbone.config.d_model)
            b.init_rows(bank.particles[i:i + 1].detach())
            singles.append(PromptedT5(backbone, b))

        def folded_step():
            bank.particles.grad = None
            folded(**batch)[0].sum().backward()

        def looped_step():
            for model in singles:
                model.bank.particles.grad = None
                model(**batch)[0].sum().backward()

        t_fold = seconds_per_step(folded_step, args.steps)
        t_loop = seconds_per_step(looped_step, args.steps)
        print(f"{m:>3} {t_fold:>14.4f} {t_loop:>20.4f} {t_loop / t_fold:>6.2f}x")


if __name__ == "__main__":
    main()
