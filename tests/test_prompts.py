"""The prompt bank and how prompts enter the encoder (plain torch, one process)."""
from __future__ import annotations

import pytest
import torch

from bpt_ds.model import PromptedT5, per_example_loss
from bpt_ds.prompts import PromptBank, prepend_prompts


def test_particles_fold_into_the_batch():
    bank = PromptBank(3, 2, 4)
    bank.init_random(1.0, torch.Generator().manual_seed(0))
    embeds = torch.randn(5, 6, 4)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    full, full_mask = prepend_prompts(bank(torch.zeros(5, dtype=torch.long)), embeds, mask)
    assert full.shape == (15, 8, 4) and full_mask.shape == (15, 8)
    for m in range(3):
        for b in range(5):
            assert torch.equal(full[m * 5 + b, :2], bank.particles[m])
            assert torch.equal(full[m * 5 + b, 2:], embeds[b])
            assert torch.equal(full_mask[m * 5 + b], torch.cat([torch.ones(2, dtype=torch.long), mask[b]]))


def test_factors_start_near_the_shared_prompt_and_follow_the_task():
    torch.manual_seed(0)
    bank = PromptBank(2, 3, 8, tasks=["a", "b"], rank=1, factor_init_std=0.0)
    bank.init_random(1.0, torch.Generator().manual_seed(1))
    out = bank(torch.tensor([0, 1]))
    torch.testing.assert_close(out, bank.particles[:, None].expand(2, 2, 3, 8))  # U V = all ones
    with torch.no_grad():
        bank.factor_u[1].fill_(2.0)
    out = bank(torch.tensor([0, 1]))
    torch.testing.assert_close(out[:, 1], bank.particles * 2.0)
    assert bank.size() == 2 * 3 * 8 + 2 * (3 + 8) * 1
    exported = bank.export()
    assert set(exported) == {"particles", "factors.a.U", "factors.a.V", "factors.b.U", "factors.b.V"}
    assert exported["factors.b.U"].shape == (3, 1) and exported["factors.b.V"].shape == (1, 8)


