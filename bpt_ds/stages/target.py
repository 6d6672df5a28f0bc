"""The target stage (docs/algorithms.md §5): prompt tuning on the target task(s), starting from an
earlier run's prompt file (the mean of a BMTPT posterior, one chosen particle, MPT's shared
prompt, or any one prompt), with optional low-rank factors on top (prompt.factors.rank,
train.factor_lr) and an optional prior p̂(S) fitted to the source particles (prior.kind,
prior.beta), in natural units: the objective is N · L̄ - β log p̂(S), L̄ the mean loss per
target token and N the target tokens of the training set, so N · L̄ estimates the data's
negative log-likelihood and β = 1 is the MAP under p̂ on 32 examples and on 400k alike. Its
gradient divided by N is added to the reduced gradient once per step.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import svgd
from ..config import RunConfig
from ..errors import ConfigError
from ..prompts import load_prompts_file
from .base import Stage


class PriorGradient:
    """The gradient transform: G -> G - (β / N) ∇ log p̂(θ) (step.GradTransform): G is the
    gradient of the per-target-token mean loss L̄, and N the target tokens of the training set,
    so N · L̄ estimates the data's negative log-likelihood and this is the gradient of the MAP
    objective -log p(D_T | θ) - β log p̂(θ), divided by N."""

    def __init__(self, prior, beta: float, target_tokens: int):
        self.prior, self.beta = prior, beta / target_tokens
        self.scalars: dict[str, float] = {}

    def __call__(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = theta.detach().requires_grad_(True)
            log_p = self.prior.log_prob(x)                  # [M]
            (d_log_p,) = torch.autograd.grad(log_p.sum(), x)
        # prior/grad_norm against prior/loss_grad_norm: how much of the step the prior steers.
        self.scalars = {"prior/log_prob": log_p.mean().item(),
                        "prior/term": (-self.beta * log_p).mean().item(),
                        "prior/grad_norm": (self.beta * d_log_p).norm().item(),
                        "prior/loss_grad_norm": grad.norm().item()}
        return grad - self.beta * d_log_p


class Target(Stage):
    name = "target"
    starts_from_file = True
    uses_prior = True

    @classmethod
    def input_files(cls, cfg: RunConfig) -> list[str]:
        files = super().input_files(cfg)
        if cfg.prior.beta > 0:
            files.append(cfg.prior.file or cfg.prompt.init_file)
        return files

    def read_inputs(self, bank, train_examples: int, init_tensors: Optional[dict],
                    train_tokens: int = 0) -> None:
        pr = self.cfg.prior
        self.prior, self.target_tokens = None, train_tokens
        if pr.beta > 0 and train_tokens < 1:
            raise ValueError("the target stage's prior needs the training set's target token count")
        if pr.beta > 0:
            key = "prior.file" if pr.file else "prompt.init_file"
            # Without prior.file the prior comes from the init file, which the runner has read already.
            tensors = load_prompts_file(pr.file, key=key) if pr.file else init_tensors
            source = tensors.get("particles")
            if source is None or source.dim() != 3 or tuple(source.shape[1:]) != bank.shape[1:]:
                raise ConfigError(
                    f"{key}: the prior needs source particles [M, {bank.length}, {bank.dim}] (prompt.length "
                    f"x the backbone's d_model); the file has "
                    f"{'none' if source is None else list(source.shape)}")
            try:
                self.prior = svgd.make_prior(pr.kind, source.float(), pr.bandwidth, pr.min_var)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
            self.source_shape = tuple(source.shape)

    def grad_transform(self, device) -> Optional[PriorGradient]:
        if self.prior is None:
            return None
        return PriorGradient(self.prior.to(device), self.cfg.prior.beta, self.target_tokens)

    def describe(self, bank) -> list[str]:
        pr, lines = self.cfg.prior, []
        if self.prior is not None:
            n = self.target_tokens
            lines.append(f"prior: {pr.kind} over {self.source_shape[0]} source particles, beta {pr.beta:g} against "
                         f"the {n:,} target tokens of the training set (objective: {n:,} x mean token loss - "
                         f"{pr.beta:g} x log p(S); the step's gradient: that of the mean loss - {pr.beta / n:.4g} x "
                         "grad log p(S))")
        if bank.rank > 0:
            t = self.cfg.train
            lines.append(f"factors: rank {bank.rank}, lr {t.factor_lr if t.factor_lr is not None else t.lr:g} "
                         f"(prompt lr {t.lr:g}); parameters per target task: "
                         f"{bank.length * bank.dim + (bank.length + bank.dim) * bank.rank:,}")
        return lines
