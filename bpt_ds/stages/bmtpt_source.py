"""BMTPT's source stage (docs/algorithms.md §4): the posterior over the source prompt S by SVGD.

M particles of the base prompt S move along SVGD's direction for
    log p(θ | D) = log N(θ; 0, σ₀² I) [svgd.prior_std] - scale · L(θ; B) [svgd.likelihood_scale]
where L(θ; B) = (1/|B|) Σ_{(x,y) ∈ B} -log p(y | x; θ), each example's token NLL summed over
its target tokens, averaged over the particle's block B of the multitask global batch
(LossUnit.EXAMPLE; the other stages average over target tokens instead): with scale = N,
the number of training examples, scale · L estimates -Σ_n log p(y_n | x_n; θ), and a label of
4 tokens counts as fully as one of 2. Particles are placed over ranks (step.Placement, mode
SPLIT); DeepSpeed reduces every particle's gradient over the ranks, and the gradient transform,
after that reduction and before the optimizer, turns the full gradient matrix G into -φ on
every rank alike:
    φ = (K · ∇log p + repulsive) / M,  K, h from the full fp32 particles.
Since φ is linear in G, reducing G and then applying K equals summing every rank's K·G_r;
the repulsive and prior terms depend on θ alone and are added once, after the reduction.
The particles start in one basin (svgd.init=shared): one draw plus relative noise
(svgd.init_spread), so that their mean, the target's default start, is a prompt of that basin.
Evaluation scores the posterior predictive (on the tiny backbone the particles sit in
different modes and their mean prompt predicts poorly).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import svgd
from ..config import RunConfig, require_batch_per_particle
from ..step import LossUnit, PlacementMode
from .base import Stage, require


# svgd.init_spread when the particles start from one prompt and the config leaves it unset.
DEFAULT_SPREAD = 0.1


class SVGDDirection:
    """The gradient transform: G -> -φ, SVGD's direction for the particles θ (step.GradTransform)."""

    def __init__(self, scale: float, prior_std: Optional[float], bandwidth: Optional[float], repulsive: bool):
        self.scale, self.prior_std, self.bandwidth, self.repulsive = scale, prior_std, bandwidth, repulsive
        self.scalars: dict[str, float] = {}

    def __call__(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        flat, g = theta.flatten(1), grad.flatten(1)
        log_prob_grad = -self.scale * g
        if self.prior_std:
            log_prob_grad = log_prob_grad - flat / self.prior_std ** 2
        terms = svgd.svgd_terms(flat, log_prob_grad, self.bandwidth, self.repulsive)
        m = flat.shape[0]
        self.scalars = {
            "svgd/bandwidth": terms.bandwidth,
            "svgd/mean_pairwise_distance": terms.mean_distance,
            # Per-particle RMS of the two parts of φ: their ratio is what the scale sets.
            "svgd/driving_norm": terms.driving.norm().item() / m ** 0.5,
            "svgd/repulsive_norm": terms.repulsive.norm().item() / m ** 0.5,
            "svgd/kernel_offdiag_mean": ((terms.kernel.sum() - terms.kernel.diagonal().sum())
                                         / max(1, m * (m - 1))).item(),
        }
        return (-terms.phi).view_as(grad)


class BMTPTSource(Stage):
    name = "bmtpt-source"
    placement_mode = PlacementMode.SPLIT
    # G_m: the gradient of the mean over particle m's block of each example's summed token NLL.
    loss_unit = LossUnit.EXAMPLE

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        super().validate(cfg)
        t, p = cfg.train, cfg.prompt
        require_batch_per_particle(t.global_batch_size, p.particles)
        require(t.weight_decay == 0,
                f"stage 'bmtpt-source': train.weight_decay={t.weight_decay} would pull the particles toward 0 "
                "outside SVGD; set it to 0 and use svgd.prior_std for a Gaussian prior that SVGD accounts for")
        require(p.factors.rank == 0, "stage 'bmtpt-source' samples the base prompt S only: set prompt.factors.rank=0 "
                                     "(low-rank factors belong to the target stage)")

    def read_inputs(self, bank, train_examples: int, init_tensors,
                    train_tokens: int = 0) -> None:
        s = self.cfg.svgd
        # Σ_k N_k by default: the sampler mixes tasks in proportion to their sizes, so the mean over
        # a block of each example's summed token NLL times the total count estimates the data's
        # negative log-likelihood, -Σ_n log p(y_n | x_n).
        self.scale = float(train_examples if s.likelihood_scale is None else s.likelihood_scale)

    def init_bank(self, bank) -> list[str]:
        """svgd.init and svgd.init_spread: one shared start (or the file's) plus relative noise."""
        s, m = self.cfg.svgd, bank.num_particles
        with torch.no_grad():
            if s.init == "shared" and self.cfg.prompt.init != "file" and m > 1:
                bank.particles.copy_(bank.particles[:1].clone().expand(bank.shape))
            p = bank.particles.detach()
            equal = m > 1 and bool((p == p[:1]).all())
            spread = s.init_spread if s.init_spread is not None else (DEFAULT_SPREAD if equal else 0.0)
            self.start_rms = p.float().pow(2).mean().sqrt().item()
            self.start_spread = spread
            if spread > 0:
                gen = torch.Generator().manual_seed(self.cfg.seed + 1)
                bank.particles.add_(torch.randn(bank.shape, generator=gen) * (spread * self.start_rms))
        if equal and spread * self.start_rms == 0 and s.repulsive:
            why = "svgd.init_spread=0" if spread == 0 else "they are all zero (the noise is relative to their size)"
            fix = ("Set svgd.init_spread (e.g. 0.1) to spread them." if spread == 0 else
                   "Start them from prompt.init=vocab or random, or a non-zero prompt file.")
            return [f"bmtpt-source: all {m} particles start equal and {why}; SVGD's repulsion is zero between "
                    f"equal particles, so they would stay equal. {fix}"]
        return []

    def grad_transform(self, device) -> SVGDDirection:
        s = self.cfg.svgd
        return SVGDDirection(self.scale, s.prior_std, s.bandwidth, s.repulsive)

    def describe(self, bank) -> list[str]:
        s = self.cfg.svgd
        prior = f"N(0, {s.prior_std}² I)" if s.prior_std else "none"
        m = self.cfg.prompt.particles
        start = ("from the init file" if self.cfg.prompt.init == "file" else
                 "from one shared draw" if s.init == "shared" else "from independent draws")
        return [f"SVGD start: {m} particles {start}, noise {self.start_spread:g} x their RMS coordinate "
                f"{self.start_rms:.4g} (svgd.init, svgd.init_spread)",
                f"SVGD: {self.cfg.prompt.particles} particles, likelihood scale {self.scale:g}"
                f"{' (training examples)' if s.likelihood_scale is None else ''}, prior {prior}, "
                f"bandwidth {'median heuristic' if s.bandwidth is None else s.bandwidth}, "
                f"repulsive term {'on' if s.repulsive else 'off'}"]

    def embeddings(self, tensors: dict) -> list:
        """The particles in TensorBoard's embedding projector: the posterior's spread at a glance."""
        parts = tensors["particles"]
        m, length, _ = parts.shape
        return [(parts.flatten(1), [f"particle {i}" for i in range(m)], "particles", None),
                (parts.flatten(0, 1), [[f"particle {i}", f"token {j}"] for i in range(m) for j in range(length)],
                 "particle_tokens", ["particle", "position"])]