def test_aggregate_is_the_particle_mean():
    bank = PromptBank(4, 2, 3)
    bank.init_random(1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(bank(torch.zeros(2, dtype=torch.long), aggregate=True)[0, 0], bank.particles.mean(0))


def test_load_tensors_checks_shapes():
    bank = PromptBank(2, 3, 4, tasks=["a"], rank=1)
    bank.load_tensors({"particles": torch.ones(1, 3, 4), "factors.a.U": torch.full((3, 1), 2.0),
                       "factors.a.V": torch.ones(1, 4)}, "f.safetensors")
    assert torch.equal(bank.particles, torch.ones(2, 3, 4)) and torch.equal(bank.factor_u[0], torch.full((3, 1), 2.0))
    with pytest.raises(ValueError, match=r"f.safetensors: particles have shape \(1, 5, 4\), this run needs "
                                         r"\[F, 3, 4\]; set prompt.length to match the file"):
        bank.load_tensors({"particles": torch.ones(1, 5, 4)}, "f.safetensors")
    with pytest.raises(ValueError, match=r"f.safetensors holds 3 particles and this run has 2: use "
                                         r"prompt.particles=3 to continue all of them, or prompt.particles=1"):
        bank.load_tensors({"particles": torch.ones(3, 3, 4)}, "f.safetensors")
    with pytest.raises(ValueError, match=r"f.safetensors holds 3 particles; prompt.init_particle=3 must be in 0..2"):
        bank.load_tensors({"particles": torch.ones(3, 3, 4)}, "f.safetensors", pick=3)
    with pytest.raises(ValueError, match="f.safetensors has no 'particles' tensor"):
        bank.load_tensors({"x": torch.ones(1)}, "f.safetensors")


def test_load_tensors_aggregates_a_posterior():
    """A one-particle run starts from the mean of a file's particles, or from a chosen one."""
    src = torch.randn(5, 3, 4)
    one = PromptBank(1, 3, 4)
    one.load_tensors({"particles": src}, "f")
    torch.testing.assert_close(one.particles[0], src.mean(0))
    one.load_tensors({"particles": src}, "f", pick=2)
    assert torch.equal(one.particles[0], src[2])
    two = PromptBank(2, 3, 4)
    two.load_tensors({"particles": src}, "f", pick=4)
    assert torch.equal(two.particles, src[4].expand(2, 3, 4))
    five = PromptBank(5, 3, 4)
    five.load_tensors({"particles": src}, "f")
    assert torch.equal(five.particles, src)


def test_per_example_loss_ignores_padding():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    loss = per_example_loss(logits, labels)
    lp = torch.log_softmax(logits, -1)
    expected = torch.stack([-(lp[0, 0, 1] + lp[0, 1, 2]), -lp[1, 0, 3]])  # summed over target tokens
    torch.testing.assert_close(loss, expected)


def test_all_particles_in_one_pass_match_one_pass_per_particle(tiny_backbone_path):
    from transformers import T5ForConditionalGeneration

    backbone = T5ForConditionalGeneration.from_pretrained(tiny_backbone_path).requires_grad_(False)
    bank = PromptBank(3, 4, backbone.config.d_model)
    bank.init_random(0.5, torch.Generator().manual_seed(0))
    model = PromptedT5(backbone, bank)
    batch = dict(input_ids=torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]]),
                 attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                 labels=torch.tensor([[10, 1], [11, 1]]), task_ids=torch.zeros(2, dtype=torch.long))
    rows, parts, _ = model(**batch)
    assert parts.tolist() == [0, 0, 1, 1, 2, 2]  # row m·B + b is particle m on example b
    losses = rows.view(3, 2).mean(1)
    losses.sum().backward()
    grads = bank.particles.grad.clone()
    assert losses.shape == (3,)
    for m in range(3):
        single = PromptBank(1, 4, backbone.config.d_model)
        single.init_rows(bank.particles[m:m + 1].detach())
        alone = PromptedT5(backbone, single)(**batch)[0].mean(0, keepdim=True)
        alone.sum().backward()
        torch.testing.assert_close(alone[0], losses[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single.particles.grad[0], grads[m], rtol=1e-4, atol=1e-6)
    # Rank classification scores are log-likelihoods: the true label of a tiny batch scores as the loss says.
    cands = torch.tensor([[10, 1], [11, 1]])
    single = PromptBank(1, 4, backbone.config.d_model)
    single.init_rows(bank.particles.mean(0, keepdim=True).detach())
    scores = PromptedT5(backbone, single).score_candidates(batch["input_ids"], batch["attention_mask"],
                                                          batch["task_ids"], cands)
    loss_mean = PromptedT5(backbone, single)(**batch)[0].mean(0, keepdim=True)
    torch.testing.assert_close(model.score_candidates(batch["input_ids"], batch["attention_mask"],
                                                      batch["task_ids"], cands), scores)
    per_ex = -torch.stack([scores[0, 0], scores[1, 1]])  # a row's loss: -log p(y | x), summed over tokens
    torch.testing.assert_close(per_ex.mean(), loss_mean[0], rtol=1e-5, atol=1e-6)


def test_particle_ids_put_each_example_under_its_own_particle(tiny_backbone_path):
    """SVGD's placement: row b runs under particle particle_ids[b], factors included."""
    from transformers import T5ForConditionalGeneration

    backbone = T5ForConditionalGeneration.from_pretrained(tiny_backbone_path).requires_grad_(False)
    bank = PromptBank(3, 4, backbone.config.d_model, tasks=["a", "b"], rank=1, factor_init_std=0.3)
    bank.init_random(0.5, torch.Generator().manual_seed(1))
    model = PromptedT5(backbone, bank)
    batch = dict(input_ids=torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0], [7, 7, 1, 0]]),
                 attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]),
                 labels=torch.tensor([[10, 1], [11, 1], [10, 1]]), task_ids=torch.tensor([0, 1, 1]))
    every, _, _ = model(**batch)                       # [M·B]: particle m on example b at m·B + b
    picked = torch.tensor([2, 0, 1])
    rows, parts, _ = model(**batch, particle_ids=picked)
    assert parts.tolist() == [2, 0, 1]
    torch.testing.assert_close(rows, every.view(3, 3)[picked, torch.arange(3)], rtol=1e-5, atol=1e-6)


def source_start(rows: torch.Tensor, *overrides: str, init: str = "vocab"):
    """The bank of a bmtpt-source run after the runner's init (rows) and the stage's init_bank."""
    from bpt_ds.runs import load_config
    from bpt_ds.stages.bmtpt_source import BMTPTSource

    bank = PromptBank(3, 4, 8)
    if init == "file":
        bank.load_tensors({"particles": rows}, "f")
        overrides = ("prompt.init=file", "prompt.init_file=f.safetensors", *overrides)
    else:
        bank.init_rows(rows)
    stage = BMTPTSource(load_config(None, ["stage=bmtpt-source", "prompt.particles=3", "train.global_batch_size=30",
                                           *overrides]))
    stage.read_inputs(bank, 100, None)
    warnings = stage.init_bank(bank)
    return bank.particles.detach().clone(), warnings, stage.describe(bank)[0]


