"""The tiny T5 backbone: a ~1M-parameter T5 pre-trained on the synthetic tasks.

It stands in for a real checkpoint on CPU (tests, the default config, the
benchmarks), so it must be reproducible without a model hub: a recipe fully
determines it, and the built model is cached under a hash of that recipe.
Concurrent callers (the ranks of one job) share one build through a file lock,
and the model only ever appears at its final path complete (build in a
temporary sibling, then an atomic rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration, T5Tokenizer

from bpt_ds.data.synthetic import SYNTHETIC_TASKS, corpus, make_examples, with_prefix
from bpt_ds.likelihood import IGNORE, candidate_log_likelihood
from bpt_ds.report import line as say

# Bump "version" whenever synthetic.py or this builder changes what a recipe produces.
TINY_RECIPE: dict = {
    "version": 1,
    "tasks": ["sentiment", "mood", "topic"],
    "corpus_seed": 0,
    "corpus_lines": 20000,
    "spm_vocab_size": 700,
    "spm_character_coverage": 1.0,
    "d_model": 128,
    "d_ff": 256,
    "num_heads": 4,
    "d_kv": 32,
    "num_layers": 3,
    "num_decoder_layers": 3,
    "dropout_rate": 0.0,
    "pretrain_steps": 250,
    "batch_size": 64,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "warmup_steps": 50,
    "grad_clip": 1.0,
    "seed": 0,
}

BUILD_INFO = "build_info.json"
VALIDATION_EXAMPLES = 200
MIN_ACCURACY = 0.97
# One thread: the build is then bit-identical wherever it runs, and it does not
# collapse when other processes share the cores (on a busy 2-core machine two
# threads ran a step 16x slower than one).
BUILD_THREADS = 1


def recipe_hash(recipe: dict) -> str:
    """Short content hash of a recipe; names its cache directory."""
    canonical = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """``$BPT_DS_CACHE``, else ``~/.cache/bpt_ds``."""
    return Path(os.environ.get("BPT_DS_CACHE") or Path.home() / ".cache" / "bpt_ds")


def build_tiny_backbone(
    cache_dir: str | Path | None = None, recipe: dict | None = None, progress: bool = True
) -> Path:
    """Return ``<cache>/tiny-t5-<hash>`` holding the model and tokenizer, building it if absent.

    ``recipe`` overrides keys of ``TINY_RECIPE``. Safe to call from several
    processes at once: one builds, the others wait on the lock and reuse it.
    """
    recipe = _resolve_recipe(recipe)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"tiny-t5-{recipe_hash(recipe)}"
    started = time.perf_counter()
    if build_once(final, _is_complete, lambda staging: _build_into(staging, recipe, progress)):
        say(f"bpt_ds: built tiny T5 backbone at {final} in {time.perf_counter() - started:.1f}s")
    return final


def build_once(final: Path, complete, build) -> bool:
    """Makes the cache directory `final` with build(staging) unless complete(final) already:
    under a file lock (concurrent processes build once, the others wait and reuse it), in a
    staging directory renamed into place, so a crash never leaves a half-built `final`.
    Returns whether this call built it."""
    if complete(final):
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if complete(final):
            return False
        if final.exists():  # not written by this builder, which only renames complete builds
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            build(staging)
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is not
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return True


@torch.no_grad()
def rank_classify(model, tokenizer, inputs: list[str], labels: list[str], batch_size: int = 64) -> list[int]:
    """Index of the most likely label per input (summed log-likelihood of its tokens and eos).

    Scoring every label avoids generation, so each input gets one of the labels.
    """
    label_ids = tokenizer(labels, padding=True, return_tensors="pt").input_ids.to(model.device)
    candidates = label_ids.masked_fill(label_ids == tokenizer.pad_token_id, IGNORE)
    was_training = model.training
    model.eval()
    try:
        predictions: list[int] = []
        for start in range(0, len(inputs), batch_size):
            batch = tokenizer(inputs[start : start + batch_size], padding=True, return_tensors="pt").to(model.device)
            hidden = model.get_encoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            scores = candidate_log_likelihood(model, hidden.last_hidden_state, batch.attention_mask, candidates)
            predictions += scores.argmax(dim=1).tolist()
        return predictions
    finally:
        model.train(was_training)


def _resolve_recipe(overrides: dict | None) -> dict:
    unknown = set(overrides or {}) - set(TINY_RECIPE)
    if unknown:
        raise ValueError(f"unknown tiny recipe keys {sorted(unknown)}; known keys: {sorted(TINY_RECIPE)}")
    return {**TINY_RECIPE, **(overrides or {})}


def _has_model_files(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _is_complete(path: Path) -> bool:
    """build_info.json is written last, so its presence marks a finished build. A directory
    with build_info.json but no weights (left by versions that built on a rank other than 0,
    where transformers saved nothing) is incomplete and is built again."""
    return (path / BUILD_INFO).is_file() and _has_model_files(path)


def _build_into(directory: Path, recipe: dict, progress: bool) -> None:
    """Train tokenizer and model, check them, and save both plus build_info.json."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        started = time.perf_counter()
        tokenizer = _build_tokenizer(directory, recipe)
        with torch.random.fork_rng(devices=[]):  # seed the model without disturbing the caller's RNG
            torch.manual_seed(recipe["seed"])
            model = T5ForConditionalGeneration(_model_config(recipe, len(tokenizer)))
        final_loss = _pretrain(model, tokenizer, recipe, progress)
        accuracy = _validation_accuracy(model, tokenizer, recipe)
        failed = {task: acc for task, acc in accuracy.items() if acc < MIN_ACCURACY}
        if failed:
            raise RuntimeError(f"tiny backbone pre-training fell below {MIN_ACCURACY}: {failed}")
        # Once a process group exists, transformers writes the weights on torch.distributed rank 0
        # only; this cache is per machine, and whichever rank holds the lock builds it.
        model.should_save_on_this_rank = lambda is_main_process: True
        model.save_pretrained(directory)
        if not _has_model_files(directory):
            raise RuntimeError(f"tiny backbone build: save_pretrained wrote no config.json/model.safetensors "
                               f"into {directory}")
        info = {
            "recipe": recipe,
            "recipe_hash": recipe_hash(recipe),
            "accuracy": accuracy,
            "final_loss": final_loss,
            "vocab_size": len(tokenizer),
            "num_parameters": model.num_parameters(),
            "build_seconds": round(time.perf_counter() - started, 1),
        }
        (directory / BUILD_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
    finally:
        torch.set_num_threads(threads)


def _build_tokenizer(directory: Path, recipe: dict):
    """Train a SentencePiece unigram model and save it as a T5 tokenizer in ``directory``.

    transformers 5.x ignores ``T5Tokenizer(vocab_file=...)`` (a 4-token vocabulary
    results), so the tokenizer is built from the pieces and scores, saved,
    reloaded, and checked against SentencePiece itself.
    """
    lines = corpus(recipe["corpus_seed"], recipe["corpus_lines"])
    model_proto = _train_sentencepiece(lines, recipe)
    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for line in lines[:200]:
        ids = tokenizer(line).input_ids
        if ids != sp.encode(line) + [sp.eos_id()] or tokenizer.decode(ids, skip_special_tokens=True) != line:
            raise RuntimeError(f"saved tokenizer disagrees with SentencePiece on {line!r}")
    return tokenizer


def _train_sentencepiece(lines: list[str], recipe: dict) -> bytes:
    # T5's special ids (pad 0, eos 1, unk 2, no bos); one thread, no shuffling and
    # a fixed generator seed keep the vocabulary identical from build to build.
    spm.set_random_generator_seed(recipe["corpus_seed"])
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=recipe["spm_vocab_size"],
        hard_vocab_limit=False,
        character_coverage=recipe["spm_character_coverage"],
        normalization_rule_name="identity",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _model_config(recipe: dict, vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size,
        d_model=recipe["d_model"],
        d_ff=recipe["d_ff"],
        num_heads=recipe["num_heads"],
        d_kv=recipe["d_kv"],
        num_layers=recipe["num_layers"],
        num_decoder_layers=recipe["num_decoder_layers"],
        dropout_rate=recipe["dropout_rate"],
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )


def _pretrain(model, tokenizer, recipe: dict, progress: bool) -> float:
    """Train all weights on the prefixed pre-training mixture; return the last loss."""
    steps, batch_size, warmup = recipe["pretrain_steps"], recipe["batch_size"], recipe["warmup_steps"]
    inputs, targets = _pretraining_mixture(recipe, steps * batch_size)
    input_batch = tokenizer(inputs, padding=True, return_tensors="pt")
    label_ids = tokenizer(targets, padding=True, return_tensors="pt").input_ids
    label_ids = label_ids.masked_fill(label_ids == tokenizer.pad_token_id, -100)

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (steps - step) / (steps - warmup))
    )
    model.train()
    bar = tqdm(range(steps), desc="pre-training tiny T5", disable=not progress)
    for step in bar:
        rows = slice(step * batch_size, (step + 1) * batch_size)
        loss = model(
            input_ids=input_batch.input_ids[rows],
            attention_mask=input_batch.attention_mask[rows],
            labels=label_ids[rows],
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["grad_clip"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    model.eval()
    return loss.item()


def _pretraining_mixture(recipe: dict, n: int) -> tuple[list[str], list[str]]:
    """``n`` prefixed (input, target) pairs, tasks in equal shares, in a seeded order."""
    tasks = recipe["tasks"]
    per_task = -(-n // len(tasks))
    pairs = [
        (with_prefix(task, example["input"]), example["target"])
        for task in tasks
        for example in make_examples(task, per_task, recipe["seed"], "train")
    ]
    random.Random(recipe["seed"]).shuffle(pairs)
    inputs, targets = zip(*pairs[:n])
    return list(inputs), list(targets)


def _validation_accuracy(model, tokenizer, recipe: dict) -> dict[str, float]:
    """Prefixed rank-classification accuracy per pre-training task on its validation split."""
    accuracy = {}
    for task in recipe["tasks"]:
        labels = list(SYNTHETIC_TASKS[task].labels)
        examples = make_examples(task, VALIDATION_EXAMPLES, recipe["seed"], "validation")
        predicted = rank_classify(model, tokenizer, [with_prefix(task, e["input"]) for e in examples], labels)
        correct = sum(labels[p] == e["target"] for p, e in zip(predicted, examples))
        accuracy[task] = correct / len(examples)
    return accuracy
