"""Weak scaling of the training step: tokens/s per rank and scaling efficiency at 1, 2, ... ranks.

Each (model, ranks) point is one real training run (`deepspeed --num_gpus R launch/train.py`,
the same code path as a user's run) with a fixed micro-batch per rank, so the global batch
grows with the ranks. Throughput is read from the run's TensorBoard (`perf/tokens_per_s`:
real tokens of the global batch, no padding, no prompt) over the steps after the warm-up;
the median over those steps is reported.

    efficiency(R) = (tokens/s per rank at R ranks) / (tokens/s per rank at the smallest R)

CPU (each rank gets --threads-per-rank threads, so a rank stands in for one device):

    python bench/scaling.py --ranks 1,2 --models tiny --out bench/results/scaling_cpu

GPU, one node (random weights at published T5 sizes: no download):

    python bench/scaling.py --ranks 1,2,4,8 --models random:t5-v1_1-base,random:t5-v1_1-large,random:t5-v1_1-xl \\
        --batch-per-rank 8 --steps 30 --warmup 10 --set data.max_source_length=256 prompt.length=100 \\
        --out bench/results/scaling_gpu

It writes <out>.json (every point and the command), <out>.md (the table) and <out>.png
(tokens/s per rank and efficiency against ranks, one line per model).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"


def run_point(model: str, ranks: int, args, work: Path, port: int) -> dict:
    out = work / f"{model.replace(':', '_').replace('/', '_').replace(',', '_')}-r{ranks}"
    overrides = [
        f"output_dir={out}", f"model.name_or_path={model}", "train.resume=never",
        f"train.steps={args.steps}", f"train.global_batch_size={args.batch_per_rank * ranks}",
        f"train.micro_batch_size={args.batch_per_rank}", "train.eval_every=0", "train.save_every=0",
        "train.log_every=1", "data.max_eval_examples=16", "data.synthetic_eval_examples=16",
        *args.set,
    ]
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(TRAIN),
           *(["--config", args.config] if args.config else []), *overrides]
    env = dict(os.environ)
    if args.threads_per_rank:
        env["OMP_NUM_THREADS"] = str(args.threads_per_rank)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return {"model": model, "ranks": ranks, "error": f"exit {proc.returncode}", "command": cmd}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()

    def after_warmup(tag: str) -> list[float]:
        return [e.value for e in acc.Scalars(tag) if e.step > args.warmup]

    tokens, samples = after_warmup("perf/tokens_per_s"), after_warmup("perf/samples_per_s")
    if not tokens:
        return {"model": model, "ranks": ranks, "error": "no logged steps after the warm-up", "command": cmd}
    return {
        "model": model, "ranks": ranks, "global_batch": args.batch_per_rank * ranks,
        "steps_timed": len(tokens), "tokens_per_s": statistics.median(tokens),
        "tokens_per_s_per_rank": statistics.median(tokens) / ranks,
        "samples_per_s": statistics.median(samples),
        "peak_memory_mb": max(e.value for e in acc.Scalars("perf/peak_memory_mb")),
        "wall_s": round(time.perf_counter() - started, 1), "command": cmd,
    }


def add_efficiency(points: list[dict]) -> None:
    for model in dict.fromkeys(p["model"] for p in points):
        ok = [p for p in points if p["model"] == model and "error" not in p]
        if not ok:
            continue
        base = min(ok, key=lambda p: p["ranks"])
        for p in ok:
            p["efficiency"] = p["tokens_per_s_per_rank"] / base["tokens_per_s_per_rank"]


def table(points: list[dict]) -> str:
    lines = ["| model | ranks | global batch | tokens/s | tokens/s per rank | efficiency | peak MB per rank |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['model']} | {p['ranks']} | | failed: {p['error']} | | | |")
            continue
        lines.append(f"| {p['model']} | {p['ranks']} | {p['global_batch']} | {p['tokens_per_s']:,.0f} | "
                     f"{p['tokens_per_s_per_rank']:,.0f} | {p['efficiency']:.2f} | {p['peak_memory_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for model in dict.fromkeys(p["model"] for p in points):
        ok = [p for p in points if p["model"] == model and "error" not in p]
        ranks = [p["ranks"] for p in ok]
        left.plot(ranks, [p["tokens_per_s_per_rank"] for p in ok], marker="o", label=model)
        right.plot(ranks, [p["efficiency"] for p in ok], marker="o", label=model)
    all_ranks = sorted({p["ranks"] for p in points})
    for ax, label in ((left, "tokens/s per rank"), (right, "scaling efficiency")):
        ax.set_xlabel("ranks")
        ax.set_ylabel(label)
        ax.set_xticks(all_ranks)
        ax.grid(alpha=0.3)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    right.set_ylim(0, 1.1 * max([1.0] + [p.get("efficiency", 0) for p in points]))
    left.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def split_models(text: str) -> list[str]:
    """"tiny,random:d_model=64,num_layers=2" -> ["tiny", "random:d_model=64,num_layers=2"]: a part
    that is a bare key=value continues the previous model's dimensions (';' separates too)."""
    models: list[str] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if models and "=" in part and ":" not in part:
            models[-1] += "," + part
        elif part:
            models.append(part)
    return models


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001 - the description is informational
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    ap.add_argument("--models", default="tiny",
                    help="comma-separated model.name_or_path values: tiny, random:<T5 size or dims>, a hub "
                         "name or directory (default tiny)")
    ap.add_argument("--config", help="a run config to start from (default: the embedded tiny CPU run)")
    ap.add_argument("--batch-per-rank", type=int, default=8, help="micro-batch per rank (default 8)")
    ap.add_argument("--steps", type=int, default=12, help="training steps per point (default 12)")
    ap.add_argument("--warmup", type=int, default=4, help="steps left out of the timing (default 4)")
    ap.add_argument("--threads-per-rank", type=int, default=None,
                    help="OMP_NUM_THREADS per rank (default: 1 on CPU, unset on GPU)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more run-config overrides")
    ap.add_argument("--port", type=int, default=29640, help="first master port (default 29640)")
    ap.add_argument("--out", required=True, help="output path without extension: writes .json, .md and .png")
    args = ap.parse_args(argv)
    try:
        ranks = sorted({int(r) for r in args.ranks.split(",") if r.strip()})
    except ValueError:
        ap.error(f"--ranks expects integers such as 1,2,4; got {args.ranks!r}")
    if not ranks or ranks[0] < 1:
        ap.error(f"--ranks expects integers >= 1; got {args.ranks!r}")
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    models = split_models(args.models)
    import torch

    on_gpu = torch.cuda.is_available()
    if args.threads_per_rank is None and not on_gpu:
        args.threads_per_rank = 1
    if on_gpu and ranks[-1] > torch.cuda.device_count():
        ap.error(f"--ranks asks for {ranks[-1]} ranks but this node has {torch.cuda.device_count()} GPUs")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = {ext: Path(f"{out}.{ext}") for ext in ("json", "md", "png")}  # --out may contain dots
    points = []
    with tempfile.TemporaryDirectory(prefix="bpt_ds-scaling-") as work:
        for i, model in enumerate(models):
            for j, r in enumerate(ranks):
                print(f"[scaling] {model} on {r} rank(s) ...", flush=True)
                point = run_point(model, r, args, Path(work), args.port + i * len(ranks) + j)
                points.append(point)
                if "error" not in point:
                    print(f"[scaling]   {point['tokens_per_s']:,.0f} tokens/s, "
                          f"{point['tokens_per_s_per_rank']:,.0f} per rank ({point['wall_s']} s)", flush=True)
    add_efficiency(points)
    title = f"bpt_ds weak scaling, {device_name()}, {date.today().isoformat()}"
    report = {"title": title, "device": device_name(), "date": date.today().isoformat(),
              "command": [sys.executable, *sys.argv], "batch_per_rank": args.batch_per_rank,
              "steps": args.steps, "warmup": args.warmup, "threads_per_rank": args.threads_per_rank,
              "points": points}
    files["json"].write_text(json.dumps(report, indent=1) + "\n")
    md = f"{title}\n\n{table(points)}"
    files["md"].write_text(md)
    plot(points, files["png"], title)
    print(md)
    print(f"wrote {files['json']}, {files['md']}, {files['png']}")
    return 1 if any("error" in p for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
