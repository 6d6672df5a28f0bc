"""The task suite of the ATTEMPT/MPT/BMTPT experiments, selectable by name.

Each entry says where the data lives (a `datasets` hub name and config, or local files in the
same columns), how a row becomes text to text (the task name and field names are written into
the input: "rte sentence1: ... sentence2: ..."), the verbalized labels, how the splits are made
and which metrics score it. Adding a task is one `TaskSpec(...)` line in `_TASKS`.

Splits (docs/algorithms.md §6), deterministic given data.split_seed:
- "halve-validation" (datasets under 10k training examples): the shuffled validation set is cut
  in half, the first half dev and the second test (MultiRC: whole questions go to one half).
- "holdout-train" (larger ones): 1,000 shuffled training examples are the dev set, the rest
  train; validation is the test set.
- MNLI: validation_mismatched is dev, validation_matched test, the whole train set trains.
- Yelp polarity has no validation split: its test split takes that place.
Few-shot (data.few_shot = k): k training examples per class (k in total for regression and QA),
drawn with the run's seed from the train split; dev and test stay whole.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from .synthetic import BENCH_ONLY, SYNTHETIC_TASKS

DEV_HOLDOUT = 1000
STSB_LABELS = tuple(f"{i / 5:.1f}" for i in range(26))


class RowError(ValueError):
    """A row lacks a column or holds a value the task cannot use; the loader adds file and row."""


def _text(row: dict, column: str) -> str:
    if column not in row:
        raise RowError(f"no column '{column}'")
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"column '{column}' must be non-empty text; got {value!r}")
    return " ".join(value.split())


def _text_raw(row: dict, column: str) -> str:
    _text(row, column)
    return row[column]


def _label(row: dict, n: int) -> str:
    value = row.get("label")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise RowError(f"column 'label' must be an integer class in 0..{n - 1}; got {value!r}"
                       + (" (the hub's unlabeled test split? use train/validation)" if value == -1 else ""))
    return str(value)


def _answers(value, column: str) -> list[str]:
    if isinstance(value, dict):  # SQuAD: {"text": [...], "answer_start": [...]}
        value = value.get("text")
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a.strip() for a in value):
        raise RowError(f"column '{column}' must hold a non-empty list of answer strings; got {value!r}")
    return [" ".join(a.split()) for a in value]


def _input(task: str, parts: list[tuple[str, str]]) -> str:
    return task + " " + " ".join(f"{name}: {value}" for name, value in parts)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hub: tuple[str, Optional[str]]                 # datasets.load_dataset(path, config)
    kind: Literal["classification", "regression", "qa"]
    metrics: tuple[str, ...]
    split: Literal["halve-validation", "holdout-train", "mnli"]
    fields: tuple[str, ...] = ()                   # columns written into the input, in this order
    labels: tuple[str, ...] = ()                   # verbalized labels: class i is labels[i]
    convert: Optional[Callable[[dict], dict]] = field(default=None, repr=False)
    subset: Optional[str] = None                   # keep rows whose column 'subset' is this (MRQA)
    reads: tuple[str, ...] = ()                    # the columns `convert` reads
    # The labeled hub split besides train that dev and test are made from (Yelp has no validation).
    eval_split: str = "validation"

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns a row of this task must have."""
        if self.convert is not None:
            return self.reads + (("subset",) if self.subset else ())
        return self.fields + ("label",)

    @property
    def hub_splits(self) -> tuple[str, ...]:
        """The hub splits the task reads."""
        return ("train", "validation_mismatched", "validation_matched") if self.split == "mnli" else (
            "train", self.eval_split)

    def example(self, row: dict) -> dict:
        """One hub row as {"input", "target", ...}: QA rows add "answers", MultiRC rows "group"."""
        if self.convert is not None:
            return self.convert(self, row)
        ex = {"input": _input(self.name, [(f, _text(row, f)) for f in self.fields])}
        if self.kind == "regression":
            value = row.get("label")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 5:
                raise RowError(f"column 'label' must be a similarity score in [0, 5]; got {value!r}")
            ex["target"] = f"{round(value * 5) / 5:.1f}"  # rounded to steps of 0.2
        else:
            ex["target"] = self.labels[int(_label(row, len(self.labels)))]
        return ex


def _multirc(spec: TaskSpec, row: dict) -> dict:
    idx = row.get("idx")
    if not isinstance(idx, dict) or "paragraph" not in idx or "question" not in idx:
        raise RowError(f"column 'idx' must be {{'paragraph', 'question', 'answer'}}; got {idx!r}")
    return {"input": _input(spec.name, [("question", _text(row, "question")), ("answer", _text(row, "answer")),
                                        ("paragraph", _text(row, "paragraph"))]),
            "target": spec.labels[int(_label(row, 2))], "group": f"{idx['paragraph']}-{idx['question']}"}


