import json
import threading
import time
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, T5ForConditionalGeneration

from bpt_ds import tiny
from bpt_ds.data.synthetic import SYNTHETIC_TASKS, make_examples, with_prefix
from bpt_ds.tiny import BUILD_INFO, TINY_RECIPE, build_tiny_backbone, rank_classify, recipe_hash


@pytest.fixture(scope="module")
def tiny_model(tiny_backbone_path):
    """The cached backbone loaded fresh from disk, as any consumer would load it."""
    model = T5ForConditionalGeneration.from_pretrained(tiny_backbone_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone_path)
    return model, tokenizer


def accuracy(model, tokenizer, examples, prefix_task, labels):
    inputs = [with_prefix(prefix_task, e["input"]) if prefix_task else e["input"] for e in examples]
    predicted = rank_classify(model, tokenizer, inputs, list(labels))
    return sum(labels[p] == e["target"] for p, e in zip(predicted, examples)) / len(examples)


# --- synthetic tasks -------------------------------------------------------


def test_examples_are_deterministic_per_seed_and_split():
    assert make_examples("sentiment", 50, seed=3) == make_examples("sentiment", 50, seed=3)
    assert make_examples("sentiment", 50, seed=3) != make_examples("sentiment", 50, seed=4)
    assert make_examples("sentiment", 50, seed=3, split="train") != make_examples(
        "sentiment", 50, seed=3, split="validation"
    )


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_labels_are_balanced_and_decided_by_one_cue_word(task):
    spec = SYNTHETIC_TASKS[task]
    examples = make_examples(task, 12 * len(spec.labels), seed=0)
    assert Counter(e["target"] for e in examples) == {label: 12 for label in spec.labels}
    for example in examples:
        words = example["input"].split()
        assert 7 <= len(words) <= 10 and ":" not in example["input"]
        cued = [label for label, cues in zip(spec.labels, spec.cue_words) for word in words if word in cues]
        assert cued == [example["target"]]


def test_only_polarity_is_held_out_of_pretraining():
    assert [name for name, spec in SYNTHETIC_TASKS.items() if not spec.pretrain] == ["polarity"]


def test_unknown_task_error_lists_known_tasks():
    with pytest.raises(ValueError, match="'nope'.*sentiment"):
        make_examples("nope", 4, seed=0)


# --- tokenizer and model ---------------------------------------------------


def test_reloaded_tokenizer_round_trips_synthetic_text(tiny_model):
    _, tokenizer = tiny_model
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    # Far above the 4-token vocabulary of the T5Tokenizer(vocab_file=...) trap.
    assert len(tokenizer) > 200
    for task in SYNTHETIC_TASKS:
        for example in make_examples(task, 20, seed=9, split="test"):
            for text in (with_prefix(task, example["input"]), example["target"]):
                ids = tokenizer(text).input_ids
                assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
                assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_build_info_records_recipe_and_solved_tasks(tiny_backbone_path):
    info = json.loads((tiny_backbone_path / BUILD_INFO).read_text())
    assert info["recipe"] == TINY_RECIPE and info["recipe_hash"] == recipe_hash(TINY_RECIPE)
    assert tiny_backbone_path.name == f"tiny-t5-{info['recipe_hash']}"
    assert set(info["accuracy"]) == set(TINY_RECIPE["tasks"])
    assert all(acc >= 0.99 for acc in info["accuracy"].values()), info["accuracy"]


def test_saved_model_classifies_unseen_examples(tiny_model):
    model, tokenizer = tiny_model
    examples = make_examples("mood", 200, seed=123, split="test")
    assert accuracy(model, tokenizer, examples, "mood", SYNTHETIC_TASKS["mood"].labels) >= 0.97


def test_held_out_polarity_transfers_partially_through_sentiment_prefix(tiny_model):
    """Only half of polarity's keywords are sentiment keywords: well above chance, not solved."""
    model, tokenizer = tiny_model
    examples = make_examples("polarity", 400, seed=0, split="test")
    assert accuracy(model, tokenizer, examples, "sentiment", SYNTHETIC_TASKS["polarity"].labels) > 0.6


# --- caching ---------------------------------------------------------------


def test_second_call_reuses_the_cached_build(tiny_backbone_path, monkeypatch):
    def must_not_build(*args):
        raise AssertionError("rebuilt a cached backbone")

    weights = tiny_backbone_path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    monkeypatch.setattr(tiny, "_build_into", must_not_build)
    assert build_tiny_backbone(tiny_backbone_path.parent, progress=False) == tiny_backbone_path
    assert weights.stat().st_mtime_ns == mtime


def test_concurrent_callers_share_one_build(tmp_path, monkeypatch):
    builds = []

    def slow_fake_build(directory, recipe, progress):
        builds.append(directory)
        time.sleep(0.3)
        for name in ("config.json", "model.safetensors", BUILD_INFO):
            (directory / name).write_text("{}")

    monkeypatch.setattr(tiny, "_build_into", slow_fake_build)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(build_tiny_backbone(tmp_path, progress=False)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(set(results)) == 1 and len(results) == 4


def test_failed_build_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    """An untrained model fails the accuracy gate; no model, final or staged, may remain."""
    monkeypatch.setattr(tiny, "_pretrain", lambda *args: 0.0)
    with pytest.raises(RuntimeError, match="fell below"):
        build_tiny_backbone(tmp_path, progress=False)
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]


def test_recipe_hash_changes_with_any_value():
    base = recipe_hash(TINY_RECIPE)
    assert recipe_hash(dict(reversed(TINY_RECIPE.items()))) == base
    changed = {"pretrain_steps": TINY_RECIPE["pretrain_steps"] + 1, "lr": 2e-3, "version": 2, "tasks": ["topic"]}
    for key, value in changed.items():
        assert recipe_hash({**TINY_RECIPE, key: value}) != base, key


def test_unknown_recipe_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="pretrain_stepz"):
        build_tiny_backbone(tmp_path, recipe={"pretrain_stepz": 10})


def test_a_build_on_a_rank_other_than_0_writes_the_weights(tmp_path, monkeypatch):
    """Ranks race for the build lock after the process group starts; transformers then saves
    on torch.distributed rank 0 only. A build by rank 1 must still write a loadable model, and
    a cache entry an older version left without weights is built again, not trusted."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(tiny, "_pretrain", lambda *args: 0.0)
    monkeypatch.setattr(tiny, "_validation_accuracy", lambda *args: {"sentiment": 1.0})
    recipe = {"spm_vocab_size": 300, "corpus_lines": 2000}
    path = build_tiny_backbone(tmp_path, recipe=recipe, progress=False)
    model = T5ForConditionalGeneration.from_pretrained(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RECIPE["seed"])
        expected = T5ForConditionalGeneration(tiny._model_config(tiny._resolve_recipe(recipe), model.config.vocab_size))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    # The broken entry of an older version: build_info.json without the model files.
    for name in ("model.safetensors", "config.json"):
        (path / name).unlink()
    assert build_tiny_backbone(tmp_path, recipe=recipe, progress=False) == path
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
