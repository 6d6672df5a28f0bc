"""Synthetic text-to-text classification tasks for the tiny CPU backbone.

Every sentence is 5-8 neutral filler words plus one polarity keyword and one
topic word, shuffled together, so all tasks read the same kind of sentence and
differ only in which word decides the label. ``sentiment``, ``mood`` and
``topic`` pre-train the tiny backbone; ``polarity`` is held out: its keywords
mix half of sentiment's and half of mood's, which makes it a related-but-new
target for prompt transfer. ``contrary`` reads sentiment's keywords with the labels
swapped (the same inputs, the opposite answer): a source that interferes with
sentiment, pre-trained only by the transfer benchmark's backbone
(bench/transfer_power.py), not by the default recipe.

Everything is deterministic given a seed and uses its own ``random.Random``.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")

FILLER_WORDS = (
    "the", "a", "of", "and", "to", "in", "on", "with", "at", "by",
    "from", "about", "over", "under", "after", "before", "near", "behind", "across", "through",
    "this", "that", "these", "those", "some", "many", "few", "every", "each", "other",
    "another", "same", "one", "two", "three", "four", "five", "six", "seven", "ten",
    "house", "table", "window", "door", "river", "street", "paper", "pencil", "chair", "garden",
    "yesterday", "today", "morning", "evening", "week", "month", "year", "hour", "minute", "season",
    "walked", "said", "saw", "made", "took", "went", "came", "found", "brought", "kept",
    "opened", "closed", "moved", "turned", "carried", "placed", "noticed", "watched", "called", "asked",
    "box", "wall", "floor", "roof", "stone", "bridge", "road", "field", "hill", "forest",
    "city", "village", "office", "school", "market", "station", "corner", "shelf", "basket", "bottle",
    "blue", "green", "round", "square", "tall", "short", "wide", "narrow", "old", "new",
    "early", "late", "quiet", "loud", "heavy", "light", "simple", "plain", "usual", "common",
    "man", "woman", "child", "teacher", "driver", "farmer", "neighbor", "friend", "stranger", "clerk",
    "number", "letter", "message", "report", "story", "picture", "question", "answer", "list", "note",
    "again", "then", "there", "here", "also", "still", "soon", "often", "almost", "quite",
)

SENTIMENT_POSITIVE = ("good", "great", "excellent", "wonderful", "superb", "lovely", "brilliant", "fantastic")
SENTIMENT_NEGATIVE = ("bad", "awful", "terrible", "horrible", "poor", "dreadful", "lousy", "mediocre")
MOOD_HAPPY = ("cheerful", "joyful", "glad", "delighted", "merry", "elated", "smiling", "jolly")
MOOD_SAD = ("gloomy", "miserable", "sorrowful", "tearful", "lonely", "depressed", "grieving", "weeping")

TOPIC_WORDS = {
    "sports": ("football", "tennis", "soccer", "hockey", "rugby", "cricket"),
    "food": ("pasta", "bread", "cheese", "soup", "salad", "pizza"),
    "music": ("guitar", "piano", "violin", "drums", "melody", "concert"),
    "travel": ("airport", "passport", "luggage", "hotel", "voyage", "journey"),
}

_ALL_TOPIC_WORDS = tuple(word for words in TOPIC_WORDS.values() for word in words)
_ALL_POLARITY_WORDS = SENTIMENT_POSITIVE + SENTIMENT_NEGATIVE + MOOD_HAPPY + MOOD_SAD


@dataclass(frozen=True)
class SyntheticTask:
    """A classification task: the one cue word in a sentence decides the label.

    ``cue_words[i]`` are the words that mean ``labels[i]``; ``companion_words``
    fill the sentence's other content slot and carry no information.
    """

    name: str
    labels: tuple[str, ...]
    pretrain: bool
    cue_words: tuple[tuple[str, ...], ...] = field(repr=False)
    companion_words: tuple[str, ...] = field(repr=False)


def _half(words: tuple[str, ...]) -> tuple[str, ...]:
    return words[: len(words) // 2]


SYNTHETIC_TASKS: dict[str, SyntheticTask] = {
    task.name: task
    for task in (
        SyntheticTask(
            "sentiment", ("positive", "negative"), True,
            (SENTIMENT_POSITIVE, SENTIMENT_NEGATIVE), _ALL_TOPIC_WORDS,
        ),
        SyntheticTask("mood", ("happy", "sad"), True, (MOOD_HAPPY, MOOD_SAD), _ALL_TOPIC_WORDS),
        SyntheticTask(
            "topic", tuple(TOPIC_WORDS), True, tuple(TOPIC_WORDS.values()), _ALL_POLARITY_WORDS,
        ),
        SyntheticTask(
            "contrary", ("positive", "negative"), True,
            (SENTIMENT_NEGATIVE, SENTIMENT_POSITIVE), _ALL_TOPIC_WORDS,
        ),
        SyntheticTask(
            "polarity", ("positive", "negative"), False,
            (_half(SENTIMENT_POSITIVE) + _half(MOOD_HAPPY), _half(SENTIMENT_NEGATIVE) + _half(MOOD_SAD)),
            _ALL_TOPIC_WORDS,
        ),
    )
}


def _check_vocabulary() -> None:
    """Fail at import if word lists overlap: a label must follow from its one cue word."""
    groups = [FILLER_WORDS, _ALL_TOPIC_WORDS, _ALL_POLARITY_WORDS]
    words = [word for group in groups for word in group]
    labels = {label for task in SYNTHETIC_TASKS.values() for label in task.labels}
    if len(words) != len(set(words)) or labels & set(words):
        raise RuntimeError("synthetic word lists overlap each other or the label strings")


_check_vocabulary()


def _get_task(task: str) -> SyntheticTask:
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known tasks: {sorted(SYNTHETIC_TASKS)}")
    return SYNTHETIC_TASKS[task]


def _stream_rng(task: str, seed: int, split: str) -> random.Random:
    """One RNG per (task, split, seed), stable across processes (crc32, not hash())."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
    return random.Random((seed << 32) | zlib.crc32(f"{task}/{split}".encode()))


