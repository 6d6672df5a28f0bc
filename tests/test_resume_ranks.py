"""A checkpoint resumes on another number of ranks (a job preempted on 4 nodes continues on 2):
the trainable state is saved in full besides DeepSpeed's per-rank files (trainable_state.pt)
and loaded into any partitioning. Checked against the uninterrupted run.

Tolerance: not bit for bit. The number of ranks changes the order in which a step's gradient is
summed (micro-batches per rank, then the all-reduce), so uninterrupted runs on the two rank
counts differ by float32 rounding too (measured: up to 1.0e-5 on values of mean size 1.2 for
SVGD, 1 vs 3 ranks, where Adam's normalization amplifies rounding in small coordinates). The
resumed run must be within twice that difference (and 1e-6) of the uninterrupted run on its
final rank count. The tiny backbone has no dropout; with dropout the draws follow (seed, step,
rank) and differ with the rank count, as they would in any run on another number of ranks."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from jobs import TRAIN, run_ds

COMMON = ["train.schedule=constant", "train.save_every=4", "train.eval_every=0", "train.log_every=1",
          "prompt.length=4", "data.max_eval_examples=8"]


def train(ranks: int, out, steps: int, cache, port: int, *extra: str):
    proc = run_ds(ranks, TRAIN, f"output_dir={out}", f"train.steps={steps}", *COMMON, *extra, cache=cache, port=port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final(out) -> dict:
    return load_file(str(out / "prompts.safetensors"))


@pytest.mark.distributed
@pytest.mark.parametrize("before, after, extra", [
    (2, 1, ["train.global_batch_size=12"]),
    (1, 4, ["train.global_batch_size=12"]),
    # 5 x 128 = 640 values over 3 ranks: ZeRO-3 pads the last partition.
    (1, 3, ["stage=bmtpt-source", "prompt.particles=3", "train.global_batch_size=12", "data.tasks=[sentiment,mood]",
            "prompt.length=5"]),
])
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path, tiny_backbone_path, before, after, extra):
    cache = tiny_backbone_path.parent
    whole = {ranks: tmp_path / f"whole{ranks}" for ranks in (before, after)}
    for ranks, out in whole.items():
        train(ranks, out, 8, cache, 29840 + ranks, *extra)
    resumed = tmp_path / "resumed"
    train(before, resumed, 4, cache, 29846, *extra)
    proc = train(after, resumed, 8, cache, 29847, *extra)
    assert (f"resumed from step 4 ({resumed / 'checkpoints' / 'step00000004'}; written by {before} rank(s), loaded "
            "from its rank-independent state)") in proc.stdout
    a, b, c = final(whole[after]), final(resumed), final(whole[before])
    assert a.keys() == b.keys()
    for key in a:
        rounding = (a[key] - c[key]).abs().max().item()  # what the rank count alone changes
        assert rounding < 1e-4
        assert (b[key] - a[key]).abs().max().item() <= max(1e-6, 2 * rounding), key


@pytest.mark.distributed
def test_under_zero2_a_checkpoint_saves_and_another_rank_count_is_refused_by_name(tmp_path, tiny_backbone_path):
    """ZeRO-1/2 (the replicated backbone) keep no rank-independent copy: saving works (with
    factors too), and a resume on another rank count is refused before the backbone loads."""
    cache = tiny_backbone_path.parent
    out = tmp_path / "run"
    extra = ["train.global_batch_size=12", "deepspeed.config=ds_configs/replicated_bf16.json", "prompt.factors.rank=1"]
    train(2, out, 4, cache, 29848, *extra)
    assert not (out / "checkpoints" / "step00000004" / "trainable_state.pt").exists()
    proc = run_ds(1, TRAIN, f"output_dir={out}", "train.steps=8", *COMMON, *extra, cache=cache, port=29849)
    assert proc.returncode == 2
    assert "was written by 2 rank(s) and this run has 1, and it has no rank-independent copy" in proc.stderr
    assert "[bpt_ds] loading backbone" not in proc.stdout
