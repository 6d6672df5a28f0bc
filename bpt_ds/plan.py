"""Memory planner: will a prompt-tuning run of a frozen T5 fit, and with which DeepSpeed setup?

    python -m bpt_ds.plan --model t5-v1_1-xl --gpus 8 --nodes 2 --gpu-mem 80 --batch 8 --seq 256 \\
        --particles 4 [--write ds_config.plan.json]

prints the per-GPU memory of each way to hold the frozen backbone, with and without
activation checkpointing, picks the fastest that fits and, with --write, writes its DeepSpeed config. The
trainer calls `check_run` at start-up and refuses a run that this estimate says cannot fit.

What is counted, per GPU (bytes; N_f frozen backbone weights, N_t trainable values, G GPUs,
L the largest layer's parameter count, as DeepSpeed counts them):

- model states, DeepSpeed's own accounting (`estimate_zero3_model_states_mem_needs_all_cold`,
  `estimate_zero2_model_states_mem_needs`) with the frozen weights costing their dtype's bytes
  only (no gradient, no fp32 master copy, no optimizer moments):
    replicated (ZeRO-2, only the trainable state sharded): w·N_f + 2·N_t + 18·N_t / G
    ZeRO-3:                                               A + (w·N_f + 18·N_t) / G
    ZeRO-3, parameters (and optimizer) offloaded to CPU:  A
  With N_f = 0 (everything trainable) and A = 4·L these are DeepSpeed's formulas exactly
  (tested). A, the parameters gathered at once, is max(4·L, w·min(N, live + 2·prefetch)) with
  the DeepSpeed config's stage3_max_live_parameters and stage3_prefetch_bucket_size
  (`zero3_gathered_params`): from the second step DeepSpeed keeps up to that many gathered
  from the forward pass to the backward pass, which for T5 up to XL under the default 1e9 is
  the whole backbone (measured, bench/RESULTS.md).
- activations of one micro-batch kept for the backward pass to the prompt (no weight
  gradients are formed, but the backward pass still runs through every layer); see
  `activation_bytes` for the per-layer terms. Activation checkpointing keeps each block's
  input and recomputes one block at a time.
- a fixed reserve (CUDA context, NCCL buffers, allocator slack) and a relative margin.

It is an estimate, on the safe side: against the tensors autograd keeps for transformers' T5
(eager attention, tests/test_plan.py) it is 1.0 to 1.6 times the measured bytes. With SDPA
(the default) the per-block score matrices are not counted, as its GPU kernels do not keep
them; on CPU, where T5's position bias sends SDPA to its math kernel, they are kept.

Over 400 lines on purpose: one memory model (the formulas above, the presets, the check the
trainer runs and the command that prints it) that its tests check as a whole.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from .errors import ConfigError

GiB = 1024 ** 3
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class PlanError(ValueError):
    pass


# ---------------------------------------------------------------------- dims


@dataclass(frozen=True)
class T5Dims:
    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int = 32128
    gated: bool = True        # v1.1 / flan: gated GELU FFN (wi_0, wi_1); original T5: ReLU (wi)
    tied: bool = False        # original T5 ties lm_head to the input embedding
    num_buckets: int = 32     # relative position buckets (one table per stack)

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv


def _v11(d, f, h, n):
    return T5Dims(d_model=d, d_ff=f, d_kv=64, num_heads=h, num_layers=n, num_decoder_layers=n)


def _orig(d, f, kv, h, n):
    return T5Dims(d_model=d, d_ff=f, d_kv=kv, num_heads=h, num_layers=n, num_decoder_layers=n,
                  gated=False, tied=True)


# Published configurations (config.json of google/t5-v1_1-*, google/flan-t5-*, t5-*).
_V11 = {"small": _v11(512, 1024, 6, 8), "base": _v11(768, 2048, 12, 12), "large": _v11(1024, 2816, 16, 24),
        "xl": _v11(2048, 5120, 32, 24), "xxl": _v11(4096, 10240, 64, 24)}
PRESETS: dict[str, T5Dims] = {
    **{f"t5-v1_1-{k}": v for k, v in _V11.items()},
    **{f"flan-t5-{k}": v for k, v in _V11.items()},
    "t5-small": _orig(512, 2048, 64, 8, 6), "t5-base": _orig(768, 3072, 64, 12, 12),
    "t5-large": _orig(1024, 4096, 64, 16, 24), "t5-3b": _orig(1024, 16384, 128, 32, 24),
    "t5-11b": _orig(1024, 65536, 128, 128, 24),
}
_SPEC_KEYS = {"d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "vocab_size",
              "gated", "tied"}


def dims_from_config(config) -> T5Dims:
    """From a transformers T5Config."""
    return T5Dims(d_model=config.d_model, d_ff=config.d_ff, d_kv=config.d_kv, num_heads=config.num_heads,
                  num_layers=config.num_layers,
                  num_decoder_layers=config.num_decoder_layers or config.num_layers,
                  vocab_size=config.vocab_size, gated=bool(getattr(config, "is_gated_act", False)),
                  tied=_tied(config),
                  num_buckets=config.relative_attention_num_buckets)


def _tied(config) -> bool:
    """Whether the checkpoint's lm_head is the input embedding. transformers 5.x always ties
    them on load and keeps the saved `tie_word_embeddings` as `scale_decoder_outputs` (False
    for v1.1 / flan); bpt_ds restores such a checkpoint's own lm_head (backbone.py), so it
    costs memory of its own."""
    if hasattr(config, "scale_decoder_outputs"):
        return bool(config.scale_decoder_outputs)
    return bool(config.tie_word_embeddings)


def resolve_dims(model: str) -> T5Dims:
    """A preset name (also as google/<name>), "d_model=..,d_ff=..,..." (missing keys from
    t5-v1_1-base), or a local directory / hub name whose config.json is read."""
    base = model.split("/")[-1]
    if base in PRESETS:
        return PRESETS[base]
    if "=" in model:
        values = {}
        for part in model.split(","):
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in _SPEC_KEYS:
                raise PlanError(f"--model: unknown T5 dimension '{key}'; use {', '.join(sorted(_SPEC_KEYS))}")
            try:
                values[key] = value.strip().lower() in ("1", "true") if key in ("gated", "tied") else int(value)
            except ValueError:
                raise PlanError(f"--model: {key} must be an integer; got {value!r}") from None
        if "num_layers" in values and "num_decoder_layers" not in values:
            values["num_decoder_layers"] = values["num_layers"]
        return replace(PRESETS["t5-v1_1-base"], **values)
    from transformers import AutoConfig

    try:
        return dims_from_config(AutoConfig.from_pretrained(model))
    except (OSError, ValueError) as e:
        raise PlanError(f"--model: '{model}' is neither a preset ({', '.join(PRESETS)}), nor T5 dimensions "
                        f"(d_model=2048,d_ff=5120,...), nor a model directory with a config.json: {e}") from None


def param_counts(d: T5Dims) -> tuple[int, int]:
    """(total parameters, largest single module's parameters), counted as DeepSpeed's
    `model_to_params` counts a T5ForConditionalGeneration (shared weights once)."""
    attn = 4 * d.d_model * d.inner
    ffn = (3 if d.gated else 2) * d.d_model * d.d_ff
    norm = d.d_model
    bias = d.num_buckets * d.num_heads  # relative_attention_bias, first block of each stack
    encoder = d.num_layers * (attn + ffn + 2 * norm) + bias + norm
    decoder = d.num_decoder_layers * (2 * attn + ffn + 3 * norm) + bias + norm
    embedding = d.vocab_size * d.d_model
    total = embedding * (1 if d.tied else 2) + encoder + decoder
    largest = max(embedding, d.d_model * d.d_ff, d.d_model * d.inner)
    return total, largest


def train_step_flops(d: T5Dims, rows: list[tuple[int, int]]) -> float:
    """Model FLOPs of one training step of prompt tuning a frozen T5 on `rows` of (encoder tokens,
    prompt included; decoder tokens), PaLM's MFU convention for a frozen backbone:
    - the weights' matmuls, 2 FLOPs per weight per token they apply to (the cross-attention's
      keys and values to the encoder's tokens, everything else of the decoder and lm_head to the
      decoder's), forward, and again backward for the activation gradients only (the weights
      are frozen), except the first decoder layer's self-attention and cross-attention query,
      whose inputs need no gradient (tests/test_plan.py checks this part against
      torch.utils.flop_counter on a real T5);
    - attention's scores and mixing, 4 · inner · query length · key length per attention layer
      forward, twice that backward (both operands are activations).
    Embedding lookups, norms and softmax are not counted."""
    return weight_flops(d, rows) + attention_flops(d, rows)


def weight_flops(d: T5Dims, rows: list[tuple[int, int]]) -> float:
    """train_step_flops' matmuls with the weights, forward and backward."""
    proj = d.d_model * d.inner                       # one of q, k, v, o
    ffn = (3 if d.gated else 2) * d.d_model * d.d_ff
    total = 0.0
    for e, t in rows:
        forward = 2 * (d.num_layers * (4 * proj + ffn) * e
                       + d.num_decoder_layers * ((6 * proj + ffn) * t + 2 * proj * e) + d.vocab_size * d.d_model * t)
        total += 2 * forward - (2 * 5 * proj * t if d.num_decoder_layers else 0)
    return total