def _wsc(spec: TaskSpec, row: dict) -> dict:
    return {"input": _input(spec.name, [("text", _text(row, "text")), ("span1_text", _text(row, "span1_text")),
                                        ("span2_text", _text(row, "span2_text"))]),
            "target": spec.labels[int(_label(row, 2))]}


def _squad(spec: TaskSpec, row: dict) -> dict:
    answers = _answers(row.get("answers"), "answers")
    return {"input": _input(spec.name, [("question", _text(row, "question")), ("context", _text(row, "context"))]),
            "target": answers[0], "answers": answers}


def _record(spec: TaskSpec, row: dict) -> dict:
    answers = _answers(row.get("answers"), "answers")
    entities = row.get("entities")
    if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
        raise RowError(f"column 'entities' must be a list of strings; got {entities!r}")
    # Highlights follow the article as "\n@highlight\n<text>": make them sentences.
    passage = re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", _text_raw(row, "passage"))
    passage = " ".join(passage.replace("\n@highlight\n", ". ").split())
    return {"input": _input(spec.name, [("query", _text(row, "query")), ("entities", ", ".join(entities)),
                                        ("passage", passage)]),
            "target": answers[0], "answers": answers}


def _scitail(spec: TaskSpec, row: dict) -> dict:
    gold = row.get("gold_label")
    if gold not in SCITAIL_GOLD:
        raise RowError(f"column 'gold_label' must be one of {', '.join(SCITAIL_GOLD)}; got {gold!r}")
    return {"input": _input(spec.name, [("premise", _text(row, "sentence1")), ("hypothesis", _text(row, "sentence2"))]),
            "target": spec.labels[SCITAIL_GOLD.index(gold)]}


def _winogrande(spec: TaskSpec, row: dict) -> dict:
    answer = row.get("answer")
    if answer not in ("1", "2"):
        raise RowError(f"column 'answer' must be \"1\" or \"2\"; got {answer!r}"
                       + (" (the hub's unlabeled test split? use train/validation)" if answer == "" else ""))
    return {"input": _input(spec.name, [("sentence", _text(row, "sentence")), ("option1", _text(row, "option1")),
                                        ("option2", _text(row, "option2"))]),
            "target": spec.labels[int(answer) - 1]}


SCITAIL_GOLD = ("entailment", "neutral")
_GLUE = "nyu-mll/glue"
_SUPER_GLUE = "aps/super_glue"
_MRQA = "mrqa-workshop/mrqa"
_ACC = ("accuracy",)
_QA = ("squad_f1", "squad_em")


_SQUAD_COLUMNS = ("question", "context", "answers")


def _mrqa(name: str, subset: str) -> TaskSpec:
    return TaskSpec(name, (_MRQA, None), "qa", _QA, "holdout-train", convert=_squad, subset=subset,
                    reads=_SQUAD_COLUMNS)


_TASKS = [
    # GLUE
    TaskSpec("mnli", (_GLUE, "mnli"), "classification", _ACC, "mnli", ("premise", "hypothesis"), ("0", "1", "2")),
    TaskSpec("qqp", (_GLUE, "qqp"), "classification", ("f1", "accuracy"), "holdout-train",
             ("question1", "question2"), ("0", "1")),
    TaskSpec("qnli", (_GLUE, "qnli"), "classification", _ACC, "holdout-train", ("question", "sentence"), ("0", "1")),
    TaskSpec("sst2", (_GLUE, "sst2"), "classification", _ACC, "holdout-train", ("sentence",), ("0", "1")),
    TaskSpec("stsb", (_GLUE, "stsb"), "regression", ("pearson", "spearman"), "halve-validation",
             ("sentence1", "sentence2"), STSB_LABELS),
    TaskSpec("mrpc", (_GLUE, "mrpc"), "classification", ("f1", "accuracy"), "halve-validation",
             ("sentence1", "sentence2"), ("0", "1")),
    TaskSpec("rte", (_GLUE, "rte"), "classification", _ACC, "halve-validation", ("sentence1", "sentence2"), ("0", "1")),
    TaskSpec("cola", (_GLUE, "cola"), "classification", ("matthews",), "halve-validation", ("sentence",), ("0", "1")),
    # SuperGLUE
    TaskSpec("boolq", (_SUPER_GLUE, "boolq"), "classification", _ACC, "halve-validation", ("question", "passage"),
             ("0", "1")),
    TaskSpec("cb", (_SUPER_GLUE, "cb"), "classification", ("macro_f1", "accuracy"), "halve-validation",
             ("premise", "hypothesis"), ("0", "1", "2")),
    TaskSpec("wic", (_SUPER_GLUE, "wic"), "classification", _ACC, "halve-validation",
             ("sentence1", "sentence2", "word"), ("0", "1")),
    TaskSpec("wsc", (_SUPER_GLUE, "wsc.fixed"), "classification", _ACC, "halve-validation", labels=("0", "1"),
             convert=_wsc, reads=("text", "span1_text", "span2_text", "label")),
    TaskSpec("multirc", (_SUPER_GLUE, "multirc"), "classification", ("f1a", "em"), "halve-validation",
             labels=("0", "1"), convert=_multirc, reads=("paragraph", "question", "answer", "idx", "label")),
    TaskSpec("record", (_SUPER_GLUE, "record"), "qa", _QA, "holdout-train", convert=_record,
             reads=("passage", "query", "entities", "answers")),
    # Extractive QA
    TaskSpec("squad", ("rajpurkar/squad", None), "qa", _QA, "holdout-train", convert=_squad, reads=_SQUAD_COLUMNS),
    _mrqa("newsqa", "NewsQA"),
    _mrqa("searchqa", "SearchQA"),
    _mrqa("hotpotqa", "HotpotQA"),
    _mrqa("nq", "NaturalQuestionsShort"),
    # The papers' "other" targets
    TaskSpec("scitail", ("allenai/scitail", "snli_format"), "classification", _ACC, "holdout-train",
             labels=("0", "1"), convert=_scitail, reads=("sentence1", "sentence2", "gold_label")),
    TaskSpec("paws", ("google-research-datasets/paws", "labeled_final"), "classification", _ACC, "holdout-train",
             ("sentence1", "sentence2"), ("0", "1")),
    TaskSpec("winogrande", ("allenai/winogrande", "winogrande_xl"), "classification", _ACC, "holdout-train",
             labels=("1", "2"), convert=_winogrande, reads=("sentence", "option1", "option2", "answer")),
    TaskSpec("yelp_polarity", ("fancyzhx/yelp_polarity", None), "classification", _ACC, "holdout-train",
             ("text",), ("0", "1"), eval_split="test"),
]
REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in _TASKS}


