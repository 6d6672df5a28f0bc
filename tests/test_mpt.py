"""MPT's parts in one process: samplers, the distillation loss against a hand computation,
factor initialization for the target, config errors, and peft export/import equivalence."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from bpt_ds.errors import ConfigError
from bpt_ds.runs import load_config
from bpt_ds.data.batching import TaskBlockSampler, TaskSubsetSampler
from bpt_ds.model import DistilledT5, PromptedT5
from bpt_ds.prompts import PromptBank


@pytest.fixture(scope="module")
def t5(tiny_backbone_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_backbone_path).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_backbone_path)


def batch(tokenizer, task_ids):
    texts = ["the good house near a river", "a bad road", "seven gloomy windows in the city", "one cheerful clerk"]
    targets = ["positive", "negative", "sad", "happy"]
    enc = tokenizer(texts[:len(task_ids)], padding=True, return_tensors="pt")
    labels = tokenizer(targets[:len(task_ids)], padding=True, return_tensors="pt").input_ids
    labels = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
    return enc.input_ids, enc.attention_mask, labels, torch.tensor(task_ids)


def test_block_sampler_gives_block_k_to_task_k_and_covers_each_epoch():
    s = TaskBlockSampler([6, 4], global_batch=4, seed=3)
    steps = [s.global_batch_at(i) for i in range(6)]
    for picks in steps:
        assert [t for t, _ in picks] == [0, 0, 1, 1]
    # Task 0's stream: 3 steps of 2 cover its 6 examples once; task 1's: 2 steps of 2 cover its 4.
    assert sorted(i for picks in steps[:3] for t, i in picks if t == 0) == list(range(6))
    assert sorted(i for picks in steps[:2] for t, i in picks if t == 1) == list(range(4))
    assert TaskBlockSampler([6, 4], 4, 3).global_batch_at(5) == steps[5]  # a pure function of the step


def test_subset_sampler_draws_k_prime_uniformly_then_fills_the_batch():
    s = TaskSubsetSampler([50, 40, 30, 20], global_batch=16, seed=0, min_tasks=2)
    counts = Counter()
    for step in range(3000):
        tasks = s.tasks_at(step)
        assert 2 <= len(tasks) <= 4 and len(set(tasks)) == len(tasks)
        counts[len(tasks)] += 1
        if step < 50:
            picks = s.global_batch_at(step)
            assert len(picks) == 16 and sorted({t for t, _ in picks}) == tasks
            shares = Counter(t for t, _ in picks)
            assert max(shares.values()) - min(shares.values()) <= 1
    # K' uniform over {2, 3, 4}: 1000 each, within 4 standard deviations (~26).
    assert all(abs(counts[k] - 1000) < 105 for k in (2, 3, 4)), counts
    assert s.global_batch_at(7) == TaskSubsetSampler([50, 40, 30, 20], 16, 0, 2).global_batch_at(7)


def test_subset_sampler_in_proportion_to_task_sizes():
    """distill.task_mix=proportional: one example for each drawn task, the rest by largest
    remainder of the size shares; the same tasks as with equal shares (the draw of K' and of the
    tasks does not depend on the mix)."""
    sizes = [900, 60, 30, 10]
    s = TaskSubsetSampler(sizes, global_batch=16, seed=0, min_tasks=2, proportional=True)
    # By hand: [0, 1]: 14 left, 14·900/960 = 13.125 and 0.875 -> 13 + 1 (remainder to task 1).
    assert s.shares([0, 1]) == [14, 2]
    # [0, 1, 2, 3]: 12 left, shares 10.8, 0.72, 0.36, 0.12 -> 10, 0, 0, 0 and the 2 left to the
    # largest remainders (0.8, 0.72): 11, 1, 0, 0, plus one each.
    assert s.shares([0, 1, 2, 3]) == [12, 2, 1, 1]
    equal = TaskSubsetSampler(sizes, global_batch=16, seed=0, min_tasks=2)
    for step in range(30):
        tasks = s.tasks_at(step)
        assert tasks == equal.tasks_at(step)
        picks = Counter(t for t, _ in s.global_batch_at(step))
        assert [picks[t] for t in tasks] == s.shares(tasks) and sum(picks.values()) == 16


def test_distillation_terms_against_a_hand_computation(t5):
    model, tok = t5
    torch.manual_seed(0)
    bank = PromptBank(1, 4, model.config.d_model, tasks=["a", "b"], rank=1)
    bank.init_random(0.5, torch.Generator().manual_seed(1))
    teachers = torch.randn(2, 4, model.config.d_model) * 0.5
    distilled = DistilledT5(model, bank, teachers, weight=0.7, temperature=2.0, hidden="decoder_last")
    ids, mask, labels, task_ids = batch(tok, [0, 1, 1])
    rows, particles, terms = distilled(ids, mask, labels, task_ids)
    # By hand: the student and teacher runs as two separate prompted forwards.
    dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
    emb = model.get_input_embeddings()(ids)
    s_in = torch.cat([bank(task_ids)[0], emb], 1)
    t_in = torch.cat([teachers[task_ids], emb], 1)
    full_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1)
    s = model(inputs_embeds=s_in, attention_mask=full_mask, decoder_input_ids=dec, output_hidden_states=True)
    t = model(inputs_embeds=t_in, attention_mask=full_mask, decoder_input_ids=dec, output_hidden_states=True)
    keep = labels != -100
    for b in range(3):
        k = keep[b]
        kl = F.kl_div(F.log_softmax(s.logits[b][k] / 2.0, -1), F.log_softmax(t.logits[b][k] / 2.0, -1),
                      log_target=True, reduction="sum")           # summed over target tokens
        mse = ((s.decoder_hidden_states[-1][b][k] - t.decoder_hidden_states[-1][b][k]) ** 2).mean(-1).sum()
        plm = F.cross_entropy(s.logits[b][k], labels[b][k], reduction="sum")
        assert terms["logits_kl"][b].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
        assert terms["hidden_mse"][b].item() == pytest.approx(mse.item(), rel=1e-4, abs=1e-7)
        assert terms["plm"][b].item() == pytest.approx(plm.item(), rel=1e-5)
        assert rows[b].item() == pytest.approx(plm.item() + 0.7 * (kl.item() + mse.item()), rel=1e-4)
    assert particles.tolist() == [0, 0, 0]
    # Gradients reach the student's prompt and factors only; a student equal to its teacher has KL = MSE = 0.
    rows.sum().backward()
    assert bank.particles.grad is not None and bank.factor_u.grad is not None
    same = DistilledT5(model, bank, bank(torch.tensor([0, 1]), aggregate=True)[0].detach(), 1.0, 1.0, "encoder_last")
    _, _, terms = same(ids, mask, labels, task_ids)
    assert terms["logits_kl"].abs().max() < 1e-6 and terms["hidden_mse"].abs().max() < 1e-10


def test_encoder_hidden_term_counts_once_per_target_token(t5):
    """distill.hidden=encoder_last under the per-token convention: a row's term is its squared
    error averaged over its encoder positions (prompt included) and features, times its target
    tokens, so the global batch's per-token mean weights examples as L_PLM does."""
    model, tok = t5
    bank = PromptBank(1, 4, model.config.d_model, tasks=["a", "b"], rank=1)
    bank.init_random(0.5, torch.Generator().manual_seed(2))
    teachers = torch.randn(2, 4, model.config.d_model, generator=torch.Generator().manual_seed(3)) * 0.5
    ids, mask, labels, task_ids = batch(tok, [0, 1, 1])
    _, _, terms = DistilledT5(model, bank, teachers, 1.0, 1.0, "encoder_last")(ids, mask, labels, task_ids)
    emb = model.get_input_embeddings()(ids)
    full_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1)
    enc = model.get_encoder()
    s = enc(inputs_embeds=torch.cat([bank(task_ids)[0], emb], 1), attention_mask=full_mask).last_hidden_state
    t = enc(inputs_embeds=torch.cat([teachers[task_ids], emb], 1), attention_mask=full_mask).last_hidden_state
    for b in range(3):
        real = full_mask[b] == 1
        expected = ((s[b][real] - t[b][real]) ** 2).mean() * (labels[b] != -100).sum()
        assert terms["hidden_mse"][b].item() == pytest.approx(expected.item(), rel=1e-4)
    # both: the encoder's term plus the decoder's, each as computed on its own.
    _, _, dec = DistilledT5(model, bank, teachers, 1.0, 1.0, "decoder_last")(ids, mask, labels, task_ids)
    _, _, both = DistilledT5(model, bank, teachers, 1.0, 1.0, "both")(ids, mask, labels, task_ids)
    assert (dec["hidden_mse"] > 0).all() and (terms["hidden_mse"] > 0).all()
    torch.testing.assert_close(both["hidden_mse"], terms["hidden_mse"] + dec["hidden_mse"])


