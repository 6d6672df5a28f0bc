"""mpt-distill on a backbone with dropout (real T5 checkpoints ship with 0.1), with real processes:
2 CPU ranks, ZeRO-3. The teacher pass runs without dropout, the student's keeps it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jobs import ROOT, dropout_backbone, run_ds

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def cache(tiny_backbone_path) -> Path:
    return Path(tiny_backbone_path).parent


def test_distill_teacher_pass_is_deterministic_under_zero3_with_dropout(tiny_backbone_path, cache, tmp_path):
    """The student starts equal to both teachers (same S, factors exactly 1). Through the DeepSpeed
    engine in training mode: two teacher passes are identical, the same seed gives the same loss,
    another seed another one (student dropout), the modes come back; in evaluation mode KL and
    hidden MSE are 0. Before the fix the teacher drew its own dropout masks under no_grad."""
    ckpt = dropout_backbone(Path(tiny_backbone_path), tmp_path / "dropout-t5", 0.1)
    s = torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(0)) * 0.5
    prompts = tmp_path / "prompts.safetensors"
    save_file({"particles": s, "teacher.sentiment": s[0].clone(), "teacher.mood": s[0].clone()}, str(prompts))
    out = tmp_path / "distill"
    proc = run_ds(2, str(ROOT / "tests/dist/distill_dropout_check.py"), str(tmp_path / "check.json"),
                  "stage=mpt-distill", f"output_dir={out}", f"model.name_or_path={ckpt}", "model.dtype=fp32",
                  "data.tasks=[sentiment,mood]", "prompt.length=8", "prompt.init=file",
                  f"prompt.init_file={prompts}", "prompt.factors.rank=1", "prompt.factors.init_std=0",
                  f"distill.teachers={prompts}", "train.steps=4", "train.global_batch_size=8",
                  "train.micro_batch_size=2", "train.eval_every=0", "train.save_every=0", "train.log_every=2",
                  "train.lr=0.1", "data.max_eval_examples=8", cache=cache, port=29724)
    assert proc.returncode == 0
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["teacher_max_diff"] == 0.0
    assert check["same_seed_max_diff"] == 0.0
    assert check["other_seed_max_diff"] > 1e-4 and check["train_mode_kl"] > 1e-4  # the student's dropout
    assert check["modes_restored"] is True
    assert check["eval_kl"] < 1e-6 and check["eval_mse"] < 1e-10
    assert (out / "prompts.safetensors").is_file()
