"""Results tables: runs' metrics.json collected into methods x tasks, mean ± std over seeds.

    python -m bpt_ds.results runs/ [more runs or metrics.json files] [--split test|dev]
                             [--format markdown|csv] [--metrics score|all] [--output FILE] [--plot PNG]

Every metrics.json under the given paths is one (method, seed) run; its method is the config's
`method` (default: the stage), with "k=<k>" added for few-shot runs. Runs that would share a
cell (the same method, seed and task, e.g. two pt runs of another lr) become rows of their
own, each labelled with its directory (`pt (lr-0.1)`, `pt (lr-0.3)`); seedN directories
stay together in one row. A cell is the mean ± sample
standard deviation over seeds, x100, of the task's score (the mean of its metrics, e.g. MRPC's F1
and accuracy) or, with --metrics all, of every metric. The test split at the best dev step is
the default (the papers' protocol); Avg is each seed's mean over the method's tasks, then
mean ± std over seeds. Columns follow the suite's order (GLUE, SuperGLUE, QA), rows the order
in which methods are first found.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from .data.registry import REGISTRY


class ResultsError(ValueError):
    """A metrics.json is missing, unreadable or duplicated; the message names the file."""


def find_metrics(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        p = Path(name)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(p.rglob("metrics.json"))
            if not found:
                raise ResultsError(f"no metrics.json under '{name}' (a finished run writes one to its output_dir)")
            files += found
        else:
            raise ResultsError(f"'{name}' does not exist")
    return files


def _read(f: Path, split: str) -> tuple[str, int, dict]:
    try:
        run = json.loads(f.read_text())
        method, seed, few_shot = run["method"], run["seed"], run.get("few_shot", 0)
        tasks = run["selected"].get(split) or {}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ResultsError(f"{f}: not a bpt_ds metrics.json ({type(e).__name__}: {e})") from None
    return (f"{method} k={few_shot}" if few_shot else method), seed, tasks


def _group(f: Path, root: Path) -> str:
    """A run's directory relative to the collection's root, without seedN parts (seeds of one
    configuration share a row)."""
    parts = [p for p in f.parent.resolve().relative_to(root).parts if not (p.startswith("seed") and p[4:].isdigit())]
    return "/".join(parts) or "."


def labels(files: list[Path], split: str = "test") -> dict[Path, str]:
    """Each run's row label: its method, or, where runs of one method would share a cell (same
    seed and task), its method and its directory, so that both are shown rather than refused."""
    read = {f: _read(f, split) for f in files}
    clashing = set()
    seen: dict[tuple, Path] = {}
    for f, (label, seed, tasks) in read.items():
        for task in tasks:
            key = (label, seed, task)
            if key in seen and _group(seen[key], Path("/")) != _group(f, Path("/")):
                clashing.add(label)
            seen.setdefault(key, f)
    out = {}
    for label in dict.fromkeys(lab for lab, _, _ in read.values()):
        mine = [f for f, (lab, _, _) in read.items() if lab == label]
        if label not in clashing:
            out.update({f: label for f in mine})
            continue
        root = Path(os.path.commonpath([str(f.parent.resolve()) for f in mine]))
        out.update({f: f"{label} ({_group(f, root)})" for f in mine})
    return out


def collect(files: list[Path], split: str = "test", which: str = "score") -> dict:
    """{method: {column: {seed: value}}} with columns "task" (score) or "task metric" (all)."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    seen: dict[tuple, Path] = {}
    names_of = labels(files, split)
    for f in files:
        _, seed, tasks = _read(f, split)
        label = names_of[f]
        row = table.setdefault(label, {})
        for task, values in tasks.items():
            # One cell per row, task and seed: runs of one task each (the papers' layout) fill a
            # row side by side; two runs of one directory scoring the same task and seed clash.
            key = (label, seed, task)
            if key in seen:
                raise ResultsError(f"{f} and {seen[key]} both score task '{task}' as method '{label}' with seed "
                                   f"{seed}; give one of them another `method` in its config, or collect them "
                                   "separately")
            seen[key] = f
            names = ["score"] if which == "score" else [k for k in values if k not in ("score", "examples", "invalid")]
            for name in names:
                column = task if which == "score" else f"{task} {name}"
                row.setdefault(column, {})[seed] = float(values[name])
    return table