def attention_flops(d: T5Dims, rows: list[tuple[int, int]]) -> float:
    """train_step_flops' attention scores and mixing, forward and backward."""
    return sum(3 * 4 * d.inner * (d.num_layers * e * e + d.num_decoder_layers * (t * t + t * e)) for e, t in rows)


# Dense bf16 peak FLOP/s of one accelerator, by a substring of its name (torch.cuda.get_device_name),
# for MFU, the more specific names first (NVIDIA's data sheets; "H100" alone is the SXM part); an
# accelerator not listed (V100: no bf16) gets model FLOP/s only.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
                   "L40S": 362e12, "A10G": 70e12}


def peak_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of an accelerator named device_name, or None when unknown."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


# ------------------------------------------------------------- model states


def model_states(total_params: int, largest_layer_params: int, trainable_params: int, *,
                 num_gpus_per_node: int = 1, num_nodes: int = 1, zero: int = 3,
                 offload_param: bool = False, offload_optimizer: bool = False,
                 weight_bytes: int = 2, additional_buffer_factor: float = 1.5,
                 gathered_params: Optional[int] = None) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes per GPU) for parameters, gradients and optimizer state.

    `trainable_params` of the `total_params` train (2-byte weights, 18 bytes of ZeRO state as
    DeepSpeed counts them); the rest are frozen and cost `weight_bytes` each. With every
    parameter trainable this is DeepSpeed's estimator (zero=3: the `all_cold` one; zero=2:
    `estimate_zero2_model_states_mem_needs`), line for line.

    ZeRO-3's working set of gathered parameters is DeepSpeed's 4·L (the largest layer) there.
    `gathered_params` (see `zero3_gathered_params`) replaces it by what DeepSpeed really keeps
    gathered during a step, `weight_bytes` each, when that is more.
    """
    frozen = total_params - trainable_params
    gpus = num_gpus_per_node * num_nodes
    buffer = additional_buffer_factor
    if zero == 3:
        layer = 4 * largest_layer_params
        if gathered_params is not None:
            layer = max(layer, weight_bytes * min(total_params, gathered_params))
        if offload_optimizer and offload_param:
            gpu = layer
            cpu = (weight_bytes * frozen + 18 * trainable_params) / num_nodes * buffer
        elif offload_optimizer:
            gpu = layer + int((weight_bytes * frozen + 2 * trainable_params) / gpus)
            cpu = 16 * trainable_params / num_nodes * buffer
        elif offload_param:
            raise PlanError("ZeRO-3 parameter offload without optimizer offload is not a case DeepSpeed "
                            "estimates; offload both")
        else:
            gpu = layer + int((weight_bytes * frozen + 18 * trainable_params) / gpus)
            # zero.Init: each process materializes one layer at a time while loading.
            cpu = largest_layer_params * 4 * num_gpus_per_node * buffer
        return int(cpu), int(gpu)
    if zero in (0, 1, 2):
        if offload_param:
            raise PlanError("parameter offload needs ZeRO-3")
        if offload_optimizer:
            gpu = weight_bytes * frozen + 2 * trainable_params
            cpu = trainable_params * max(4 * gpus, 16) * buffer
        else:
            gpu = weight_bytes * frozen + 2 * trainable_params + int(18 * trainable_params / gpus)
            cpu = (weight_bytes * frozen + 4 * trainable_params) * num_gpus_per_node * buffer
        return int(cpu), int(gpu)
    raise PlanError(f"unknown ZeRO stage {zero}")


ZERO3_DEFAULTS = {"stage3_max_live_parameters": 10 ** 9, "stage3_prefetch_bucket_size": 5 * 10 ** 7}


def zero3_gathered_params(zero_optimization: dict) -> int:
    """Parameters (values) DeepSpeed ZeRO-3 keeps gathered on a rank during a step, from its
    `zero_optimization` section: max_live_parameters + 2 x prefetch_bucket_size.

    From the second step on (the first records the module trace) every module fetch prefetches
    up to prefetch_bucket_size more values while fewer than max_live_parameters are gathered;
    the prefetcher's scan then reaches each prefetched weight's use in the backward pass, and
    DeepSpeed does not release a weight before a use it has scanned. So a frozen backbone of
    fewer than max_live_parameters values (the default 1e9) stays gathered whole from the
    forward pass to its backward use (measured: all of a small T5, tests/test_large.py; 220M of
    t5-v1_1-base's 248M, bench/RESULTS.md), and of a larger one (T5-XL: 2.85B) this assumes
    max_live_parameters plus the prefetch in flight. A max_live_parameters far below the
    backbone does not bound it: with 40,000 on a 302,208-value T5, 281,344 stayed gathered;
    this estimate is only as good as the shipped configs' 1e9.
    """
    def value(key: str) -> int:
        v = zero_optimization.get(key, ZERO3_DEFAULTS[key])
        return ZERO3_DEFAULTS[key] if v in (None, "auto") else int(v)

    return value("stage3_max_live_parameters") + 2 * value("stage3_prefetch_bucket_size")


# -------------------------------------------------------------- activations


def activation_bytes(d: T5Dims, rows: int, source_len: int, target_len: int, *,
                     checkpointing: bool, act_bytes: int = 2, dropout: bool = True,
                     attention: str = "sdpa") -> int:
    """Activation memory of one micro-batch of `rows` encoder rows (prompt included in
    `source_len` S; T target tokens) kept for the backward pass to the prompt, plus the
    working set of the backward pass. w = bytes per activation, i = heads x d_kv, f = d_ff.

    Per encoder block, per token: w·(d + i) for the norm, attention and residual tensors that
    are not shared with others; the FFN w·6f (gated GELU: transformers' tanh GELU keeps several
    f-sized intermediates) or w·f (ReLU); attention w·2·h·S for scores and probabilities
    (eager) or an fp32 log-sum-exp per head (SDPA, transformers' default for T5; the position
    bias h·S² is then counted once per stack); dropout: a byte of mask plus the dropped copy,
    (w + 1) per element of the attention probabilities (eager), of two residual branches (2d)
    and of the FFN hidden (f). Per decoder block, per target token: self- and cross-attention
    w·2(d + i), the FFN, scores w·2·h·(T + S) (eager), dropout (w + 1)·(h·(T + S) + 4d + f); per
    row the encoder output's keys and values, w·2i·S. The loss keeps the logits plus an fp32
    copy and its log-softmax: (w + 8)·T·V per row. Backward needs one block's worth on top.
    Checkpointing keeps each block's input and recomputes one block at a time (two blocks'
    worth: recomputed activations and their gradients). The coefficients are fitted to the
    tensors autograd keeps for transformers' T5 (tests/test_plan.py checks 1.0 to 1.6 times
    what it keeps).
    """
    if attention not in ("sdpa", "eager"):
        raise PlanError(f"attention must be sdpa or eager; got {attention!r}")
    S, T, dm, f, i, h, V = source_len, target_len, d.d_model, d.d_ff, d.inner, d.num_heads, d.vocab_size
    w = act_bytes
    ffn = (6 if d.gated else 1) * f
    keep = (w + 1) if dropout else 0
    if attention == "eager":
        enc_attn = (2 * w + keep) * h * S * S
        dec_attn = (2 * w + keep) * h * (T * T + T * S)
        bias = 0
    else:
        enc_attn, dec_attn = 4 * h * S, 4 * h * 2 * T
        bias = w * h * (S * S + T * T)
    enc_block = w * S * (dm + i + ffn) + enc_attn + keep * S * (2 * dm + f)
    dec_block = (w * (T * (2 * dm + 2 * i + ffn) + 2 * i * S) + dec_attn
                 + keep * T * (4 * dm + f))
    logits = (w + 8) * T * V
    embeddings = w * (S + T) * dm + bias
    work = max(enc_block, dec_block)
    if checkpointing:
        kept = w * (d.num_layers * S * dm + d.num_decoder_layers * T * dm + S * dm)
        per_row = kept + 2 * work + logits + embeddings
    else:
        per_row = d.num_layers * enc_block + d.num_decoder_layers * dec_block + work + logits + embeddings
    return int(rows * per_row)


# -------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Setup:
    name: str            # replicated | zero3 | zero3-offload
    checkpointing: bool
    template: str        # ds_configs/ file it writes


# Fastest first. Assumed for GPUs on one fast interconnect: ZeRO-3's all-gathers overlap
# compute and cost less than recomputing the forward pass. Over gloo on CPU they cost far more
# (bench/README.md, scaling.py); GPU measurements are the performance benchmark's job.
SETUPS = [
    Setup("replicated", False, "ds_configs/replicated_bf16.json"),
    Setup("zero3", False, "ds_configs/zero3_bf16.json"),
    Setup("replicated", True, "ds_configs/replicated_bf16.json"),
    Setup("zero3", True, "ds_configs/zero3_bf16.json"),
    Setup("zero3-offload", False, "ds_configs/zero3_offload_param.json"),
    Setup("zero3-offload", True, "ds_configs/zero3_offload_param.json"),
]
DESCRIPTION = {"replicated": "replicated bf16 backbone (ZeRO-2: only the prompt's state sharded)",
               "zero3": "ZeRO-3 (backbone partitioned)",
               "zero3-offload": "ZeRO-3, parameters offloaded to CPU"}


@dataclass
class Estimate:
    setup: Setup
    states: int          # per GPU
    activations: int     # per GPU
    reserve: int
    total: int
    cpu_per_node: int
    fits_gpu: bool
    fits_host: bool

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def row(self) -> str:
        g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
        ac = "yes" if self.setup.checkpointing else "no"
        return (f"{self.setup.name:<14} {ac:<4} {g(self.states)} {g(self.activations)} {g(self.reserve)} "
                f"{g(self.total)} {g(self.cpu_per_node)}  "
                f"{'fits' if self.fits else 'does not fit' + ('' if self.fits_gpu else ' (GPU)') + ('' if self.fits_host else ' (host)')}")


@dataclass
class Request:
    dims: T5Dims
    gpus: int = 1                  # per node
    nodes: int = 1
    gpu_mem_gb: float = 80.0
    cpu_mem_gb: Optional[float] = None   # host memory per node; None: not checked
    cpu_mem_source: str = ""             # where cpu_mem_gb came from, for the report
    batch: int = 8                 # micro-batch per GPU (examples)
    seq: int = 256                 # source tokens (the prompt comes on top)
    target_len: int = 16
    prompt_length: int = 100
    particles: int = 1
    placement: str = "split"       # split (SVGD: a row runs one particle) | every (each row under all)
    factor_rank: int = 0
    tasks: int = 1
    dtype: str = "bf16"
    attention: str = "sdpa"
    reserve_gb: float = 2.0
    margin: float = 0.1
    # ZeRO-3's gathered working set (zero3_gathered_params); None: from the setup's template
    # in ds_configs/ (check_run passes the run's own DeepSpeed config).
    zero3_gathered: Optional[int] = None

    @property
    def trainable(self) -> int:
        d = self.dims.d_model
        return (self.particles * self.prompt_length * d
                + self.tasks * self.factor_rank * (self.prompt_length + d))

    @property
    def rows(self) -> int:
        return self.batch * (self.particles if self.placement == "every" else 1)


def estimate(req: Request, setup: Setup) -> Estimate:
    total, largest = param_counts(req.dims)
    w = 2 if req.dtype == "bf16" else 4
    trainable = req.trainable
    kw = dict(num_gpus_per_node=req.gpus, num_nodes=req.nodes, weight_bytes=w)
    if setup.name == "replicated":
        cpu, states = model_states(total + trainable, largest, trainable, zero=2, **kw)
    else:
        gathered = req.zero3_gathered
        if gathered is None:
            template = ds_config_for(setup) if setup.template else {}
            gathered = zero3_gathered_params(template.get("zero_optimization", {}))
        kw["gathered_params"] = gathered
        if setup.name == "zero3":
            cpu, states = model_states(total + trainable, largest, trainable, zero=3, **kw)
        else:
            cpu, states = model_states(total + trainable, largest, trainable, zero=3, offload_param=True,
                                       offload_optimizer=True, **kw)
    acts = activation_bytes(req.dims, req.rows, req.seq + req.prompt_length, req.target_len,
                            checkpointing=setup.checkpointing, act_bytes=w, attention=req.attention)
    reserve = int(req.reserve_gb * GiB)
    need = int((states + acts) * (1 + req.margin)) + reserve
    host_ok = req.cpu_mem_gb is None or cpu <= req.cpu_mem_gb * GiB
    return Estimate(setup, states, acts, reserve, need, cpu, need <= req.gpu_mem_gb * GiB, host_ok)


def plan(req: Request) -> list[Estimate]:
    return [estimate(req, s) for s in SETUPS]


def best(estimates: list[Estimate]) -> Optional[Estimate]:
    return next((e for e in estimates if e.fits), None)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def report(req: Request, estimates: list[Estimate], on_cpu: bool = False) -> str:
    total, largest = param_counts(req.dims)
    lines = [
        f"backbone: {_count(total)} parameters (largest layer {_count(largest)}), {req.dtype}, frozen; "
        f"trainable: {req.trainable:,} values ({req.particles} particle(s) x {req.prompt_length} tokens"
        f"{f', rank-{req.factor_rank} factors for {req.tasks} tasks' if req.factor_rank else ''})",
        (f"hardware: {req.nodes} node(s) x {req.gpus} rank(s) on CPU, no GPU (each rank's total below is in "
         "host memory); " if on_cpu else
         f"hardware: {req.nodes} node(s) x {req.gpus} GPU(s) with {req.gpu_mem_gb:g} GiB each; ") +
        f"{host_memory_note(req)}; micro-batch "
        f"{req.batch} x {req.rows // req.batch} particle row(s), source {req.seq} + prompt {req.prompt_length} "
        f"tokens, target {req.target_len}",
        f"per {'rank' if on_cpu else 'GPU'}, GiB (total = (states + activations) x "
        f"{1 + req.margin:g} + reserve; CPU per node for offload/loading):",
        f"{'setup':<14} {'AC':<4} {'states':>8} {'activ.':>8} {'reserve':>8} {'total':>8} {'CPU/node':>8}",
    ] + [e.row() for e in estimates]
    return "\n".join(lines)


def host_memory_note(req: Request) -> str:
    """'host memory: 23.4 GiB per node (this machine; --cpu-mem to plan for another)'."""
    if req.cpu_mem_gb is None:
        return "host memory: not checked"
    return (f"host memory: {round(req.cpu_mem_gb, 1):g} GiB per node"
            f"{f' ({req.cpu_mem_source})' if req.cpu_mem_source else ''}")


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory(limits: tuple = CGROUP_LIMITS) -> int:
    """Memory this job may use, in bytes: the machine's total (psutil), or less when the job's
    cgroup caps it (SLURM's --mem, a container's limit; cgroup v2 or v1)."""
    import psutil

    total = psutil.virtual_memory().total
    for path in limits:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def ds_config_for(setup: Setup) -> dict:
    return json.loads((PROJECT_ROOT / setup.template).read_text())


# ---------------------------------------------------------------- the trainer


def setup_of(ds_config: dict, checkpointing: bool) -> Setup:
    zero = ds_config.get("zero_optimization", {})
    if int(zero.get("stage", 0)) < 3:
        return Setup("replicated", checkpointing, "")
    offload = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    return Setup("zero3-offload" if offload else "zero3", checkpointing, "")


THIS_MACHINE = "this machine; deepspeed.host_memory_gb to plan for another"


def check_run(cfg, ds_config: dict, model_path: str, placement: str, world: int, gpus_per_node: int,
              device_memory: Optional[int], host_memory: Optional[int] = None,
              host_source: str = THIS_MACHINE) -> Optional[Estimate]:
    """Refuses (ConfigError, with the planner's table) a run whose estimate exceeds the memory
    of one device, or a node's host memory (`host_memory`, from `host_source`) for loading and
    offload. `device_memory` None means no GPU: the ranks' model states and activations are in
    host memory too, so a node needs gpus_per_node x the per-device total + the loading memory.
    Nothing to check (None) without either figure or with deepspeed.memory_check=false."""
    from transformers import AutoConfig


    if not cfg.deepspeed.memory_check or (device_memory is None and host_memory is None):
        return None
    on_cpu = device_memory is None
    dims = dims_from_config(AutoConfig.from_pretrained(model_path))
    req = Request(dims, gpus=gpus_per_node, nodes=max(1, world // max(1, gpus_per_node)),
                  gpu_mem_gb=float("inf") if on_cpu else device_memory / GiB,
                  cpu_mem_gb=host_memory / GiB if host_memory is not None else None, cpu_mem_source=host_source,
                  batch=ds_config["train_micro_batch_size_per_gpu"],
                  seq=cfg.data.max_source_length, target_len=cfg.data.max_target_length,
                  prompt_length=cfg.prompt.length, particles=cfg.prompt.particles,
                  placement=placement, factor_rank=cfg.prompt.factors.rank,
                  tasks=len(cfg.data.tasks), dtype="bf16" if ds_config["bf16"]["enabled"] else "fp32",
                  attention=cfg.model.attn_implementation,
                  reserve_gb=cfg.deepspeed.memory_reserve_gb, margin=0.1,
                  zero3_gathered=zero3_gathered_params(ds_config.get("zero_optimization", {})))

    def host_need(e: Estimate) -> int:  # what a node's host memory holds
        return e.cpu_per_node + (req.gpus * e.total if on_cpu else 0)

    def fits(e: Estimate) -> bool:
        return e.fits_gpu and (req.cpu_mem_gb is None or host_need(e) <= req.cpu_mem_gb * GiB)

    mine = estimate(req, setup_of(ds_config, cfg.model.gradient_checkpointing))
    if fits(mine):
        return mine
    estimates = [replace(e, fits_host=e.fits_host and fits(e)) for e in plan(req)]
    fit = best(estimates)
    advice = (f"the fastest setup that fits is {DESCRIPTION[fit.setup.name]}"
              f"{' with activation checkpointing' if fit.setup.checkpointing else ''}: "
              f"deepspeed.config={fit.setup.template} model.gradient_checkpointing="
              f"{'true' if fit.setup.checkpointing else 'false'}" if fit else
              "no setup fits: lower train.micro_batch_size (gradient accumulation keeps the global batch), "
              "data.max_source_length or prompt.length, or use more GPUs" +
              (" (on CPU: fewer ranks per node, or a smaller deepspeed.memory_reserve_gb per rank)" if on_cpu else ""))
    what = f"{mine.setup.name}, activation checkpointing {'on' if mine.setup.checkpointing else 'off'}"
    if not mine.fits_gpu:
        need = f"about {mine.total / GiB:.2f} GiB per GPU ({what}) but a device has {device_memory / GiB:.2f} GiB"
    else:
        parts = (f"{req.gpus} rank(s) x {mine.total / GiB:.2f} GiB of model states, activations and reserve on "
                 f"CPU + {mine.cpu_per_node / GiB:.2f} GiB to load; " if on_cpu else "")
        need = (f"about {host_need(mine) / GiB:.1f} GiB of host memory per node ({parts}{what}) but a node has "
                f"{req.cpu_mem_gb:.1f} GiB ({host_source})")
    raise ConfigError(f"this run needs {need}; {advice}. Set deepspeed.memory_check=false to start anyway.\n"
                      f"{report(req, estimates, on_cpu=on_cpu)}")


# -------------------------------------------------------------------- CLI


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bpt_ds.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help=f"a preset ({', '.join(PRESETS)}), T5 dims as d_model=..,d_ff=..,num_heads=..,"
                         "num_layers=.., or a model directory / hub name with a config.json")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--cpu-mem", type=float, default=None,
                    help="host memory per node in GiB, checked against loading and offload (default: this "
                         "machine's total memory)")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per GPU, examples (default 8)")
    ap.add_argument("--seq", type=int, default=256, help="source tokens, without the prompt (default 256)")
    ap.add_argument("--target-len", type=int, default=16, help="target tokens (default 16)")
    ap.add_argument("--prompt-length", type=int, default=100, help="prompt tokens (default 100)")
    ap.add_argument("--particles", type=int, default=1, help="prompt particles M (default 1)")
    ap.add_argument("--placement", choices=["split", "every"], default="split",
                    help="split: a row runs one particle (SVGD, bmtpt-source); every: each row runs all M "
                         "particles (stage pt); default split")
    ap.add_argument("--factor-rank", type=int, default=0, help="MPT factor rank (default 0: none)")
    ap.add_argument("--tasks", type=int, default=1, help="tasks with their own factors (default 1)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                    help="attention kernel: sdpa (transformers' default for T5) or eager (keeps the "
                         "h x S x S scores of every block); default sdpa")
    ap.add_argument("--reserve", type=float, default=2.0,
                    help="GiB per GPU kept for the CUDA context, NCCL and allocator slack (default 2)")
    ap.add_argument("--write", default=None, metavar="FILE",
                    help="also write the chosen setup's DeepSpeed config to FILE (e.g. ds_config.plan.json); "
                         "without it nothing is written")
    ap.add_argument("--json", action="store_true", help="print the estimates as JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        for name in ("gpus", "nodes", "batch", "seq", "target_len", "prompt_length", "particles", "tasks"):
            if getattr(args, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
        if not args.gpu_mem > 0:
            raise PlanError(f"--gpu-mem must be > 0 GiB; got {args.gpu_mem}")
        if args.cpu_mem is not None and not args.cpu_mem > 0:
            raise PlanError(f"--cpu-mem must be > 0 GiB; got {args.cpu_mem}")
        cpu_mem, source = ((args.cpu_mem, "--cpu-mem") if args.cpu_mem is not None else
                           (machine_memory() / GiB, "this machine; --cpu-mem to plan for another"))
        req = Request(resolve_dims(args.model), gpus=args.gpus, nodes=args.nodes, gpu_mem_gb=args.gpu_mem,
                      cpu_mem_gb=cpu_mem, cpu_mem_source=source,
                      batch=args.batch, seq=args.seq, target_len=args.target_len,
                      prompt_length=args.prompt_length, particles=args.particles, placement=args.placement,
                      factor_rank=args.factor_rank, tasks=args.tasks, dtype=args.dtype, attention=args.attention,
                      reserve_gb=args.reserve)
    except PlanError as e:
        print(f"bpt_ds.plan: error: {e}", file=sys.stderr)
        return 2
    estimates = plan(req)
    fit = best(estimates)
    if args.json:
        print(json.dumps({"request": {**asdict(req), "dims": asdict(req.dims)},
                          "estimates": [{**asdict(e.setup), "states": e.states, "activations": e.activations,
                                         "reserve": e.reserve, "total": e.total, "cpu_per_node": e.cpu_per_node,
                                         "fits": e.fits, "fits_gpu": e.fits_gpu, "fits_host": e.fits_host} for e in estimates],
                          "choice": asdict(fit.setup) if fit else None}, indent=1))
    else:
        print(report(req, estimates))
    if fit is None:
        print("nothing fits: lower --batch (gradient accumulation keeps the global batch), --seq or "
              "--prompt-length, or add GPUs", file=sys.stderr)
        return 1
    if not args.json:
        print(f"fastest that fits: {DESCRIPTION[fit.setup.name]}, activation checkpointing "
              f"{'on' if fit.setup.checkpointing else 'off'}"
              + ("" if args.write not in (None, "-") else "; --write FILE saves its DeepSpeed config"))
    if args.write not in (None, "-"):
        Path(args.write).write_text(json.dumps(ds_config_for(fit.setup), indent=2) + "\n")
        if not args.json:
            print(f"wrote {args.write}; train with: deepspeed.config={args.write} model.gradient_checkpointing="
                  f"{'true' if fit.setup.checkpointing else 'false'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
