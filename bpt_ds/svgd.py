"""SVGD (Liu & Wang 2016) math for BMTPT; the distributed parts build on it.

Plain torch only (no DeepSpeed, no transformers). Everything works on CPU and GPU tensors.

Particles are M prompts flattened to vectors θ_1..θ_M of length D. With the RBF kernel
K_ij = exp(-||θ_i - θ_j||² / h) the SVGD ascent direction is

    phi_i = (1/M) Σ_j [ K_ij ∇log p(θ_j) + (2/h) K_ij (θ_i - θ_j) ]

(the second term is Σ_j ∇_{θ_j} K_ij, the repulsion that keeps particles apart). An optimizer
that minimizes takes ``-phi`` as the gradient. Distances and matmuls run in float64 and the
results come back as float32; nothing allocates an M×M×D tensor (D can be ~1e6).

The module also holds the priors the target stage uses as log p̂ over a prompt, built from the
source-stage particles: a kernel density estimate (:class:`KDEPrior`) and a Gaussian fit
(:class:`GaussianPrior`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "pairwise_sq_dists", "median_bandwidth", "rbf_kernel", "SVGDTerms", "svgd_terms", "svgd_direction",
    "KDEPrior", "GaussianPrior", "make_prior", "PRIOR_KINDS", "mean_pairwise_distance",
]

PRIOR_KINDS = ("kde", "gaussian-isotropic", "gaussian-diagonal")


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, D]; got shape {tuple(x.shape)}")


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """Squared Euclidean distances ||x_i - x_j||² of the rows of ``x`` [M, D], as float64 [M, M].

    Uses the Gram matrix (memory M·M, never M·M·D), clamps rounding negatives at 0 and sets
    the diagonal to exact zeros.
    """
    _check_2d("x", x)
    x64 = x.detach().to(torch.float64)
    g = x64 @ x64.T
    diag = torch.diagonal(g)
    sq = (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min(0.0)
    sq.fill_diagonal_(0.0)
    return sq


def median_bandwidth(sq: Tensor) -> float:
    """The median heuristic h = median_{i≠j} sq_ij / log(M + 1) for squared distances ``sq`` [M, M].

    The median is the conventional one (mean of the two middle values for an even count, as
    ``numpy.median``), not ``torch.median``'s lower middle value. Taken over the upper
    triangle i < j (``sq`` is symmetric). Guards: M == 1, a zero median (identical particles)
    or a non-finite median give 1.0.
    """
    _check_2d("sq", sq)
    m = sq.shape[0]
    if m <= 1:
        return 1.0
    iu = torch.triu_indices(m, m, offset=1, device=sq.device)
    vals = torch.sort(sq[iu[0], iu[1]].to(torch.float64).flatten()).values
    n = vals.numel()
    if n % 2 == 1:
        med = vals[n // 2].item()
    else:
        med = 0.5 * (vals[n // 2 - 1].item() + vals[n // 2].item())
    if not math.isfinite(med) or med <= 0.0:
        return 1.0
    return med / math.log(m + 1)


def _check_bandwidth(bandwidth: float) -> float:
    try:
        h = float(bandwidth)
    except (TypeError, ValueError):
        h = float("nan")
    if not math.isfinite(h) or h <= 0.0:
        raise ValueError(f"svgd bandwidth must be a positive finite number; got {bandwidth!r}")
    return h


def _kernel64(particles: Tensor, bandwidth: Optional[float]) -> Tuple[Tensor, float, Tensor]:
    sq = pairwise_sq_dists(particles)
    h = median_bandwidth(sq) if bandwidth is None else _check_bandwidth(bandwidth)
    return torch.exp(-sq / h), h, sq


def rbf_kernel(particles: Tensor, bandwidth: Optional[float] = None) -> Tuple[Tensor, float]:
    """RBF kernel K_ij = exp(-||θ_i - θ_j||² / h) of ``particles`` [M, D] (any dtype).

    ``h`` is the median heuristic (:func:`median_bandwidth`) when ``bandwidth`` is None; a given
    bandwidth must be positive and finite. Returns (K as float32 [M, M] on the particles'
    device, h as a Python float).
    """
    k, h, _ = _kernel64(particles, bandwidth)
    return k.to(torch.float32), h


@dataclass
class SVGDTerms:
    """The pieces of one SVGD step; all tensors float32 on the particles' device."""

    phi: Tensor        # [M, D] ascent direction = driving + repulsive
    driving: Tensor    # [M, D] (1/M) K @ ∇log p
    repulsive: Tensor  # [M, D] (1/M)(2/h) Σ_j K_ij (θ_i - θ_j); zeros when repulsion is off
    kernel: Tensor     # [M, M]
    bandwidth: float
    mean_distance: float  # mean ||θ_i - θ_j|| over pairs i < j (0.0 for M = 1), from the same distances