def _order(columns: set[str]) -> list[str]:
    suite = list(REGISTRY)

    def key(column: str):
        task = column.split(" ")[0]
        return (suite.index(task) if task in suite else len(suite), column)
    return sorted(columns, key=key)


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def rows(table: dict) -> tuple[list[str], list[tuple[str, list]]]:
    """Columns and, per method, each column's (mean, std, seeds) or None; the last column is Avg."""
    columns = _order({c for row in table.values() for c in row})
    out = []
    for method, row in table.items():
        cells = [(*_stats(list(row[c].values())), len(row[c])) if c in row else None for c in columns]
        seeds = set.intersection(*(set(v) for v in row.values())) if row else set()
        per_seed = [statistics.fmean(row[c][s] for c in row) for s in sorted(seeds)]
        cells.append((*_stats(per_seed), len(per_seed)) if per_seed else None)
        out.append((method, cells))
    return columns + ["Avg"], out


def markdown(table: dict) -> str:
    columns, body = rows(table)
    lines = ["| Method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, cells in body:
        text = ["–" if c is None else f"{100 * c[0]:.1f}" + (f" ± {100 * c[1]:.1f}" if c[2] > 1 else "")
                for c in cells]
        lines.append(f"| {method} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def csv_text(table: dict) -> str:
    import csv
    import io

    columns, body = rows(table)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "column", "mean", "std", "seeds"])
    for method, cells in body:
        for column, c in zip(columns, cells):
            if c is not None:
                writer.writerow([method, column, f"{100 * c[0]:.4f}", f"{100 * c[1]:.4f}", c[2]])
    return buf.getvalue()


def render(paths: list[str], split: str = "test", fmt: str = "markdown", which: str = "score") -> str:
    table = collect(find_metrics(paths), split, which)
    if not any(table.values()):
        raise ResultsError(f"the runs have no {split} metrics (a task without a {split} split, or a run "
                           "that never evaluated: train.eval_every=0 and no dev rows)")
    return markdown(table) if fmt == "markdown" else csv_text(table)


def curves(files: list[Path], split: str = "dev", label_split: str = "test") -> dict[str, dict[str, dict[int, list[float]]]]:
    """{row label: {task: {step: [one value per run]}}}: each run's <split>/<task>/score scalars,
    read from its TensorBoard log (tb/ beside its metrics.json) with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[str, dict[int, list[float]]]] = {}
    for f, label in labels(files, label_split).items():
        tb = f.parent / "tb"
        if not tb.is_dir():
            raise ResultsError(f"{f}: no TensorBoard log beside it ({tb}) to draw its curve from")
        acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            parts = tag.split("/")
            if len(parts) == 3 and parts[0] == split and parts[2] == "score":
                series = out.setdefault(label, {}).setdefault(parts[1], {})
                for event in acc.Scalars(tag):
                    series.setdefault(event.step, []).append(event.value)
    if not out:
        raise ResultsError(f"the runs' TensorBoard logs hold no {split}/<task>/score scalars (train.eval_every=0?)")
    return out


def plot(files: list[Path], path: str, split: str = "dev", label_split: str = "test") -> str:
    """A PNG of the runs' <split> score curves: one panel per task, one line per row label (the
    mean over its seeds, x100) with a band of ± one standard deviation where it has several."""
    try:
        import matplotlib
    except ImportError:
        raise ResultsError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(files, split, label_split)
    tasks = _order({t for by_task in data.values() for t in by_task})
    cols = min(3, len(tasks))
    rows_ = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.5 * cols, 4 * rows_), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for label, by_task in data.items():
            if task not in by_task:
                continue
            steps = sorted(by_task[task])
            mean = [100 * statistics.fmean(by_task[task][s]) for s in steps]
            sd = [100 * statistics.stdev(by_task[task][s]) if len(by_task[task][s]) > 1 else 0.0 for s in steps]
            runs = max(len(v) for v in by_task[task].values())
            line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} ({runs} run{'s' * (runs > 1)})")
            ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} score (x100; band: ± 1 sd over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpt_ds.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories (searched for metrics.json) or metrics.json files")
    parser.add_argument("--split", choices=["test", "dev"], default="test",
                        help="test (default) or dev metrics, both at the best dev step")
    parser.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    parser.add_argument("--metrics", choices=["score", "all"], default="score",
                        help="one column per task (its score) or per task and metric")
    parser.add_argument("--output", help="write the table here instead of printing it")
    parser.add_argument("--plot", metavar="PNG", help="also draw the runs' dev score curves (mean and spread over "
                                                      "seeds, one line per row) into this PNG")
    args = parser.parse_args(argv)
    try:
        text = render(args.paths, args.split, args.format, args.metrics)
        if args.plot:
            plot(find_metrics(args.paths), args.plot, label_split=args.split)
    except ResultsError as e:
        print(f"bpt_ds.results: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
