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

from jobs import TRAIN, run_ds, step_zero_batch

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
    from transformers import T5ForConditionalGeneration

    _, path, _, tasks, picks = step_zero_batch(overrides, cache)
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


# (stage overrides, micro-batch on 1 rank, seed of the start prompt, ports)
CASES = {
    # Stage pt: train/loss is the global batch's mean token cross-entropy and the gradient is its
    # gradient (Hugging Face's and peft's loss), on 1 rank (one micro-batch of 12) and on 3 ranks
    # (micro-batches of 2, two accumulation steps). A mean per example would weight a 2-token
    # label's tokens 2.5 times as much as a 5-token label's.
    "pt-per-token": (["stage=pt"], 12, 0, (29720, 29721)),
    # bmtpt-source, 3 particles started equal, repulsion off, svgd.likelihood_scale=1: K is all
    # ones, so every particle's -φ is the mean of the three blocks' G, the gradient of the mean over
    # the 12 examples of each example's summed token NLL; the logged norm of -φ is √3 times its
    # norm. train/loss is that mean. 1 rank (micro-batches of 6, which span two particles) and
    # 3 ranks (one particle each, micro-batches of 2) agree.
    "svgd-per-example": (["stage=bmtpt-source", "prompt.particles=3", "svgd.repulsive=false",
                          "svgd.likelihood_scale=1", "svgd.init_spread=0"], 6, 1, (29722, 29723)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_loss_against_a_hand_computation_on_one_and_three_ranks(cache, tmp_path, case):
    stage, micro, seed, ports = CASES[case]
    svgd = case.startswith("svgd")
    start = tmp_path / "start.safetensors"
    prompt = torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(seed)) * 0.5
    save_file({"particles": prompt}, str(start))
    args = [stage[0], *COMMON, f"prompt.init_file={start}", *stage[1:]]
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_ds(1, TRAIN, f"output_dir={one}", *args, f"train.micro_batch_size={micro}", cache=cache,
                  port=ports[0]).returncode == 0
    assert run_ds(3, TRAIN, f"output_dir={three}", *args, "train.micro_batch_size=2", cache=cache,
                  port=ports[1]).returncode == 0
    loss, norm = hand_step_one(prompt[0], args, cache, per_token=not svgd)
    for run in (one, three):
        logged = scalars(run)
        assert logged["train/loss"][0] == pytest.approx(loss, rel=1e-5)
        assert logged["train/grad_norm"][0] == pytest.approx((3 ** 0.5 if svgd else 1) * norm, rel=1e-4)
    p1 = load_file(str(one / "prompts.safetensors"))["particles"]
    p3 = load_file(str(three / "prompts.safetensors"))["particles"]
    assert (p1[0] - prompt[0]).norm() > 0.1
    if svgd:
        assert torch.equal(p1[0], p1[2])
    torch.testing.assert_close(p3, p1, rtol=0, atol=1e-5)
