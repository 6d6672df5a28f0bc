"""BMTPT with real processes: SVGD over particles placed on 1 and 2 CPU ranks (gloo, ZeRO-3),
the target stage with its prior, and the one-command pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jobs import ROOT, TRAIN, run_ds, step_zero_batch

pytestmark = pytest.mark.distributed

# fp32 so that runs on 1 and 2 ranks can be held to a tight tolerance.
SOURCE = ["stage=bmtpt-source", "model.dtype=fp32", "data.tasks=[sentiment,mood]", "prompt.length=8",
          "prompt.init=random", "prompt.init_std=0.5", "train.steps=12", "train.global_batch_size=16",
          "train.eval_every=0", "train.save_every=0", "train.log_every=4", "train.lr=0.1", "seed=5",
          "data.max_eval_examples=16"]


@pytest.fixture(scope="module")
def cache(tiny_backbone_path) -> Path:
    return Path(tiny_backbone_path).parent


def particles(run_dir: Path) -> torch.Tensor:
    return load_file(str(run_dir / "prompts.safetensors"))["particles"]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def shared_start(m: int, seed: int = 5, std: float = 0.5, spread: float = 0.1) -> torch.Tensor:
    """svgd.init=shared (the default) after prompt.init=random: particle 0 of the run's draw for
    every particle, plus noise (seed + 1) of std svgd.init_spread x that prompt's RMS coordinate."""
    first = (torch.randn(m, 8, 128, generator=torch.Generator().manual_seed(seed)) * std)[0]
    noise = torch.randn(m, 8, 128, generator=torch.Generator().manual_seed(seed + 1))
    return first + noise * (spread * first.pow(2).mean().sqrt())


def mean_pairwise_distance(x: torch.Tensor) -> float:
    m = x.shape[0]
    return sum((x[i] - x[j]).norm().item() for i in range(m) for j in range(i + 1, m)) / (m * (m - 1) / 2)


