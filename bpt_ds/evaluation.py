"""Evaluation: predictions sharded over ranks, their metrics (bpt_ds.metrics), and the choice of
the best dev step with early stopping.

What is scored (README, "What evaluation scores"): with M > 1 particles and a stage whose rule is
the posterior predictive (Evaluator ensemble=True), (1/M) Σ_m p_m(y | x), for rank classification
and generation alike; otherwise the bank's aggregate prompt of each example (mpt-teachers: its
task's own teacher). With M = 1 it is the prompt itself either way.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .checkpoints import TrainState
from .data.batching import EncodedTask, collate, pad_candidates
from .deepspeed_setup import DeepSpeedModel
from .distributed import rank, world_size
from .metrics import compute as compute_metrics
from .report import Reporter


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict(model: DeepSpeedModel, tasks: list[EncodedTask], batch_size: int, pad_id: int, ensemble: bool = False,
            generate: bool = False, max_new_tokens: int = 32,
            progress: Optional[Callable[[int], None]] = None) -> dict[str, list]:
    """Predictions of every example of every task, in example order, the same on every rank.

    ensemble (M > 1 particles): what is scored is the particles' posterior predictive
    (1/M) Σ_m p_m(y | x), maximized over a candidate set; otherwise the bank's aggregate
    prompt (the prompt itself for M = 1; each task's teacher under task_particles).
    Rank classification (classification and regression tasks unless `generate`): the index of
    the best-scoring verbalized label. Generation (QA tasks, and all with `generate`): the
    greedy output's token ids; with ensemble, the particles' greedy outputs are the
    candidates, each scored under every particle (PromptedT5.generate).

    Examples are sharded over ranks (rank r takes r, r + R, ...) and gathered once, so each
    one is predicted exactly once. Every rank runs the same number of forward passes (ZeRO-3
    gathers parameters collectively), padding its shard with placeholders it drops; generation
    passes synced_gpus under ZeRO-3 so that a rank whose batch finishes early keeps stepping
    with the others instead of hanging them. progress(n): called after each batch with the
    number of examples the ranks have just predicted together (a progress bar on rank 0).
    """
    ds = model.ds
    ds.eval()
    r, w = rank(), world_size()
    synced = w > 1 and ds.zero_optimization_stage() == 3
    results = {}
    for task in tasks:
        n = len(task.inputs)
        mine = list(range(r, n, w))
        per_rank = math.ceil(n / w)
        mine += [-1] * (per_rank - len(mine))
        by_generation = generate or task.kind == "qa"
        candidates = None if by_generation else pad_candidates(task.label_ids).to(model.device)
        preds: list[tuple[int, Any]] = []
        for start in range(0, per_rank, batch_size):
            chunk = mine[start:start + batch_size]
            batch = to_device(collate([task], [(0, max(i, 0)) for i in chunk], pad_id), model.device)
            if by_generation:
                out = model.model.generate(batch["input_ids"], batch["attention_mask"], batch["task_ids"],
                                          max_new_tokens=max_new_tokens, synced_gpus=synced,
                                          ensemble=ensemble).tolist()
            else:
                out = model.model.score_candidates(batch["input_ids"], batch["attention_mask"],
                                                  batch["task_ids"], candidates, ensemble=ensemble)
                out = out.argmax(-1).tolist()
            preds += [(i, p) for i, p in zip(chunk, out) if i >= 0]
            if progress is not None:
                progress(min(n, (start + len(chunk)) * w) - min(n, start * w))
        gathered: list[Any] = [None] * w
        if w > 1:
            dist.all_gather_object(gathered, preds)
        else:
            gathered = [preds]
        pairs = dict(p for part in gathered for p in part)
        if sorted(pairs) != list(range(n)) or sum(len(part) for part in gathered) != n:
            raise RuntimeError(f"evaluation of {task.name} gathered {sum(len(p) for p in gathered)} "
                               f"predictions for {n} examples")
        results[task.name] = [pairs[i] for i in range(n)]
    return results


class Evaluator:
    """Scores encoded tasks under `model` and reports them. ensemble: score the particles'
    posterior predictive (M > 1 and the stage's rule); scored: what is scored, in words."""

    def __init__(self, model: DeepSpeedModel, tokenizer, data_cfg, batch_size: int, ensemble: bool, scored: str,
                 report: Reporter):
        self.model, self.tokenizer, self.data_cfg, self.batch_size = model, tokenizer, data_cfg, batch_size
        self.ensemble, self.scored, self.report = ensemble, scored, report

    def scores(self, tasks: list[EncodedTask]) -> dict[str, dict]:
        """Every task's metrics (bpt_ds.metrics) on the given split's encoded tasks (collective)."""
        d = self.data_cfg
        generate = d.eval_mode == "generate"
        preds = predict(self.model, tasks, self.batch_size, self.tokenizer.pad_token_id, ensemble=self.ensemble,
                        generate=generate, max_new_tokens=d.max_new_tokens)
        return {task.name: texts_and_metrics(task, preds[task.name], self.tokenizer, generate)[1] for task in tasks}

    def log(self, split: str, metrics: dict, step: int) -> None:
        """TensorBoard scalars <split>/<task>/<metric> and one line."""
        for task, values in metrics.items():
            for key, value in values.items():
                if key != "examples":
                    self.report.scalar(f"{split}/{task}/{key}", value, step)
        summary = ", ".join(
            f"{task} " + " ".join(f"{k} {x:.4f}" for k, x in v.items() if k not in ("score", "examples", "invalid"))
            + (f" ({v['invalid']} of {v['examples']} predictions invalid)" if v["invalid"] else "")
            for task, v in metrics.items())
        self.report.info(f"step {step} {split} ({self.scored}): {summary}")


def texts_and_metrics(task: EncodedTask, preds: list, tokenizer, generate: bool,
                      score: bool = True) -> tuple[list[str], Optional[dict]]:
    """The predicted texts of a task's examples (predict's label indices or token ids) and,
    with score, their metrics against the rows' targets (bpt_ds.metrics)."""
    if generate or task.kind == "qa":
        texts = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
    else:
        texts = [task.labels[i] for i in preds]
    if not score:
        return texts, None
    golds = [row["answers"] if task.kind == "qa" else row["target"] for row in task.rows]
    groups = [row.get("group") for row in task.rows]
    return texts, compute_metrics(task.metrics, texts, golds, labels=task.labels, groups=groups)


def what_is_scored(posterior_predictive: bool, particles: int) -> tuple[bool, str]:
    """(ensemble, in words): whether evaluation scores the particles' posterior predictive (M > 1
    and the stage's rule, Stage.eval_ensemble, says so), and what it scores, for the log."""
    ensemble = posterior_predictive and particles > 1
    if ensemble:
        return True, f"posterior predictive over {particles} particles"
    return False, "each task under its own teacher prompt" if particles > 1 else "prompt"


def mean_score(metrics: dict) -> float:
    """The number best-dev selection compares: the mean over tasks of each task's `score`."""
    return sum(v["score"] for v in metrics.values()) / len(metrics)


def hparam_metrics(selected: Optional[dict]) -> dict[str, float]:
    """The selected (best dev) step's scores as TensorBoard HPARAMS metrics: hparams/dev_score
    and hparams/test_score (the mean task score best-dev selection compares), and each task's
    hparams/<split>/<task>."""
    out: dict[str, float] = {}
    for split in ("dev", "test"):
        scores = (selected or {}).get(split) or {}
        if scores:
            out[f"hparams/{split}_score"] = mean_score(scores)
            out.update({f"hparams/{split}/{task}": v["score"] for task, v in scores.items()})
    return out


def select(state: TrainState, dev: dict, test: Callable[[], dict], patience: int) -> tuple[bool, bool]:
    """Records an evaluation at state.step: when its mean dev score beats state.best, the test
    metrics (test(), scored only then: the reported numbers are the test scores at the best dev
    step) and the step become state.selected. Returns (improved, stop): stop when train.patience
    (`patience`, 0: never) evaluations in a row brought no gain."""
    score = mean_score(dev)
    improved = score > state.best
    if improved:
        state.best, state.evals_without_gain = score, 0
        state.selected = {"step": state.step, "dev": dev, "test": test()}
    else:
        state.evals_without_gain += 1
    return improved, bool(patience) and state.evals_without_gain >= patience
