"""Run configuration: typed dataclasses, YAML files and dotted command-line overrides.

Everything a run does is decided here, up front: a typo or a wrong type fails before
any model is loaded, with the key's full name and what it accepts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the fix."""


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
    init_std: float = 0.01
    # When prompt.init_file holds factors of other (source) tasks, e.g. an mpt-distill run:
    # null starts this run's tasks from fresh factors (a task of the same name keeps its own),
    # "mean" from the source tasks' mean U and mean V, a task name from that task's U and V.
    init_from: Optional[str] = None


@dataclass
class PromptConfig:
    length: int = 16
    particles: int = 1
    init: Literal["random", "vocab", "file"] = "vocab"
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

    train: Optional[str] = None
    # The dev set (evaluated every train.eval_every steps; picks the reported step).
    validation: Optional[str] = None
    # The test set, evaluated whenever the dev score improves.
    test: Optional[str] = None
    input_column: str = "input"
    target_column: str = "target"
    # Verbalized labels for rank classification; default: the sorted distinct train targets.
    labels: Optional[list[str]] = None


@dataclass
class DataConfig:
    # Training tasks: suite tasks (mnli, rte, squad, ...: `python -m bpt_ds.data.registry`),
    # synthetic tasks (polarity, sentiment, mood, topic) or names defined under data.local.
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
    synthetic_train_examples: int = 2000
    synthetic_eval_examples: int = 200
    max_source_length: int = 64
    max_target_length: int = 8
    # Cap on evaluation examples per task (0 = all).
    max_eval_examples: int = 0
    # Length-grouped batches: the examples of every W consecutive steps are sorted by length
    # and regrouped into W batches of similar lengths (less padding); 0 = off. Stages pt,
    # spot, bmtpt-source and target (the MPT stages sample per task).
    group_by_length: int = 0


@dataclass
class TrainConfig:
    steps: int = 200
    global_batch_size: int = 32
    # Per-rank micro-batch; gradient accumulation = global / (micro x world size).
    # null: the largest divisor of global / world size that is at most 16.
    micro_batch_size: Optional[int] = None
    lr: float = 0.3
    # torch's fused AdamW (one kernel per step for all of a group's tensors, on CPU and CUDA)
    # instead of its per-tensor loop: the same update up to float rounding.
    fused_adamw: bool = False
    # Learning rate of the low-rank factors; default: train.lr.
    factor_lr: Optional[float] = None
    weight_decay: float = 0.0
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 50
    # Also evaluate before the first step (the starting prompt's accuracy, logged at step 0).
    eval_at_start: bool = False
    # Stop after this many evaluations without improvement of the mean eval metric; 0 = never.
    patience: int = 0
    eval_batch_size: int = 64
    save_every: int = 100
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
    """Stage bmtpt-source: SVGD over the M particles of the base prompt (algorithms.md §4)."""

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
    # Std of Gaussian noise added to every particle at the start (not on resume). Particles
    # that start equal (e.g. from a one-prompt init_file) feel no repulsion and stay equal.
    init_noise: float = 0.0


