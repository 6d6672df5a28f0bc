"""Training-step throughput: bpt_ds against Hugging Face peft prompt tuning, side by side.

    python bench/throughput.py --json bench/results/throughput_cpu.json               # CPU, tiny T5
    deepspeed --num_gpus 1 bench/throughput.py --model random:t5-v1_1-xl --batch 64 --micro 64 \\
        --seq 256 --prompt-length 100 --json bench/results/throughput_h100_xl.json      # one GPU

One process per rank (one launcher call) builds three rows and times them in alternating
windows (row A, row B, row C, row A, ...), so drift of the machine hits every row alike:

- ours: bpt_ds's real step. The run is set up exactly as launch/train.py sets it up
  (`runner.Runner.setup`, the run's DeepSpeed config), and each step is
  `runner.batches_at(step)` + `runner.stepper.step`: dynamic padding, all particles in one pass,
  the SVGD direction for stage bmtpt-source.
- peft-padded: peft's `PromptTuningConfig` (encoder prompt, `num_transformer_submodules=1`)
  on a second instance of the same backbone under the same DeepSpeed config, fed the same
  examples padded to the maximum lengths, as peft's examples and docs batch them.
- peft-our-batches: the same peft model fed exactly our micro-batches, which separates what
  the data pipeline gains (padded vs ours for peft) from what the step gains (peft on our
  batches vs ours).
- ours-grouped (optional, --rows): ours with length-grouped batches (data.group_by_length,
  --group-window steps pooled); its tokens/s is the figure to compare, since its steps hold
  other examples than the other rows' steps.
- ours-fused (optional): ours with torch's fused AdamW kernel (train.fused_adamw), switched on
  for this row's steps only.
- ours-compiled (optional): ours with the prompted model under torch.compile (model.compile,
  --compile-backend); compilation, and the recompiles for new input lengths until dynamo marks
  them dynamic, fall in its warm-up steps (--warmup; raise it when the lengths vary a lot).

Examples: a synthetic two-label task whose input lengths follow a GLUE-like distribution:
word counts lognormal with median 20 and sigma 0.7 (about: 50% under 20 words, 90% under 50,
a tail to --seq), cut at --seq tokens. The measured token-length percentiles are reported.

Reported per row: samples/s and tokens/s (real tokens: inputs plus targets, no padding, no
prompt) for the whole job, their ratio to ours, peak memory per rank (on a GPU the peak of
the row's own windows, which still counts the other rows' resident weights: run --rows ours
for ours alone; on CPU the process's peak RSS over all rows), for stage bmtpt-source
the share of the step in the SVGD hook (all-gathers of particles and gradients plus the
kernel math), and the model FLOPs rate. Model FLOPs of a prompt-tuning step, per example:
2·F_linear + 3·F_attn, with F the forward FLOPs (2 per multiply-add) of the linear layers
(encoder blocks on prompt + input tokens, the decoder's cross-attention keys/values on them,
decoder blocks and lm_head on target tokens) and of the attention products (QK^T and PV);
backward forms activation gradients only (no weight gradients: about 4·N FLOPs per token,
not 6·N) and twice the attention forward. Recomputation under activation checkpointing is not
counted (MFU convention). It is within 2% of torch's FlopCounterMode on a real forward and
backward (tests/test_throughput.py; it counts the decoder's first self-attention block as if
it had gradients). On a GPU, MFU = model FLOPs/s / peak bf16 dense FLOPs (H100 SXM and
H200: 989 TFLOPs, H100 PCIe: 756; --peak-tflops otherwise).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peaks by device name, most specific first (H100 PCIe before the SXM figure).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


# ------------------------------------------------------------------------ data


def write_task(path: Path, n: int, seq: int, seed: int) -> None:
    """GLUE-like lengths: lognormal word counts (median 20, sigma 0.7), labels positive/negative."""
    from bpt_ds.data.synthetic import FILLER_WORDS, SENTIMENT_NEGATIVE, SENTIMENT_POSITIVE

    rng = random.Random(seed)
    words = list(FILLER_WORDS + SENTIMENT_POSITIVE + SENTIMENT_NEGATIVE)
    with path.open("w") as f:
        for _ in range(n):
            count = max(3, min(seq, int(rng.lognormvariate(math.log(20), 0.7))))
            text = " ".join(rng.choice(words) for _ in range(count))
            f.write(json.dumps({"input": text, "target": rng.choice(["positive", "negative"])}) + "\n")


# ----------------------------------------------------------------------- flops


def step_flops(dims, prompt_len: int, inputs: list[int], targets: list[int], rows_per_example: int) -> float:
    """Model FLOPs of one prompt-tuning step over examples with these token counts."""
    d, f, i, V = dims.d_model, dims.d_ff, dims.inner, dims.vocab_size
    ffn = (3 if dims.gated else 2) * d * f
    le, ld = dims.num_layers, dims.num_decoder_layers
    total = 0.0
    for s_in, t in zip(inputs, targets):
        s = prompt_len + s_in
        linear = 2 * (s * le * (4 * d * i + ffn) + s * ld * 2 * d * i + t * (ld * (6 * d * i + ffn) + d * V))
        attn = 2 * 2 * i * (le * s * s + ld * (t * t + t * s))
        total += rows_per_example * (2 * linear + 3 * attn)
    return total


# ------------------------------------------------------------------------ rows


class Row:
    def __init__(self, name: str, step_fn):
        self.name = name
        self.step_fn = step_fn
        self.seconds = 0.0
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self.flops = 0.0
        self.hook_seconds = 0.0
        self.peak_mb = 0.0
        self.error = None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="model.name_or_path: tiny, random:<T5 size>, a directory")
    ap.add_argument("--stage", choices=["pt", "bmtpt-source"], default="pt")
    ap.add_argument("--particles", type=int, default=1, help="prompt particles (peft rows need 1)")
    ap.add_argument("--prompt-length", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="global batch (examples per step)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch per rank (default: the trainer's)")
    ap.add_argument("--seq", type=int, default=128, help="max input tokens (default 128)")
    ap.add_argument("--target-len", type=int, default=4)
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=3, help="timed windows per row (default 3)")
    ap.add_argument("--steps", type=int, default=4, help="steps per window (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (default 2)")
    ap.add_argument("--rows", default="ours,peft-padded,peft-our-batches",
                    help="comma-separated, from ours, ours-grouped (length-grouped batches, "
                         "data.group_by_length), ours-fused (train.fused_adamw), ours-compiled "
                         "(model.compile), peft-padded, peft-our-batches")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend of the ours-compiled row (default inductor)")
    ap.add_argument("--group-window", type=int, default=8,
                    help="steps pooled per length group for the ours-grouped row (default 8)")
    ap.add_argument("--ds-config", default="auto", help="deepspeed.config for every row (default auto)")
    ap.add_argument("--dtype", default="auto", help="model.dtype (default auto: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOPs of one device, for MFU")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more run-config overrides")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the figures as JSON here (rank 0)")
    args = ap.parse_args(argv)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    known = ["ours", "ours-grouped", "ours-fused", "ours-compiled", "peft-padded", "peft-our-batches"]
    unknown = set(rows_wanted) - set(known)
    if unknown:
        ap.error(f"--rows: unknown {sorted(unknown)}; use {', '.join(known)}")
    for row, key in (("ours-fused", "train.fused_adamw="), ("ours-compiled", "model.compile=")):
        if row in rows_wanted and any(s.startswith(key) for s in args.set):
            ap.error(f"--rows {row} times its setting against ours without it: leave {key[:-1]} out of --set")
    if args.particles != 1 and {r for r in rows_wanted if not r.startswith("peft")} != set(rows_wanted):
        ap.error("peft prompt tuning has one prompt: use --particles 1, or --rows ours")

    import torch

    from bpt_ds import distributed
    from bpt_ds.deepspeed_setup import ds_dtype
    from bpt_ds.plan import dims_from_config
    from bpt_ds.report import peak_memory_mb
    from bpt_ds.runner import Runner
    from bpt_ds.runs import load_config
    from bpt_ds.stages import STAGES

    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    work = Path(tempfile.mkdtemp(prefix="bpt_ds-throughput-")) if rank == 0 else None
    holder = [str(work)]
    if world > 1:
        torch.distributed.broadcast_object_list(holder, src=0)
    work = Path(holder[0])
    if rank == 0:
        write_task(work / "train.jsonl", args.examples, args.seq, seed=0)
        write_task(work / "dev.jsonl", 16, args.seq, seed=1)
    distributed.barrier()
    overrides = [f"stage={args.stage}", f"output_dir={work / 'run'}", f"model.name_or_path={args.model}",
                 f"model.dtype={args.dtype}", "data.tasks=[bench]", f"data.local.bench.train={work / 'train.jsonl'}",
                 f"data.local.bench.validation={work / 'dev.jsonl'}", f"data.max_source_length={args.seq}",
                 f"data.max_target_length={args.target_len}", f"prompt.length={args.prompt_length}",
                 f"prompt.particles={args.particles}", "prompt.init=random", f"train.global_batch_size={args.batch}",
                 "train.eval_every=0", "train.save_every=0", "train.schedule=constant", "train.steps=1000000",
                 "train.resume=never", f"deepspeed.config={args.ds_config}", *args.set]
    if args.micro:
        overrides.append(f"train.micro_batch_size={args.micro}")
    cfg = load_config(None, overrides)
    stage = Runner(cfg, STAGES[cfg.stage](cfg))  # the run, as launch/train.py builds it
    stage.setup()
    dims = dims_from_config(stage.backbone.model.config)
    task = stage.train_tasks[0]
    in_lens = [len(x) for x in task.inputs]
    rows_per_example = args.particles if stage.placement.mode == "every" else 1
    gpu = distributed.on_gpu()

    def batch_stats(picks):
        ins = [len(stage.train_tasks[t].inputs[i]) for t, i in picks]
        outs = [len(stage.train_tasks[t].targets[i]) for t, i in picks]
        return len(picks), sum(ins) + sum(outs), step_flops(dims, args.prompt_length, ins, outs, rows_per_example)

    rows: list[Row] = []

    def ours(step: int):
        picks, micro = stage.batches_at(step)
        stage.stepper.step(micro, stage.row_weight)
        return picks

    if "ours" in rows_wanted:
        rows.append(Row("ours", ours))
    if "ours-grouped" in rows_wanted:
        from bpt_ds.data.batching import LengthGroupedSampler

        plain = stage.sampler
        grouped = LengthGroupedSampler(plain, lambda pair: len(stage.train_tasks[pair[0]].inputs[pair[1]]),
                                       args.group_window, cfg.seed)

        def ours_grouped(step: int):
            stage.sampler = grouped  # what data.group_by_length=W gives a run
            try:
                return ours(step)
            finally:
                stage.sampler = plain

        rows.append(Row("ours-grouped", ours_grouped))
    if "ours-fused" in rows_wanted:
        optimizer = stage.deepspeed.base_optimizer

        def ours_fused(step: int):
            set_fused_adamw(optimizer, True)  # what train.fused_adamw=true gives a run
            try:
                return ours(step)
            finally:
                set_fused_adamw(optimizer, False)

        rows.append(Row("ours-fused", ours_fused))
    if "ours-compiled" in rows_wanted:
        module = stage.deepspeed.ds.module
        stage.deepspeed.ds.compile(backend=args.compile_backend)  # what model.compile=<backend> gives a run
        compiled, module._compiled_call_impl = module._compiled_call_impl, None

        def ours_compiled(step: int):
            module._compiled_call_impl = compiled
            try:
                return ours(step)
            finally:
                module._compiled_call_impl = None

        rows.append(Row("ours-compiled", ours_compiled))

    if set(rows_wanted) & {"peft-padded", "peft-our-batches"}:
        peft_engine = build_peft(stage, cfg, args)

        def peft_step(padded: bool):
            def run(step: int):
                picks, micro = stage.batches_at(step)
                for mb in micro:
                    if padded:
                        mb = pad_to(mb, args.seq, args.target_len, stage.pad_id)
                    mb = {k: v.to(peft_engine.device) for k, v in mb.items()
                          if k not in ("task_ids", "particle_ids", "loss_units", "loss_denominator")}
                    loss = peft_engine(**mb).loss
                    peft_engine.backward(loss)
                    peft_engine.step()
                return picks
            return run

        if "peft-padded" in rows_wanted:
            rows.append(Row("peft-padded", peft_step(True)))
        if "peft-our-batches" in rows_wanted:
            rows.append(Row("peft-our-batches", peft_step(False)))
    rows.sort(key=lambda r: rows_wanted.index(r.name))

    def sync():
        if gpu:
            torch.cuda.synchronize()
        distributed.barrier()

    # Warm-up, then alternating windows; every row walks the same sequence of global batches.
    cursor = {r.name: 0 for r in rows}
    for r in rows:
        try:
            for _ in range(args.warmup):
                r.step_fn(cursor[r.name])
                cursor[r.name] += 1
        except RuntimeError as e:  # e.g. out of memory: recorded, the other rows go on
            r.error = str(e).splitlines()[0][:300]
    for _ in range(args.windows):
        for r in rows:
            if r.error:
                continue
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            stage.stepper.hook_seconds = 0.0
            sync()
            started = time.perf_counter()
            try:
                for _ in range(args.steps):
                    picks = r.step_fn(cursor[r.name])
                    cursor[r.name] += 1
                    n, tokens, flops = batch_stats(picks)
                    r.samples += n
                    r.tokens += tokens
                    r.flops += flops
            except RuntimeError as e:  # e.g. out of memory: recorded, the other rows go on
                r.error = str(e).splitlines()[0][:300]
                continue
            sync()
            r.seconds += time.perf_counter() - started
            r.steps += args.steps
            if r.name == "ours":
                r.hook_seconds += stage.stepper.hook_seconds
            r.peak_mb = max(r.peak_mb, peak_memory_mb(gpu))

    device = (torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)")
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None) if gpu else None
    trainable = stage.bank_size
    report = {
        "device": device, "world_size": world, "date": time.strftime("%Y-%m-%d"),
        "command": [sys.executable, *sys.argv], "model": args.model, "stage": args.stage,
        "particles": args.particles, "prompt_length": args.prompt_length, "global_batch": args.batch,
        "micro_batch": stage.micro, "dtype": ds_dtype(stage.ds_config),
        "ds_config": cfg.deepspeed.config,
        "input_tokens": {"median": statistics.median(in_lens), "p90": sorted(in_lens)[int(0.9 * len(in_lens))],
                         "max": max(in_lens)},
        "flops_formula": "per example 2*F_linear + 3*F_attn (activation gradients only; no recompute)",
        "trainable_values": trainable,
        "rows": [],
    }
    base = next((r for r in rows if r.name == "ours" and not r.error), None)
    for r in rows:
        entry = {"row": r.name}
        if r.error or not r.seconds:
            entry["error"] = r.error or "no timed steps"
        else:
            entry.update(samples_per_s=r.samples / r.seconds, tokens_per_s=r.tokens / r.seconds,
                         model_tflops_per_s=r.flops / r.seconds / 1e12, peak_memory_mb_per_rank=r.peak_mb,
                         step_s=r.seconds / r.steps)
            if base is not None:
                entry["samples_per_s_vs_ours"] = entry["samples_per_s"] / (base.samples / base.seconds)
            if peak:
                entry["mfu"] = entry["model_tflops_per_s"] / (peak * world)
            if r.name == "ours" and args.stage == "bmtpt-source":
                entry["svgd_share"] = r.hook_seconds / r.seconds
            if r.name == "ours":
                # fp32 master + gradient + two Adam moments (+ the bf16 copy), partitioned over ranks
                state = trainable * (16 + (2 if report["dtype"] == "bf16" else 4)) / world
                entry["trainable_state_share_of_peak"] = state / (r.peak_mb * 2**20) if r.peak_mb else None
        report["rows"].append(entry)
    if rank == 0:
        print(render(report), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
            print(f"wrote {args.json}", flush=True)
    distributed.barrier()
    return 0


def set_fused_adamw(optimizer, fused: bool) -> None:
    """Switches torch's AdamW between its fused kernel and its default implementation. The
    fused kernel keeps its step counters on the parameters' device, the default on the CPU."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, False) if fused else (None, None)
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:
                state["step"] = state["step"].to(param.device if fused else "cpu")


