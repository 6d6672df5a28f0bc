"""train.optimizer: AdamW, plain SGD and the step of Liu & Wang's reference SVGD code, against a
direct numpy transcription of that code's loop, and in real runs on 1, 2 and 3 ranks under ZeRO-3
(their state in checkpoints: a resumed run matches an uninterrupted one)."""
from __future__ import annotations

import shutil

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bpt_ds.deepspeed_setup import SkippableSGD, SVGDAdagrad
from bpt_ds.errors import ConfigError
from bpt_ds.runs import load_config
from bpt_ds.svgd import svgd_direction
from jobs import TRAIN, run_ds


def liu_wang_svgd(x0: np.ndarray, dlnprob, n_iter: int, stepsize: float, alpha: float = 0.9,
                  fudge_factor: float = 1e-6) -> np.ndarray:
    """The update loop of Liu & Wang's reference implementation (SVGD, NeurIPS 2016), written out
    in numpy: median-heuristic RBF kernel, AdaGrad with an exponential average."""
    theta = x0.copy()
    historical_grad = 0.0
    for it in range(n_iter):
        lnpgrad = dlnprob(theta)
        sq = ((theta[:, None, :] - theta[None, :, :]) ** 2).sum(-1)
        h = np.median(sq[np.triu_indices(len(theta), 1)]) / np.log(len(theta) + 1)
        kxy = np.exp(-sq / h)
        dxkxy = (2.0 / h) * (theta * kxy.sum(1, keepdims=True) - kxy @ theta)
        grad_theta = (kxy @ lnpgrad + dxkxy) / len(theta)
        historical_grad = grad_theta ** 2 if it == 0 else alpha * historical_grad + (1 - alpha) * grad_theta ** 2
        theta = theta + stepsize * grad_theta / (fudge_factor + np.sqrt(historical_grad))
    return theta


def test_svgd_adagrad_is_the_reference_codes_step():
    """SVGD on a 2-D Gaussian for 50 iterations: our direction (float32), fed as -φ to SVGDAdagrad,
    against the reference loop in float64. The kernel is the reference code's (exp(-d² / h) with
    h = median / log(M + 1)) except that the median is over distinct pairs, as in
    svgd.median_bandwidth; the reference code's own median includes the zero diagonal."""
    mu, prec = np.array([1.0, -2.0]), np.array([[2.0, 0.6], [0.6, 1.0]])
    x0 = np.random.default_rng(0).normal(size=(12, 2)) * 2.0
    ref = liu_wang_svgd(x0, lambda t: -(t - mu) @ prec, n_iter=50, stepsize=0.05)

    theta = torch.nn.Parameter(torch.tensor(x0))
    opt = SVGDAdagrad([theta], lr=0.05)
    mu_t, prec_t = torch.tensor(mu), torch.tensor(prec)
    for _ in range(50):
        phi = svgd_direction(theta.detach(), -(theta.detach() - mu_t) @ prec_t)
        theta.grad = -phi.double()
        opt.step()
    np.testing.assert_allclose(theta.detach().numpy(), ref, rtol=1e-4, atol=1e-5)
    assert np.abs(ref - x0).max() > 0.5  # the particles moved