@dataclass
class PriorConfig:
    """Stage target: -β · log p̂(S) added to the target loss, p̂ fitted to a BMTPT source's
    particles (algorithms.md §5). The prior acts on the full-rank prompt S, the quantity the
    source posterior is over, not on S ∘ (U V): the factors stay a free task-specific
    modulation. The scale of log p̂ differs by kind: the KDE with the median bandwidth is broad
    (its kernel variance per coordinate is h/2), a diagonal Gaussian is sharp; compare
    prior/grad_norm with prior/loss_grad_norm in TensorBoard when choosing β."""

    kind: Literal["kde", "gaussian-isotropic", "gaussian-diagonal"] = "kde"
    # 0 switches the prior off (the source then only initializes the prompt).
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
    """Stage mpt-distill (algorithms.md §3): the student S ∘ (U_k V_k) learns from teacher k.

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
    # encoder's last (at prompt and input positions), or none (no hidden-state term).
    hidden: Literal["decoder_last", "encoder_last", "none"] = "decoder_last"
    # Each step draws K' uniformly from [min_tasks, K], then K' of the K source tasks, and fills
    # the global batch from them.
    min_tasks: int = 2


@dataclass
class RunConfig:
    stage: Literal["pt", "spot", "bmtpt-source", "target", "mpt-teachers", "mpt-distill"] = "pt"
    seed: int = 42
    output_dir: str = "runs/default"
    # The row label of this run in results tables (python -m bpt_ds.results); default: the stage.
    method: Optional[str] = None
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


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown config key '{key}'.{hint} Accepted keys"
                f"{' under ' + repr(prefix) if prefix else ''}: {', '.join(names)}"
            )
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
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


def _read_yaml(path: Optional[str]) -> dict:
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


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """Builds the run config from an optional YAML file plus dotted overrides, then validates it."""
    raw = _read_yaml(path)
    if "stages" in raw:
        raise ConfigError(f"config file '{path}' is a pipeline (it has 'stages'); run it with load_runs")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return build_config(raw)


FROM_FILE_STAGES = ("spot", "target")

PIPELINE_KEYS = ("output_dir", "defaults", "stages")
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunConfig))


def load_runs(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = (),
              seed: Optional[int] = None) -> list[tuple[str, RunConfig]]:
    """The runs a config file asks for, as (name, config): one for a run config, several for a pipeline.

    seed: one run of a multi-seed command: every stage gets this seed and writes to
    <its output_dir>/seed<seed> (a pipeline's {name} references follow).

    A pipeline file chains stages by output path:

        output_dir: runs/bmtpt          # stage <name> writes to <output_dir>/<name>
        defaults: {model: ..., seed: 1} # keys every stage shares
        stages:
          - name: source
            stage: bmtpt-source
          - name: target
            stage: target
            prompt: {init_file: "{source}"}   # {name}: that earlier stage's output directory

    Overrides `key=value` apply to every stage (after its own keys), `<name>.key=value` to
    one stage, and `output_dir=...` to the pipeline. Every stage's config is built and
    validated before the first one runs.
    """
    raw = _read_yaml(path)
    if "stages" not in raw:
        cfg = load_config(path, overrides)
        if seed is not None:
            cfg = load_config(path, list(overrides) + [f"seed={seed}", f"output_dir={cfg.output_dir}/seed{seed}"])
        return [("run", cfg)]
    unknown = sorted(set(raw) - set(PIPELINE_KEYS))
    if unknown:
        raise ConfigError(f"pipeline '{path}': unknown top-level key(s) {unknown}; a pipeline has "
                          f"{', '.join(PIPELINE_KEYS)} (stage keys go under defaults or a stage)")
    stages, defaults = raw["stages"], raw.get("defaults") or {}
    if not isinstance(stages, list) or not stages or not all(isinstance(st, dict) for st in stages):
        raise ConfigError(f"pipeline '{path}': 'stages' must be a non-empty list of mappings")
    if not isinstance(defaults, dict):
        raise ConfigError(f"pipeline '{path}': 'defaults' must be a mapping of run config keys")
    names = [str(st.get("name", "")) for st in stages]
    for i, name in enumerate(names):
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"pipeline '{path}': stages[{i}] needs a 'name' of letters, digits, - or _; "
                              f"got {name!r}")
        if name in names[:i]:
            raise ConfigError(f"pipeline '{path}': two stages are named '{name}'")
        if name in RUN_KEYS:
            raise ConfigError(f"pipeline '{path}': stage name '{name}' is also a config key, so '{name}.x=...' "
                              "overrides would be ambiguous; choose another name")
    root = raw.get("output_dir", "runs/pipeline")
    shared: list[str] = []
    per_stage: dict[str, list[str]] = {n: [] for n in names}
    for text in overrides:
        key, _ = parse_override(text)
        head = key.split(".", 1)[0]
        if key == "output_dir":
            root = parse_override(text)[1]
        elif head in per_stage and "." in key:
            per_stage[head].append(text.split(".", 1)[1])
        else:
            shared.append(text)
    runs, dirs = [], {}
    for i, (name, st) in enumerate(zip(names, stages)):
        merged = _deep_merge(defaults, {k: v for k, v in st.items() if k != "name"})
        merged.setdefault("output_dir", f"{root}/{name}")
        for text in shared + per_stage[name]:
            key, value = parse_override(text)
            _set_dotted(merged, key, value)
        if seed is not None:
            merged["seed"] = seed
            merged["output_dir"] = f"{merged['output_dir']}/seed{seed}"
        merged = _substitute(merged, dirs, names[i:], f"pipeline '{path}', stage '{name}'")
        try:
            cfg = build_config(merged)
        except ConfigError as e:
            raise ConfigError(f"pipeline '{path}', stage '{name}': {e}") from None
        if cfg.output_dir in dirs.values():
            other = next(n for n, d in dirs.items() if d == cfg.output_dir)
            raise ConfigError(f"pipeline '{path}': stages '{other}' and '{name}' both write to {cfg.output_dir}; "
                              "give each stage its own output_dir (or leave it unset: <output_dir>/<name>)")
        dirs[name] = cfg.output_dir
        runs.append((name, cfg))
    return runs


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _substitute(value: Any, dirs: dict[str, str], later: list[str], where: str) -> Any:
    """Replaces {name} in strings with the output directory of the earlier stage `name`."""
    if isinstance(value, dict):
        return {k: _substitute(v, dirs, later, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs, later, where) for v in value]
    if isinstance(value, str) and "{" in value:
        for name in later:
            if "{" + name + "}" in value:
                raise ConfigError(f"{where}: '{value}' refers to stage '{name}', which does not run before it")
        for name, d in dirs.items():
            value = value.replace("{" + name + "}", d)
    return value


def build_config(raw: dict) -> RunConfig:
    if raw.get("stage") in FROM_FILE_STAGES and isinstance(raw.get("prompt", {}), dict):
        # SPoT and target start from an earlier run's prompt: that is their init unless the user says otherwise.
        raw.setdefault("prompt", {}).setdefault("init", "file")
    if raw.get("stage") == "mpt-teachers" and isinstance(raw.get("prompt", {}), dict) \
            and isinstance(raw.get("data", {}), dict) and isinstance(raw.get("data", {}).get("tasks"), list):
        # One teacher per source task, as K particles.
        raw.setdefault("prompt", {}).setdefault("particles", len(raw["data"]["tasks"]))
    if raw.get("stage") == "mpt-distill" and isinstance(raw.get("prompt", {}), dict) \
            and isinstance(raw.get("prompt", {}).get("factors", {}), dict):
        raw.setdefault("prompt", {}).setdefault("factors", {}).setdefault("rank", 1)  # MPT's rank-one factors
    cfg = _build(RunConfig, raw)
    validate(cfg)
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
    _require(len(d.tasks) > 0, "config key 'data.tasks' must name at least one task")
    _require(not (d.group_by_length and cfg.stage in ("mpt-teachers", "mpt-distill")),
             f"data.group_by_length does not apply to stage '{cfg.stage}', which samples each task on its own; "
             "set data.group_by_length=0")
    from .data.tasks import check_task_names

    check_task_names(d)
    if p.init == "file" or cfg.stage in FROM_FILE_STAGES:
        _require(
            p.init_file is not None,
            f"stage '{cfg.stage}' with prompt.init={p.init} needs prompt.init_file: "
            "the prompts.safetensors of an earlier run",
        )
    if cfg.stage in FROM_FILE_STAGES:
        _require(p.init == "file",
                 f"stage '{cfg.stage}' initializes from a file: set prompt.init=file (or leave it unset)")
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
    _require(math.isfinite(sv.init_noise) and sv.init_noise >= 0,
             f"config key 'svgd.init_noise' must be a finite number >= 0; got {sv.init_noise}")
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
    if cfg.stage == "bmtpt-source":
        require_batch_per_particle(t.global_batch_size, p.particles)
        _require(t.weight_decay == 0,
                 f"stage 'bmtpt-source': train.weight_decay={t.weight_decay} would pull the particles toward 0 "
                 "outside SVGD; set it to 0 and use svgd.prior_std for a Gaussian prior that SVGD accounts for")
        _require(p.factors.rank == 0,
                 "stage 'bmtpt-source' samples the base prompt S only: set prompt.factors.rank=0 "
                 "(low-rank factors belong to the target stage)")
    if pr.beta > 0:
        _require(cfg.stage == "target", f"prior.beta={pr.beta} applies to stage 'target' only; "
                                        f"this run is stage '{cfg.stage}' (set prior.beta=0)")
    di = cfg.distill
    if cfg.stage == "mpt-teachers":
        _require(p.particles == len(d.tasks),
                 f"stage 'mpt-teachers' trains one teacher prompt per task of data.tasks ({len(d.tasks)}) as "
                 f"particles: set prompt.particles={len(d.tasks)} (or leave it unset)")
        _require(len(set(d.tasks)) == len(d.tasks), "stage 'mpt-teachers': data.tasks names a task twice")
        _require(p.factors.rank == 0, "stage 'mpt-teachers' trains plain prompts: set prompt.factors.rank=0")
        _require(all(n in d.tasks for n in d.eval_tasks or []),
                 "stage 'mpt-teachers' evaluates each teacher on its own task: data.eval_tasks must be "
                 "among data.tasks (or unset)")
        require_batch_per_particle(t.global_batch_size, p.particles)
    if cfg.stage == "mpt-distill":
        _require(di.teachers is not None, "stage 'mpt-distill' needs distill.teachers: the output directory "
                                          "(or prompts.safetensors) of an mpt-teachers run")
        _require(p.particles == 1, "stage 'mpt-distill' learns one shared prompt: set prompt.particles=1")
        _require(p.factors.rank >= 1, "stage 'mpt-distill' learns S ∘ (U_k V_k): prompt.factors.rank must be "
                                      ">= 1 (MPT uses 1)")
        _require(2 <= di.min_tasks <= max(2, len(d.tasks)),
                 f"config key 'distill.min_tasks' must be in 2..{len(d.tasks)} (the number of data.tasks); "
                 f"got {di.min_tasks}")
        _require(len(d.tasks) >= 2, "stage 'mpt-distill' mixes at least 2 source tasks per batch: "
                                    "data.tasks needs 2 or more")
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
    from .data.tasks import check_data_files

    check_data_files(d)


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