def pad_to(mb: dict, seq: int, target_len: int, pad_id: int) -> dict:
    """peft's batching: every input padded to the maximum source length, targets to the
    maximum target length (labels padded with -100)."""
    import torch

    def widen(t, width, value):
        out = torch.full((t.shape[0], width), value, dtype=t.dtype)
        out[:, :t.shape[1]] = t
        return out

    return {"input_ids": widen(mb["input_ids"], seq, pad_id), "attention_mask": widen(mb["attention_mask"], seq, 0),
            "labels": widen(mb["labels"], target_len, -100), "task_ids": mb["task_ids"]}


def build_peft(stage, cfg, args):
    """A second instance of the backbone with a peft prompt-tuning adapter, under the same
    DeepSpeed config and optimizer settings as ours."""
    import deepspeed
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model

    from bpt_ds.backbone import load_backbone
    from bpt_ds.deepspeed_setup import ds_dtype

    ds_config = stage.ds_config
    backbone = load_backbone(stage.backbone.path, ds_config, ds_dtype(ds_config), progress=False,
                             attn_implementation=cfg.model.attn_implementation)
    d = backbone.model.config.d_model
    model = get_peft_model(backbone.model, PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=args.prompt_length, token_dim=d,
        num_transformer_submodules=1, num_attention_heads=backbone.model.config.num_heads,
        num_layers=backbone.model.config.num_layers))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine._bpt_ds_backbone = backbone  # keeps the HfDeepSpeedConfig handle alive
    return engine


