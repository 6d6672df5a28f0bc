"""The loss conventions with real processes (deepspeed launcher, gloo, ZeRO-3), on the tiny
sentiment and mood tasks, whose labels are 2 to 5 tokens long: the first step's logged loss and
gradient norm against a hand computation (explicit loops over examples and tokens, no DeepSpeed),
on 1 and 3 ranks with different micro-batches, and the same prompts after a few steps.
tests/test_loss_convention.py checks the same weighting in one process."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import TRAIN, run_ds

pytestmark = pytest.mark.distributed

COMMON = ["model.dtype=fp32", "data.tasks=[sentiment,mood]", "prompt.length=8", "prompt.init=file",
          "train.steps=3", "train.global_batch_size=12", "train.eval_every=0", "train.save_every=0",
          "train.log_every=1", "train.lr=0.1", "train.max_grad_norm=0", "seed=5", "data.max_eval_examples=16"]


@pytest.fixture(scope="module")
def cache(tiny_backbone_path) -> Path:
    return Path(tiny_backbone_path).parent


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hand_step_one(start: torch.Tensor, overrides: list[str], cache: Path, per_token: bool) -> tuple[float, float]:
    """(loss, gradient norm) of the step-0 global batch under the prompt `start` [l, d], one
    example and one token at a time in float64: Σ_n Σ_t -log p(y_nt | ...) divided by the batch's
    target tokens (per_token) or by its examples."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from bpt_ds.config import load_config
    from bpt_ds.data.batching import MixtureSampler, encode_task
    from bpt_ds.data.tasks import load_task

    cfg = load_config(None, overrides)
    path = next(cache.glob("tiny-t5-*/"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tasks = [encode_task(tokenizer, load_task(n, cfg.data, cfg.seed), i, "train", cfg.data.max_source_length,
                         cfg.data.max_target_length) for i, n in enumerate(cfg.data.tasks)]
    picks = MixtureSampler([len(t.inputs) for t in tasks], cfg.train.global_batch_size, cfg.seed).global_batch_at(0)
    model = T5ForConditionalGeneration.from_pretrained(path).requires_grad_(False).double()
    prompt = start.double().clone().requires_grad_(True)
    total, tokens, lengths = 0.0, 0, set()
    for k, i in picks:
        ids = torch.tensor([tasks[k].inputs[i]])
        target = tasks[k].targets[i]
        lengths.add(len(target))
        embeds = torch.cat([prompt[None], model.get_input_embeddings()(ids)], 1)
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(
                           labels=torch.tensor([target]))).logits[0]
        for t, y in enumerate(target):
            total = total - torch.log_softmax(logits[t], -1)[y]
            tokens += 1
    assert len(lengths) >= 3, lengths  # labels of different lengths, or the test shows nothing
    loss = total / (tokens if per_token else len(picks))
    (grad,) = torch.autograd.grad(loss, prompt)
    return loss.item(), grad.norm().item()


def test_prompt_tuning_loss_is_per_target_token_on_one_and_three_ranks(cache, tmp_path):
    """Stage pt: train/loss is the global batch's mean token cross-entropy and the gradient is its
    gradient (Hugging Face's and peft's loss), on 1 rank (one micro-batch of 12) and on 3 ranks
    (micro-batches of 2, two accumulation steps). A mean per example would weight a 2-token
    label's tokens 2.5 times as much as a 5-token label's."""
    start = tmp_path / "start.safetensors"
    prompt = torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(0)) * 0.5
    save_file({"particles": prompt}, str(start))
    args = ["stage=pt", *COMMON, f"prompt.init_file={start}"]
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_ds(1, TRAIN, f"output_dir={one}", *args, "train.micro_batch_size=12", cache=cache,
                  port=29720).returncode == 0
    assert run_ds(3, TRAIN, f"output_dir={three}", *args, "train.micro_batch_size=2", cache=cache,
                  port=29721).returncode == 0
    loss, norm = hand_step_one(prompt[0], args, cache, per_token=True)
    for run in (one, three):
        logged = scalars(run)
        assert logged["train/loss"][0] == pytest.approx(loss, rel=1e-5)
        assert logged["train/grad_norm"][0] == pytest.approx(norm, rel=1e-4)
    p1 = load_file(str(one / "prompts.safetensors"))["particles"]
    p3 = load_file(str(three / "prompts.safetensors"))["particles"]
    assert (p1 - prompt).norm() > 0.1
    torch.testing.assert_close(p3, p1, rtol=0, atol=1e-5)


def test_svgd_likelihood_sums_each_examples_tokens_on_one_and_three_ranks(cache, tmp_path):
    """bmtpt-source, 3 particles started equal, repulsion off, svgd.likelihood_scale=1: K is all
    ones, so every particle's -φ is the mean of the three blocks' G, the gradient of the mean over
    the 12 examples of each example's summed token NLL; the logged norm of -φ is √3 times its
    norm. train/loss is that mean. 1 rank (micro-batches of 6, which span two particles) and
    3 ranks (one particle each, micro-batches of 2) agree."""
    start = tmp_path / "start.safetensors"
    prompt = torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(1)) * 0.5
    save_file({"particles": prompt}, str(start))
    args = ["stage=bmtpt-source", *COMMON, f"prompt.init_file={start}", "prompt.particles=3",
            "svgd.repulsive=false", "svgd.likelihood_scale=1"]
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_ds(1, TRAIN, f"output_dir={one}", *args, "train.micro_batch_size=6", cache=cache,
                  port=29722).returncode == 0
    assert run_ds(3, TRAIN, f"output_dir={three}", *args, "train.micro_batch_size=2", cache=cache,
                  port=29723).returncode == 0
    loss, norm = hand_step_one(prompt[0], args, cache, per_token=False)
    for run in (one, three):
        logged = scalars(run)
        assert logged["train/loss"][0] == pytest.approx(loss, rel=1e-5)
        assert logged["train/grad_norm"][0] == pytest.approx(3 ** 0.5 * norm, rel=1e-4)
    p1 = load_file(str(one / "prompts.safetensors"))["particles"]
    p3 = load_file(str(three / "prompts.safetensors"))["particles"]
    assert (p1[0] - prompt[0]).norm() > 0.1 and torch.equal(p1[0], p1[2])
    torch.testing.assert_close(p3, p1, rtol=0, atol=1e-5)