def test_svgd_on_one_and_two_ranks_gives_the_same_particles(cache, tmp_path):
    """(c) 4 particles: all on one rank, or 2 per rank partitioned by ZeRO-3. Same data, seeds
    and global batch: the same particles.

    fp32 with different accumulation (1 rank: micro-batches of 8 that span two particles;
    2 ranks: micro-batches of 2) agrees to float rounding, which Adam magnifies where a
    kernel sum nearly cancels: measured 0.5% of the distance moved (1 rank, micro 8 vs 4).
    bf16 with the same micro-batches on 1 and 2 ranks agrees to 1e-5."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_ds(1, TRAIN, f"output_dir={one}", *SOURCE, "prompt.particles=4", "train.micro_batch_size=8",
                  "train.log_every=1", cache=cache).returncode == 0
    proc = run_ds(2, TRAIN, f"output_dir={two}", *SOURCE, "prompt.particles=4", "train.micro_batch_size=2",
                  "train.log_every=1", cache=cache)
    assert proc.returncode == 0
    assert ("particles [4x8x128]: 4 examples per particle per step; rank 0 runs particle(s) [0, 1]; "
            "partitioned by ZeRO-3 (2,048 of 4,096 values on rank 0)") in proc.stdout
    p1, p2 = particles(one), particles(two)
    assert p1.shape == (4, 8, 128)
    # The default start, one shared draw plus noise: what SVGD saw at step 1 on both rank counts.
    start = shared_start(4)
    assert "SVGD start: 4 particles from one shared draw, noise 0.1 x their RMS coordinate" in proc.stdout
    for run in (one, two):
        assert scalars(run)["svgd/mean_pairwise_distance"][0] == pytest.approx(mean_pairwise_distance(start),
                                                                                rel=1e-5)
    assert (p2 - p1).norm() < 0.02 * (p1 - start).norm()
    # The particles moved, and the source tasks' loss fell.
    assert (p1 - start).norm() > 1.0
    logged = scalars(two)
    # The scale of -phi too (Adam alone would hide a wrong one): the gradient norm at step 1,
    # before Adam has magnified any rounding.
    assert logged["train/grad_norm"][0] == pytest.approx(scalars(one)["train/grad_norm"][0], rel=1e-4)
    assert logged["train/loss"][-1] < logged["train/loss"][0]
    assert {"svgd/bandwidth", "svgd/mean_pairwise_distance", "svgd/driving_norm", "svgd/repulsive_norm",
            "train/loss_particle_3", "train/loss_task/sentiment", "train/loss_task/mood"} <= set(logged)
    for tag in ("svgd/bandwidth", "svgd/driving_norm", "svgd/repulsive_norm", "svgd/mean_pairwise_distance"):
        assert all(v > 0 for v in logged[tag]), tag
    # The embedding projector holds the 4 particles (and their 4 x 8 token vectors).
    projector = next((two / "tb").glob("*/particles/tensors.tsv"))
    rows = projector.read_text().strip().splitlines()
    assert len(rows) == 4 and len(rows[0].split("\t")) == 8 * 128
    assert len(next((two / "tb").glob("*/particle_tokens/tensors.tsv")).read_text().strip().splitlines()) == 32
    # The replicated backbone (ds_configs/replicated_bf16.json, ZeRO-2: what bpt_ds.plan picks
    # when the weights fit on every GPU): the same first step as under ZeRO-3, and the same
    # particles up to the rounding of ZeRO-2's other reduction order (measured 0.6% of the
    # distance moved, like 1 against 2 ranks).
    replicated = tmp_path / "replicated"
    proc = run_ds(2, TRAIN, f"output_dir={replicated}", *SOURCE, "prompt.particles=4", "train.micro_batch_size=2",
                  "train.log_every=1", "deepspeed.config=ds_configs/replicated_bf16.json", cache=cache)
    assert proc.returncode == 0
    assert "stored whole on every rank" in proc.stdout
    assert scalars(replicated)["train/grad_norm"][0] == pytest.approx(logged["train/grad_norm"][0], rel=1e-6)
    assert (particles(replicated) - p2).norm() < 0.02 * (p2 - start).norm()
    # bf16 (ZeRO-3 keeps fp32 master copies; SVGD runs on those): 1 and 2 ranks agree too.
    bf16 = [*SOURCE, "prompt.particles=4", "model.dtype=bf16", "train.micro_batch_size=4"]
    assert run_ds(1, TRAIN, f"output_dir={tmp_path / 'bf16-one'}", *bf16, cache=cache).returncode == 0
    assert run_ds(2, TRAIN, f"output_dir={tmp_path / 'bf16-two'}", *bf16, cache=cache).returncode == 0
    b1, b2 = particles(tmp_path / "bf16-one"), particles(tmp_path / "bf16-two")
    assert torch.isfinite(b2).all() and (b2 - start).norm() > 1.0
    torch.testing.assert_close(b2, b1, rtol=0, atol=1e-5)


def test_two_particles_on_four_ranks_share_and_split_their_blocks(cache, tmp_path):
    """R a multiple of M: 2 particles on 4 ranks, two ranks per particle, each with half the
    particle's block of 8 examples. The same micro-batches as on one rank: the same particles."""
    args = [*SOURCE, "prompt.particles=2", "train.micro_batch_size=4", "train.log_every=1"]
    assert run_ds(1, TRAIN, f"output_dir={tmp_path / 'one'}", *args, cache=cache).returncode == 0
    four = run_ds(4, TRAIN, f"output_dir={tmp_path / 'four'}", *args, cache=cache)
    assert four.returncode == 0
    assert ("particles [2x8x128]: 8 examples per particle per step; rank 0 runs particle(s) [0]; "
            "partitioned by ZeRO-3 (512 of 2,048 values on rank 0)") in four.stdout
    torch.testing.assert_close(particles(tmp_path / "four"), particles(tmp_path / "one"), rtol=0, atol=1e-6)
    assert scalars(tmp_path / "four")["train/grad_norm"][0] == pytest.approx(
        scalars(tmp_path / "one")["train/grad_norm"][0], rel=1e-5)