def _sentence(rng: random.Random, cue: str, companion: str) -> str:
    words = rng.sample(FILLER_WORDS, rng.randint(5, 8)) + [cue, companion]
    rng.shuffle(words)
    return " ".join(words)


def make_examples(task: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` class-balanced examples ``{"input", "target"}``; inputs carry no task prefix."""
    spec = _get_task(task)
    rng = _stream_rng(task, seed, split)
    examples = []
    for i in range(n):
        label_index = i % len(spec.labels)
        cue = rng.choice(spec.cue_words[label_index])
        companion = rng.choice(spec.companion_words)
        examples.append({"input": _sentence(rng, cue, companion), "target": spec.labels[label_index]})
    rng.shuffle(examples)
    return examples


def with_prefix(task: str, text: str) -> str:
    """The task-prefixed input the tiny backbone is pre-trained on."""
    return f"{task}: {text}"


# Pre-trained by the transfer benchmark's backbone only, not by TINY_RECIPE.
BENCH_ONLY = ("contrary",)

# The tasks whose lines train the tokenizer: fixed, so that a task added later (contrary) leaves
# every recipe's vocabulary as it was. A new task's words must be words of these tasks (its
# prefix is spelled from pieces, which character_coverage 1.0 guarantees).
CORPUS_TASKS = ("sentiment", "mood", "topic", "polarity")


def corpus(seed: int, n_lines: int = 20000) -> list[str]:
    """Tokenizer-training lines: each task's prefixed input, then its target on its own line.

    Targets get their own lines because sentencepiece 0.2.3's seed-piece search
    splits nearly every word when each line ends in a label word.
    """
    names = list(CORPUS_TASKS)
    per_task = -(-n_lines // (2 * len(names)))
    streams = [make_examples(name, per_task, seed, "train") for name in names]
    lines = [
        line
        for group in zip(*streams)
        for name, example in zip(names, group)
        for line in (with_prefix(name, example["input"]), example["target"])
    ]
    return lines[:n_lines]
