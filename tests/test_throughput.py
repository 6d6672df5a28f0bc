"""bench/throughput.py on CPU: ours and both peft rows time the same examples, and the figures
it writes hang together."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import ROOT, ds_env

pytestmark = pytest.mark.distributed


def test_throughput_bench_times_ours_and_peft_on_the_same_examples(tiny_backbone_path, tmp_path):
    out = tmp_path / "tp.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/throughput.py"), "--windows", "2", "--steps", "1",
                           "--warmup", "1", "--batch", "8", "--examples", "200", "--prompt-length", "8",
                           "--rows", "ours,peft-padded,peft-our-batches,ours-fused,ours-compiled",
                           "--compile-backend", "eager", "--ds-config", "ds_configs/replicated_bf16.json",
                           "--dtype", "fp32", "--json", str(out)],
                          env=ds_env(Path(tiny_backbone_path).parent, 1), cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["ours", "peft-padded", "peft-our-batches", "ours-fused", "ours-compiled"]
    assert all("error" not in r for r in rows.values()), rows
    # The same examples in the same order: equal samples and real tokens per second of work,
    # so samples/s and tokens/s keep one ratio across rows.
    ratio = {name: r["tokens_per_s"] / r["samples_per_s"] for name, r in rows.items()}
    for name in rows:
        assert ratio[name] == pytest.approx(ratio["ours"]), name
    assert rows["peft-padded"]["samples_per_s_vs_ours"] == pytest.approx(
        rows["peft-padded"]["samples_per_s"] / rows["ours"]["samples_per_s"])
    # A GLUE-like length distribution: short typical inputs, a long tail.
    lengths = report["input_tokens"]
    assert lengths["median"] < lengths["p90"] < lengths["max"] <= 128
    # The trainable state is the 8 x 128 prompt: a sliver of the process's memory.
    assert report["trainable_values"] == 8 * 128
    assert 0 < rows["ours"]["trainable_state_share_of_peak"] < 0.001
    assert "| ours | " in proc.stdout and "| peft-padded | " in proc.stdout


@pytest.mark.parametrize("gated", [True, False])
def test_model_flops_of_a_step_match_torchs_flop_counter(gated):
    """The documented formula against torch's FlopCounterMode on a real forward + backward of a
    frozen T5 with a prompt that trains: the formula counts the decoder's first self-attention
    block as if it had gradients, which it has not (its input is the label embedding): a few
    per cent too high at these tiny sizes, less at real ones."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import T5Config, T5ForConditionalGeneration

    from bpt_ds.plan import dims_from_config

    tp = load_bench()
    config = T5Config(d_model=64, d_ff=160, num_heads=4, d_kv=16, num_layers=2, num_decoder_layers=2, vocab_size=300,
                      feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=False,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    config._attn_implementation = "eager"
    model = T5ForConditionalGeneration(config).requires_grad_(False)
    prompt, source, target = 5, 11, 3
    soft = torch.randn(1, prompt, 64, requires_grad=True)
    ids, labels = torch.randint(3, 300, (1, source)), torch.randint(3, 300, (1, target))
    with FlopCounterMode(display=False) as counter:
        x = torch.cat([soft, model.get_input_embeddings()(ids)], 1)
        model(inputs_embeds=x, labels=labels).loss.backward()
    counted = counter.get_total_flops()
    formula = tp.step_flops(dims_from_config(config), prompt, [source], [target], 1)
    assert counted <= formula <= 1.02 * counted
    # Every particle on every row (stage pt with M particles) is M times the work.
    assert tp.step_flops(dims_from_config(config), prompt, [source], [target], 4) == 4 * formula


def test_fused_adamw_makes_the_same_updates_and_skips_alike():
    """train.fused_adamw: torch's fused kernel against its default AdamW, through SkippableAdamW
    (a skipped step moves neither the values nor the moments nor the step count)."""
    from bpt_ds.deepspeed_setup import SkippableAdamW

    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 8, 16, generator=gen)
    grads = [torch.randn(3, 8, 16, generator=gen) for _ in range(6)]
    out = {}
    for fused in (None, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = SkippableAdamW([{"params": [param]}], lr=0.1, weight_decay=0.01, fused=fused)
        for i, grad in enumerate(grads):
            param.grad = grad.clone()
            optimizer.skip = i == 2
            optimizer.step()
        state = optimizer.state[param]
        out[fused] = (param.detach(), state["exp_avg"], state["exp_avg_sq"], float(state["step"]))
        assert optimizer.param_groups[0]["fused"] is fused
    plain, fused = out[None], out[True]
    assert plain[3] == fused[3] == 5.0
    moved = (plain[0] - start).abs().max()
    assert moved > 0.3
    for a, b in zip(fused[:3], plain[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench/throughput.py")
    tp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp)
    return tp


@pytest.mark.parametrize("row, setting", [("ours-fused", "train.fused_adamw=true"),
                                          ("ours-compiled", "model.compile=inductor")])
def test_a_row_and_the_setting_it_times_are_not_asked_for_together(row, setting, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_bench().main(["--rows", f"ours,{row}", "--set", setting])
    assert exit_.value.code == 2
    key = setting.split("=")[0]
    assert (f"--rows {row} times its setting against ours without it: leave {key} out of --set"
            in capsys.readouterr().err)