def test_a_skipped_step_moves_neither_the_values_nor_the_optimizer_state():
    for make in (lambda p: SVGDAdagrad([p], lr=0.1), lambda p: SkippableSGD([p], lr=0.1)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = make(p)
        p.grad = torch.tensor([1.0, -2.0, 0.5])
        opt.step()
        after_one, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
        opt.skip = True
        p.grad = torch.tensor([9.0, 9.0, 9.0])
        opt.step()
        assert torch.equal(p.detach(), after_one)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


@pytest.mark.parametrize("overrides, message", [
    (["train.optimizer=sgd", "train.weight_decay=0.01"],
     "train.weight_decay=0.01 is AdamW's decoupled decay; train.optimizer=sgd has none: set train.weight_decay=0"),
    (["train.optimizer=svgd-adagrad", "train.fused_adamw=true"],
     "train.fused_adamw applies to train.optimizer=adamw; this run uses svgd-adagrad: set train.fused_adamw=false"),
])
def test_options_of_another_optimizer_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


SOURCE = ["stage=bmtpt-source", "model.dtype=fp32", "data.tasks=[sentiment,mood]", "prompt.length=8",
          "prompt.particles=3", "prompt.init=random", "train.global_batch_size=12", "train.micro_batch_size=2",
          "train.schedule=constant", "train.max_grad_norm=0", "train.eval_every=0", "train.log_every=1",
          "train.lr=0.01", "seed=3", "data.max_eval_examples=4", "data.synthetic_train_examples=200"]


@pytest.mark.distributed
def test_svgd_adagrad_and_sgd_in_real_runs_on_one_two_and_three_ranks_and_across_a_resume(tiny_backbone_path,
                                                                                          tmp_path):
    """3 particles under ZeRO-3. svgd-adagrad's first step is lr · g / (1e-6 + |g|): every
    coordinate moves by lr (up to the fudge); sgd's first step (on 3 ranks) is lr · g, its norm
    lr x the logged gradient norm. 1 and 3 ranks agree, and a run stopped at step 3 and resumed
    (the optimizer's average in the checkpoint) ends where 6 uninterrupted steps do, on 1 rank
    and moved to 3. (3 particles do not fit 2 ranks.)"""
    cache = Path(tiny_backbone_path).parent
    start = (torch.randn(3, 8, 128, generator=torch.Generator().manual_seed(3)) * 0.5)[0]
    start = start + torch.randn(3, 8, 128, generator=torch.Generator().manual_seed(4)) * (
        0.1 * start.pow(2).mean().sqrt())

    def run(name, ranks, *extra, port):
        out = tmp_path / name
        assert run_ds(ranks, TRAIN, f"output_dir={out}", *SOURCE, *extra, cache=cache, port=port).returncode == 0
        return out

    one_step = run("adagrad-1", 1, "train.optimizer=svgd-adagrad", "train.steps=1", "train.save_every=0", port=29731)
    moved = (load_file(str(one_step / "prompts.safetensors"))["particles"] - start).abs()
    assert moved.min() > 0.0099 and moved.max() < 0.0101
    sgd = run("sgd-1", 3, "train.optimizer=sgd", "train.steps=1", "train.save_every=0", port=29732)
    from test_bmtpt import scalars
    step = (load_file(str(sgd / "prompts.safetensors"))["particles"] - start).norm().item()
    assert step == pytest.approx(0.01 * scalars(sgd)["train/grad_norm"][0], rel=1e-4)

    whole = run("whole", 1, "train.optimizer=svgd-adagrad", "train.steps=6", "train.save_every=0", port=29733)
    three = run("three", 3, "train.optimizer=svgd-adagrad", "train.steps=6", "train.save_every=0", port=29734)
    resumed = run("resumed", 1, "train.optimizer=svgd-adagrad", "train.steps=3", "train.save_every=3", port=29735)
    run("resumed", 1, "train.optimizer=svgd-adagrad", "train.steps=6", "train.save_every=3", port=29736)
    # The same 3-step checkpoint of 1 rank continued on 3 (its rank-independent state: the average h).
    moved = tmp_path / "moved"
    shutil.copytree(resumed / "checkpoints", moved / "checkpoints", ignore=shutil.ignore_patterns("step00000006"))
    (moved / "checkpoints" / "latest").write_text("step00000003")
    run("moved", 3, "train.optimizer=svgd-adagrad", "train.steps=6", "train.save_every=3", port=29737)
    final = {r: load_file(str(r / "prompts.safetensors"))["particles"] for r in (whole, three, resumed, moved)}
    assert torch.equal(final[resumed], final[whole])
    torch.testing.assert_close(final[three], final[whole], rtol=0, atol=1e-5)
    torch.testing.assert_close(final[moved], final[three], rtol=0, atol=1e-5)
    assert (final[whole] - start).abs().mean() > 0.03
