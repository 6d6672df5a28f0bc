"""What an evaluation scores (one rule for every stage, README "What evaluation scores"): with M > 1
particles their posterior predictive (1/M) Σ_m p_m(y | x), maximized over the verbalized labels
(rank classification) or over the particles' own greedy outputs (generation); with M = 1 the
prompt itself; mpt-teachers each task under its own teacher. One process, the tiny backbone."""
from __future__ import annotations

import pytest
import torch

from bpt_ds.evaluation import what_is_scored
from bpt_ds.model import PromptedT5
from bpt_ds.prompts import PromptBank
from bpt_ds.runs import load_config
from bpt_ds.stages import STAGES

TEXTS = ["the good house near a river", "a bad road", "seven gloomy windows in the city", "one cheerful clerk",
         "first word: blue cat sat on the mat", "topic: the red car drove far away", "sentiment: a lovely day",
         "mood: gloomy rain falls"]


@pytest.fixture(scope="module")
def t5(tiny_backbone_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_backbone_path).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_backbone_path)


def one_particle(backbone, bank, m) -> PromptedT5:
    single = PromptBank(1, bank.length, bank.dim)
    single.init_rows(bank.particles[m:m + 1].detach())
    return PromptedT5(backbone, single)


def answer(row: list[int], eos: int) -> list[int]:
    """A generated row without the decoder start token, cut after its first EOS (kept)."""
    row = row[1:]
    return row[:row.index(eos) + 1] if eos in row else row


def sequence_logprobs(model: PromptedT5, enc, sequences: list[list[int]]) -> torch.Tensor:
    """log p(sequences[b] | x_b) under a one-particle model, by a teacher-forced forward, in float64."""
    width = max(len(t) for t in sequences)
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in sequences])
    with torch.no_grad():
        logits = model.logits(enc.input_ids, enc.attention_mask, labels, torch.zeros(len(sequences), dtype=torch.long))
    logp = torch.log_softmax(logits.double(), dim=-1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(1)


def check_ensemble_generation(backbone, tok, seed: int, max_new_tokens: int) -> tuple[set, int, set]:
    """Asserts, for M = 2 particles drawn with `seed`, that ensemble generation answers each example
    with the particles' output of the highest mean probability; returns (the particles whose output
    won where the two differ, how often the mean prompt's decode differs from the answer, whether
    each output ended with EOS)."""
    bank = PromptBank(2, 4, backbone.config.d_model)
    bank.init_random(0.3, torch.Generator().manual_seed(seed))
    model = PromptedT5(backbone, bank)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    task_ids = torch.zeros(len(TEXTS), dtype=torch.long)
    eos = backbone.config.eos_token_id

    got = model.generate(enc.input_ids, enc.attention_mask, task_ids, max_new_tokens=max_new_tokens, ensemble=True)
    singles = [one_particle(backbone, bank, m) for m in range(2)]
    outputs = [s.generate(enc.input_ids, enc.attention_mask, task_ids, max_new_tokens=max_new_tokens).tolist()
               for s in singles]
    mean_prompt = model.generate(enc.input_ids, enc.attention_mask, task_ids, max_new_tokens=max_new_tokens).tolist()
    candidates = [[answer(outputs[k][b], eos) for b in range(len(TEXTS))] for k in range(2)]
    # probs[m][k][b] = p_m(y_k | x_b): particle k's output on example b under particle m.
    probs = [[sequence_logprobs(s, enc, candidates[k]).exp() for k in range(2)] for s in singles]
    winners, differs_from_mean = set(), 0
    for b in range(len(TEXTS)):
        mean_prob = [(probs[0][k][b] + probs[1][k][b]).item() / 2 for k in range(2)]
        best = max(range(2), key=lambda k: mean_prob[k])
        assert answer(got[b].tolist(), eos) == candidates[best][b], (seed, b, candidates, mean_prob)
        if candidates[0][b] != candidates[1][b]:
            winners.add(best)
        differs_from_mean += answer(mean_prompt[b], eos) != candidates[best][b]
    return winners, differs_from_mean, {c[-1] == eos for k in range(2) for c in candidates[k]}


@pytest.mark.parametrize("max_new_tokens", [6, 1])
def test_ensemble_generation_picks_the_output_with_the_highest_mean_probability(t5, max_new_tokens):
    """Each of M = 2 particles decodes greedily; the answer is, per example, the output with the
    highest (1/M) Σ_m p_m(y | x) (whole sequence, EOS included, no length normalization), checked
    against one-particle models' greedy decodes scored by teacher-forced forwards in float64. With 1 new token
    some outputs end without EOS (cut by the limit) and some are EOS alone (an empty answer).
    Particles are drawn seed after seed until the case is not trivial (every seed drawn is
    checked): each particle's output wins somewhere, and the mean prompt's decode (what evaluation
    used to score) differs from the posterior predictive's answer. Which seed that is depends on
    the tiny backbone's weights, which differ between library versions."""
    backbone, tok = t5
    ends = set()
    for seed in range(3, 23):
        winners, differs_from_mean, seed_ends = check_ensemble_generation(backbone, tok, seed, max_new_tokens)
        ends |= seed_ends
        if winners == {0, 1} and differs_from_mean > 0:
            break
    else:
        pytest.fail("no seed in 3..22 gives two particles that each win somewhere")
    assert (False in ends) == (max_new_tokens == 1) and True in ends  # cut by the limit, or ended


def test_one_particle_ensemble_generation_is_plain_greedy_decoding(t5):
    backbone, tok = t5
    bank = PromptBank(1, 4, backbone.config.d_model)
    bank.init_random(0.3, torch.Generator().manual_seed(3))
    model = PromptedT5(backbone, bank)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    task_ids = torch.zeros(len(TEXTS), dtype=torch.long)
    embeds, mask = model._prompted_inputs(enc.input_ids, enc.attention_mask, task_ids, aggregate=True)
    plain = backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              num_beams=1)
    assert torch.equal(model.generate(enc.input_ids, enc.attention_mask, task_ids, max_new_tokens=6, ensemble=True),
                       plain)
    assert torch.equal(model.generate(enc.input_ids, enc.attention_mask, task_ids, max_new_tokens=6), plain)


@pytest.mark.parametrize("overrides, ensemble, scored", [
    (["stage=pt"], False, "prompt"),
    (["stage=pt", "prompt.particles=3", "train.global_batch_size=30"], True,
     "posterior predictive over 3 particles"),
    (["stage=pt", "prompt.particles=2", "data.eval_mode=generate"], True, "posterior predictive over 2 particles"),
    (["stage=bmtpt-source", "prompt.particles=4"], True, "posterior predictive over 4 particles"),
    (["stage=bmtpt-source", "prompt.particles=1"], False, "prompt"),
    (["stage=target", "prompt.init_file=src", "prompt.particles=2"], True, "posterior predictive over 2 particles"),
    (["stage=target", "prompt.init_file=src"], False, "prompt"),
    (["stage=mpt-teachers", "data.tasks=[sentiment, mood]"], False, "each task under its own teacher prompt"),
])
def test_every_stage_scores_by_one_rule(overrides, ensemble, scored):
    """M > 1: the posterior predictive, for rank classification and generation alike (pt and target
    with M > 1 score their particles' ensemble, not the mean of independently trained prompts)."""
    cfg = load_config(None, list(overrides))
    assert what_is_scored(STAGES[cfg.stage].eval_ensemble, cfg.prompt.particles) == (ensemble, scored)
