"""Few-shot transfer with power: PT, SPoT, MPT and BMTPT on a backbone whose source tasks interfere.

    python bench/transfer_power.py [--seeds 1 2 ... 10] [--shots 4 16 32] [--steps 60]
        [--eval-examples 1000] [--out runs/bench-power] [--json F] [--png F] [--methods SUBSTRING ...]

The backbone (built here in ~40 s, cached): the tiny T5 recipe pre-trained on four prefixed
tasks that share two sub-skills, reading a polarity keyword and reading a topic word:
  sentiment  keyword set A -> positive / negative
  mood       keyword set B -> happy / sad          (the same skill on other words and labels)
  contrary   keyword set A -> negative / positive  (sentiment's inputs, the opposite labels)
  topic      topic word -> 4 classes               (unrelated to the target)
The target is the held-out task polarity (half of A's and half of B's keywords -> positive /
negative), few-shot: k examples per class (data.few_shot=k), k in --shots, drawn with the seed.

Every method starts from sources trained once (seed 42, the same steps, batch and lr) on the
same interfering mixture [sentiment, mood, contrary, topic]: one prompt has to serve tasks
that answer the same input in opposite ways. Then every target row trains --steps steps of
global batch 8 with lr 0.1 (its factors too), so every prompt sees the same examples; it is
scored on the same --eval-examples validation examples per seed every 10 steps. The rows:
  PT                      random init
  SPoT                    the prompt tuned on the mixture
  MPT / + fresh factors / + mean factors   MPT's distilled shared prompt alone, with new rank-1
                          factors, with the factors started from the source tasks' mean
  BMTPT mean / + KDE prior / + fresh factors   the mean of the M SVGD particles; with the
                          particles' KDE as prior (beta 1, the MAP, natural units); with factors
  BMTPT best particle     the particle with the lowest loss on the k-shot training examples
                          (the only target data a few-shot user has): the selection rule
  BMTPT ensemble          all M particles trained on, scored by their posterior predictive
  BMTPT tempered mean     as BMTPT mean from a source with likelihood scale --tempered-scale
Seeds pair the rows: one seed is one draw of the k shots and of the validation set, shared by
every row. Reported per k: the mean over seeds at the start, after 10 steps and at the end,
the mean over the curve (area), and each row's paired difference from SPoT and from PT with a
95% t-interval over the seeds. Also: the SVGD forces of the BMTPT sources at several likelihood
scales and bandwidths (what makes the repulsion matter). Writes --json and --png (the learning
curves, mean and 95% band per row, one panel per k).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = {"tasks": ["sentiment", "mood", "contrary", "topic"], "pretrain_steps": 400}
MIXTURE = "[sentiment,mood,contrary,topic]"
TARGET = "polarity"
TARGET_BATCH = 8


def run(overrides: list[str]) -> None:
    from bpt_ds.runner import run_stage
    from bpt_ds.runs import load_config
    from bpt_ds.stages import STAGES

    cfg = load_config(None, overrides)
    run_stage(cfg, STAGES[cfg.stage](cfg))


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def best_particle(backbone: Path, source: Path, shots: int, seed: int) -> tuple[int, list[float]]:
    """The selection rule: the source particle with the lowest mean token loss on the target's
    k-shot training examples of this seed (what the target run will train on)."""
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from bpt_ds.config import DataConfig
    from bpt_ds.data.batching import collate, encode_task
    from bpt_ds.data.tasks import load_task
    from bpt_ds.model import PromptedT5
    from bpt_ds.prompts import PromptBank, load_prompts_file

    tensors = load_prompts_file(source / "prompts.safetensors")
    m, length, dim = tensors["particles"].shape
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = T5ForConditionalGeneration.from_pretrained(backbone).eval()
    bank = PromptBank(m, length, dim, tasks=[TARGET])
    bank.load_tensors(tensors, str(source))
    task = load_task(TARGET, DataConfig(few_shot=shots), seed)
    encoded = encode_task(tokenizer, task, 0, "train", 64, 8)
    batch = collate([encoded], [(0, i) for i in range(len(encoded.inputs))], tokenizer.pad_token_id)
    with torch.no_grad():
        losses, particle, _ = PromptedT5(model, bank)(**batch)
    tokens = (batch["labels"] != -100).sum().item()
    per_particle = [losses[particle == p].sum().item() / tokens for p in range(m)]
    return min(range(m), key=per_particle.__getitem__), per_particle


def interval(diffs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of paired differences."""
    from scipy import stats

    n = len(diffs)
    mean = statistics.mean(diffs)
    if n < 2:
        return mean, math.nan
    return mean, stats.t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n)


