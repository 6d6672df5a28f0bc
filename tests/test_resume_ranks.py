"""A checkpoint resumes on another number of ranks (a job preempted on 4 nodes continues on 2):
the trainable state is saved in full besides DeepSpeed's per-rank files (trainable_state.pt)
and loaded into any partitioning: ZeRO-3, ZeRO-2 and ZeRO-1 (DeepSpeed's BF16_Optimizer), fp32
and bf16. Checked against the uninterrupted run.

The preemption: each case's uninterrupted run on the first rank count writes checkpoints at
steps 4 and 8; a copy of its directory without the step-8 checkpoint and the finished outputs
is what a job killed between the two saves leaves. The second rank count resumes it from step 4.

Tolerance: not bit for bit. The number of ranks changes the order in which a step's gradient is
summed (micro-batches per rank, then the all-reduce), so uninterrupted runs on the two rank
counts differ by rounding too, and Adam amplifies it where a gradient coordinate is near its
eps (not in the cases here, which stay within 1e-4; measured on another setup, 2 particles and
factors, 1 vs 3 ranks, lr 0.3, not a case here because of it: a single coordinate of 1,024 differs by
6.7e-4 after one step, its gradient being 2.2e-7 (the median is 7.2e-3) with 1.3e-8 of
summation rounding: update = lr·g/(|g| + 1e-8) moves by 0.3 × 0.0023. The resumed run must be
within twice that rank-count difference (and 1e-6) of the uninterrupted run on its final rank
count; the difference itself is bounded, so the tolerance cannot grow vacuous. The tiny
backbone has no dropout; with dropout the draws follow (seed, step, rank) and differ with the
rank count, as they would in any run on another number of ranks."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from jobs import ROOT, TRAIN, run_ds

COMMON = ["train.schedule=constant", "train.save_every=4", "train.eval_every=0", "train.log_every=1",
          "prompt.length=4", "data.max_eval_examples=8", "train.global_batch_size=12"]
PT: tuple[str, ...] = ()
# 5 x 128 = 640 values over 3 ranks: ZeRO-3 pads the last partition.
SVGD = ("stage=bmtpt-source", "prompt.particles=3", "data.tasks=[sentiment,mood]", "prompt.length=5")
# ZeRO-2: DeepSpeedZeroOptimizer's flat buffer of the particles, U (5 x 1) and V.
ZERO2 = ("deepspeed.config=ds_configs/replicated_bf16.json", "prompt.factors.rank=1", "prompt.length=5")
# bf16 under ZeRO-2 (2 particles, factors; zero_optimization.parameter_alignment on, so that U's
# 5 values are followed by a gap of 3 in the flat buffer) and ZeRO-1 (DeepSpeed's BF16_Optimizer,
# another flat layout), checked by the exact round trip. Their configs are written per session.
ZERO2_BF16 = ("deepspeed.config={zero2_aligned}", "prompt.factors.rank=1", "prompt.length=5", "model.dtype=bf16",
              "prompt.particles=2")
ZERO1_BF16 = ("deepspeed.config={zero1}", "model.dtype=bf16", "prompt.factors.rank=1", "prompt.length=5")
ZERO3_BF16 = ("model.dtype=bf16", "prompt.factors.rank=1", "prompt.length=5")
ROUNDTRIP = str(ROOT / "tests" / "dist" / "portable_roundtrip.py")


class Runs:
    """Uninterrupted 8-step runs, each trained once per session and shared by the cases."""

    def __init__(self, root, cache):
        self.root, self.cache, self.done, self.port = root, cache, {}, 29840
        self.configs = {}
        for name, change in (("zero1", {"stage": 1}), ("zero2_aligned", {"parameter_alignment": True})):
            config = json.loads((ROOT / "ds_configs" / "replicated_bf16.json").read_text())
            config["zero_optimization"].update(change)
            self.configs[name] = root / f"{name}.json"
            self.configs[name].write_text(json.dumps(config))

    def args(self, extra) -> list[str]:
        return [a.format(**self.configs) for a in extra]

    def launch(self, ranks: int, script: str, *args: str):
        self.port += 1
        proc = run_ds(ranks, script, *args, cache=self.cache, port=self.port)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    def train(self, ranks: int, out, steps: int, extra):
        return self.launch(ranks, TRAIN, f"output_dir={out}", f"train.steps={steps}", *COMMON, *self.args(extra))

    def whole(self, ranks: int, extra, steps: int = 8):
        key = (ranks, extra, steps)
        if key not in self.done:
            out = self.root / f"whole-{len(self.done)}-{ranks}"
            self.train(ranks, out, steps, extra)
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone_path):
    return Runs(tmp_path_factory.mktemp("resume_ranks"), tiny_backbone_path.parent)


def preempted_at_step_4(whole, dest):
    """What a job killed between its step-4 and step-8 checkpoints leaves in its output_dir."""
    shutil.copytree(whole, dest)
    shutil.rmtree(dest / "checkpoints" / "step00000008", ignore_errors=True)
    (dest / "checkpoints" / "latest").write_text("step00000004")
    for name in ("done.json", "metrics.json", "prompts.safetensors", "prompts_best.safetensors"):
        (dest / name).unlink(missing_ok=True)


@pytest.mark.distributed
@pytest.mark.parametrize("before, after, extra", [
    (2, 1, PT),
    (1, 4, PT),
    (1, 3, SVGD),
    (2, 3, ZERO2),
], ids=["zero3-2to1", "zero3-1to4", "zero3-svgd-1to3", "zero2-factors-2to3"])
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path, runs, before, after, extra):
    first, second = runs.whole(before, extra), runs.whole(after, extra)
    assert (first / "checkpoints" / "step00000004" / "trainable_state.pt").is_file()
    resumed = tmp_path / "resumed"
    preempted_at_step_4(first, resumed)
    proc = runs.train(after, resumed, 8, extra)
    assert (f"resumed from step 4 ({resumed / 'checkpoints' / 'step00000004'}; written by {before} rank(s), loaded "
            "from its rank-independent state)") in proc.stdout
    a, b, c = (load_file(str(d / "prompts.safetensors")) for d in (second, resumed, first))
    assert a.keys() == b.keys()
    for key in a:
        rounding = (a[key] - c[key]).abs().max().item()  # what the rank count alone changes
        assert rounding < 1e-4, key  # measured: up to 1.0e-5 in these cases
        assert (b[key] - a[key]).abs().max().item() <= max(1e-6, 2 * rounding), key


@pytest.mark.distributed
@pytest.mark.parametrize("before, after, extra, optimizer, prompt_dtype", [
    (2, 3, ZERO2_BF16, "DeepSpeedZeroOptimizer", "torch.bfloat16"),
    (3, 2, ZERO1_BF16, "BF16_Optimizer", "torch.bfloat16"),
    # ZeRO-3 partitions the prompt bank in the dtype it was built in (fp32; the backbone is bf16).
    (2, 3, ZERO3_BF16, "DeepSpeedZeroOptimizer_Stage3", "torch.float32"),
], ids=["zero2-bf16-2to3", "zero1-bf16-3to2", "zero3-bf16-2to3"])
def test_in_bf16_the_state_loaded_on_another_rank_count_is_exactly_the_saved_one(tmp_path, runs, before, after,
                                                                                 extra, optimizer, prompt_dtype):
    """In bf16 the trajectories on two rank counts part at once (a gradient coordinate near 0
    rounds to the other sign in bf16 and Adam makes that a whole step of lr), so the check is the
    round trip: loaded on the other rank count and gathered back before any step, every value,
    moment, scalar and the schedule is bit for bit the saved one, and the bf16 model copy is the
    saved fp32 value cast. The saved values are those DeepSpeed's own gather gave the writing
    run's prompts file (the flat buffer cut at the right offsets), and training goes on to step 8."""
    first = runs.whole(before, extra, steps=4)
    resumed = tmp_path / "resumed"
    preempted_at_step_4(first, resumed)
    result = tmp_path / "roundtrip.json"
    proc = runs.launch(after, ROUNDTRIP, str(result), str(first / "prompts.safetensors"), f"output_dir={resumed}",
                       "train.steps=8", *COMMON, *runs.args(extra))
    assert "(bf16, frozen)" in proc.stdout  # the backbone
    got = json.loads(result.read_text())
    assert (got["written_by"], got["optimizer_type"], got["model_dtype"], got["step"]) == (
        before, optimizer, prompt_dtype, 4)
    assert got["keys_again"] == got["keys_saved"] and any(k.startswith("factor_u/") for k in got["keys_saved"])
    assert set(got["max_abs_diff"].values()) == {0.0}, got["max_abs_diff"]
    assert got["scalars_equal"] and got["scheduler_equal"]
    assert set(got["low_precision_copy_mismatches"].values()) == {0}
    assert set(got["saved_vs_reference"].values()) == {0.0} and len(got["saved_vs_reference"]) == 3
    assert set(got["loaded_vs_deepspeed"].values()) == {0.0}
    # and it trains on from there
    assert "resumed from step 4" in proc.stdout and (resumed / "checkpoints" / "step00000008").is_dir()
