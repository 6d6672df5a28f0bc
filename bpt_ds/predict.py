"""Predictions of a trained prompt: one JSON line per input row, in input order, plus the
metrics when the rows have targets.

    deepspeed [--num_gpus N] launch/predict.py --prompts RUN_DIR_OR_FILE
        [--task NAME [--split test|validation|train]] [--input FILE [--labels a,b,...]]
        [--particles ensemble|mean|K] [--generate] [--output FILE.jsonl] [key.sub=value ...]

The prompts: a run's output directory (its prompts_best.safetensors, the prompt metrics.json
reports, else prompts.safetensors; its config.yaml gives the backbone, the seed and the data
settings) or any prompts file (then name the backbone: model.name_or_path=...). The rows: a
task's split (a suite task, a synthetic task or a data.local one; default the run's first
evaluated task, its test split), or your own JSON/JSONL/CSV/Parquet file with an `input`
column and, optionally, a `target` column (--input). Classification rank-scores the task's
labels (--labels for a file of your own; without labels it generates); QA, and --generate,
generate. A file of M > 1 particles predicts by their posterior predictive (as the target
stage evaluates it); --particles mean or K uses their mean or particle K.

It runs on any number of ranks with the backbone partitioned by ZeRO-3 (deepspeed.config):
each rank predicts every R-th row and rank 0 writes them all. Everything that can be wrong
with the input (files, task, columns, labels, the prompt's shape against the backbone, the
output path) is refused before the backbone loads. key.sub=value overrides the config read
from the run (model.*, data.*, deepspeed.*, train.eval_batch_size).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from . import distributed as job
from .backbone import load_backbone, resolve_model_path
from .config import build_config, parse_override, read_yaml, set_dotted
from .data.batching import encode_task
from .data.registry import REGISTRY
from .data.synthetic import SYNTHETIC_TASKS
from .data.tasks import TaskData, _read_file, check_task_names, load_task
from .deepspeed_setup import ds_dtype, initialize, resolve_ds_config
from .errors import ConfigError, DataError
from .evaluation import predict, texts_and_metrics
from .files import atomic_write, check_writable
from .model import PromptedT5
from .prompts import PromptBank, load_prompts_file
from .report import line
from .stages import STAGES

SPLITS = ("test", "validation", "train")
KEPT_SECTIONS = ("model", "data", "deepspeed", "seed")


@dataclass
class Request:
    """What to predict, checked: the prompt tensors, the config, the rows and where they go."""

    cfg: object                     # RunConfig (model, data, deepspeed; the bank's shape)
    prompts_path: Path
    tensors: dict
    task: TaskData                  # the rows to predict as task.test (targets may be placeholders)
    has_targets: bool
    generate: bool
    pick: Optional[int]             # None: all particles (ensemble) or their mean (particles=1)
    particles: int                  # the bank's M
    factors_rank: int
    output: Path
    where: str                      # the rows, in words


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="a run's output directory or a prompts.safetensors file")
    ap.add_argument("--task", help="the task whose rows (or, with --input, whose labels) to use")
    ap.add_argument("--split", choices=SPLITS, default="test", help="the task's split (default: test)")
    ap.add_argument("--input", help="your own rows: JSON/JSONL/CSV/Parquet with an 'input' column, optionally 'target'")
    ap.add_argument("--labels", help="comma-separated labels to rank-score the rows of --input (default: the labels "
                                     "of --task, or of the run's first task; else the file's distinct targets)")
    ap.add_argument("--particles", default="ensemble",
                    help="with M > 1 particles: ensemble (posterior predictive, default), mean, or a particle index")
    ap.add_argument("--generate", action="store_true", help="generate text instead of rank-scoring the labels")
    ap.add_argument("--output", help="the JSONL to write (default: predictions/<task>-<split>.jsonl beside the prompts)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. model.name_or_path=...")
    return ap.parse_args(argv)


def prepare(args: argparse.Namespace, world: int = 1) -> Request:
    """Reads and checks everything except the backbone's weights."""
    given = Path(args.prompts)
    run_dir = given if given.is_dir() else None
    if run_dir is not None and not (run_dir / "adapter_config.json").is_file():
        best = run_dir / "prompts_best.safetensors"
        path = best if best.is_file() else run_dir / "prompts.safetensors"
    else:
        path, run_dir = given, (given.parent if (given.parent / "config.yaml").is_file() else None)
    tensors = load_prompts_file(path, key="--prompts")
    particles = tensors.get("particles")
    if particles is None or particles.dim() != 3:
        raise ConfigError(f"--prompts: '{path}' holds no particles [M, length, d_model] (keys: {sorted(tensors)})")
    m, length, dim = particles.shape

    run = read_yaml(str(run_dir / "config.yaml")) if run_dir is not None and (run_dir / "config.yaml").is_file() else {}
    raw = {k: run[k] for k in KEPT_SECTIONS if k in run}
    stage = run.get("stage")
    for text in args.overrides:
        key, value = parse_override(text)
        if key.split(".")[0] not in ("model", "data", "deepspeed", "seed") and key != "train.eval_batch_size":
            raise ConfigError(f"predict: override '{text}' sets {key}; predict reads model.*, data.*, deepspeed.*, "
                              "seed and train.eval_batch_size")
        set_dotted(raw, key, value)
    # The training batch keys are not used, but must resolve on `world` ranks: one row per rank.
    eval_batch = raw.get("train", {}).get("eval_batch_size")
    raw["train"] = {"global_batch_size": world, "micro_batch_size": 1, "eval_every": 0,
                    **({"eval_batch_size": eval_batch} if eval_batch is not None else {})}
    raw.setdefault("data", {})
    raw["data"].pop("eval_tasks", None)
    raw["stage"], raw["prompt"] = "pt", {"length": length, "particles": 1, "init": "random"}
    task_name = args.task or (run.get("data", {}).get("eval_tasks") or run.get("data", {}).get("tasks") or [None])[0]
    if "name_or_path" not in raw.get("model", {}):
        raise ConfigError(f"predict: '{path}' is not in a run directory with a config.yaml, so the backbone is "
                          "unknown: add model.name_or_path=<the backbone it was trained with>")
    if task_name is None and not args.input:
        raise ConfigError("predict: name the rows: --task NAME (a suite, synthetic or data.local task) or --input FILE")
    if task_name is not None:
        raw["data"]["tasks"] = [task_name]
    cfg = build_config(raw, STAGES)

    mode = args.particles
    pick: Optional[int] = None
    if mode not in ("ensemble", "mean"):
        try:
            pick = int(mode)
        except ValueError:
            raise ConfigError(f"--particles expects ensemble, mean or a particle index; got {mode!r}") from None
        if not 0 <= pick < m:
            raise ConfigError(f"--particles {pick}: '{path}' holds {m} particle(s), 0..{m - 1}")
    if m > 1 and mode == "ensemble" and stage == "mpt-teachers":
        raise ConfigError(f"--prompts: '{path}' holds one teacher prompt per task (stage mpt-teachers), not a "
                          "posterior: choose the teacher with --particles K")
    bank_particles = m if (m > 1 and mode == "ensemble") else 1

    task, has_targets, capped = _rows(args, cfg, task_name)
    generate = args.generate or task.kind == "qa" or not task.labels
    factors_rank = _factors_rank(tensors, task.name, path)

    model_path = resolve_model_path(cfg.model.name_or_path, progress=int(os.environ.get("RANK", "0")) == 0)
    d_model = AutoConfig.from_pretrained(model_path).d_model
    if dim != d_model:
        raise ConfigError(f"--prompts: '{path}' holds prompts of width {dim}; the backbone {cfg.model.name_or_path} "
                          f"has d_model={d_model}: use the backbone the prompt was trained with (model.name_or_path)")
    output = Path(args.output) if args.output else path.parent / "predictions" / f"{task.name}-{_split_name(args)}.jsonl"

    check_writable(output.parent, key="--output")
    where = f"--input {args.input}" if args.input else f"its {args.split} split"
    if capped:
        where += (f": the first {capped[0]:,} of its {capped[1]:,} rows, as data.max_eval_examples={capped[0]} "
                  "says; data.max_eval_examples=0 predicts them all")
    return Request(cfg, path, tensors, task, has_targets, generate, pick, bank_particles, factors_rank, output, where)


