"""bench/throughput.py on CPU: ours and both peft rows time the same examples, and the figures
it writes hang together."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import ROOT, ds_env

pytestmark = pytest.mark.distributed


def test_throughput_bench_times_ours_and_peft_on_the_same_examples(tiny_backbone_path, tmp_path):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--windows", "2", "--steps", "1",
                           "--warmup", "1", "--batch", "8", "--examples", "200", "--prompt-length", "8",
                           "--json", str(out)],
                          env=ds_env(Path(tiny_backbone_path).parent, 1), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["ours", "peft-padded", "peft-our-batches"]
    assert all("error" not in r for r in rows.values()), rows
    # The same examples in the same order: equal samples and real tokens per second of work,
    # so samples/s and tokens/s keep one ratio across rows.
    ratio = {name: r["tokens_per_s"] / r["samples_per_s"] for name, r in rows.items()}
    assert ratio["peft-padded"] == pytest.approx(ratio["ours"]) == pytest.approx(ratio["peft-our-batches"])
    assert rows["ours"]["samples_per_s_vs_ours"] == 1.0
    assert rows["peft-padded"]["samples_per_s_vs_ours"] == pytest.approx(
        rows["peft-padded"]["samples_per_s"] / rows["ours"]["samples_per_s"])
    # A GLUE-like length distribution: short typical inputs, a long tail.
    lengths = report["input_tokens"]
    assert lengths["median"] < lengths["p90"] < lengths["max"] <= 128
    # The trainable state is the 8 x 128 prompt: a sliver of the process's memory.
    assert report["trainable_values"] == 8 * 128
    assert 0 < rows["ours"]["trainable_state_share_of_peak"] < 0.001
    assert "| ours | " in proc.stdout and "| peft-padded | " in proc.stdout


def test_model_flops_of_a_step_follow_the_documented_formula():
    """One example, one encoder and one decoder block, worked by hand."""
    import importlib.util

    from bpt_ds.plan import T5Dims

    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench/throughput.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    d = T5Dims(d_model=4, d_ff=8, d_kv=2, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=10)
    s, t = 3 + 2, 1  # prompt 3 + input 2 encoder tokens; 1 target token
    i = 4
    linear = 2 * (s * (4 * 4 * i + 3 * 4 * 8) + s * 2 * 4 * i + t * (6 * 4 * i + 3 * 4 * 8 + 4 * 10))
    attn = 2 * 2 * i * (s * s + t * t + t * s)
    assert tp.step_flops(d, 3, [2], [1], 1) == 2 * linear + 3 * attn
    # Every particle on every row (stage pt with M particles) is M times the work.
    assert tp.step_flops(d, 3, [2], [1], 4) == 4 * (2 * linear + 3 * attn)