@pytest.fixture(scope="module")
def t5_dropout(tiny_backbone_path):
    """The tiny backbone as real T5 checkpoints ship: dropout 0.1."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(tiny_backbone_path, dropout_rate=0.1)
    return model.requires_grad_(False)


def _modes(module) -> list[bool]:
    return [m.training for m in module.modules()]


@pytest.mark.parametrize("hidden", ["decoder_last", "encoder_last", "both"])
def test_teacher_pass_is_deterministic_while_the_student_keeps_dropout(t5, t5_dropout, hidden):
    """With dropout 0.1 and the teacher prompt equal to the student's, the teacher runs without
    dropout (what an eval-mode pass gives), the student with it, and the backbone is back in
    training mode afterwards. no_grad alone left the teacher's dropout on: KL and MSE then
    measured two noisy copies of the same prompt."""
    model, tok = t5_dropout, t5[1]
    bank = PromptBank(1, 4, model.config.d_model, tasks=["a", "b"], rank=1, factor_init_std=0.0)
    bank.init_random(0.5, torch.Generator().manual_seed(1))
    ids, mask, labels, task_ids = batch(tok, [0, 1, 1])
    same_prompt = bank(torch.tensor([0, 1]), aggregate=True)[0].detach()
    distilled = DistilledT5(model, bank, same_prompt, 1.0, 1.0, hidden).train()
    model.encoder.block[0].layer[0].eval()   # a submodule in its own mode keeps it
    before = _modes(model)
    torch.manual_seed(7)
    rows, _, terms = distilled(ids, mask, labels, task_ids)
    assert _modes(model) == before and model.training

    # By hand: the teacher in eval mode (no dropout), the student in training mode with the
    # same random state as the student pass above (the teacher pass draws nothing).
    dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
    emb = model.get_input_embeddings()(ids)
    full_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], 1)
    t_in = torch.cat([same_prompt[task_ids], emb], 1)
    model.eval()
    t = model(inputs_embeds=t_in, attention_mask=full_mask, decoder_input_ids=dec, output_hidden_states=True)
    again = model(inputs_embeds=t_in, attention_mask=full_mask, decoder_input_ids=dec).logits
    assert torch.equal(t.logits, again)
    distilled.train()
    model.encoder.block[0].layer[0].eval()
    torch.manual_seed(7)
    s = model(inputs_embeds=torch.cat([bank(task_ids)[0], emb], 1), attention_mask=full_mask,
              decoder_input_ids=dec, output_hidden_states=True)
    keep = labels != -100
    for b in range(3):
        k = keep[b]
        kl = F.kl_div(F.log_softmax(s.logits[b][k], -1), F.log_softmax(t.logits[b][k], -1),
                      log_target=True, reduction="sum")
        assert terms["logits_kl"][b].item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    assert terms["logits_kl"].min() > 1e-4          # the student's own dropout
    # The student pass still applies dropout: another draw, another loss.
    torch.manual_seed(8)
    other, _, _ = distilled(ids, mask, labels, task_ids)
    assert (other - rows).abs().max() > 1e-4
    # With the whole model in eval mode the two passes are one computation: KL = MSE = 0.
    distilled.eval()
    _, _, still = distilled(ids, mask, labels, task_ids)
    assert still["logits_kl"].abs().max() < 1e-6 and still["hidden_mse"].abs().max() < 1e-10
    assert not any(_modes(model))


def test_target_factors_start_fresh_from_one_source_or_from_the_mean():
    src = {"particles": torch.randn(1, 4, 6), "factors.a.U": torch.full((4, 1), 2.0),
           "factors.a.V": torch.full((1, 6), 3.0), "factors.b.U": torch.full((4, 1), 4.0),
           "factors.b.V": torch.full((1, 6), 5.0)}
    fresh = PromptBank(1, 4, 6, tasks=["target"], rank=1, factor_init_std=0.0)
    fresh.load_tensors(src, "src")
    assert torch.equal(fresh.particles, src["particles"])
    assert torch.equal(fresh.factor_u, torch.ones(1, 4, 1)) and torch.equal(fresh.factor_v, torch.ones(1, 1, 6))
    one = PromptBank(1, 4, 6, tasks=["target"], rank=1)
    one.load_tensors(src, "src", factors_from="b")
    assert torch.equal(one.factor_u[0], src["factors.b.U"]) and torch.equal(one.factor_v[0], src["factors.b.V"])
    mean = PromptBank(1, 4, 6, tasks=["target"], rank=1)
    mean.load_tensors(src, "src", factors_from="mean")
    assert torch.equal(mean.factor_u[0], torch.full((4, 1), 3.0)) and torch.equal(mean.factor_v[0], torch.full((1, 6), 4.0))
    with pytest.raises(ValueError) as e:
        one.load_tensors(src, "src", factors_from="c")
    assert str(e.value) == ("src has no factors of task 'c' (prompt.factors.init_from); its tasks: a, b, or 'mean'")
    with pytest.raises(ValueError, match="holds no factors; prompt.factors.init_from='mean' needs a file"):
        one.load_tensors({"particles": src["particles"]}, "src", factors_from="mean")


@pytest.mark.parametrize("overrides, message", [
    (["stage=mpt-teachers", "data.tasks=[sentiment, mood]", "prompt.particles=3"],
     "stage 'mpt-teachers' trains one teacher prompt per task of data.tasks (2) as particles: set "
     "prompt.particles=2 (or leave it unset)"),
    (["stage=mpt-teachers", "data.tasks=[sentiment, mood]", "data.eval_tasks=[polarity]"],
     "stage 'mpt-teachers' evaluates each teacher on its own task: data.eval_tasks must be among data.tasks (or unset)"),
    (["stage=mpt-distill", "data.tasks=[sentiment, mood]"],
     "stage 'mpt-distill' needs distill.teachers: the output directory (or prompts.safetensors) of an mpt-teachers run"),
    (["stage=mpt-distill", "data.tasks=[sentiment]", "distill.teachers=x"],
     "stage 'mpt-distill' mixes at least 2 source tasks per batch: data.tasks needs 2 or more"),
    (["stage=mpt-distill", "data.tasks=[sentiment, mood]", "distill.teachers=x", "distill.min_tasks=3"],
     "config key 'distill.min_tasks' must be in 2..2 (the number of data.tasks); got 3"),
    (["stage=mpt-distill", "data.tasks=[sentiment, mood]", "distill.teachers=x", "prompt.factors.rank=0"],
     "stage 'mpt-distill' learns S ∘ (U_k V_k): prompt.factors.rank must be >= 1 (MPT uses 1)"),
    (["stage=mpt-distill", "data.tasks=[sentiment, mood]", "distill.teachers=x", "distill.temperature=0"],
     "config key 'distill.temperature' must be a finite number > 0; got 0.0"),
    (["stage=mpt-distill", "data.tasks=[sentiment, mood, topic]", "distill.teachers=x", "train.global_batch_size=2"],
     "stage 'mpt-distill': train.global_batch_size (2) must be at least the 3 tasks of data.tasks, so that every "
     "task a step draws gets an example"),
    (["prompt.factors.init_from=mean"],
     "prompt.factors.init_from takes factors from prompt.init_file: set prompt.init=file (or stage target) and "
     "prompt.factors.rank >= 1"),
])
def test_mpt_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message


def test_mpt_defaults():
    cfg = load_config(None, ["stage=mpt-teachers", "data.tasks=[sentiment, mood, topic]", "train.global_batch_size=30"])
    assert cfg.prompt.particles == 3
    cfg = load_config(None, ["stage=mpt-distill", "data.tasks=[sentiment, mood]", "distill.teachers=x"])
    assert cfg.prompt.factors.rank == 1 and cfg.distill.hidden == "decoder_last"


def test_teacher_ranks_must_fit():
    from bpt_ds.stages.mpt_teachers import MPTTeachers

    cfg = load_config(None, ["stage=mpt-teachers", "data.tasks=[sentiment, mood, topic]", "train.global_batch_size=30"])
    MPTTeachers.placement(cfg, 3)
    with pytest.raises(ConfigError) as e:
        MPTTeachers.placement(cfg, 2)
    assert str(e.value) == ("stage 'mpt-teachers': its 3 teachers (one per task of data.tasks) are placed whole on "
                            "ranks, so 3 and the number of ranks (2) must divide one another; launch 1 or 3 or 6 or "
                            "9 or 12 ranks")


# ---------------------------------------------------------------- peft


def _trained_like_bank(d_model: int, tasks: list[str], rank: int) -> PromptBank:
    bank = PromptBank(1, 5, d_model, tasks=tasks, rank=rank, factor_init_std=0.3)
    bank.init_random(0.5, torch.Generator().manual_seed(4))
    return bank


def test_peft_multitask_adapter_matches_our_prompt_and_logits(t5, tmp_path, tiny_backbone_path):
    from peft import PeftModel
    from safetensors.torch import save_file

    from bpt_ds.peft_io import export_peft, import_peft

    model, tok = t5
    bank = _trained_like_bank(model.config.d_model, ["mood", "sentiment", "topic"], rank=2)
    ours = PromptedT5(model, bank)
    prompts = tmp_path / "prompts.safetensors"
    save_file(bank.export(), str(prompts))
    info = export_peft(str(prompts), str(tmp_path / "adapter"), base_model=str(tiny_backbone_path),
                       tasks=bank.tasks)
    assert info["type"] == "MultitaskPromptTuningConfig"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_transformer_submodules"], config["num_tasks"], config["num_ranks"],
            config["num_virtual_tokens"]) == ("MULTITASK_PROMPT_TUNING", 1, 3, 2, 5)
    # Prompt learning wraps the base model without changing it, so the shared fixture stays clean.
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "adapter")).eval()
    ids, mask, labels, task_ids = batch(tok, [2, 0, 1, 2])
    with torch.no_grad():
        # The prompt: ours S ∘ (U_t V_t) equals peft's MultitaskPromptEmbedding output.
        encoder = peft_model.prompt_encoder["default"]
        indices = torch.arange(5)[None].expand(4, 5)
        torch.testing.assert_close(encoder(indices, task_ids), bank(task_ids, aggregate=True)[0],
                                   rtol=1e-6, atol=1e-6)
        # The model: the same logits on the same batch.
        theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids).logits
        torch.testing.assert_close(theirs, ours.logits(ids, mask, labels, task_ids), rtol=1e-5, atol=1e-5)
    # And back: the imported tensors are ours, task names included.
    back = import_peft(str(tmp_path / "adapter"))
    for key, value in bank.export().items():
        torch.testing.assert_close(back[key], value)


def test_peft_plain_prompt_round_trip_and_errors(t5, tmp_path, tiny_backbone_path, capsys):
    from peft import PeftModel, PromptTuningConfig, get_peft_model
    from safetensors.torch import save_file

    from bpt_ds.peft_io import main
    from bpt_ds.prompts import load_prompts_file

    model, tok = t5
    bank = _trained_like_bank(model.config.d_model, ["polarity"], rank=0)
    save_file(bank.export(), str(tmp_path / "prompts.safetensors"))
    assert main(["export", str(tmp_path), str(tmp_path / "plain"), "--base-model", str(tiny_backbone_path)]) == 0
    assert "wrote PromptTuningConfig adapter [5 x 128]" in capsys.readouterr().out
    peft_model = PeftModel.from_pretrained(model, str(tmp_path / "plain")).eval()
    ids, mask, labels, task_ids = batch(tok, [0, 0])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(theirs, PromptedT5(model, bank).logits(ids, mask, labels, task_ids),
                                   rtol=1e-5, atol=1e-5)
    # A peft adapter directory works as prompt.init_file.
    torch.testing.assert_close(load_prompts_file(str(tmp_path / "plain"))["particles"], bank.export()["particles"])
    # peft's seq2seq default (encoder and decoder rows): the encoder's first l rows are what it uses.
    cfg = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5)
    default = get_peft_model(model, cfg)
    default.save_pretrained(str(tmp_path / "default"))
    rows = default.prompt_encoder["default"].embedding.weight.detach().clone()
    assert rows.shape[0] == 10
    assert main(["import", str(tmp_path / "default"), str(tmp_path / "imported.safetensors")]) == 0
    torch.testing.assert_close(load_prompts_file(str(tmp_path / "imported.safetensors"))["particles"][0], rows[:5])
    assert main(["import", str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.endswith("has no adapter_config.json: not a peft adapter directory\n")