def _split_name(args) -> str:
    return Path(args.input).stem if args.input else args.split


def _rows(args, cfg, task_name: Optional[str]) -> tuple[TaskData, bool, Optional[tuple[int, int]]]:
    """The rows to predict, as the `test` rows of a TaskData, whether they carry targets, and
    (kept, of) when data.max_eval_examples kept only the first rows of a task's split."""
    known, capped = None, None
    if task_name is not None:

        check_task_names(cfg.data)
        if not args.input:
            known = load_task(task_name, cfg.data, cfg.seed)
            rows = getattr(known, "validation" if args.split == "validation" else args.split)
            if cfg.data.max_eval_examples and args.split != "train" and len(rows) > cfg.data.max_eval_examples:
                # the config the run was trained with caps its evaluation; predict says so
                capped = (cfg.data.max_eval_examples, len(rows))
                rows = rows[:cfg.data.max_eval_examples]
            if not rows:
                raise DataError(f"task {task_name} has no {args.split} rows; choose another --split")
            known.test = rows
            return known, True, capped

        spec = cfg.data.local.get(task_name) or REGISTRY.get(task_name) or SYNTHETIC_TASKS.get(task_name)
        labels_of = list(getattr(spec, "labels", None) or [])
        if task_name in cfg.data.local and not labels_of:  # a local task's labels come from its files
            labels_of = load_task(task_name, cfg.data, cfg.seed).labels
        known = TaskData(task_name, labels_of, [], [],
                         kind=getattr(spec, "kind", "classification"), metrics=getattr(spec, "metrics", ("accuracy",)))
    ds = _read_file(args.input, "--input")
    if "input" not in ds.column_names:
        raise DataError(f"--input: '{args.input}' has no column 'input'; its columns are: {', '.join(ds.column_names)}")
    has_targets = "target" in ds.column_names
    rows = []
    for i, row in enumerate(ds):
        x = row["input"]
        if not isinstance(x, str) or not x.strip():
            raise DataError(f"{args.input}, row {i + 1}: column 'input' must be non-empty text; got {x!r}")
        y = row.get("target")
        if has_targets and (y is None or isinstance(y, (list, dict)) or not str(y).strip()):
            raise DataError(f"{args.input}, row {i + 1}: column 'target' must be a label; got {y!r}")
        rows.append({"input": x, "target": str(y) if has_targets else None})
    if not rows:
        raise DataError(f"--input: '{args.input}' has no rows")
    labels = ([s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else
              (known.labels if known is not None else sorted({r["target"] for r in rows}) if has_targets else []))
    kind = known.kind if known is not None else "classification"
    if kind == "qa":
        for r in rows:
            r["answers"] = [r["target"]] if has_targets else []
    elif labels and has_targets:
        bad = next((i for i, r in enumerate(rows) if r["target"] not in labels), None)
        if bad is not None:
            raise DataError(f"{args.input}, row {bad + 1}: target {rows[bad]['target']!r} is not one of the labels "
                            f"{labels}; fix the row or pass --labels")
    name = task_name or Path(args.input).stem
    metrics = known.metrics if known is not None else ("accuracy",)
    return TaskData(name, labels, [], [], rows, kind, metrics), has_targets, None


def _factors_rank(tensors: dict, task: str, path: Path) -> int:
    tasks = sorted(k[len("factors."):-len(".U")] for k in tensors if k.startswith("factors.") and k.endswith(".U"))
    if not tasks:
        return 0
    if task not in tasks:
        raise ConfigError(f"--prompts: '{path}' holds low-rank factors for task(s) {', '.join(tasks)}, not for "
                          f"'{task}': predict one of those tasks (--task), whose prompt is S ∘ (U V)")
    return int(tensors[f"factors.{task}.U"].shape[-1])


def run(req: Request) -> Optional[dict]:
    """Loads the backbone (partitioned), predicts every row (rows sharded over ranks) and writes
    the JSONL on rank 0. Returns the metrics (rows with targets) or None."""
    cfg, task = req.cfg, req.task
    main = job.rank() == 0
    ds_config = resolve_ds_config(cfg, job.world_size())
    model_path = resolve_model_path(cfg.model.name_or_path, progress=main)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # Rows without targets: the first label (or an empty answer) stands in; it is never scored.
    encodable = TaskData(task.name, task.labels, [], [], [
        {**r, "target": r["target"] if r["target"] is not None else (task.labels[0] if task.labels else "")}
        for r in task.test], task.kind, task.metrics)
    kind = "qa" if req.generate and task.kind != "qa" and not task.labels else task.kind
    encodable.kind = kind
    encoded = encode_task(tokenizer, encodable, 0, "test", cfg.data.max_source_length, cfg.data.max_target_length,
                          warn=lambda m: main and line(f"[bpt_ds] warning: {m}", err=True))
    m, length, dim = req.tensors["particles"].shape
    if main:
        what = (f"posterior predictive over {m} particles" if req.particles > 1 else
                f"particle {req.pick}" if req.pick is not None else f"mean of {m} particles" if m > 1 else "the prompt")
        line(f"[bpt_ds] predict: {len(encoded.inputs):,} rows of {task.name} ({req.where}) with {req.prompts_path} "
             f"({what}{f', rank-{req.factors_rank} factors' if req.factors_rank else ''}); "
             f"{'generation' if req.generate or kind == 'qa' else 'rank classification'} on {job.world_size()} rank(s)")
    backbone = load_backbone(model_path, ds_config, ds_dtype(ds_config), progress=main,
                             attn_implementation=cfg.model.attn_implementation)
    bank = PromptBank(req.particles, length, dim, tasks=[task.name], rank=req.factors_rank)
    bank.load_tensors(req.tensors, str(req.prompts_path), pick=req.pick)
    engine = initialize(cfg, PromptedT5(backbone.model, bank), ds_config)
    bar = tqdm(total=len(encoded.inputs), desc="predict", disable=not main, dynamic_ncols=True)
    try:
        preds = predict(engine, [encoded], cfg.train.eval_batch_size, tokenizer.pad_token_id,
                        ensemble=req.particles > 1, generate=req.generate, max_new_tokens=cfg.data.max_new_tokens,
                        progress=bar.update)[task.name]
    finally:
        bar.close()
    texts, metrics = texts_and_metrics(encoded, preds, tokenizer, req.generate, score=req.has_targets)
    if main:
        def write(f: Path) -> None:
            with open(f, "w", encoding="utf-8") as out:
                for i, (row, text) in enumerate(zip(task.test, texts)):
                    item = {"index": i, "input": row["input"], "prediction": text}
                    if req.has_targets:
                        item["target"] = row.get("answers") if kind == "qa" and row.get("answers") else row["target"]
                    out.write(json.dumps(item, ensure_ascii=False) + "\n")

        req.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(req.output, write)
        line(f"[bpt_ds] wrote {len(texts):,} predictions to {req.output}")
        if metrics is not None:
            metrics_path = req.output.with_suffix(".metrics.json")
            atomic_write(metrics_path, lambda f: f.write_text(json.dumps(
                {"task": task.name, "rows": req.where, "prompts": str(req.prompts_path), "metrics": metrics},
                indent=2) + "\n"))
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("score", "examples", "invalid"))
            line(f"[bpt_ds] {task.name}: {shown} ({metrics['examples']} rows; {metrics_path})")
    job.barrier()
    engine.destroy()
    return metrics


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        req = prepare(args, world)
        job.init_distributed(req.cfg.deepspeed.timeout_minutes)
        run(req)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"bpt_ds: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
