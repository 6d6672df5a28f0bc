"""Small local files in each suite task's real hub column layout (the tests never use the hub).

`write_suite(root)` writes JSONL files for every task of bpt_ds.data.registry and returns
{task: {hub split: path}}, ready for data.files. Rows are made up but typed like the hub's:
integer class labels, STS-B float scores, SQuAD's answers struct, ReCoRD's entity lists,
MultiRC's idx struct, MRQA's subset column.
"""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ["river", "stone", "garden", "window", "market", "bridge", "forest", "letter", "school", "paper"]


def _sentence(i: int, n: int = 5) -> str:
    return " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(n))


def _pair(names: tuple[str, str], classes: int):
    def row(i: int) -> dict:
        return {names[0]: _sentence(i), names[1]: _sentence(i + 1), "label": i % classes, "idx": i}
    return row


def _single(name: str):
    return lambda i: {"sentence": _sentence(i), "label": i % 2, "idx": i}


def _stsb(i: int) -> dict:
    return {"sentence1": _sentence(i), "sentence2": _sentence(i + 2), "label": round((i * 0.37) % 5, 3), "idx": i}


def _wic(i: int) -> dict:
    return {"word": WORDS[i % len(WORDS)], "sentence1": _sentence(i), "sentence2": _sentence(i + 4),
            "start1": 0, "start2": 0, "end1": 4, "end2": 4, "idx": i, "label": i % 2}


def _wsc(i: int) -> dict:
    return {"text": _sentence(i, 8), "span1_index": 0, "span2_index": 3, "span1_text": WORDS[i % 10],
            "span2_text": "it", "idx": i, "label": i % 2}


def _multirc(i: int) -> dict:
    # Three answer options per question, two questions per paragraph.
    return {"paragraph": _sentence(i // 6, 12), "question": _sentence(i // 3), "answer": _sentence(i, 2),
            "idx": {"paragraph": i // 6, "question": i // 3, "answer": i % 3}, "label": int(i % 3 == 0)}


def _record(i: int) -> dict:
    answer = WORDS[i % len(WORDS)].capitalize()
    return {"passage": f"{_sentence(i, 6)} {answer} stayed.\n@highlight\n{answer} news", "query": "@placeholder went home",
            "entities": [answer, WORDS[(i + 1) % 10].capitalize()], "entity_spans": {"text": [answer], "start": [0],
                                                                                 "end": [len(answer)]},
            "answers": [answer], "idx": {"passage": i, "query": i}}


def _squad(i: int) -> dict:
    answer = WORDS[i % len(WORDS)]
    context = f"{_sentence(i + 1, 6)} the {answer} was near."
    return {"id": f"q{i}", "title": "t", "context": context, "question": f"what was near in {i}?",
            "answers": {"text": [answer, f"the {answer}"], "answer_start": [context.index(answer)] * 2}}


def _mrqa(subset: str):
    def row(i: int) -> dict:
        answer = WORDS[i % len(WORDS)]
        context = f"{_sentence(i, 6)} {answer} here"
        return {"subset": subset, "context": context, "context_tokens": {"tokens": context.split(), "offsets": [0]},
                "qid": f"{subset}{i}", "question": f"which one {i}?", "question_tokens": {"tokens": [], "offsets": []},
                "detected_answers": {"text": [answer], "char_spans": [], "token_spans": []}, "answers": [answer]}
    return row


def _scitail(i: int) -> dict:
    return {"sentence1_binary_parse": "( a b )", "sentence1_parse": "(ROOT a)", "sentence1": _sentence(i),
            "sentence2_parse": "(ROOT b)", "sentence2": _sentence(i + 1), "annotator_labels": ["x"],
            "gold_label": ("entailment", "neutral")[i % 2]}


def _winogrande(i: int) -> dict:
    return {"sentence": f"{_sentence(i)} _ was there", "option1": WORDS[i % 10], "option2": WORDS[(i + 1) % 10],
            "answer": "12"[i % 2]}


ROWS = {
    "mnli": _pair(("premise", "hypothesis"), 3),
    "qqp": _pair(("question1", "question2"), 2),
    "qnli": _pair(("question", "sentence"), 2),
    "sst2": _single("sentence"),
    "stsb": _stsb,
    "mrpc": _pair(("sentence1", "sentence2"), 2),
    "rte": _pair(("sentence1", "sentence2"), 2),
    "cola": _single("sentence"),
    "boolq": _pair(("question", "passage"), 2),
    "cb": _pair(("premise", "hypothesis"), 3),
    "wic": _wic,
    "wsc": _wsc,
    "multirc": _multirc,
    "record": _record,
    "squad": _squad,
    "newsqa": _mrqa("NewsQA"),
    "searchqa": _mrqa("SearchQA"),
    "hotpotqa": _mrqa("HotpotQA"),
    "nq": _mrqa("NaturalQuestionsShort"),
    "scitail": _scitail,
    "paws": lambda i: {"id": i, "sentence1": _sentence(i), "sentence2": _sentence(i + 2), "label": i % 2},
    "winogrande": _winogrande,
    "yelp_polarity": lambda i: {"label": i % 2, "text": _sentence(i, 12)},
}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_suite(root: Path, train: int = 24, validation: int = 12) -> dict[str, dict[str, str]]:
    from bpt_ds.data.registry import REGISTRY

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in REGISTRY.items():
        make = ROWS[name]
        sizes = {"train": train, "validation": validation, "validation_matched": validation,
                 "validation_mismatched": validation, "test": validation}
        out[name] = {}
        for k, split in enumerate(spec.hub_splits):
            rows = [make(1000 * k + i) for i in range(sizes[split])]
            if spec.subset:  # MRQA files hold every subset; the task keeps its own
                rows += [ROWS["newsqa" if name != "newsqa" else "nq"](5000 + i) for i in range(3)]
            out[name][split] = write_jsonl(root / f"{name}_{split}.jsonl", rows)
    return out
