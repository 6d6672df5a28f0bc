"""The two loss conventions (docs/architecture.md, "Particles over ranks, and SVGD").

pt, spot, target, mpt-teachers and mpt-distill: per target token, as Hugging Face and peft compute
it: the token cross-entropy summed over a particle's share of the global batch, divided by the
number of target tokens in that share. bmtpt-source: per example, each example's summed token
negative log-likelihood averaged over its particle's block (so svgd.likelihood_scale = N gives
-Σ_n log p(y_n | x_n)). The gradient that the step's micro-batches and row weights
give, on 1, 2 and 3 ranks and several micro-batch sizes, against one computed by hand: explicit
loops over examples and tokens, one forward pass per example. DeepSpeed's part (divide by the
accumulation steps, average over ranks) is done here as it documents it; tests/test_loss_runs.py
checks it with real processes.
"""
from __future__ import annotations

import pytest
import torch

from bpt_ds.data.batching import EncodedTask
from bpt_ds.model import PromptedT5
from bpt_ds.prompts import PromptBank
from bpt_ds.stages.bmtpt_source import BMTPTSource
from bpt_ds.stages.pt import PromptTuning
from bpt_ds.step import Placement, micro_batches, row_weights

# Target lengths in tokens (eos included): 1, 2 and 5, so a per-row mean would weight them unequally.
TARGETS = [[1], [17, 1], [30, 31, 32, 33, 1], [40, 1], [50, 51, 52, 53, 1], [1]]
INPUTS = [[5, 6, 7, 1], [8, 9, 1], [7, 7, 10, 11, 1], [12, 1], [13, 14, 15, 1], [16, 17, 18, 1]]


@pytest.fixture(scope="module")
def backbone(tiny_backbone_path):
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(tiny_backbone_path).requires_grad_(False).double()


def rank_batches(cls, placement: Placement, rank: int, micro: int) -> list[dict]:
    """Rank `rank`'s micro-batches of the global batch of all six examples under the stage's loss unit."""
    tasks = [EncodedTask("t", 0, [], INPUTS, TARGETS, [], [])]
    return micro_batches([(0, i) for i in range(len(TARGETS))], placement, rank, micro, cls.loss_unit, tasks, 0)


def hand_gradient(backbone, start: torch.Tensor, blocks: list[list[int]], per_token: bool) -> torch.Tensor:
    """Particle m's loss over the examples blocks[m], one example and one token at a time."""
    grads = []
    for m, block in enumerate(blocks):
        prompt = start[m].clone().requires_grad_(True)
        total, tokens = 0.0, 0
        for b in block:
            ids = torch.tensor([INPUTS[b]])
            embeds = torch.cat([prompt[None], backbone.get_input_embeddings()(ids)], 1)
            target = torch.tensor([TARGETS[b]])
            dec = backbone.prepare_decoder_input_ids_from_labels(labels=target)
            logits = backbone(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              decoder_input_ids=dec).logits[0]
            for t, y in enumerate(TARGETS[b]):
                total = total - torch.log_softmax(logits[t], -1)[y]
                tokens += 1
        loss = total / (tokens if per_token else len(block))
        (g,) = torch.autograd.grad(loss, prompt)
        grads.append(g)
    return torch.stack(grads)


def engine_gradient(backbone, start, cls, mode: str, world: int, micro: int) -> torch.Tensor:
    """What Stepper.step hands DeepSpeed on every rank, reduced as DeepSpeed does it: the sum of the
    weighted rows' gradients over the rank's micro-batches, divided by the accumulation steps,
    averaged over the ranks."""
    m = start.shape[0]
    placement = Placement.make(mode, m, world, len(TARGETS))
    accumulation = len(TARGETS) // world // micro
    bank = PromptBank(m, start.shape[1], start.shape[2])
    bank.init_rows(start.float())
    bank.double()
    model = PromptedT5(backbone, bank)
    for r in range(world):
        batches = rank_batches(cls, placement, r, micro)
        assert len(batches) == accumulation
        for mb in batches:
            mb = dict(mb)
            weights, units = row_weights(mb, placement.row_weight(accumulation))
            rows, _, _ = model(**mb)
            reps = rows.shape[0] // weights.shape[0]
            ((rows * weights.repeat(reps).to(rows.dtype)).sum() / accumulation / world).backward()
    return bank.particles.grad


@pytest.mark.parametrize("world,micro", [(1, 6), (3, 2)])
def test_per_token_loss_of_every_particle_on_the_whole_batch(backbone, world, micro):
    """Stage pt (placement "every"): each particle's gradient is that of the global batch's summed
    token cross-entropy over its 16 target tokens, on any ranks and micro-batches."""
    start = torch.randn(2, 3, backbone.config.d_model, generator=torch.Generator().manual_seed(0)).double()
    reference = hand_gradient(backbone, start, [list(range(6))] * 2, per_token=True)
    got = engine_gradient(backbone, start, PromptTuning, "every", world, micro)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)


BLOCKS = {3: [[0, 1], [2, 3], [4, 5]], 1: [list(range(6))]}


@pytest.mark.parametrize("particles,world,micro", [(3, 3, 1), (1, 2, 3)])
def test_per_token_loss_of_each_particle_on_its_own_block(backbone, particles, world, micro):
    """Placement "split" under the per-token convention (stage mpt-teachers): particle m's
    gradient is that of its block's summed token cross-entropy over its block's tokens (also when
    ranks share a particle and split its block)."""
    start = torch.randn(particles, 3, backbone.config.d_model, generator=torch.Generator().manual_seed(1)).double()
    reference = hand_gradient(backbone, start, BLOCKS[particles], per_token=True)
    got = engine_gradient(backbone, start, PromptTuning, "split", world, micro)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("particles,world,micro", [(3, 1, 1), (3, 3, 1), (1, 2, 1)])
def test_svgd_likelihood_sums_each_examples_tokens(backbone, particles, world, micro):
    """bmtpt-source: G_m is the gradient of the mean over particle m's block of each example's
    summed token negative log-likelihood, whatever the target lengths, ranks and micro-batches."""
    start = torch.randn(particles, 3, backbone.config.d_model, generator=torch.Generator().manual_seed(2)).double()
    reference = hand_gradient(backbone, start, BLOCKS[particles], per_token=False)
    got = engine_gradient(backbone, start, BMTPTSource, "split", world, micro)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)


def test_row_weights_carry_the_global_counts():
    """The stage's micro-batches carry each row's units (its target tokens, or 1) and its particle's
    units in the whole global batch, the same on every rank."""
    placement = Placement.make("split", 3, 3, 6)
    mbs = [rank_batches(PromptTuning, placement, r, 1) for r in range(3)]
    assert [mb["loss_units"].tolist() for rank in mbs for mb in rank] == [[1], [2], [5], [2], [5], [1]]
    assert [mb["loss_denominator"].tolist() for rank in mbs for mb in rank] == [[3], [3], [7], [7], [6], [6]]
    every = rank_batches(PromptTuning, Placement.make("every", 2, 2, 6), 1, 3)
    assert every[0]["loss_units"].tolist() == [2, 5, 1] and every[0]["loss_denominator"].tolist() == [16] * 3
    source = rank_batches(BMTPTSource, placement, 2, 2)
    assert source[0]["loss_units"].tolist() == [1, 1] and source[0]["loss_denominator"].tolist() == [2, 2]
