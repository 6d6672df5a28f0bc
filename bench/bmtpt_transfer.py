"""Transfer to a held-out task on the tiny backbone: PT vs SPoT vs BMTPT vs MPT, same target steps and seeds.

    python bench/bmtpt_transfer.py [--seeds 1 2 3] [--target-steps 100] [--out runs/bench-transfer]

Sources (trained once, seed 42, equal steps and global batch):
  spot-src       prompt tuning on the related tasks sentiment + mood (one prompt)
  bmtpt-src      SVGD posterior, M particles, on sentiment + mood
  spot-topic     prompt tuning on the unrelated task topic (control)
  bmtpt-topic    SVGD posterior on topic (control)
  bmtpt-src-tempered  as bmtpt-src with a small likelihood scale (--tempered-scale)
  bmtpt-src-independent / -sgd / -adagrad   independent starts; plain steps; Liu & Wang's step
  mpt-teachers   MPT's teachers: one prompt each for sentiment and mood, in one run
  mpt-shared     MPT's shared prompt with rank-1 factors, distilled from mpt-teachers
Targets (the held-out task polarity; every row: the same target steps, lr, batch and seeds):
  pt             random init
  spot           init from spot-src                 spot (unrelated)   init from spot-topic
  bmtpt          init: mean of bmtpt-src particles, no prior (beta 0)
  bmtpt particle 0   init: one particle of bmtpt-src instead of the mean
  bmtpt tempered     init: mean of bmtpt-src-tempered particles
  bmtpt+kde      the same, plus the particles' kernel density as prior
  bmtpt+gauss    the same, plus a diagonal Gaussian fitted to the particles as prior
  bmtpt (unrelated)  init: mean of bmtpt-topic particles
  bmtpt ensemble     all M particles continued, scored by their posterior predictive
  bmtpt independent / sgd / adagrad   init: the mean of those sources' particles
  mpt            init: mpt-shared's prompt, fresh rank-1 factors (trained with it)
  mpt (mean factors)  init: mpt-shared's prompt, factors from the sources' mean
It prints accuracy at the start and after 10/20/30 steps and at the end, and steps to 80% accuracy (early
accuracy is where transfer shows on this backbone: ../shared/design/tiny-backbone.md), as
mean ± std over the seeds, then the command that reproduced it. All runs share one
process (one rank; CPU unless a GPU is present).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(overrides: list[str]) -> None:
    from bpt_ds.runner import run_stage
    from bpt_ds.runs import load_config
    from bpt_ds.stages import STAGES

    cfg = load_config(None, overrides)
    run_stage(cfg, STAGES[cfg.stage](cfg))


def eval_curve(run_dir: Path, task: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(f"dev/{task}/accuracy")}


def svgd_forces(run_dir: Path) -> dict:
    """What SVGD's TensorBoard says of a source: the two terms' per-particle RMS (first, last),
    and from its particles the mean pairwise distance and mean norm."""
    import torch
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    first_last = lambda tag: (acc.Scalars(tag)[0].value, acc.Scalars(tag)[-1].value)  # noqa: E731
    p = load_file(str(run_dir / "prompts.safetensors"))["particles"].flatten(1).double()
    return {"driving": first_last("svgd/driving_norm"), "repulsive": first_last("svgd/repulsive_norm"),
            "distance": torch.pdist(p).mean().item() if len(p) > 1 else 0.0, "norm": p.norm(dim=1).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--source-steps", type=int, default=200)
    ap.add_argument("--target-steps", type=int, default=100)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--target-lr", type=float, default=0.1)
    ap.add_argument("--kde-beta", type=float, default=30000.0)  # natural units (x 6,000 target tokens)
    ap.add_argument("--gauss-beta", type=float, default=6.0)
    ap.add_argument("--tempered-scale", type=float, default=10.0)
    ap.add_argument("--sgd-lr", type=float, default=0.1)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--out", default="runs/bench-transfer")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--methods", nargs="+", metavar="SUBSTRING",
                    help="run only the target rows whose name contains one of these (e.g. PT SPoT MPT)")
    ap.add_argument("--reuse-sources", action="store_true",
                    help="keep source runs already in --out (same settings assumed) instead of retraining them")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    out = Path(args.out)
    common = ["model.dtype=auto", "prompt.length=16", "train.global_batch_size=32", "train.save_every=0",
              "train.resume=never", "train.log_every=10", f"data.max_eval_examples={args.eval_examples}"]

    start = time.time()
    sources = {
        "spot-src": ["stage=pt", "data.tasks=[sentiment,mood]", "prompt.init=vocab"],
        "bmtpt-src": ["stage=bmtpt-source", "data.tasks=[sentiment,mood]", "prompt.init=vocab",
                      f"prompt.particles={args.particles}"],
        "spot-topic": ["stage=pt", "data.tasks=[topic]", "prompt.init=vocab"],
        "bmtpt-topic": ["stage=bmtpt-source", "data.tasks=[topic]", "prompt.init=vocab",
                        f"prompt.particles={args.particles}"],
        # A tempered posterior: a likelihood scale far below the 4000 examples strengthens the
        # repulsive term against the driving one.
        "bmtpt-src-tempered": ["stage=bmtpt-source", "data.tasks=[sentiment,mood]", "prompt.init=vocab",
                               f"prompt.particles={args.particles}", f"svgd.likelihood_scale={args.tempered_scale}"],
        # The particles' start and update rule (svgd.init, train.optimizer): independent vocabulary
        # draws (the default before 2026-12), and SVGD's own fixed point with plain steps or
        # Liu & Wang's step instead of AdamW (lrs giving a similar first move per coordinate;
        # plain steps unclipped, since clipping the joint -φ to norm 1 would stall them).
        "bmtpt-src-independent": ["stage=bmtpt-source", "data.tasks=[sentiment,mood]", "prompt.init=vocab",
                                  f"prompt.particles={args.particles}", "svgd.init=independent"],
        "bmtpt-src-sgd": ["stage=bmtpt-source", "data.tasks=[sentiment,mood]", "prompt.init=vocab",
                          f"prompt.particles={args.particles}", "train.optimizer=sgd", "train.max_grad_norm=0",
                          f"train.lr={args.sgd_lr}"],
        "bmtpt-src-adagrad": ["stage=bmtpt-source", "data.tasks=[sentiment,mood]", "prompt.init=vocab",
                              f"prompt.particles={args.particles}", "train.optimizer=svgd-adagrad"],
        # MPT: teachers for the two related tasks in one run, then the shared prompt distilled from them.
        "mpt-teachers": ["stage=mpt-teachers", "data.tasks=[sentiment,mood]", "prompt.init=vocab"],
        "mpt-shared": ["stage=mpt-distill", "data.tasks=[sentiment,mood]", "prompt.init=vocab",
                       f"distill.teachers={out / 'mpt-teachers'}"],
    }
    src = lambda name: str(out / name / "prompts.safetensors")  # noqa: E731
    methods = {
        "PT (random init)": ["stage=pt", "prompt.init=random"],
        "SPoT": ["stage=spot", f"prompt.init_file={src('spot-src')}"],
        "SPoT, unrelated source": ["stage=spot", f"prompt.init_file={src('spot-topic')}"],
        "BMTPT init (particle mean), no prior": ["stage=target", f"prompt.init_file={src('bmtpt-src')}"],
        "BMTPT particle 0 as init, no prior": ["stage=target", f"prompt.init_file={src('bmtpt-src')}",
                                               "prompt.init_particle=0"],
        f"BMTPT tempered (scale {args.tempered_scale:g}) init, no prior":
            ["stage=target", f"prompt.init_file={src('bmtpt-src-tempered')}"],
        "BMTPT init + KDE prior (beta 1, the MAP)":
            ["stage=target", f"prompt.init_file={src('bmtpt-src')}", "prior.kind=kde", "prior.beta=1"],
        f"BMTPT init + KDE prior (beta {args.kde_beta:g})":
            ["stage=target", f"prompt.init_file={src('bmtpt-src')}", "prior.kind=kde", f"prior.beta={args.kde_beta}"],
        f"BMTPT init + Gaussian prior (diagonal, beta {args.gauss_beta:g})":
            ["stage=target", f"prompt.init_file={src('bmtpt-src')}", "prior.kind=gaussian-diagonal",
             f"prior.beta={args.gauss_beta}"],
        "BMTPT init, unrelated source": ["stage=target", f"prompt.init_file={src('bmtpt-topic')}"],
        "BMTPT ensemble start (all particles, posterior predictive), no prior":
            ["stage=target", f"prompt.init_file={src('bmtpt-src')}", f"prompt.particles={args.particles}"],
        "BMTPT independent starts, particle mean, no prior":
            ["stage=target", f"prompt.init_file={src('bmtpt-src-independent')}"],
        "BMTPT source by plain SGD steps, particle mean, no prior":
            ["stage=target", f"prompt.init_file={src('bmtpt-src-sgd')}"],
        "BMTPT source by svgd-adagrad, particle mean, no prior":
            ["stage=target", f"prompt.init_file={src('bmtpt-src-adagrad')}"],
        "MPT (shared prompt, fresh rank-1 factors)": ["stage=target", f"prompt.init_file={src('mpt-shared')}",
                                                      "prompt.factors.rank=1"],
        "MPT (shared prompt, mean source factors)": ["stage=target", f"prompt.init_file={src('mpt-shared')}",
                                                     "prompt.factors.rank=1", "prompt.factors.init_from=mean"],
    }
    if args.methods:
        methods = {m: extra for m, extra in methods.items() if any(k in m for k in args.methods)}
    # Train the sources the chosen rows start from (mpt-shared needs mpt-teachers first).
    used = {name for name in sources for extra in methods.values() if f"prompt.init_file={src(name)}" in extra}
    if "mpt-shared" in used:
        used.add("mpt-teachers")
    for name, extra in sources.items():
        if name not in used or (args.reuse_sources and (out / name / "prompts.safetensors").is_file()):
            continue
        run([*common, "seed=42", f"train.steps={args.source_steps}", "train.lr=0.3", "train.eval_every=0",
             f"output_dir={out / name}", *extra])  # a source's own keys (e.g. the SGD lr) last
    forces = {name: svgd_forces(out / name) for name in sources
              if name.startswith("bmtpt") and (out / name / "tb").is_dir()}
    results: dict[str, list[dict]] = {}
    for i, (method, extra) in enumerate(methods.items()):
        for seed in args.seeds:
            run_dir = out / f"target-{i}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh TensorBoard log for the curve
            run([*common, *extra, "data.tasks=[polarity]", f"seed={seed}", f"train.steps={args.target_steps}",
                 f"train.lr={args.target_lr}", "train.eval_every=10", "train.eval_at_start=true",
                 f"output_dir={run_dir}"])
            curve = eval_curve(run_dir, "polarity")
            reached = [s for s, a in sorted(curve.items()) if a >= 0.8]
            results.setdefault(method, []).append({
                "seed": seed, "curve": curve, "acc@0": curve.get(0), "acc@10": curve.get(10), "acc@20": curve.get(20),
                "acc@30": curve.get(30), "final": curve[max(curve)],
                "steps_to_80": reached[0] if reached else None})

    def cell(rows: list[dict], key: str, fmt: str) -> str:
        values = [r[key] for r in rows if r[key] is not None]
        if not values:
            return "never"
        missing = f" ({len(rows) - len(values)} never)" if len(values) < len(rows) else ""
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{format(statistics.mean(values), fmt)} ± {format(sd, fmt)}{missing}"

    lines = [f"| method | acc@0 | acc@10 | acc@20 | acc@30 | acc@{args.target_steps} | steps to 80% |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, rows in results.items():
        lines.append(f"| {method} | {cell(rows, 'acc@0', '.3f')} | {cell(rows, 'acc@10', '.3f')} | "
                     f"{cell(rows, 'acc@20', '.3f')} | "
                     f"{cell(rows, 'acc@30', '.3f')} | {cell(rows, 'final', '.3f')} | "
                     f"{cell(rows, 'steps_to_80', '.0f')} |")
    if forces:
        print("\nSVGD sources: per-particle RMS of the driving and repulsive terms (first and last logged step), "
              "mean pairwise particle distance and particle norm at the end")
        print("| source | driving | repulsive | repulsive / driving (last) | pairwise distance | norm |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, f in forces.items():
            print(f"| {name} | {f['driving'][0]:.3g} -> {f['driving'][1]:.3g} | {f['repulsive'][0]:.3g} -> "
                  f"{f['repulsive'][1]:.3g} | {f['repulsive'][1] / f['driving'][1]:.2g} | {f['distance']:.3g} | "
                  f"{f['norm']:.3g} |")
    command = "python bench/bmtpt_transfer.py " + shlex.join(a for a in sys.argv[1:] if a != "--reuse-sources")
    print()
    print(f"Target: polarity, {args.target_steps} steps, lr {args.target_lr}, batch 32, seeds {args.seeds}; "
          f"sources: {args.source_steps} steps, seed 42, {args.particles} particles for BMTPT. "
          f"Evaluated on {args.eval_examples} validation examples every 10 steps. {time.time() - start:.0f} s.")
    print("\n".join(lines))
    print(f"\nreproduce: {command.strip()}" + ("  (this pass reused the sources already in --out)"
                                               if args.reuse_sources else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "forces": forces},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