def render(report: dict) -> str:
    lines = [f"{report['device']}, {report['world_size']} rank(s), {report['model']} ({report['dtype']}), stage "
             f"{report['stage']}, {report['particles']} particle(s), prompt {report['prompt_length']}, global batch "
             f"{report['global_batch']} (micro {report['micro_batch']}), {report['ds_config']}; input tokens median "
             f"{report['input_tokens']['median']}, p90 {report['input_tokens']['p90']}, max "
             f"{report['input_tokens']['max']}",
             "| row | samples/s | tokens/s | vs ours | s/step | model TFLOP/s | MFU | peak MB/rank | SVGD share |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in report["rows"]:
        if "error" in e:
            lines.append(f"| {e['row']} | failed: {e['error']} | | | | | | | |")
            continue
        fmt = lambda k, spec: format(e[k], spec) if e.get(k) is not None else "-"  # noqa: E731
        lines.append(f"| {e['row']} | {e['samples_per_s']:.1f} | {e['tokens_per_s']:,.0f} | "
                     f"{fmt('samples_per_s_vs_ours', '.2f')} | {e['step_s']:.3f} | {e['model_tflops_per_s']:.4f} | "
                     f"{fmt('mfu', '.1%')} | {e['peak_memory_mb_per_rank']:,.0f} | {fmt('svgd_share', '.1%')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
