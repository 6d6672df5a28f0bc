"""Run configuration: typed dataclasses, YAML files and dotted command-line overrides.

Everything a run does is decided here, up front: a typo or a wrong type fails before
any model is loaded, with the key's full name and what it accepts. A stage's own rules and
defaults live in its file (bpt_ds/stages), which build_config is given.

Over 400 lines on purpose: every key's field, its comment (the key's documentation), its
conversion and its range check are one edit in one file; split, a new key would be three.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from .data.tasks import check_data_files, check_task_names
from .errors import ConfigError


@dataclass
class ModelConfig:
    # "tiny" builds (or reuses) the project's own tiny T5; "random:<size>" (random:t5-v1_1-xl,
    # random:d_model=512,num_layers=6) a published T5 architecture with random weights, for
    # timing and memory work; anything else goes to T5ForConditionalGeneration.from_pretrained
    # (hub name or local directory).
    name_or_path: str = "tiny"
    # T5 overflows in fp16, so fp16 is not offered. auto: bf16 on GPUs, fp32 on CPU
    # (bf16 matmuls on CPUs without native bf16 units are several times slower).
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    # Recompute the backbone's activations in the backward pass: less activation memory for
    # about a third more compute (python -m bpt_ds.plan says when it is needed).
    gradient_checkpointing: bool = False
    # Attention kernel: sdpa (torch's scaled_dot_product_attention, transformers' default for
    # T5) or eager (the reference implementation, which keeps every score matrix).
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # torch.compile of the prompted model's forward and backward (DeepSpeed's engine.compile):
    # none; inductor (generated, fused kernels); aot_eager or eager (graph capture without code
    # generation: for checking that a model compiles). Measured effect: bench/RESULTS.md.
    compile: Literal["none", "inductor", "aot_eager", "eager"] = "none"


@dataclass
class FactorsConfig:
    # Rank r of the per-task low-rank factors U_t [l, r], V_t [r, d]; 0 switches them off.
    rank: int = 0
    # Std of the factors' random start (U and V).
    init_std: float = 0.01
    # When prompt.init_file holds factors of other (source) tasks, e.g. an mpt-distill run:
    # null starts this run's tasks from fresh factors (a task of the same name keeps its own),
    # "mean" from the source tasks' mean U and mean V, a task name from that task's U and V.
    init_from: Optional[str] = None


@dataclass
class PromptConfig:
    # Virtual tokens l of the soft prompt.
    length: int = 16
    # M prompts in the bank: bmtpt-source's SVGD particles; in a target run, M particles continued
    # and scored by their posterior predictive; mpt-teachers has one per task.
    particles: int = 1
    # Where the prompt starts: random (Gaussian, std prompt.init_std), vocab (embeddings of
    # vocabulary rows drawn with the seed) or file (prompt.init_file).
    init: Literal["random", "vocab", "file"] = "vocab"
    # Std of prompt.init=random.
    init_std: float = 0.5
    # prompts.safetensors of an earlier run (or that run's output directory): required by
    # init=file and by stages spot and target.
    init_file: Optional[str] = None
    # When init_file holds more particles than this run: null starts from their mean (the
    # aggregate of a BMTPT posterior); k starts every particle from the file's particle k.
    init_particle: Optional[int] = None
    factors: FactorsConfig = field(default_factory=FactorsConfig)


@dataclass
class LocalTaskConfig:
    """A task read from local files (JSON/JSONL, CSV or Parquet) through `datasets`."""

    # The training file.
    train: Optional[str] = None
    # The dev set (evaluated every train.eval_every steps; picks the reported step).
    validation: Optional[str] = None
    # The test set, evaluated whenever the dev score improves.
    test: Optional[str] = None
    # The file's column of input text.
    input_column: str = "input"
    # The file's column of targets (labels, or answers).
    target_column: str = "target"
    # Verbalized labels for rank classification; default: the sorted distinct train targets.
    labels: Optional[list[str]] = None


@dataclass
class DataConfig:
    # Training tasks: suite tasks (mnli, rte, squad, ...: `python -m bpt_ds.data.registry`),
    # synthetic tasks (polarity, sentiment, mood, topic, contrary) or names defined under data.local.
    tasks: list[str] = field(default_factory=lambda: ["polarity"])
    # Evaluation tasks; default: the training tasks.
    eval_tasks: Optional[list[str]] = None
    # Your own tasks in {input, target} columns (a name here takes precedence over a suite task).
    local: dict[str, LocalTaskConfig] = field(default_factory=dict)
    # Suite tasks from local files in the hub dataset's own columns, by hub split name:
    # data.files.rte.train=rte_train.jsonl, data.files.rte.validation=... (MNLI:
    # validation_matched / validation_mismatched). A task without files loads from the hub.
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    # Another hub dataset for a suite task, "owner/name" or "owner/name:config", in the same
    # columns (e.g. a parquet mirror of aps/super_glue): data.hub.boolq=me/super_glue:boolq.
    hub: dict[str, str] = field(default_factory=dict)
    # A directory of local copies of hub datasets (<datasets_dir>/nyu-mll/glue, ...), read with
    # datasets.load_dataset(<datasets_dir>/<hub name>, <config>) instead of the hub.
    datasets_dir: Optional[str] = None
    # Seed of the dev/test split of suite tasks; fixed across training seeds so that every seed
    # is scored on the same test set.
    split_seed: int = 42
    # Few-shot: k training examples per class (k in total for regression and QA tasks), drawn
    # with the run's seed; 0 trains on the whole train split.
    few_shot: int = 0
    # How classification tasks are evaluated: rank (score every label, exact) or generate
    # (decode text; a text that is no label counts as wrong and as invalid). QA always generates.
    eval_mode: Literal["rank", "generate"] = "rank"
    # Longest generated answer (QA, and classification with eval_mode=generate).
    max_new_tokens: int = 32
    # Examples generated per synthetic task for training.
    synthetic_train_examples: int = 2000
    # Examples generated per synthetic task for the dev split, and as many for test.
    synthetic_eval_examples: int = 200
    # Tokens of an input (eos included); longer inputs are cut, and the log says how many.
    max_source_length: int = 64
    # Tokens of a target (eos included); longer answers are cut, longer labels refused.
    max_target_length: int = 8
    # Cap on evaluation examples per task (0 = all).
    max_eval_examples: int = 0
    # Length-grouped batches: the examples of every W consecutive steps are sorted by length
    # and regrouped into W batches of similar lengths (less padding); 0 = off. Stages pt,
    # spot, bmtpt-source and target (the MPT stages sample per task).
    group_by_length: int = 0


@dataclass
class TrainConfig:
    # Optimizer steps (unless train.epochs is set).
    steps: int = 200
    # Train for this many passes over the training examples instead (the papers' unit):
    # train.steps becomes ceil(epochs x examples / global_batch_size), said in the log; a
    # resume may change it, as it may train.steps.
    epochs: Optional[float] = None
    # Examples per optimizer step over all ranks (micro x accumulation x ranks).
    global_batch_size: int = 32
    # Per-rank micro-batch; gradient accumulation = global / (micro x world size).
    # null: the largest divisor of global / world size that is at most 16.
    micro_batch_size: Optional[int] = None
    # Learning rate of the prompt particles (factors: train.factor_lr).
    lr: float = 0.3
    # The update rule of the prompts and factors: adamw (torch's AdamW); sgd (plain gradient
    # steps: for SVGD the particles then move along φ itself, whose fixed point is the
    # posterior's); svgd-adagrad (the step of Liu & Wang's reference SVGD code: φ divided by the
    # root of an exponential average, α = 0.9, of its squares, 1e-6 added, the average started at
    # the first step's square). Adam's and AdaGrad's per-coordinate scaling moves stochastic
    # SVGD's fixed point; bench/README.md measures the three.
    optimizer: Literal["adamw", "sgd", "svgd-adagrad"] = "adamw"
    # torch's fused AdamW (one kernel per step for all of a group's tensors, on CPU and CUDA)
    # instead of its per-tensor loop: the same update up to float rounding.
    fused_adamw: bool = False
    # Learning rate of the low-rank factors; default: train.lr.
    factor_lr: Optional[float] = None
    # AdamW's decoupled weight decay on the trainable tensors (train.optimizer=adamw only).
    weight_decay: float = 0.0
    # LR schedule after the warm-up: constant, linear decay to 0, or cosine decay to 0.
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    # Steps of linear LR warm-up from 0.
    warmup_steps: int = 0
    # Clip the trainable tensors' joint gradient norm to this; 0 switches clipping off.
    max_grad_norm: float = 1.0
    # Steps between log lines and TensorBoard training scalars.
    log_every: int = 10
    # Steps between dev evaluations (and at the end); 0: no evaluation.
    eval_every: int = 50
    # Also evaluate before the first step (the starting prompt's accuracy, logged at step 0).
    eval_at_start: bool = False
    # Stop after this many evaluations without improvement of the mean eval metric; 0 = never.
    patience: int = 0
    # Examples per rank in one evaluation forward pass.
    eval_batch_size: int = 64
    # Steps between checkpoints (one is also written at the end and on SIGTERM/SIGINT); 0: no periodic ones.
    save_every: int = 100
    # The newest this many checkpoints are kept.
    keep_checkpoints: int = 2
    # A step whose loss, gradient or SVGD direction is NaN or Inf is skipped (the prompts do not
    # move) and counted; after this many in a row training stops, keeping the checkpoints.
    max_bad_steps: int = 5
    # When an output cannot be written (disk full, read-only), retry for this long with the data
    # in memory, then write it under the system's temporary directory and stop. At most half of
    # deepspeed.timeout_minutes, which is how long the other ranks wait.
    save_retry_minutes: float = 10.0
    # auto: continue from the newest checkpoint in output_dir if there is one.
    resume: Literal["auto", "never"] = "auto"


@dataclass
class DeepSpeedSection:
    # A DeepSpeed JSON config; "auto" picks ds_configs/zero3_bf16.json on GPUs and
    # ds_configs/cpu_zero3.json without one.
    config: str = "auto"
    # Before loading the backbone, estimate per-GPU memory (python -m bpt_ds.plan) and refuse
    # a run that cannot fit, naming the setup that would.
    memory_check: bool = True
    # Memory of one device in GiB; null: the accelerator's own (no check on CPU).
    device_memory_gb: Optional[float] = None
    # Host memory of one node in GiB, checked against loading, offload and (on CPU) every local
    # rank's share; null: this machine's total memory.
    host_memory_gb: Optional[float] = None
    # GiB per device the estimate keeps aside for the CUDA context, NCCL and allocator slack.
    memory_reserve_gb: float = 2.0
    # Minutes a collective may wait for the other ranks before the job ends with an error
    # naming the ranks that did not answer (a lost node, a hung rank).
    timeout_minutes: float = 30.0


@dataclass
class SVGDConfig:
    """Stage bmtpt-source: SVGD over the M particles of the base prompt (docs/algorithms.md §4)."""

    # Bandwidth h of the kernel k(x, y) = exp(-||x - y||² / h) over flattened prompts;
    # null: the median heuristic, recomputed every step.
    bandwidth: Optional[float] = None
    # The repulsive term (2/h) Σ_j k_ij (θ_i - θ_j) that spreads the particles; false leaves
    # kernel-weighted gradient descent (particles started equal then stay equal).
    repulsive: bool = True
    # log p(D | θ) ≈ -scale · L(θ; B), L the mean over the particle's examples of each
    # example's summed token NLL, -log p(y | x; θ): null uses the number of training examples
    # over all source tasks (the data's log-likelihood, Σ_n log p(y_n | x_n; θ)); a number
    # replaces it (a temperature: smaller lets the repulsive term spread the particles more).
    # Logged with the step's force norms.
    likelihood_scale: Optional[float] = None
    # σ₀ of the prior N(0, σ₀² I) on the base prompt; null: no prior term.
    prior_std: Optional[float] = None
    # Where the particles start (prompt.init random or vocab): shared, every particle from one
    # draw (particle 0's) plus init_spread noise, so that they sample one basin and their mean
    # is a prompt of that basin; independent, each particle its own draw (M separate starts,
    # whose mean blurs them). A prompt.init_file decides by itself: one prompt is shared, M
    # prompts are taken as they are.
    init: Literal["shared", "independent"] = "shared"
    # Std of Gaussian noise added to every particle at the start (not on resume), relative to
    # the starting particles' RMS coordinate: 0.1 moves each coordinate by a tenth of its
    # typical size. Particles that start equal feel no repulsion and would stay equal. null:
    # 0.1 when the particles start from one prompt, 0 when they start apart.
    init_spread: Optional[float] = None


@dataclass
class PriorConfig:
    """Stage target: -β · log p̂(S) added to the target loss, p̂ fitted to a BMTPT source's
    particles (docs/algorithms.md §5). The prior acts on the full-rank prompt S, the quantity the
    source posterior is over, not on S ∘ (U V): the factors stay a free task-specific
    modulation. The scale of log p̂ differs by kind: the KDE with the median bandwidth is broad
    (its kernel variance per coordinate is h/2), a diagonal Gaussian is sharp; compare
    prior/grad_norm with prior/loss_grad_norm in TensorBoard when choosing β."""

    # The prior's form: kde (the particles' kernel density, prior.bandwidth), or a Gaussian
    # fitted to the particles, isotropic or diagonal.
    kind: Literal["kde", "gaussian-isotropic", "gaussian-diagonal"] = "kde"
    # The prior's weight in natural units: the objective is N · L̄ - beta · log p̂(S), L̄ the
    # mean loss per target token and N the target tokens of the training set (N · L̄ estimates
    # the data's negative log-likelihood), so beta = 1 is the MAP under p̂ whatever the data's
    # size (few-shot or full); beta > 1 trusts the sources more. 0 switches the prior off (the
    # source then only initializes the prompt).
    beta: float = 0.0
    # The source's prompts.safetensors (or run directory); default: prompt.init_file.
    file: Optional[str] = None
    # KDE bandwidth; null: the median heuristic over the source particles (needs >= 2).
    bandwidth: Optional[float] = None
    # Gaussian kinds: floor of the fitted variances (a coordinate on which the particles agree
    # would otherwise pin the prompt with a huge gradient).
    min_var: float = 1e-6


@dataclass
class DistillConfig:
    """Stage mpt-distill (docs/algorithms.md §3): the student S ∘ (U_k V_k) learns from teacher k.

    loss = L_PLM + weight · (L_logits + L_hidden) at each target position of task k's examples,
    averaged over the global batch's target tokens (the per-token convention of every stage but
    bmtpt-source): L_PLM the token cross-entropy; L_logits KL(softmax(z_teacher / τ) ||
    softmax(z_student / τ)) over the vocabulary; L_hidden the squared error of the chosen hidden
    states averaged over features (encoder_last: the example's mean over encoder positions). The
    teacher pass runs without dropout. MPT's own λ and τ were not verified here; tune them on
    your tasks."""

    # The mpt-teachers run (its prompts.safetensors, or the run directory): teacher.<task> per task.
    teachers: Optional[str] = None
    weight: float = 1.0                     # λ
    temperature: float = 1.0                # τ
    # Which hidden states L_hidden compares: the decoder's last (at target positions), the
    # encoder's last (at prompt and input positions), both (the sum of the two: MPT's paper
    # matches encoder and decoder), or none (no hidden-state term).
    hidden: Literal["decoder_last", "encoder_last", "both", "none"] = "decoder_last"
    # Each step draws K' uniformly from [min_tasks, K], then K' of the K source tasks, and fills
    # the global batch from them.
    min_tasks: int = 2
    # How the global batch is shared among the step's K' tasks: equal shares, or proportional
    # to their training-set sizes (examples-proportional, as pt and bmtpt-source mix tasks).
    task_mix: Literal["equal", "proportional"] = "equal"


@dataclass
class RunConfig:
    stage: str = "pt"  # a name in bpt_ds.stages.STAGES (checked by build_config)
    # Seeds the prompt's start, the data order, dropout, few-shot draws and synthetic data.
    seed: int = 42
    # Where the run writes its outputs and checkpoints (README, Outputs).
    output_dir: str = "runs/default"
    # The row label of this run in results tables (python -m bpt_ds.results); default: the stage.
    method: Optional[str] = None
    # Where scalars go: tensorboard (<output_dir>/tb), wandb (offline unless WANDB_MODE=online),
    # mlflow (<output_dir>/mlruns unless MLFLOW_TRACKING_URI); any of them (bpt_ds/trackers.py).
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    model: ModelConfig = field(default_factory=ModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    svgd: SVGDConfig = field(default_factory=SVGDConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of name to {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}' expects {_type_name(tp)}; got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                raise ConfigError(f"config key '{key}' expects {_type_name(tp)}; got {value!r}: write a list, "
                                  f"{key}=[{value}] (several: {key}=[{value},...])")
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-6 (no dot) as text; a number written that way is still a number.
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects text; got {value!r}: YAML reads yes/no/on/off/"
                              f"true/false as booleans, so quote it (\"{str(value).lower()}\")")
        if isinstance(value, (int, float)):
            return str(value)  # labels such as 0 / 1 are text to the model
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


# Keys that were renamed or changed meaning: a config that still sets one is told what to write.
REPLACED = {
    "svgd.init_noise": "use svgd.init_spread, which is relative to the starting particles' RMS coordinate "
                       "(an absolute std s is svgd.init_spread = s / that RMS; the log prints the RMS)",
}


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key in REPLACED:
            if key in REMOVED_KEYS and v == REMOVED_KEYS[key]:
                continue  # its neutral value, as every config.yaml written before the change holds
            raise ConfigError(f"config key '{key}' was replaced: {REPLACED[key]}")
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{key}'.{hint} Accepted keys"
                f"{' under ' + repr(prefix) if prefix else ''}: {', '.join(names)}"
            )
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=300' -> ('train.steps', 300); values are parsed as YAML scalars/lists."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. train.steps=300)")
    key, value = text.split("=", 1)
    if not value.strip():
        return key.strip(), ""
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = str(e).strip().splitlines()[0]
        raise ConfigError(f"override '{text}': the value of '{key.strip()}' is not valid YAML ({problem}); quote "
                          f"text values, e.g. {key.strip()}='\"...\"'") from None


def read_yaml(path: Optional[str]) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def build_config(raw: dict, stages: Mapping[str, Any]) -> RunConfig:
    """The run config of a raw mapping (YAML plus overrides), validated: its values each on their
    own (validate), then by its stage's rules. stages: the stage classes by name
    (bpt_ds.stages.STAGES; each has defaults(raw) and validate(cfg))."""
    name = raw.get("stage", RunConfig.stage)
    if not isinstance(name, str) or name not in stages:
        raise ConfigError(f"config key 'stage' expects one of {', '.join(repr(k) for k in stages)}; got {name!r}")
    stage = stages[name]
    stage.defaults(raw)
    cfg = _build(RunConfig, raw)
    validate(cfg)
    stage.validate(cfg)
    return cfg


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def require_batch_per_particle(global_batch: int, particles: int) -> None:
    """SVGD gives each particle its own block of global_batch / particles examples a step."""
    _require(global_batch % particles == 0,
             f"train.global_batch_size ({global_batch}) must be a multiple of prompt.particles ({particles}): "
             f"each particle gets global_batch_size / particles examples a step; e.g. "
             f"train.global_batch_size={particles * max(1, global_batch // particles)}")


def validate(cfg: RunConfig) -> None:
    """Checks relations between values that types alone cannot express."""
    t, p, d = cfg.train, cfg.prompt, cfg.data
    trackers = ("tensorboard", "wandb", "mlflow")
    unknown = [k for k in cfg.report_to if k not in trackers]
    _require(not unknown and len(set(cfg.report_to)) == len(cfg.report_to),
             f"config key 'report_to' takes distinct names of {', '.join(trackers)}; got {cfg.report_to}")
    for key, value in [
        ("train.steps", t.steps), ("train.global_batch_size", t.global_batch_size),
        ("prompt.length", p.length),
        ("prompt.particles", p.particles), ("train.eval_batch_size", t.eval_batch_size),
        ("train.log_every", t.log_every), ("data.max_source_length", d.max_source_length),
        ("data.max_target_length", d.max_target_length), ("train.keep_checkpoints", t.keep_checkpoints),
        ("data.max_new_tokens", d.max_new_tokens), ("train.max_bad_steps", t.max_bad_steps),
    ]:
        _require(value >= 1, f"config key '{key}' must be >= 1; got {value}")
    for key, value in [
        ("train.eval_every", t.eval_every), ("train.save_every", t.save_every),
        ("train.patience", t.patience), ("train.warmup_steps", t.warmup_steps),
        ("prompt.factors.rank", p.factors.rank), ("data.max_eval_examples", d.max_eval_examples),
        ("data.few_shot", d.few_shot), ("data.group_by_length", d.group_by_length),
    ]:
        _require(value >= 0, f"config key '{key}' must be >= 0; got {value}")
    for key, value, low in [
        ("train.lr", t.lr, 0.0), ("prompt.init_std", p.init_std, 0.0),
        ("train.max_grad_norm", t.max_grad_norm, -1.0), ("train.weight_decay", t.weight_decay, -1.0),
        ("prompt.factors.init_std", p.factors.init_std, -1.0),
    ] + ([("train.factor_lr", t.factor_lr, 0.0)] if t.factor_lr is not None else []):
        bound = "> 0" if low == 0.0 else ">= 0"
        _require(math.isfinite(value) and (value > 0 if low == 0.0 else value >= 0),
                 f"config key '{key}' must be a finite number {bound}; got {value}")
    if t.micro_batch_size is not None:
        _require(t.micro_batch_size >= 1, f"config key 'train.micro_batch_size' must be >= 1; got {t.micro_batch_size}")
        _require(
            t.global_batch_size % t.micro_batch_size == 0,
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})",
        )
    if t.epochs is not None:
        _require(math.isfinite(t.epochs) and t.epochs > 0,
                 f"config key 'train.epochs' must be a finite number > 0 (or null); got {t.epochs}")
    if t.optimizer != "adamw":
        _require(t.weight_decay == 0, f"train.weight_decay={t.weight_decay} is AdamW's decoupled decay; "
                                      f"train.optimizer={t.optimizer} has none: set train.weight_decay=0")
        _require(not t.fused_adamw, f"train.fused_adamw applies to train.optimizer=adamw; this run uses "
                                    f"{t.optimizer}: set train.fused_adamw=false")
    _require(len(d.tasks) > 0, "config key 'data.tasks' must name at least one task")
    check_task_names(d)
    if p.init_particle is not None:
        _require(p.init_particle >= 0, f"config key 'prompt.init_particle' must be >= 0; got {p.init_particle}")
    sv, pr, ds = cfg.svgd, cfg.prior, cfg.deepspeed
    for key, value in [("svgd.bandwidth", sv.bandwidth), ("svgd.likelihood_scale", sv.likelihood_scale),
                       ("svgd.prior_std", sv.prior_std), ("prior.bandwidth", pr.bandwidth),
                       ("deepspeed.device_memory_gb", ds.device_memory_gb),
                       ("deepspeed.host_memory_gb", ds.host_memory_gb)]:
        if value is not None:
            _require(math.isfinite(value) and value > 0,
                     f"config key '{key}' must be a finite number > 0 (or null); got {value}")
    if sv.init_spread is not None:
        _require(math.isfinite(sv.init_spread) and sv.init_spread >= 0,
                 f"config key 'svgd.init_spread' must be a finite number >= 0 (or null); got {sv.init_spread}")
    _require(math.isfinite(ds.timeout_minutes) and ds.timeout_minutes > 0,
             f"config key 'deepspeed.timeout_minutes' must be a finite number > 0; got {ds.timeout_minutes}")
    _require(math.isfinite(t.save_retry_minutes) and t.save_retry_minutes >= 0,
             f"config key 'train.save_retry_minutes' must be a finite number >= 0; got {t.save_retry_minutes}")
    _require(math.isfinite(ds.memory_reserve_gb) and ds.memory_reserve_gb >= 0,
             f"config key 'deepspeed.memory_reserve_gb' must be a finite number >= 0; got {ds.memory_reserve_gb}")
    _require(math.isfinite(pr.min_var) and pr.min_var > 0,
             f"config key 'prior.min_var' must be a finite number > 0; got {pr.min_var}")
    _require(math.isfinite(pr.beta) and pr.beta >= 0,
             f"config key 'prior.beta' must be a finite number >= 0; got {pr.beta}")
    di = cfg.distill
    for key, value in [("distill.weight", di.weight), ("distill.temperature", di.temperature)]:
        _require(math.isfinite(value) and value >= 0 and (value > 0 or key == "distill.weight"),
                 f"config key '{key}' must be a finite number {'>= 0' if key == 'distill.weight' else '> 0'}; "
                 f"got {value}")
    if p.factors.init_from is not None:
        _require(p.init == "file" and p.factors.rank > 0,
                 "prompt.factors.init_from takes factors from prompt.init_file: set prompt.init=file (or stage "
                 "target) and prompt.factors.rank >= 1")
    for name, local in d.local.items():
        _require(local.train is not None or local.validation is not None,
                 f"data.local.{name} needs a file: set data.local.{name}.train and/or .validation")
    check_data_files(d)


def steps_for_epochs(epochs: float, examples: int, global_batch: int) -> int:
    """train.steps of train.epochs passes over `examples` training examples."""
    return max(1, math.ceil(epochs * examples / global_batch - 1e-9))


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------- fingerprint

# Keys a resumed run may change: they say how long to train and what to log, not what a step computes.
RESUME_FREE = {"output_dir", "train.steps", "train.epochs", "train.resume", "train.log_every", "train.eval_every",
               "train.eval_at_start", "train.save_every", "train.keep_checkpoints", "train.patience",
               "train.eval_batch_size", "data.eval_tasks", "data.max_eval_examples", "method", "report_to",
               # How the job is guarded, not what it computes.
               "deepspeed.memory_check", "deepspeed.device_memory_gb", "deepspeed.memory_reserve_gb",
               "deepspeed.timeout_minutes", "train.max_bad_steps", "train.save_retry_minutes",
               # How a step runs, not what it computes (up to float rounding).
               "model.compile", "train.fused_adamw"}

# What the code computes beyond the config: the loss a step minimizes. Checkpoints and done.json
# written before 2026-12 (each row's mean token loss) carry no such entry, so a resume of one, or a
# pipeline rerun over one, sees it changed instead of silently mixing two objectives.
LOSS_CONVENTION = "per target token; bmtpt-source: summed token NLL per example"


# prior.beta's unit (stage target): the weight of -log p̂(S) against the loss summed over the data.
PRIOR_UNITS = "beta per the training set's target tokens"


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


# Sections only one stage reads: they are no part of another stage's fingerprint, so a new key
# there (or a changed default) does not turn away the checkpoints of the stages that ignore it.
SECTION_STAGES = {"svgd": "bmtpt-source", "prior": "target", "distill": "mpt-distill"}
# Keys added after fingerprints were first written, with the value that the code before them
# computed with: a fingerprint without the key is read as having that value.
ADDED_KEYS = {"svgd.init": "independent", "svgd.init_spread": 0.0, "train.optimizer": "adamw",
              "distill.task_mix": "equal"}
# Keys since removed, with the value under which leaving them out changes nothing.
REMOVED_KEYS = {"svgd.init_noise": 0.0}


def config_fingerprint(cfg: RunConfig) -> dict:
    """What a run computes: the config as flat keys, without the keys a resume may change and
    the sections of other stages, and the loss convention (LOSS_CONVENTION). Checkpoints and
    done.json carry it."""
    flat = _flat(json.loads(json.dumps(to_dict(cfg))))
    out = {k: v for k, v in flat.items() if k not in RESUME_FREE and _applies(k, cfg.stage)}
    out["loss_convention"] = LOSS_CONVENTION
    if cfg.prior.beta > 0:
        # Before 2026-12 the prior's gradient was beta · ∇log p̂ against the mean loss's: a
        # checkpoint of that objective is refused by name, not continued under this one.
        out["prior_units"] = PRIOR_UNITS
    return out


def _applies(key: str, stage: str) -> bool:
    section = key.split(".", 1)[0]
    return SECTION_STAGES.get(section, stage) == stage


def compare_fingerprint(cfg: RunConfig, saved: dict) -> tuple[dict, dict, list[str]]:
    """(the saved fingerprint as today's code reads it, this config's, the keys that differ).
    A saved fingerprint (a checkpoint's, a done.json's) is read as the code that wrote it
    computed: ADDED_KEYS at their old values, REMOVED_KEYS at their neutral ones dropped, and the
    sections of other stages left out."""
    now = config_fingerprint(cfg)
    old = {k: v for k, v in saved.items() if _applies(k, cfg.stage)
           and not (k in REMOVED_KEYS and v == REMOVED_KEYS[k])}
    for key, value in ADDED_KEYS.items():
        if key not in old and key in now:
            old[key] = value
    return old, now, sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))


def fingerprint_changes(cfg: RunConfig, saved: dict) -> list[str]:
    """The keys in which a saved fingerprint differs from this config's (compare_fingerprint)."""
    return compare_fingerprint(cfg, saved)[2]