def test_three_ranks_with_a_particle_tensor_that_does_not_divide_by_three(cache, tmp_path):
    """ZeRO-3 pads every rank's partition to ceil(D/R) values: one particle of 8 x 128 = 1,024 on 3
    ranks is 342 + 342 + 340 and 2 of padding. DeepSpeed 0.19.8's safe_set_full_grad cuts the
    unpadded full gradient at rank x 342, so rank 2 died writing its partition back ("start (684)
    + length (342) exceeds dimension size (1024)"). Every stage with a gradient hook writes
    through that path: SVGD (one particle, three ranks sharing its block), and the target's prior
    (a KDE over three source particles; with factors). One pipeline of both on 1 and on 3 ranks.

    Tolerance: fp32 and the same micro-batches of 2 on both; only the order in which the three
    micro-batches' gradients are summed differs (accumulation on one rank, reduction over three),
    rounding of ~1e-7 relative that Adam carries through three steps (measured: at most 1.1e-6,
    a few fp32 ulps of values up to 1.8, on particles that moved up to 0.2 per coordinate; a rank
    writing a wrong partition would be off by ~0.1 there)."""
    prior = tmp_path / "prior.safetensors"
    save_file({"particles": torch.randn(3, 8, 128, generator=torch.Generator().manual_seed(1)) * 0.5}, str(prior))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        "defaults:\n  seed: 5\n  model: {dtype: fp32}\n  prompt: {length: 8}\n"
        "  data: {max_eval_examples: 4, synthetic_train_examples: 200}\n"
        "  train: {steps: 3, global_batch_size: 6, micro_batch_size: 2, lr: 0.1, eval_every: 0, save_every: 0,"
        " log_every: 1}\n"
        "stages:\n"
        "  - {name: source, stage: bmtpt-source, prompt: {particles: 1, init: random}, data: {tasks: [sentiment, mood]}}\n"
        "  - name: target\n    stage: target\n"
        "    prompt: {init_file: \"{source}\", factors: {rank: 1}}\n"
        f"    prior: {{kind: kde, beta: 1.0, file: {prior}}}\n"
        "    data: {tasks: [polarity]}\n")
    runs = {}
    for ranks in (1, 3):
        out = tmp_path / f"ranks{ranks}"
        proc = run_ds(ranks, TRAIN, "--config", str(pipeline), f"output_dir={out}", cache=cache, port=29700)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ranks] = {stage: load_file(str(out / stage / "prompts.safetensors")) for stage in ("source", "target")}
    assert "partitioned by ZeRO-3 (342 of 1,024 values on rank 0)" in proc.stdout
    start = torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(5)) * 0.5
    one, three = runs[1], runs[3]
    assert (one["source"]["particles"] - start).norm() > 1.0  # SVGD moved it
    assert (one["target"]["particles"] - one["source"]["particles"]).norm() > 1.0
    for stage in ("source", "target"):
        assert set(three[stage]) == set(one[stage])
        for name in one[stage]:
            torch.testing.assert_close(three[stage][name], one[stage][name], rtol=0, atol=5e-6,
                                       msg=lambda m: f"{stage} {name}: {m}")
    assert scalars(tmp_path / "ranks3" / "target")["prior/grad_norm"][0] == pytest.approx(
        scalars(tmp_path / "ranks1" / "target")["prior/grad_norm"][0], rel=1e-5)


def test_without_repulsion_equal_particles_stay_equal_and_do_data_parallel_descent(cache, tmp_path):
    """(d) Two particles started equal, one per rank, repulsive term off, likelihood scale 1:
    K is all ones, so each particle moves along the mean of both ranks' gradients, which is
    plain data-parallel gradient descent on the whole global batch's likelihood (one particle
    shared by both ranks). Gradient clipping is off: it acts on the norm over all particles
    together."""
    start = tmp_path / "start.safetensors"
    save_file({"particles": torch.randn(1, 8, 128, generator=torch.Generator().manual_seed(0)) * 0.5}, str(start))
    common = [*SOURCE[1:], "prompt.init=file", f"prompt.init_file={start}", "train.max_grad_norm=0",
              "train.log_every=1"]
    svgd = tmp_path / "svgd"
    assert run_ds(2, TRAIN, f"output_dir={svgd}", "stage=bmtpt-source", *common, "prompt.particles=2",
                  "svgd.repulsive=false", "svgd.likelihood_scale=1", "svgd.init_spread=0", cache=cache,
                  port=29725).returncode == 0
    ps = particles(svgd)
    assert torch.equal(ps[0], ps[1])
    assert (ps[0] - load_file(str(start))["particles"][0]).norm() > 1.0
    # One particle shared by both ranks, each with half its block (R a multiple of M): the same.
    shared = tmp_path / "shared"
    assert run_ds(2, TRAIN, f"output_dir={shared}", "stage=bmtpt-source", *common, "prompt.particles=1",
                  "svgd.likelihood_scale=1", cache=cache, port=29726).returncode == 0
    torch.testing.assert_close(particles(shared)[0], ps[0], rtol=0, atol=2e-5)

    # Adam hides a wrong gradient scale, so check the scale itself: the gradient norm DeepSpeed
    # logs at step 1 against the gradient of the mean over the step's 16 examples of each
    # example's summed token NLL, computed here in one process without DeepSpeed. SVGD's -phi
    # has two rows, each that gradient. (Stage pt's per-token loss: tests/test_loss_runs.py.)
    reference = step_one_gradient_norm(load_file(str(start))["particles"], common, cache)
    norm = lambda run: scalars(run)["train/grad_norm"][0]  # noqa: E731
    assert norm(shared) == pytest.approx(reference, rel=1e-4)
    assert norm(svgd) == pytest.approx(2 ** 0.5 * reference, rel=1e-4)


def step_one_gradient_norm(start: torch.Tensor, overrides: list[str], cache: Path) -> float:
    from transformers import T5ForConditionalGeneration

    from bpt_ds.data.batching import collate
    from bpt_ds.model import PromptedT5
    from bpt_ds.prompts import PromptBank

    cfg, path, tokenizer, tasks, picks = step_zero_batch(overrides, cache)
    bank = PromptBank(1, cfg.prompt.length, 128)
    bank.init_rows(start)
    model = PromptedT5(T5ForConditionalGeneration.from_pretrained(path).requires_grad_(False), bank)
    rows, _, _ = model(**collate(tasks, picks, tokenizer.pad_token_id))
    rows.mean().backward()  # a row: an example's token NLL summed over its tokens
    return bank.particles.grad.norm().item()