def test_bmtpt_source_starts_its_particles_from_one_shared_draw_with_relative_noise():
    """svgd.init=shared (the default): every particle is particle 0's draw plus noise of std
    0.1 x the draw's RMS coordinate; independent keeps the M draws and adds none by default."""
    rows = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)) * 5.0
    rms = rows[0].pow(2).mean().sqrt().item()
    shared, warnings, line = source_start(rows)
    assert warnings == []
    noise = shared - rows[0]
    assert 0.07 * rms < noise.std().item() < 0.13 * rms and not torch.equal(shared[0], shared[1])
    # One basin: the particles are far closer to each other than to the origin.
    assert (shared[0] - shared[1]).norm() < 0.25 * shared[0].norm()
    assert line == f"SVGD start: 3 particles from one shared draw, noise 0.1 x their RMS coordinate {rms:.4g} " \
                   "(svgd.init, svgd.init_spread)"
    wider, _, _ = source_start(rows, "svgd.init_spread=0.3")
    assert 0.25 * rms < (wider - rows[0]).std().item() < 0.35 * rms
    apart, warnings, line = source_start(rows, "svgd.init=independent")
    assert torch.equal(apart, rows) and warnings == []
    assert line.startswith("SVGD start: 3 particles from independent draws, noise 0 x")


def test_bmtpt_source_spreads_a_one_prompt_file_keeps_an_m_prompt_file_and_warns_about_equal_particles():
    one = torch.ones(1, 4, 8)
    spread, warnings, _ = source_start(one, init="file")
    assert warnings == []
    assert 0.07 < (spread - 1).std().item() < 0.13 and not torch.equal(spread[0], spread[1])
    many = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    kept, warnings, line = source_start(many, init="file")
    assert torch.equal(kept, many) and warnings == []
    assert line.startswith("SVGD start: 3 particles from the init file, noise 0 x")
    same, warnings, _ = source_start(one, "svgd.init_spread=0", init="file")
    assert torch.equal(same, torch.ones(3, 4, 8))
    assert warnings == [
        "bmtpt-source: all 3 particles start equal and svgd.init_spread=0; SVGD's repulsion is zero between "
        "equal particles, so they would stay equal. Set svgd.init_spread (e.g. 0.1) to spread them."]
    _, warnings, _ = source_start(torch.zeros(1, 4, 8), init="file")
    assert warnings == [
        "bmtpt-source: all 3 particles start equal and they are all zero (the noise is relative to their size); "
        "SVGD's repulsion is zero between equal particles, so they would stay equal. Start them from "
        "prompt.init=vocab or random, or a non-zero prompt file."]


def test_the_replaced_init_noise_key_says_what_to_write_instead():
    """Its neutral value (0.0, in every config.yaml saved before the change) still loads."""
    from bpt_ds.errors import ConfigError
    from bpt_ds.runs import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["stage=bmtpt-source", "svgd.init_noise=0.01"])
    assert str(err.value) == (
        "config key 'svgd.init_noise' was replaced: use svgd.init_spread, which is relative to the starting "
        "particles' RMS coordinate (an absolute std s is svgd.init_spread = s / that RMS; the log prints the RMS)")
    assert load_config(None, ["stage=bmtpt-source", "svgd.init_noise=0.0"]).svgd.init_spread is None


def test_ensemble_scores_are_the_posterior_predictive(tiny_backbone_path):
    """log (1/M) Σ_m softmax over candidates of particle m's scores, from one encoder pass."""
    from transformers import T5ForConditionalGeneration

    backbone = T5ForConditionalGeneration.from_pretrained(tiny_backbone_path).requires_grad_(False)
    bank = PromptBank(3, 4, backbone.config.d_model)
    bank.init_random(0.5, torch.Generator().manual_seed(2))
    model = PromptedT5(backbone, bank)
    args = (torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
            torch.zeros(2, dtype=torch.long), torch.tensor([[10, 1], [11, 1], [12, -100]]))
    got = model.score_candidates(*args, ensemble=True)
    probs = []
    for m in range(3):
        single = PromptBank(1, 4, backbone.config.d_model)
        single.init_rows(bank.particles[m:m + 1].detach())
        probs.append(torch.softmax(PromptedT5(backbone, single).score_candidates(*args), dim=-1))
    torch.testing.assert_close(got, torch.stack(probs).mean(0).log(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.exp().sum(-1), torch.ones(2))