def svgd_terms(particles: Tensor, log_prob_grads: Tensor, bandwidth: Optional[float] = None,
               repulsive: bool = True) -> SVGDTerms:
    """SVGD driving and repulsive terms for ``particles`` [M, D] with gradients ∇log p [M, D].

    phi_i = (1/M) Σ_j [K_ij ∇log p(θ_j) + (2/h) K_ij (θ_i - θ_j)]. With ``repulsive=False`` the
    repulsive field is zeros and phi equals the driving term. The repulsion is computed as
    θ_i Σ_j K_ij - (K θ)_i, so no M×M×D tensor is built. Inputs may be any dtype and are
    detached (no autograd through SVGD); the math runs in float64 and the results are float32.
    """
    if particles.dim() != 2 or log_prob_grads.dim() != 2 or particles.shape != log_prob_grads.shape:
        raise ValueError("svgd needs particles and log_prob_grads both 2-D [M, D] of the same shape; got "
                         f"particles {tuple(particles.shape)} and log_prob_grads {tuple(log_prob_grads.shape)}")
    m = particles.shape[0]
    k, h, sq = _kernel64(particles, bandwidth)
    theta = particles.detach().to(torch.float64)
    grads = log_prob_grads.detach().to(torch.float64)
    driving = (k @ grads) / m
    if repulsive:
        rep = (theta * k.sum(dim=1, keepdim=True) - k @ theta) * (2.0 / (h * m))
    else:
        rep = torch.zeros_like(theta)
    phi = driving + rep
    f32 = torch.float32
    return SVGDTerms(phi=phi.to(f32), driving=driving.to(f32), repulsive=rep.to(f32), kernel=k.to(f32),
                     bandwidth=h, mean_distance=_mean_pair_distance(sq))


def svgd_direction(particles: Tensor, log_prob_grads: Tensor, bandwidth: Optional[float] = None,
                   repulsive: bool = True) -> Tensor:
    """The SVGD ascent direction phi [M, D] (float32): phi_i = (1/M) Σ_j [K_ij ∇log p(θ_j) + (2/h) K_ij (θ_i - θ_j)]."""
    return svgd_terms(particles, log_prob_grads, bandwidth=bandwidth, repulsive=repulsive).phi


def mean_pairwise_distance(particles: Tensor) -> float:
    """Mean Euclidean distance ||θ_i - θ_j|| over pairs i < j of ``particles`` [M, D]; 0.0 for M = 1."""
    _check_2d("particles", particles)
    return _mean_pair_distance(pairwise_sq_dists(particles))


def _mean_pair_distance(sq: Tensor) -> float:
    m = sq.shape[0]
    if m <= 1:
        return 0.0
    iu = torch.triu_indices(m, m, offset=1, device=sq.device)
    return sq[iu[0], iu[1]].sqrt().mean().item()


# ---------------------------------------------------------------------------------------------
# Priors over a prompt built from source particles (the target stage's log p̂).
# ---------------------------------------------------------------------------------------------

def _flatten_particles(particles: Tensor) -> Tuple[Tensor, torch.Size]:
    if particles.dim() < 2:
        raise ValueError(f"prior particles must be [M, D] or [M, l, d]; got shape {tuple(particles.shape)}")
    if particles.shape[0] < 1 or particles[0].numel() < 1:
        raise ValueError(f"prior particles must be non-empty; got shape {tuple(particles.shape)}")
    event_shape = particles.shape[1:]
    return particles.detach().reshape(particles.shape[0], -1), event_shape


class _Prior(nn.Module):
    event_shape: torch.Size

    def _flatten_x(self, x: Tensor) -> Tuple[Tensor, bool]:
        """x shaped event_shape or [N, *event_shape] -> ([N, D] float32, whether x had a batch dim)."""
        k = len(self.event_shape)
        if x.dim() not in (k, k + 1) or tuple(x.shape[x.dim() - k:]) != tuple(self.event_shape):
            raise ValueError(f"prior log_prob expects x shaped {tuple(self.event_shape)} or "
                             f"[N, {', '.join(map(str, self.event_shape))}]; got {tuple(x.shape)}")
        batched = x.dim() == k + 1
        flat = x.to(torch.float32).reshape(-1 if batched else 1, self.dim)
        return flat, batched

    @property
    def dim(self) -> int:
        return int(math.prod(self.event_shape))