def test_pipeline_source_then_target_with_prior_and_factors(cache, tmp_path):
    """configs/tiny_bmtpt_pipeline.yaml in one command, plus a second target without prior:
    the target starts at the particles' mean, trains factors, logs the prior, and the prior
    keeps the prompt nearer the source posterior than no prior does."""
    pipeline = tmp_path / "pipeline.yaml"
    text = (ROOT / "configs/tiny_bmtpt_pipeline.yaml").read_text()
    # A third stage: the same target without the prior, from the same source.
    text += ("  - name: noprior\n    stage: target\n    prompt: {init_file: \"{source}\", factors: {rank: 1}}\n"
             "    prior: {beta: 0.0}\n    data: {tasks: [polarity]}\n    train: {steps: 12, lr: 0.1, factor_lr: 0.01}\n")
    pipeline.write_text(text)
    out = tmp_path / "runs"
    args = ["--config", str(pipeline), f"output_dir={out}", "model.dtype=fp32", "train.steps=12",
            "train.eval_every=0", "train.save_every=0", "train.log_every=4", "source.data.synthetic_train_examples=400",
            "target.prior.kind=gaussian-diagonal", "target.prior.beta=60", "data.max_eval_examples=16"]
    proc = run_ds(1, TRAIN, *args, cache=cache)
    assert proc.returncode == 0
    assert "[bpt_ds] pipeline stage 2/3: target (target) -> " + str(out / "target") in proc.stdout
    # Natural units: beta 60 against polarity's 6,000 target tokens (2,000 labels of 2 or 4 tokens,
    # eos included) is a step gradient of 0.01 x grad log p, the weight this test used before.
    assert ("prior: gaussian-diagonal over 4 source particles, beta 60 against the 6,000 target tokens of the "
            "training set (objective: 6,000 x mean token loss - 60 x log p(S); the step's gradient: that of the mean "
            "loss - 0.01 x grad log p(S))") in proc.stdout
    assert "factors: rank 1, lr 0.01 (prompt lr 0.1); parameters per target task: 2,192" in proc.stdout
    # SVGD's likelihood scale defaults to the number of source training examples: 2 x 400.
    assert "likelihood scale 800 (training examples)" in proc.stdout
    source = particles(out / "source")
    target = load_file(str(out / "target" / "prompts.safetensors"))
    assert set(target) == {"particles", "factors.polarity.U", "factors.polarity.V"}
    config = (out / "target" / "config.yaml").read_text()
    assert f"init_file: {out / 'source'}" in config
    logged = scalars(out / "target")
    assert {"prior/log_prob", "prior/term", "prior/grad_norm", "prior/loss_grad_norm"} <= set(logged)
    mean = source.mean(0)
    with_prior = (target["particles"][0] - mean).norm()
    without = (particles(out / "noprior")[0] - mean).norm()
    assert with_prior < 0.8 * without
    assert json.loads((out / "target" / "metrics.json").read_text())["final"]["dev"]["polarity"]["examples"] == 16

    # The same command again: every stage finished with this config, so nothing runs.
    again = run_ds(1, TRAIN, *args, cache=cache)
    assert again.returncode == 0
    for i, name in enumerate(["source", "target", "noprior"]):
        assert f"stage {i + 1}/3: {name} " in again.stdout and "already finished" in again.stdout
    assert proc.stdout.count("[bpt_ds] loading backbone") == 3 and "loading backbone" not in again.stdout
    # A changed source runs again (resuming its checkpoint); the stages after it start fresh.
    changed = run_ds(1, TRAIN, *args, "source.train.steps=13", "target.train.steps=2", "noprior.train.steps=2",
                     cache=cache)
    assert changed.returncode == 0
    assert "resumed from step 12" in changed.stdout
    assert (f"pipeline stage 2/3: target (target) -> {out / 'target'} (fresh: stage 'source', whose output it "
            "reads, ran)") in changed.stdout
    assert "train.resume=never: earlier checkpoints moved to" in changed.stdout
    assert (out / "target" / "checkpoints" / "latest").read_text() == "step00000002"
    # A stage that finished with another config starts fresh; the stages before it are skipped.
    lr = run_ds(1, TRAIN, *args, "source.train.steps=13", "target.train.steps=2", "noprior.train.steps=2",
                "noprior.train.lr=0.05", cache=cache)
    assert lr.returncode == 0
    assert "stage 1/3: source (bmtpt-source) already finished" in lr.stdout
    assert "stage 2/3: target (target) already finished" in lr.stdout
    assert (f"pipeline stage 3/3: noprior (target) -> {out / 'noprior'} (fresh: its earlier finished run used "
            "another config or other inputs)") in lr.stdout
