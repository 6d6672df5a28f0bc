"""Log-likelihoods of target token sequences under a T5: the one place that says how padding
(IGNORE = -100) counts. Plain torch; model, the tiny backbone and the data's batching use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def answer_labels(sequences: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Generated rows [N, L] (decoder start token first) as targets [N, L - 1]: the start token
    stripped, every position after a row's first EOS set to -100 (the EOS itself is kept: its
    probability is part of the sequence's; a row cut by max_new_tokens has none and keeps all)."""
    labels = sequences[:, 1:]
    is_eos = labels == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return labels.masked_fill(after, IGNORE)


def candidate_log_likelihood(backbone, hidden, attention_mask, candidates) -> torch.Tensor:
    """Summed log-likelihood of every candidate target given encoder states: [B, C].

    hidden: [B, T, d] encoder output; candidates: token ids padded with -100, either [C, Lc]
    (the same candidates for every row: verbalized labels) or [B, C, Lc] (row b's own, e.g.
    generated answers). Columns that are -100 in every candidate are dropped before the decoder.
    """
    b = hidden.shape[0]
    if candidates.dim() == 2:
        candidates = candidates.unsqueeze(0).expand(b, *candidates.shape)
    c = candidates.shape[1]
    labels = candidates.reshape(b * c, -1)
    used = (labels != IGNORE).any(0).nonzero()
    labels = labels[:, :int(used.max()) + 1 if used.numel() else 1]
    hidden = hidden.repeat_interleave(c, dim=0)
    attention_mask = attention_mask.repeat_interleave(c, dim=0)
    decoder_input_ids = backbone.prepare_decoder_input_ids_from_labels(labels=labels)
    logits = backbone(encoder_outputs=(hidden,), attention_mask=attention_mask,
                      decoder_input_ids=decoder_input_ids).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = labels != IGNORE
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return token_logp.sum(1).view(b, c)

def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy of each row's target summed over its tokens (-log p(y | x)), in
    fp32 (fp64 logits stay fp64): [rows]. Padding (-100) counts nothing."""
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).flatten(0, 1), labels.flatten(),
                         ignore_index=IGNORE, reduction="none").view(labels.shape)
    return (ce * (labels != IGNORE).float()).sum(1)