# ------------------------------------------------------------------ splits and few-shot


def _shuffled(rows: list[dict], seed: int, salt: str) -> list[dict]:
    rows = list(rows)
    random.Random(f"{seed}/{salt}").shuffle(rows)
    return rows


def _halves(rows: list[dict], seed: int, salt: str) -> tuple[list[dict], list[dict]]:
    """Shuffled rows cut in half; rows sharing a "group" (a MultiRC question) stay together."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row.get("group", id(row)), []).append(row)
    keys = list(groups)
    random.Random(f"{seed}/{salt}").shuffle(keys)
    first, second, half = [], [], len(rows) / 2
    for key in keys:
        (first if len(first) < half else second).extend(groups[key])
    return first, second


def make_splits(spec: TaskSpec, hub: dict[str, list[dict]], seed: int) -> dict[str, list[dict]]:
    """train/dev/test rows from the hub splits' converted rows (see the module docstring)."""
    if spec.split == "mnli":
        return {"train": hub["train"], "dev": hub["validation_mismatched"], "test": hub["validation_matched"]}
    if spec.split == "halve-validation":
        dev, test = _halves(hub[spec.eval_split], seed, spec.name)
        return {"train": hub["train"], "dev": dev, "test": test}
    train = _shuffled(hub["train"], seed, spec.name)
    holdout = min(DEV_HOLDOUT, len(train) // 2)  # tiny local files keep half their rows for training
    return {"train": train[holdout:], "dev": train[:holdout], "test": hub[spec.eval_split]}


def few_shot(rows: list[dict], k: int, seed: int, by_class: bool) -> list[dict]:
    """k examples per class (by_class) or k in total, drawn with `seed`; fewer where fewer exist."""
    rng = random.Random(f"few-shot/{seed}")
    if not by_class:
        return rng.sample(rows, min(k, len(rows)))
    classes: dict[str, list[dict]] = {}
    for row in rows:
        classes.setdefault(row["target"], []).append(row)
    picked = [row for target in sorted(classes) for row in rng.sample(classes[target], min(k, len(classes[target])))]
    rng.shuffle(picked)
    return picked


def describe() -> str:
    """The suite as a table: `python -m bpt_ds.data.registry`."""
    lines = [f"{'task':<10} {'hub dataset':<42} {'kind':<15} {'splits':<17} metrics"]
    for spec in REGISTRY.values():
        hub = spec.hub[0] + (f"/{spec.hub[1]}" if spec.hub[1] else "") + (f"[{spec.subset}]" if spec.subset else "")
        lines.append(f"{spec.name:<10} {hub:<42} {spec.kind:<15} {spec.split:<17} {', '.join(spec.metrics)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
    print("\nsynthetic tasks (generated here, for the tiny backbone; data.synthetic_train_examples, "
          "data.synthetic_eval_examples):")
    for task in SYNTHETIC_TASKS.values():
        role = ("pre-trained by bench/transfer_power.py's backbone only" if task.name in BENCH_ONLY else
                "a pre-training task of the tiny backbone" if task.pretrain else "held out (the transfer target)")
        print(f"{task.name:<10} labels {', '.join(task.labels):<34} {role}")
