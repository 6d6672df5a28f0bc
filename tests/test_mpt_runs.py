"""MPT in real runs: a teacher trains as if alone, whatever its neighbour and the number of
ranks; the teachers → shared prompt → target pipeline on 2 ranks, with its logs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import ROOT, TRAIN, run_ds

pytestmark = pytest.mark.distributed

TEACHERS = ["stage=mpt-teachers", "model.dtype=fp32", "train.steps=12", "train.global_batch_size=16",
            "train.micro_batch_size=8", "train.eval_every=0", "prompt.length=8", "train.lr=0.3", "seed=5",
            # Clipping acts every step, so a joint clip over both teachers would couple them.
            "train.max_grad_norm=0.01", "data.max_eval_examples=16"]


@pytest.fixture(scope="module")
def cache(tiny_backbone_path) -> Path:
    return Path(tiny_backbone_path).parent


def test_teachers_train_as_if_alone_on_one_and_two_ranks(cache, tmp_path):
    runs = {}
    for name, ranks, tasks in [("two", 2, "[sentiment, mood]"), ("other", 1, "[topic, mood]")]:
        out = tmp_path / name
        assert run_ds(ranks, TRAIN, *TEACHERS, f"output_dir={out}", f"data.tasks={tasks}", cache=cache).returncode == 0
        runs[name] = load_file(str(out / "prompts.safetensors"))
    two, other = runs["two"], runs["other"]
    assert set(two) == {"particles", "teacher.sentiment", "teacher.mood"}
    assert torch.equal(two["teacher.mood"], two["particles"][1])
    # Each teacher sees only its task's block, is clipped by its own norm, and its rows run the same
    # way on 1 rank (beside topic) as on its own rank of 2 (beside sentiment on the other rank): the
    # mood teacher comes out the same.
    torch.testing.assert_close(other["teacher.mood"], two["teacher.mood"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(other["teacher.topic"], two["teacher.sentiment"])
    assert (other["teacher.mood"] - other["particles"][1]).abs().max() == 0


def test_mpt_pipeline_on_two_ranks(cache, tmp_path):
    """configs/tiny_mpt_pipeline.yaml with two source tasks (two teachers fit two ranks)."""
    out = tmp_path / "mpt"
    args = [f"output_dir={out}", "model.dtype=fp32", "train.steps=40", "train.eval_every=40", "train.log_every=5",
            "train.global_batch_size=16", "teachers.data.tasks=[sentiment, mood]",
            "shared.data.tasks=[sentiment, mood]", "prompt.length=8", "target.prompt.factors.init_from=mean"]
    proc = run_ds(2, TRAIN, "--config", str(ROOT / "configs/tiny_mpt_pipeline.yaml"), *args, cache=cache)
    assert proc.returncode == 0
    teachers = json.loads((out / "teachers" / "metrics.json").read_text())["final"]["dev"]
    assert teachers["sentiment"]["accuracy"] >= 0.9 and teachers["mood"]["accuracy"] >= 0.9
    # Distillation: the three terms in TensorBoard, overall and per task.
    acc = EventAccumulator(str(out / "shared" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for term in ("plm", "logits_kl", "hidden_mse"):
        assert {f"train/{term}", f"train/{term}/sentiment", f"train/{term}/mood"} <= tags
    kl = [e.value for e in acc.Scalars("train/logits_kl")]
    assert kl[-1] < kl[0]
    shared = load_file(str(out / "shared" / "prompts.safetensors"))
    assert shared["particles"].shape == (1, 8, 128)
    assert shared["factors.sentiment.U"].shape == (8, 1) and shared["factors.mood.V"].shape == (1, 128)
    # Target: S from the shared prompt, factors from the sources' mean; the count per task is logged.
    assert f"parameters per target task: {8 * 128 + (8 + 128) * 1:,}" in proc.stdout
    target = json.loads((out / "target" / "metrics.json").read_text())
    assert target["method"] == "mpt"
    # 40 steps from chance (0.5) on the held-out task (the benchmark compares methods properly).
    assert target["final"]["dev"]["polarity"]["accuracy"] >= 0.7
