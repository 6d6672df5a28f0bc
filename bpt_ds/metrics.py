"""The papers' metrics, computed from prediction strings.

Every metric is a fraction in [0, 1] (tables print x100). A task's `score` is the mean of its
metrics (the GLUE convention: MRPC's F1 and accuracy, STS-B's Pearson and Spearman, ...); early
stopping and the results table's averages use it.

Predictions are strings: the chosen label under rank classification, the decoded text under
generation. A classification prediction that is not one of the task's labels is invalid: it
counts as wrong and is counted in `invalid`. For STS-B an unparsable prediction is -1.0 (the T5
convention), outside the [0, 5] range of every target.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter, defaultdict
from typing import Optional, Sequence

INVALID = "<invalid>"

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman", "macro_f1", "f1a", "em", "squad_f1",
           "squad_em")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_em(prediction: str, answers: Sequence[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(a)) for a in answers)


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 of the normalized strings, the best over the gold answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _parse_float(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _correlation(fn, x: list[float], y: list[float]) -> float:
    """scipy's correlation; 0.0 where it is undefined (fewer than 2 points, a constant side)."""
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    value = float(fn(x, y)[0])
    return value if math.isfinite(value) else 0.0


def compute(metrics: Sequence[str], predictions: Sequence[str], golds: Sequence, labels: Sequence[str] = (),
            groups: Optional[Sequence[str]] = None, positive: str = "1") -> dict:
    """The named metrics of one task.

    golds: the gold label string of each example, or for QA metrics its list of gold answers.
    labels: the task's valid label strings (classification); a prediction outside them is invalid.
    groups: MultiRC's question of each answer row, for the grouped exact match.
    positive: the positive label of binary F1 (MRPC, QQP, MultiRC).
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} examples")
    n = len(golds)
    out: dict = {}
    regression = any(m in ("pearson", "spearman") for m in metrics)
    qa = any(m in ("squad_f1", "squad_em") for m in metrics)
    invalid = 0
    if regression:
        parsed = [_parse_float(p) for p in predictions]
        invalid = sum(v is None for v in parsed)
        pred_values = [-1.0 if v is None else v for v in parsed]
        gold_values = [float(g) for g in golds]
    elif not qa:
        valid = set(labels)
        preds = [p if p in valid else INVALID for p in predictions]
        invalid = sum(p == INVALID for p in preds)
        golds = [str(g) for g in golds]
    for m in metrics:
        if n == 0:
            out[m] = 0.0
        elif m == "accuracy":
            out[m] = float(accuracy_score(golds, preds))
        elif m in ("f1", "f1a"):
            # Binary F1 of the positive label (MultiRC's F1a: over all answer rows).
            out[m] = float(f1_score([g == positive for g in golds], [p == positive for p in preds],
                                    zero_division=0.0))
        elif m == "macro_f1":
            out[m] = float(f1_score(golds, preds, labels=list(labels), average="macro", zero_division=0.0))
        elif m == "matthews":
            out[m] = float(matthews_corrcoef(golds, preds))
        elif m == "pearson":
            out[m] = _correlation(pearsonr, pred_values, gold_values)
        elif m == "spearman":
            out[m] = _correlation(spearmanr, pred_values, gold_values)
        elif m == "em":
            # MultiRC: a question counts when every one of its answer rows is right.
            if groups is None:
                raise ValueError("metric 'em' needs the group (question) of every row")
            right: dict = defaultdict(lambda: True)
            for g, p, group in zip(golds, preds, groups):
                right[group] = right[group] and p == g
            out[m] = sum(right.values()) / len(right)
        elif m == "squad_f1":
            out[m] = sum(squad_f1(p, g) for p, g in zip(predictions, golds)) / n
        elif m == "squad_em":
            out[m] = sum(squad_em(p, g) for p, g in zip(predictions, golds)) / n
    out["score"] = sum(out[m] for m in metrics) / len(metrics) if metrics else 0.0
    out["examples"] = n
    out["invalid"] = invalid
    return out
