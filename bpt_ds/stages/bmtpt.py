"""BMTPT (algorithms.md §4–§5): the source posterior by SVGD, and the target stage that uses it.

Stage `bmtpt-source`: M particles of the base prompt S move along SVGD's direction for
    log p(θ | D) = log N(θ; 0, σ₀² I) [svgd.prior_std] - scale · L(θ; B) [svgd.likelihood_scale]
where L(θ; B) = (1/|B|) Σ_{(x,y) ∈ B} -log p(y | x; θ), each example's token NLL summed over
its target tokens, averaged over the particle's block B of the multitask global batch
(loss_unit "example"; the other stages average over target tokens instead): with scale = N,
the number of training examples, scale · L estimates -Σ_n log p(y_n | x_n; θ), and a label of
4 tokens counts as fully as one of 2. Particles
are placed over ranks (engine.Placement, mode "split"); DeepSpeed reduces every particle's
gradient over the ranks, and the engine's gradient hook, after that reduction and before
the optimizer, turns the full gradient matrix G into -φ on every rank alike:
    φ = (K · ∇log p + repulsive) / M,  K, h from the full fp32 particles.
Since φ is linear in G, reducing G and then applying K equals summing every rank's K·G_r;
the repulsive and prior terms depend on θ alone and are added once, after the reduction.

Stage `target`: prompt tuning on the target task(s), starting from an earlier run's prompt
file (the mean of a BMTPT posterior, one chosen particle, or any one prompt), with optional
low-rank factors on top (prompt.factors.rank, train.factor_lr) and an optional prior
-β · log p̂(S) fitted to the source particles (prior.kind, prior.beta), added to the
gradient after the reduction, once per step.
"""
from __future__ import annotations

import logging

import torch

from .. import svgd
from ..config import ConfigError
from ..prompts import load_prompts_file
from .prompt_tuning import PromptTuning

log = logging.getLogger(__name__)


class BMTPTSource(PromptTuning):
    placement_mode = "split"
    # G_m: the gradient of the mean over particle m's block of each example's summed token NLL.
    loss_unit = "example"
    # Evaluation scores the posterior predictive (PromptTuning.eval_ensemble; on the tiny backbone
    # the particles sit in different modes and their mean prompt predicts poorly).

    def after_init(self, bank) -> None:
        s = self.cfg.svgd
        if s.init_noise > 0:
            gen = torch.Generator().manual_seed(self.cfg.seed + 1)
            with torch.no_grad():
                bank.particles.add_(torch.randn(bank.shape, generator=gen) * s.init_noise)
        p = bank.particles.detach()
        if self.is_main and bank.num_particles > 1 and s.repulsive and bool((p == p[:1]).all()):
            log.warning("bmtpt-source: all %d particles start equal (prompt.init_file holds one prompt?); "
                        "SVGD's repulsion is zero between equal particles, so they would stay equal. "
                        "Set svgd.init_noise (e.g. 0.01) to spread them.", bank.num_particles)

    def check_inputs(self, bank) -> None:
        s = self.cfg.svgd
        if s.likelihood_scale is None:
            # Σ_k N_k: the sampler mixes tasks in proportion to their sizes, so the mean over a
            # block of each example's summed token NLL times the total count estimates the
            # data's negative log-likelihood, -Σ_n log p(y_n | x_n).
            self.scale = float(sum(len(self.raw[n].train) for n in self.cfg.data.tasks))
        else:
            self.scale = float(s.likelihood_scale)
        self.last: dict[str, float] = {}

    def prepare(self) -> None:
        s = self.cfg.svgd
        prior = f"N(0, {s.prior_std}² I)" if s.prior_std else "none"
        self._info(f"SVGD: {self.cfg.prompt.particles} particles, likelihood scale {self.scale:g}"
                   f"{' (training examples)' if s.likelihood_scale is None else ''}, prior {prior}, "
                   f"bandwidth {'median heuristic' if s.bandwidth is None else s.bandwidth}, "
                   f"repulsive term {'on' if s.repulsive else 'off'}")

    def grad_hook(self):
        s = self.cfg.svgd

        def hook(theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            flat, g = theta.flatten(1), grad.flatten(1)
            log_prob_grad = -self.scale * g
            if s.prior_std:
                log_prob_grad = log_prob_grad - flat / s.prior_std ** 2
            terms = svgd.svgd_terms(flat, log_prob_grad, s.bandwidth, s.repulsive)
            m = flat.shape[0]
            self.last = {
                "svgd/bandwidth": terms.bandwidth,
                "svgd/mean_pairwise_distance": terms.mean_distance,
                # Per-particle RMS of the two parts of φ: their ratio is what the scale sets.
                "svgd/driving_norm": terms.driving.norm().item() / m ** 0.5,
                "svgd/repulsive_norm": terms.repulsive.norm().item() / m ** 0.5,
                "svgd/kernel_offdiag_mean": ((terms.kernel.sum() - terms.kernel.diagonal().sum())
                                             / max(1, m * (m - 1))).item(),
            }
            return (-terms.phi).view_as(grad)

        return hook

    def extra_scalars(self) -> dict[str, float]:
        return dict(self.last)

    def export_extras(self, tensors: dict) -> None:
        """The particles in TensorBoard's embedding projector: the posterior's spread at a glance."""
        parts = tensors["particles"]
        m, l, _ = parts.shape
        self.writer.add_embedding(parts.flatten(1), metadata=[f"particle {i}" for i in range(m)],
                                  tag="particles", global_step=self.step)
        self.writer.add_embedding(parts.flatten(0, 1), metadata=[[f"particle {i}", f"token {j}"]
                                                                 for i in range(m) for j in range(l)],
                                  metadata_header=["particle", "position"], tag="particle_tokens",
                                  global_step=self.step)


class Target(PromptTuning):
    def check_inputs(self, bank) -> None:
        pr = self.cfg.prior
        self.prior = None
        self.last: dict[str, float] = {}
        if pr.beta > 0:
            key = "prior.file" if pr.file else "prompt.init_file"
            # Without prior.file the prior comes from the init file, which setup has read already.
            tensors = load_prompts_file(pr.file, key=key) if pr.file else self.init_tensors
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

    def prepare(self) -> None:
        pr, bank = self.cfg.prior, self.engine.model.bank
        if self.prior is not None:
            self.prior = self.prior.to(self.engine.device)
            self._info(f"prior: {pr.kind} over {self.source_shape[0]} source particles, beta {pr.beta:g} "
                       f"(objective: target loss - beta * log p(S))")
        if bank.rank > 0:
            t = self.cfg.train
            self._info(f"factors: rank {bank.rank}, lr {t.factor_lr if t.factor_lr is not None else t.lr:g} "
                       f"(prompt lr {t.lr:g}); parameters per target task: "
                       f"{bank.length * bank.dim + (bank.length + bank.dim) * bank.rank:,}")

    def grad_hook(self):
        if self.prior is None:
            return None
        beta = self.cfg.prior.beta

        def hook(theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                x = theta.detach().requires_grad_(True)
                log_p = self.prior.log_prob(x)                  # [M]
                (d_log_p,) = torch.autograd.grad(log_p.sum(), x)
            # prior/grad_norm against prior/loss_grad_norm: how much of the step the prior steers.
            self.last = {"prior/log_prob": log_p.mean().item(),
                         "prior/term": (-beta * log_p).mean().item(),
                         "prior/grad_norm": (beta * d_log_p).norm().item(),
                         "prior/loss_grad_norm": grad.norm().item()}
            return grad - beta * d_log_p

        return hook

    def extra_scalars(self) -> dict[str, float]:
        return dict(self.last)
