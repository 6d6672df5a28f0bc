"""PromptedT5: the frozen backbone with the prompt bank in front of its encoder.

Plain torch and transformers: DeepSpeed wraps this module, it does not know DeepSpeed.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .likelihood import IGNORE, answer_labels, candidate_log_likelihood, per_example_loss  # noqa: F401
from .prompts import PromptBank, prepend_prompts


class PromptedT5(nn.Module):
    def __init__(self, backbone: nn.Module, bank: PromptBank):
        super().__init__()
        self.backbone = backbone
        self.bank = bank

    def _prompted_inputs(self, input_ids, attention_mask, task_ids, aggregate: bool, particle_ids=None):
        # Call the embedding module (never read its weight): under ZeRO-3 the weight is a
        # partition and only the module's forward hook gathers it.
        embeds = self.backbone.get_input_embeddings()(input_ids)
        return prepend_prompts(self.bank(task_ids, aggregate, particle_ids), embeds, attention_mask)

    def forward(self, input_ids, attention_mask, labels, task_ids, particle_ids=None):
        """Per-row losses, the particle of each row, and the model's extra loss terms per row:
        (losses [rows], particles [rows], {}) (DistilledT5 fills the terms).

        Without particle_ids every particle runs on every example (rows = M·B, row m·B + b
        is particle m on example b); with them, row b is particle particle_ids[b] on
        example b (rows = B). A row's loss is its target's token cross-entropy summed over
        its tokens, -log p(y | x); the stage decides the reduction (step.row_weights: per
        target token of the particle's share of the global batch, or per example for SVGD's
        likelihood), whatever the ranks and micro-batches.
        """
        embeds, mask = self._prompted_inputs(input_ids, attention_mask, task_ids, False, particle_ids)
        m = embeds.shape[0] // input_ids.shape[0]
        labels = labels.repeat(m, 1)
        decoder_input_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = self.backbone(inputs_embeds=embeds, attention_mask=mask,
                               decoder_input_ids=decoder_input_ids).logits
        if particle_ids is None:
            particle_ids = torch.arange(m, device=labels.device).repeat_interleave(input_ids.shape[0])
        return per_example_loss(logits, labels), particle_ids, {}

    def logits(self, input_ids, attention_mask, labels, task_ids) -> torch.Tensor:
        """Decoder logits [B, L, V] for the targets `labels` under the particle-mean prompt
        (teacher forcing); what a peft adapter with the same weights must reproduce."""
        embeds, mask = self._prompted_inputs(input_ids, attention_mask, task_ids, aggregate=True)
        decoder_input_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels=labels)
        return self.backbone(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits

    @torch.no_grad()
    def score_candidates(self, input_ids, attention_mask, task_ids, candidates,
                         ensemble: bool = False) -> torch.Tensor:
        """Scores of every candidate target: [B, C]; rank classification picks the highest.

        Default: the summed log-likelihood under the bank's aggregate prompt. ensemble=True: the
        posterior predictive over the particles, log (1/M) Σ_m p_m(c | x) with p_m the
        candidates' probabilities under particle m normalized over the candidates (what a
        posterior over prompts predicts; the mean prompt of far-apart particles can be poor).
        candidates: [C, Lc] token ids padded with -100. The encoder runs once per example and
        prompt; only the decoder sees each candidate (no generation).
        """
        embeds, mask = self._prompted_inputs(input_ids, attention_mask, task_ids, aggregate=not ensemble)
        hidden = self.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        scores = candidate_log_likelihood(self.backbone, hidden, mask, candidates)
        if not ensemble:
            return scores
        m = scores.shape[0] // input_ids.shape[0]
        per_particle = torch.log_softmax(scores.view(m, input_ids.shape[0], -1), dim=-1)
        return torch.logsumexp(per_particle, dim=0) - math.log(m)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, task_ids, max_new_tokens: int,
                 synced_gpus: bool = False, ensemble: bool = False) -> torch.Tensor:
        """Greedy answers: [B, <= max_new_tokens + 1] token ids (starting with the decoder start
        token, padded after EOS).

        Default: greedy decoding under the bank's aggregate prompt (the prompt itself for M = 1;
        with task_particles, each example's task particle). ensemble=True: the posterior
        predictive's answer among the particles' own greedy outputs: every particle decodes
        greedily, every output y_k is scored under every particle m (log p_m(y_k | x), the whole
        sequence up to and including its EOS, summed over tokens: no length normalization, the
        sequence's probability), and each example gets the output with the highest
        (1/M) Σ_m p_m(y_k | x). The encoder runs once per example and particle; the scoring is M
        teacher-forced decoder passes of M·B rows (one per candidate slot, the same count on every
        rank). With M = 1 this is plain greedy decoding. synced_gpus keeps every rank stepping
        until all are done, which ZeRO-3's collective parameter gathers require.
        """
        embeds, mask = self._prompted_inputs(input_ids, attention_mask, task_ids, aggregate=not ensemble)
        if not ensemble:
            return self.backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, num_beams=1, synced_gpus=synced_gpus)
        from transformers.modeling_outputs import BaseModelOutput

        b = input_ids.shape[0]
        m = embeds.shape[0] // b
        hidden = self.backbone.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        # Row k·B + b: particle k's greedy output on example b (the encoder is not run again).
        out = self.backbone.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), attention_mask=mask,
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     synced_gpus=synced_gpus)
        if m == 1:
            return out
        answers = answer_labels(out, self.backbone.config.eos_token_id).view(m, b, -1)
        # scores[k][m·B + b] = log p_m(y_k | x_b): candidate k of example b under every particle m.
        scores = torch.cat([candidate_log_likelihood(self.backbone, hidden, mask, answers[k].repeat(m, 1)[:, None])
                            for k in range(m)], dim=1)                      # [M·B, M candidates]
        mean = torch.logsumexp(scores.view(m, b, m), dim=0) - math.log(m)  # [B, M]: log (1/M) Σ_m p_m(y_k | x_b)
        best = mean.argmax(-1)
        return out.view(m, b, -1)[best, torch.arange(b, device=best.device)]


class _TeacherMode:
    """Evaluation mode for the duration of the teacher pass: every submodule's own mode is put
    back after (no_grad stops the gradient, not dropout). Plain module flags, so it works the
    same inside DeepSpeed's engine (ZeRO-3's parameter hooks do not depend on the mode)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode


class DistilledT5(PromptedT5):
    """Stage mpt-distill: the student prompt S ∘ (U_k V_k) learns from task k's frozen teacher
    prompt on the same frozen backbone (docs/algorithms.md §3).

    Each step runs the teacher rows first, under no_grad and in evaluation mode (no activations
    kept, no dropout, no second copy of the backbone: the same module runs twice), then the
    student rows in the backbone's own mode (dropout on while training). A row's loss is
        L_PLM + weight · (L_logits + L_hidden)
    summed over the row's target tokens (the per-token convention: the engine divides by the
    global batch's target tokens): L_PLM the token cross-entropy, L_logits the
    KL(teacher_τ || student_τ) over the vocabulary at each target position, L_hidden the squared
    error of the decoder's last hidden states averaged over features at each target position
    (decoder_last), or, for encoder_last, the row's squared error averaged over its encoder
    positions and features, counted once per target token; both (MPT's published loss, on the
    encoder and decoder together) adds the two. forward also returns the three
    terms per row, for logging.
    """

    def __init__(self, backbone: nn.Module, bank: PromptBank, teachers: torch.Tensor, weight: float,
                 temperature: float, hidden: str):
        super().__init__(backbone, bank)
        # [T, l, d], one row per task of the bank (zeros for tasks without a teacher); a buffer,
        # so it is neither trained nor partitioned, and not saved in checkpoints.
        self.register_buffer("teachers", teachers, persistent=False)
        self.weight, self.temperature, self.hidden = weight, temperature, hidden

    def teacher_outputs(self, embeds, attention_mask, task_ids, decoder_input_ids, want_hidden: bool):
        """The teacher rows' backbone outputs: each example under its task's teacher prompt, without
        gradient and in evaluation mode (deterministic: no dropout, whatever the backbone's mode;
        every submodule's mode is restored after)."""
        with torch.no_grad(), _TeacherMode(self.backbone):
            t_embeds, t_mask = prepend_prompts(self.teachers[task_ids][None], embeds, attention_mask)
            return self.backbone(inputs_embeds=t_embeds, attention_mask=t_mask, decoder_input_ids=decoder_input_ids,
                                 output_hidden_states=want_hidden)

    def forward(self, input_ids, attention_mask, labels, task_ids, particle_ids=None):
        embeds = self.backbone.get_input_embeddings()(input_ids)
        decoder_input_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels=labels)
        want_hidden = self.hidden in ("decoder_last", "both")
        teacher = self.teacher_outputs(embeds, attention_mask, task_ids, decoder_input_ids, want_hidden)
        s_embeds, s_mask = prepend_prompts(self.bank(task_ids), embeds, attention_mask)
        student = self.backbone(inputs_embeds=s_embeds, attention_mask=s_mask, decoder_input_ids=decoder_input_ids,
                                output_hidden_states=want_hidden)
        keep = (labels != IGNORE).float()
        plm = per_example_loss(student.logits, labels)
        tau = self.temperature
        log_s = torch.log_softmax(student.logits.float() / tau, dim=-1)
        log_t = torch.log_softmax(teacher.logits.float() / tau, dim=-1)
        kl = ((log_t.exp() * (log_t - log_s)).sum(-1) * keep).sum(1)
        mse = torch.zeros_like(kl)
        if self.hidden in ("decoder_last", "both"):
            diff = (student.decoder_hidden_states[-1].float() - teacher.decoder_hidden_states[-1].float()) ** 2
            mse = mse + (diff.mean(-1) * keep).sum(1)
        if self.hidden in ("encoder_last", "both"):
            diff = (student.encoder_last_hidden_state.float() - teacher.encoder_last_hidden_state.float()) ** 2
            m = s_mask.float()
            mse = mse + (diff.mean(-1) * m).sum(1) / m.sum(1) * keep.sum(1)
        rows = plm + self.weight * (kl + mse)
        particles = torch.zeros_like(task_ids)
        return rows, particles, {"plm": plm.detach(), "logits_kl": kl.detach(), "hidden_mse": mse.detach()}
