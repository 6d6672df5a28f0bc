"""Rank-classification evaluation: one encoder pass for all labels against a full forward
pass per label, side by side in one run (plain torch, no DeepSpeed).

bpt_ds scores C candidate labels by running the encoder once per example and the decoder once
per candidate (`PromptedT5.score_candidates`); the obvious way runs the whole model C times.
Both give the same scores (checked here on every batch). Prints seconds per batch and the ratio
for C = 2 (binary GLUE tasks), 3 (MNLI, CB) and 26 (STS-B's 0.0 .. 5.0 in steps of 0.2).

    python bench/bench_eval.py [--model tiny | --model random:t5-v1_1-small] [--batch 64] [--seq 128]
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(model: str):
    from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration

    from bpt_ds.backbone import RANDOM_MARKER, resolve_model_path

    path = resolve_model_path(model, progress=False)
    if (Path(path) / RANDOM_MARKER).is_file():
        torch.manual_seed(0)
        backbone = T5ForConditionalGeneration(AutoConfig.from_pretrained(path))
    else:
        backbone = T5ForConditionalGeneration.from_pretrained(path)
    return backbone.eval().requires_grad_(False), AutoTokenizer.from_pretrained(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt-length", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from bpt_ds.data.batching import pad_candidates
    from bpt_ds.model import PromptedT5, candidate_log_likelihood
    from bpt_ds.prompts import PromptBank

    backbone, tok = build(args.model)
    bank = PromptBank(1, args.prompt_length, backbone.config.d_model, tasks=["t"])
    bank.init_random(0.5, torch.Generator().manual_seed(0))
    model = PromptedT5(backbone, bank).eval()
    rng = random.Random(0)
    lengths = [max(3, min(args.seq, int(rng.lognormvariate(math.log(20), 0.7)))) for _ in range(args.batch)]
    ids = torch.full((args.batch, max(lengths)), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, len(tok), (n,))
        mask[i, :n] = 1
    task_ids = torch.zeros(args.batch, dtype=torch.long)
    print(f"{args.model}, batch {args.batch}, input tokens median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}, prompt {args.prompt_length}, {torch.get_num_threads()} threads")
    print("| labels | encoder once s/batch | full pass per label s/batch | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for c in (2, 3, 26):
        labels = [f"{x / 5:.1f}" for x in range(26)][:c] if c == 26 else ["negative", "positive", "neutral"][:c]
        cands = pad_candidates([tok(x).input_ids for x in labels])

        @torch.no_grad()
        def once():
            return model.score_candidates(ids, mask, task_ids, cands)

        @torch.no_grad()
        def per_label():
            embeds, m = model._prompted_inputs(ids, mask, task_ids, aggregate=True)
            cols = []
            for k in range(c):
                hidden = backbone.get_encoder()(inputs_embeds=embeds, attention_mask=m).last_hidden_state
                cols.append(candidate_log_likelihood(backbone, hidden, m, cands[k:k + 1]))
            return torch.cat(cols, dim=1)

        torch.testing.assert_close(once(), per_label(), rtol=1e-4, atol=1e-4)
        timings = {}
        for _ in range(args.repeats):  # alternate, so drift hits both
            for name, fn in (("once", once), ("per_label", per_label)):
                start = time.perf_counter()
                fn()
                timings.setdefault(name, []).append(time.perf_counter() - start)
        a, b = min(timings["once"]), min(timings["per_label"])
        print(f"| {c} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
