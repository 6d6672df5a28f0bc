"""bench/scaling.py on CPU: the real training step at 1 and 2 ranks, a table, JSON and a plot."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import ROOT, ds_env

pytestmark = pytest.mark.distributed


def test_scaling_bench_measures_one_and_two_ranks(tiny_backbone_path, tmp_path):
    out = tmp_path / "scaling"
    # A random-weight backbone of given T5 dimensions (model.name_or_path=random:...), as on GPU.
    model = "random:d_model=64,d_ff=128,num_heads=4,d_kv=16,num_layers=2"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/scaling.py"), "--ranks", "1,2", "--models", model,
                           "--steps", "6", "--warmup", "2", "--batch-per-rank", "8", "--out", str(out),
                           "--set", "model.dtype=fp32", "prompt.length=8"],
                          env=ds_env(Path(tiny_backbone_path).parent, 2), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    points = report["points"]
    assert [(p["model"], p["ranks"], p["global_batch"], p["steps_timed"]) for p in points] == [
        (model, 1, 8, 4), (model, 2, 16, 4)]
    one, two = points
    assert two["tokens_per_s_per_rank"] == pytest.approx(two["tokens_per_s"] / 2)
    assert two["efficiency"] == pytest.approx(two["tokens_per_s_per_rank"] / one["tokens_per_s_per_rank"])
    assert one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
    table = out.with_suffix(".md").read_text().splitlines()
    assert table[2] == "| model | ranks | global batch | tokens/s | tokens/s per rank | efficiency | peak MB per rank |"
    assert table[4].startswith(f"| {model} | 1 | 8 | ") and table[5].startswith(f"| {model} | 2 | 16 | ")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The random backbone: the dimensions asked for, the tiny tokenizer, no weights on disk.
    built, = [m.parent for m in Path(tiny_backbone_path).parent.glob("random-t5-*/RANDOM_WEIGHTS")
              if json.loads(m.read_text())["spec"] == model.removeprefix("random:")]
    config = json.loads((built / "config.json").read_text())
    assert (config["d_model"], config["d_ff"], config["num_heads"], config["num_layers"]) == (64, 128, 4, 2)
    assert not list(built.glob("*.safetensors")) and (built / "tokenizer.json").is_file()
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "bench/scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    assert scaling.split_models(f"tiny,{model};random:t5-v1_1-xl") == ["tiny", model, "random:t5-v1_1-xl"]


def test_random_weights_are_the_same_on_every_rank_without_zero3(monkeypatch):
    """Under ZeRO-2 (the replicated backbone) there is no gather: every rank must draw the same
    weights itself, not leave transformers' own initialization on ranks other than 0."""
    import torch
    import torch.distributed as dist
    from transformers import T5Config, T5ForConditionalGeneration

    from bpt_ds.backbone import init_random_weights

    config = T5Config(d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=1, vocab_size=300,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    replicated = {"zero_optimization": {"stage": 2}}
    weights = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(100 + rank)  # transformers' own init differs per rank
        model = T5ForConditionalGeneration(config)
        init_random_weights(model, replicated)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