class KDEPrior(_Prior):
    """Kernel density estimate over the source particles with the SVGD RBF kernel.

    log p̂(x) = logsumexp_j(-||x - θ_j||² / h) - log M, with h the particles' median bandwidth
    when ``bandwidth`` is None. Unnormalized: the Gaussian normalizing constant
    -(D/2) log(π h) is dropped (it does not depend on x).
    """

    def __init__(self, particles: Tensor, bandwidth: Optional[float] = None):
        super().__init__()
        flat, self.event_shape = _flatten_particles(particles)
        if bandwidth is None:
            h = median_bandwidth(pairwise_sq_dists(flat))
        else:
            h = _check_bandwidth(bandwidth)
        self.bandwidth = h
        self.register_buffer("particles", flat.to(torch.float32))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p̂(x) for x shaped [D], [l, d], [N, D] or [N, l, d]: a scalar or [N], float32, differentiable in x.

        The squared distances are summed from the differences x_n - θ_j in float64, one particle
        at a time (autograd keeps M·N·D values; M and N are small): expanded as ||x||² - 2 x·θ + ||θ||², prompts far from the origin
        and close to the particles (T5 embeddings: coordinates ~10, D ~ 1e5) lose the distance to
        cancellation, and the gradient with it.
        """
        flat, batched = self._flatten_x(x)
        x64 = flat.to(torch.float64)
        theta = self.particles.to(torch.float64)
        sq = torch.stack([((x64 - t) ** 2).sum(dim=1) for t in theta], dim=1)  # [N, M]
        out = torch.logsumexp(-sq / self.bandwidth, dim=1) - math.log(theta.shape[0])
        out = out.to(torch.float32)
        return out if batched else out[0]


class GaussianPrior(_Prior):
    """Gaussian fit to the source particles: mean = particle mean, variance per ``kind``.

    ``"isotropic"``: one variance, the mean over dims of the per-dimension (biased, /M) variance;
    ``"diagonal"``: the per-dimension variance. Variances are clamped below at ``min_var`` (M = 1
    or identical particles). log p̂(x) = -0.5 Σ_d (x_d - μ_d)²/σ_d² - 0.5 Σ_d log(2π σ_d²),
    the normalized log density.
    """

    def __init__(self, particles: Tensor, kind: str = "isotropic", min_var: float = 1e-6):
        super().__init__()
        if kind not in ("isotropic", "diagonal"):
            raise ValueError(f"GaussianPrior kind must be 'isotropic' or 'diagonal'; got {kind!r}")
        if not (math.isfinite(min_var) and min_var > 0):
            raise ValueError(f"GaussianPrior min_var must be a positive finite number; got {min_var!r}")
        flat, self.event_shape = _flatten_particles(particles)
        self.kind = kind
        p64 = flat.to(torch.float64)
        mean = p64.mean(dim=0)
        var = ((p64 - mean) ** 2).mean(dim=0)
        if kind == "isotropic":
            var = var.mean().expand_as(mean).clone()
        var = var.clamp_min(min_var)
        self.register_buffer("mean", mean.to(torch.float32))
        self.register_buffer("var", var.to(torch.float32))
        self.register_buffer("log_norm", (-0.5 * torch.log(2 * math.pi * var).sum()).to(torch.float32))

    def log_prob(self, x: Tensor) -> Tensor:
        """log p̂(x) for x shaped [D], [l, d], [N, D] or [N, l, d]: a scalar or [N], float32, differentiable in x."""
        flat, batched = self._flatten_x(x)
        f32 = torch.float32  # the casts are no-ops unless the module was cast with .to(dtype)
        out = (-0.5 * ((flat - self.mean.to(f32)) ** 2 / self.var.to(f32)).sum(dim=1)
               + self.log_norm.to(f32))
        return out if batched else out[0]


def make_prior(kind: str, particles: Tensor, bandwidth: Optional[float] = None, min_var: float = 1e-6) -> nn.Module:
    """Build a prior of ``kind`` in {"kde", "gaussian-isotropic", "gaussian-diagonal"} from ``particles``.

    ``bandwidth`` applies to "kde" only (None: the median heuristic, which needs at least two
    particles); ``min_var`` to the Gaussian kinds, whose variances need at least two particles.
    """
    m = particles.shape[0] if particles.dim() >= 2 else 0
    if kind == "kde":
        if m < 2 and bandwidth is None:
            raise ValueError("a KDE prior over one particle has no spread to set its bandwidth from; "
                             "give prior.bandwidth, or use a source with several particles")
        return KDEPrior(particles, bandwidth=bandwidth)
    if kind in ("gaussian-isotropic", "gaussian-diagonal"):
        if m < 2:
            raise ValueError(f"a {kind} prior needs at least 2 source particles to fit a variance; the file "
                             f"has {m}: use prior.kind=kde with prior.bandwidth, or a source with more particles")
        return GaussianPrior(particles, kind=kind.split("-")[1], min_var=min_var)
    raise ValueError(f"unknown prior kind {kind!r}; expected one of {', '.join(repr(k) for k in PRIOR_KINDS)}")