def plot(results: dict, steps_of: list[int], shots: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shots), figsize=(6 * len(shots), 5), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], shots):
        for i, (method, by_k) in enumerate(results.items()):
            rows = by_k.get(str(k))
            if not rows:
                continue
            mean, half = [], []
            for s in steps_of:
                m, h = interval([r["curve"][str(s)] for r in rows]) if len(rows) > 1 else (rows[0]["curve"][str(s)], 0)
                mean.append(m)
                half.append(0 if math.isnan(h) else h)
            style = "-" if i < 10 else "--"
            line, = ax.plot(steps_of, mean, style, marker="o", markersize=3, label=method)
            ax.fill_between(steps_of, [a - b for a, b in zip(mean, half)], [a + b for a, b in zip(mean, half)],
                            color=line.get_color(), alpha=0.12)
        ax.set_title(f"k = {k} examples per class")
        ax.set_xlabel("target step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"dev accuracy ({TARGET}), mean over seeds, 95% band")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    ap.add_argument("--shots", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--source-steps", type=int, default=300)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--tempered-scale", type=float, default=10.0)
    ap.add_argument("--eval-examples", type=int, default=1000)
    ap.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "replicated_bf16.json"),
                    help="DeepSpeed config of every run (default: replicated, ZeRO-2: on one rank the same "
                         "fp32 math as ZeRO-3 without its per-module hooks, 2.4x faster on this backbone)")
    ap.add_argument("--out", default="runs/bench-power")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--png", help="write the learning curves here")
    ap.add_argument("--methods", nargs="+", metavar="SUBSTRING", help="run only the rows whose name contains one")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the sources and the finished target runs already in --out (same settings assumed)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    from bpt_ds.tiny import build_tiny_backbone

    started = time.time()
    backbone = build_tiny_backbone(recipe=RECIPE)
    out = Path(args.out)
    common = [f"model.name_or_path={backbone}", "model.dtype=auto", "prompt.length=16", "train.save_every=0",
              "train.resume=never", "train.log_every=10",
              f"deepspeed.config={args.ds_config}"]
    src = lambda name: str(out / name)  # noqa: E731
    bmtpt = ["stage=bmtpt-source", f"prompt.particles={args.particles}"]
    sources = {
        "spot-src": ["stage=pt"],
        "bmtpt-src": bmtpt,
        "bmtpt-tempered": [*bmtpt, f"svgd.likelihood_scale={args.tempered_scale}"],
        "mpt-teachers": ["stage=mpt-teachers"],
        "mpt-shared": ["stage=mpt-distill", f"distill.teachers={src('mpt-teachers')}"],
    }
    methods = {
        "PT (random init)": ["stage=pt", "prompt.init=random"],
        "SPoT": ["stage=spot", f"prompt.init_file={src('spot-src')}"],
        "MPT shared prompt, no factors": ["stage=target", f"prompt.init_file={src('mpt-shared')}"],
        "MPT + fresh rank-1 factors": ["stage=target", f"prompt.init_file={src('mpt-shared')}",
                                       "prompt.factors.rank=1"],
        "MPT + mean source factors": ["stage=target", f"prompt.init_file={src('mpt-shared')}",
                                      "prompt.factors.rank=1", "prompt.factors.init_from=mean"],
        "BMTPT mean, no prior": ["stage=target", f"prompt.init_file={src('bmtpt-src')}"],
        "BMTPT mean + KDE prior (beta 1)": ["stage=target", f"prompt.init_file={src('bmtpt-src')}",
                                            "prior.kind=kde", "prior.beta=1"],
        "BMTPT mean + fresh rank-1 factors": ["stage=target", f"prompt.init_file={src('bmtpt-src')}",
                                              "prompt.factors.rank=1"],
        "BMTPT best particle": ["stage=target", f"prompt.init_file={src('bmtpt-src')}"],  # + init_particle
        "BMTPT ensemble (posterior predictive)": ["stage=target", f"prompt.init_file={src('bmtpt-src')}",
                                                  f"prompt.particles={args.particles}"],
        f"BMTPT tempered (scale {args.tempered_scale:g}) mean":
            ["stage=target", f"prompt.init_file={src('bmtpt-tempered')}"],
    }
    if args.methods:
        methods = {m: extra for m, extra in methods.items() if any(k in m for k in args.methods)}
    used = {n for n in sources for extra in methods.values() if f"prompt.init_file={src(n)}" in extra}
    used |= {"mpt-teachers"} if "mpt-shared" in used else set()
    used |= {"bmtpt-src"}  # the forces table's reference
    source_args = [*common, "seed=42", f"data.tasks={MIXTURE}", "prompt.init=vocab", f"train.steps={args.source_steps}",
                   "train.lr=0.3", "train.global_batch_size=32", "train.eval_every=0"]

    def train_source(name: str, extra: list[str]) -> None:
        if not (args.reuse and (out / name / "done.json").is_file()):
            shutil.rmtree(out / name, ignore_errors=True)
            run([*source_args, f"output_dir={out / name}", *extra])

    for name, extra in sources.items():
        if name in used:
            train_source(name, extra)
    # The repulsion against the driving force, by likelihood scale and bandwidth (sources only).
    h = scalars(out / "bmtpt-src", "svgd/bandwidth")
    median_h = statistics.median(h.values())
    sweep = {"default (scale = 8,000 examples, median bandwidth)": "bmtpt-src",
             f"scale {args.tempered_scale:g}": "bmtpt-tempered"}
    for label, extra in {"scale 1": ["svgd.likelihood_scale=1"],
                         f"bandwidth {median_h / 10:.3g} (median / 10)": [f"svgd.bandwidth={median_h / 10:.6g}"],
                         f"bandwidth {median_h * 10:.3g} (median x 10)": [f"svgd.bandwidth={median_h * 10:.6g}"]}.items():
        name = "forces-" + extra[0].split("=")[0].split(".")[-1] + "-" + extra[0].split("=")[1]
        train_source(name, [*bmtpt, *extra])
        sweep[label] = name
    if "bmtpt-tempered" not in used:
        train_source("bmtpt-tempered", sources["bmtpt-tempered"])
    forces = {}
    for label, name in sweep.items():
        d, r = scalars(out / name, "svgd/driving_norm"), scalars(out / name, "svgd/repulsive_norm")
        dist = scalars(out / name, "svgd/mean_pairwise_distance")
        last = max(d)
        forces[label] = {"driving": d[last], "repulsive": r[last], "ratio": r[last] / d[last],
                         "distance": dist[max(dist)]}

    steps_of = list(range(0, args.steps + 1, 10))
    results: dict[str, dict[str, list[dict]]] = {}
    for i, (method, extra) in enumerate(methods.items()):
        for k in args.shots:
            for seed in args.seeds:
                run_dir = out / f"target-{i}-k{k}-seed{seed}"
                pick = []
                if method == "BMTPT best particle":
                    chosen, losses = best_particle(backbone, out / "bmtpt-src", k, seed)
                    pick = [f"prompt.init_particle={chosen}"]
                if not (args.reuse and (run_dir / "done.json").is_file()):
                    shutil.rmtree(run_dir, ignore_errors=True)  # one TensorBoard log per curve
                    run([*common, *extra, *pick, f"data.tasks=[{TARGET}]", f"data.few_shot={k}",
                         f"data.synthetic_eval_examples={args.eval_examples}", f"seed={seed}",
                         f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.global_batch_size={TARGET_BATCH}",
                         "train.eval_every=10", "train.eval_at_start=true", "train.eval_batch_size=250",
                         f"output_dir={run_dir}"])
                curve = scalars(run_dir, f"dev/{TARGET}/accuracy")
                results.setdefault(method, {}).setdefault(str(k), []).append(
                    {"seed": seed, "curve": {str(s): curve[s] for s in steps_of},
                     "area": statistics.mean(curve[s] for s in steps_of), **({"particle": pick[0]} if pick else {})})
                if args.json:  # after every run: a crash keeps what was measured
                    Path(args.json).write_text(json.dumps({"args": vars(args), "forces": forces, "results": results},
                                                          indent=1) + "\n")

    command = "python bench/transfer_power.py " + shlex.join(a for a in sys.argv[1:] if a != "--reuse")
    elapsed = time.time() - started
    print(f"\nTarget {TARGET}, few-shot k per class, {args.steps} steps of batch {TARGET_BATCH}, lr {args.lr}; "
          f"sources on {MIXTURE}: {args.source_steps} steps, seed 42, {args.particles} particles for BMTPT; "
          f"{len(args.seeds)} paired seeds, {args.eval_examples} validation examples each; {elapsed:.0f} s.")
    fmt = lambda m, h: f"{m:+.3f} ± {h:.3f}" if not math.isnan(h) else f"{m:+.3f}"  # noqa: E731
    for k in args.shots:
        print(f"\n### k = {k}\n")
        print(f"| method | acc@0 | acc@10 | acc@{args.steps} | area | Δ area vs SPoT (95% CI) | "
              f"Δ acc@{args.steps} vs SPoT | Δ area vs PT |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        base = {name: {r["seed"]: r for r in results.get(name, {}).get(str(k), [])} for name in ("SPoT", "PT (random init)")}
        for method, by_k in results.items():
            rows = by_k.get(str(k), [])
            mean = lambda key: statistics.mean(r["curve"][key] if key != "area" else r["area"] for r in rows)  # noqa: E731

            def delta(name: str, key: str) -> str:
                ref = base[name]
                if not ref or method == name:
                    return "—"
                get = (lambda r: r["area"]) if key == "area" else (lambda r: r["curve"][key])
                return fmt(*interval([get(r) - get(ref[r["seed"]]) for r in rows if r["seed"] in ref]))

            print(f"| {method} | {mean('0'):.3f} | {mean('10'):.3f} | {mean(str(args.steps)):.3f} | {mean('area'):.3f} | "
                  f"{delta('SPoT', 'area')} | {delta('SPoT', str(args.steps))} | {delta('PT (random init)', 'area')} |")
    print("\nSVGD forces at the last source step (per-particle RMS) and the particles' mean pairwise distance:")
    print("| source | driving | repulsive | repulsive / driving | pairwise distance |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, f in forces.items():
        print(f"| {label} | {f['driving']:.3g} | {f['repulsive']:.3g} | {f['ratio']:.2g} | {f['distance']:.3g} |")
    print(f"\nreproduce: {command.strip()}")
    if args.png:
        plot(results, steps_of, args.shots, Path(args.png),
             f"{TARGET} from sources {MIXTURE}; {len(args.seeds)} seeds, {args.eval_examples} dev examples")
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
