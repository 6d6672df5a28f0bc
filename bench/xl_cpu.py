"""A real-size frozen T5 under ZeRO-3 on CPU ranks: per-rank peak memory against the planner.

    python bench/xl_cpu.py                          # random:t5-v1_1-xl, 2 ranks (needs ~20 GB free)
    python bench/xl_cpu.py --size t5-v1_1-large     # the same path at Large, a quick check

Three `deepspeed launch/train.py` runs of a `random:<size>` backbone in bf16, as a user runs them:
bmtpt-source with M = 2 particles (--source-steps), then a target with rank-1 factors and a KDE
prior from those particles (--target-steps), then the same target resumed for one more step.
Each rank runs under a probe (this file, --rank-probe) that reads /proc/self/status at the
points of setup (imports, backbone loaded, deepspeed.initialize, every step; VmHWM reset in
between through /proc/self/clear_refs, so each phase has its own peak) and times the steps.
Printed, and written to --json (default bench/results/xl_cpu_<size>_<date>.json): per run and
rank the peak resident memory and where it was reached, the planner's estimate for the same run
(`python -m bpt_ds.plan`, ZeRO-3 without checkpointing), seconds per step, and checkpoint sizes
(the prompt's state only: they must not grow with the backbone). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2 ** 20


# ------------------------------------------------------------------ rank side


def rank_probe(out_prefix: str, overrides: list[str]) -> int:
    """Runs launch/train.py's main with marks at the points of setup; writes
    <out_prefix>.rank<r>.json."""
    marks = []

    def status() -> dict:
        got = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    got[key] = int(value.split()[0]) / 1024
        return got

    def mark(name: str) -> None:
        marks.append({"phase": name, "t": time.time(), **status()})
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS: the next mark's VmHWM is that phase's own peak
        except OSError:
            pass

    mark("start")
    sys.path[:0] = [str(ROOT), str(ROOT / "launch")]
    import bpt_ds.runner as runner
    import bpt_ds.step as step
    import train  # launch/train.py

    mark("imports")

    def wrap(owner, attr: str, name: str, numbered: bool = False):
        real, count = getattr(owner, attr), [0]

        def probed(*a, **k):
            mark(f"before {name}")
            result = real(*a, **k)
            count[0] += 1
            mark(f"{name} {count[0]}" if numbered else name)
            return result

        setattr(owner, attr, probed)

    wrap(runner, "load_backbone", "load_backbone")
    wrap(runner, "initialize", "deepspeed.initialize")
    wrap(step.Stepper, "step", "step", numbered=True)
    code = 1
    try:
        code = train.main(overrides)
    finally:
        mark("end")
        rank = os.environ.get("RANK", "0")
        Path(f"{out_prefix}.rank{rank}.json").write_text(json.dumps(marks, indent=1))
    return code


# ------------------------------------------------------------------ driver


def summarize(marks: list[dict]) -> dict:
    t0 = marks[0]["t"]
    phases = [{"phase": m["phase"], "peak_mb": round(m["VmHWM"], 1), "rss_mb": round(m["VmRSS"], 1),
               "t": round(m["t"] - t0, 2)} for m in marks]
    top = max(phases, key=lambda p: p["peak_mb"])
    steps = [m["t"] - b["t"] for b, m in zip(marks, marks[1:]) if b["phase"] == "before step"]
    by = {p["phase"]: p for p in phases}

    def at(name):
        return by[name]["rss_mb"] if name in by else None

    return {"peak_mb": top["peak_mb"], "peak_phase": top["phase"],
            "rss_after_imports_mb": at("imports"), "rss_after_load_mb": at("load_backbone"),
            "rss_after_initialize_mb": at("deepspeed.initialize"),
            "load_peak_mb": by["load_backbone"]["peak_mb"] if "load_backbone" in by else None,
            "step_peaks_mb": [p["peak_mb"] for p in phases if p["phase"].startswith("step ")],
            "step_seconds": [round(s, 2) for s in steps], "phases": phases}


def planner(size: str, ranks: int, seq: int, target_len: int, prompt_length: int, particles: int,
            factor_rank: int, tasks: int, reserve: float) -> dict:
    cmd = [sys.executable, "-m", "bpt_ds.plan", "--model", size, "--gpus", str(ranks), "--gpu-mem", "1000",
           "--cpu-mem", "1000", "--batch", "1", "--seq", str(seq), "--target-len", str(target_len),
           "--prompt-length", str(prompt_length), "--particles", str(particles), "--factor-rank", str(factor_rank),
           "--tasks", str(tasks), "--reserve", str(reserve), "--json", "--write", "-"]
    got = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    e = next(e for e in got["estimates"] if e["name"] == "zero3" and not e["checkpointing"])
    return {"command": " ".join(["python -m bpt_ds.plan", *cmd[3:]]),
            **{k: round(e[k] / MB, 1) for k in ("states", "activations", "reserve", "total")}}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    if "--rank-probe" in sys.argv:
        args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
        i = args.index("--rank-probe")
        return rank_probe(args[i + 1], args[i + 2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="t5-v1_1-xl", help="a bpt_ds.plan preset (default t5-v1_1-xl)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--source-steps", type=int, default=3)
    ap.add_argument("--target-steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64, help="data.max_source_length (default 64)")
    ap.add_argument("--prompt-length", type=int, default=8)
    ap.add_argument("--port", type=int, default=29805)
    ap.add_argument("--work", default=None, help="run directory (default /tmp/bpt_xl_cpu_<size>)")
    ap.add_argument("--json", default=None, help="default bench/results/xl_cpu_<size>_<date>.json")
    ap.add_argument("--set", action="append", default=[], metavar="key=value", help="extra overrides, every run")
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    work = Path(args.work or f"/tmp/bpt_xl_cpu_{args.size}")
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.json or ROOT / "bench" / "results" / f"xl_cpu_{args.size}_{date}.json")
    from bpt_ds.runs import load_config

    target_len = load_config(None, []).data.max_target_length
    common = [f"model.name_or_path=random:{args.size}", "model.dtype=bf16", f"prompt.length={args.prompt_length}",
              f"data.max_source_length={args.seq}", f"train.global_batch_size={args.ranks}",
              "train.micro_batch_size=1", "train.eval_every=0", "data.max_eval_examples=2", "train.log_every=1",
              *args.set]
    source, target = work / "source", work / "target"
    runs = [
        ("source", [f"output_dir={source}", "stage=bmtpt-source", "prompt.particles=2", "prompt.init=random",
                    "data.tasks=[sentiment,mood]", f"train.steps={args.source_steps}",
                    f"train.save_every={args.source_steps}", "train.resume=never"],
         dict(particles=2, factor_rank=0, tasks=2)),
        ("target", [f"output_dir={target}", "stage=target", f"prompt.init_file={source}", "prompt.factors.rank=1",
                    "prior.kind=kde", "prior.beta=1.0", "data.tasks=[polarity]", f"train.steps={args.target_steps}",
                    "train.save_every=1", "train.resume=never"],
         dict(particles=1, factor_rank=1, tasks=1)),
        ("resume", [f"output_dir={target}", "stage=target", f"prompt.init_file={source}", "prompt.factors.rank=1",
                    "prior.kind=kde", "prior.beta=1.0", "data.tasks=[polarity]",
                    f"train.steps={args.target_steps + 1}", "train.save_every=1"],
         dict(particles=1, factor_rank=1, tasks=1)),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks))}
    report = {"date": date, "size": args.size, "ranks": args.ranks, "cpu_count": os.cpu_count(),
              "command": " ".join(["python bench/xl_cpu.py", *sys.argv[1:]]), "runs": {}}
    for name, overrides, shape in runs:
        prefix = work / name
        cmd = ["deepspeed", "--num_gpus", str(args.ranks), "--master_port", str(args.port), __file__,
               "--rank-probe", str(prefix), *common, *overrides]
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            print(f"bench/xl_cpu.py: run {name} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        ranks = [summarize(json.loads(Path(f"{prefix}.rank{r}.json").read_text())) for r in range(args.ranks)]
        run_dir = source if name == "source" else target
        ckpts = sorted((run_dir / "checkpoints").glob("step*"))
        baseline = max(r["rss_after_imports_mb"] for r in ranks) / 1024
        est = planner(args.size, args.ranks, args.seq, target_len, args.prompt_length, reserve=2.0, **shape)
        est_cpu = planner(args.size, args.ranks, args.seq, target_len, args.prompt_length,
                          reserve=round(baseline, 2), **shape)
        report["runs"][name] = {
            "overrides": common + overrides, "wall_s": round(wall, 1), "ranks": ranks,
            "planner": est, "planner_cpu_reserve": est_cpu,
            "checkpoint_bytes": {c.name: dir_bytes(c) for c in ckpts},
            "prompts_bytes": (run_dir / "prompts.safetensors").stat().st_size,
            "resumed": "resumed from step" in proc.stdout,
        }
        print(f"{name}: {wall:.0f} s", flush=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {out_json}")
    return 0


def table(report: dict) -> str:
    lines = [f"{report['size']}, {report['ranks']} CPU ranks, bf16, ZeRO-3 ({report['date']}); MB per rank",
             "| run | rank | peak RSS | at | after load | load peak | planner total (reserve 2 GiB / process baseline) "
             "| measured / planner (baseline) | s/step | checkpoint bytes |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for name, run in report["runs"].items():
        for i, r in enumerate(run["ranks"]):
            ck = max(run["checkpoint_bytes"].values()) if run["checkpoint_bytes"] else 0
            lines.append(f"| {name} | {i} | {r['peak_mb']:,.0f} | {r['peak_phase']} | {r['rss_after_load_mb']:,.0f} | "
                         f"{r['load_peak_mb']:,.0f} | {run['planner']['total']:,.0f} / {run['planner_cpu_reserve']['total']:,.0f} | "
                         f"{r['peak_mb'] / run['planner_cpu_reserve']['total']:.2f} | "
                         f"{', '.join(f'{s:.1f}' for s in r['step_seconds'])} | {ck:,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
