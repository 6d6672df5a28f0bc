"""The Stage: what a method adds to the one recipe (bpt_ds.runner), in one place.

A stage is a class with a name, a few declarative facts, and a few parts, each with a default
that is plain prompt tuning; a method overrides only what differs, and is registered in one line
in bpt_ds/stages/__init__.py. A stage never sees the runner: each part gets what it needs as
arguments and returns what the runner uses.

At config time (classmethods, no files read):
    defaults(raw)          stage defaults filled into the raw config before it is built
    validate(cfg)          the stage's own rules, with a ConfigError naming key and fix
    placement(cfg, world)  which rows and particles each rank runs; refuses what does not fit
    input_files(cfg)       the files from other runs it reads (input_digests: their sha256, in done.json)
Before the backbone loads (the stage object, one per run):
    sampler(sizes, source_length)   which (task, example) pairs make each step's global batch
    read_inputs(bank, train_examples, init_tensors, train_tokens)   reads and checks its input files
    init_bank(bank) -> warnings     changes to the initialized prompt bank
With the backbone:
    model(backbone, bank)           the module DeepSpeed wraps
    grad_transform(device)          its change to the reduced gradient each step (step.GradTransform)
    describe(bank)                  lines for the log
At the end:
    exported(tensors)               the tensors of prompts.safetensors
    embeddings(tensors)             rows for TensorBoard's embedding projector
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar, Optional

import torch

from ..config import RunConfig
from ..data.batching import LengthGroupedSampler, MixtureSampler
from ..errors import ConfigError
from ..model import PromptedT5
from ..prompts import PromptBank
from ..step import GradTransform, LossUnit, Placement, PlacementMode


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


class Stage:
    """The defaults are prompt tuning (stages/pt.py): M independent prompts (particles), each
    seeing the whole global batch, the mean token cross-entropy over the batch's target tokens,
    no gradient transform."""

    name: ClassVar[str] = ""
    placement_mode: ClassVar[PlacementMode] = PlacementMode.EVERY
    # What a particle's loss averages over its share of the global batch (step.LossUnit).
    loss_unit: ClassVar[LossUnit] = LossUnit.TOKEN
    # What evaluation scores when the bank holds M > 1 particles (README, "What evaluation scores"):
    # True, the particles' posterior predictive (1/M) Σ_m p_m(y | x); False, the bank's aggregate
    # prompt of each example (mpt-teachers: its task's own teacher).
    eval_ensemble: ClassVar[bool] = True
    # False: DeepSpeed's joint gradient clipping is off (the stage clips in its transform).
    clip_jointly: ClassVar[bool] = True
    # The prompt starts from an earlier run's file (prompt.init=file by default).
    starts_from_file: ClassVar[bool] = False
    # Samples each task on its own (data.group_by_length does not apply).
    samples_per_task: ClassVar[bool] = False
    # Uses prior.* (the target stage's prior over the source particles).
    uses_prior: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # ---------------------------------------------------------------- config time
    @classmethod
    def defaults(cls, raw: dict) -> None:
        """Fills the stage's defaults into the raw (not yet built) config, where the user left them unset."""
        if cls.starts_from_file and isinstance(raw.get("prompt", {}), dict):
            raw.setdefault("prompt", {}).setdefault("init", "file")

    @classmethod
    def validate(cls, cfg: RunConfig) -> None:
        """The stage's own rules (config.validate has checked every value on its own)."""
        p = cfg.prompt
        if p.init == "file" or cls.starts_from_file:
            require(p.init_file is not None, f"stage '{cfg.stage}' with prompt.init={p.init} needs prompt.init_file: "
                                             "the prompts.safetensors of an earlier run")
        if cls.starts_from_file:
            require(p.init == "file",
                    f"stage '{cfg.stage}' initializes from a file: set prompt.init=file (or leave it unset)")
        require(not (cfg.data.group_by_length and cls.samples_per_task),
                f"data.group_by_length does not apply to stage '{cfg.stage}', which samples each task on its own; "
                "set data.group_by_length=0")
        require(cfg.prior.beta == 0 or cls.uses_prior,
                f"prior.beta={cfg.prior.beta} applies to stage 'target' only; this run is stage '{cfg.stage}' "
                "(set prior.beta=0)")

    @classmethod
    def placement(cls, cfg: RunConfig, world: int) -> Placement:
        """Which rows and particles each rank runs; fails on particles that do not fit the ranks
        (run_pipeline asks every stage before the first one runs)."""
        return Placement.make(cls.placement_mode, cfg.prompt.particles, world, cfg.train.global_batch_size)

    @classmethod
    def input_files(cls, cfg: RunConfig) -> list[str]:
        """Prompt files of other runs that this run reads (done.json records their sha256)."""
        return [cfg.prompt.init_file] if cfg.prompt.init == "file" and cfg.prompt.init_file else []

    @classmethod
    def input_digests(cls, cfg: RunConfig) -> dict[str, str]:
        """sha256 of each input file (a run directory stands for its prompts.safetensors), or "missing"."""
        out = {}
        for name in cls.input_files(cfg):
            path = Path(name) / "prompts.safetensors" if Path(name).is_dir() else Path(name)
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        return out

    # ------------------------------------------------------- before the backbone
    def sampler(self, sizes: list[int], source_length):
        """Which (task, example) pairs make the global batch of each step. source_length(pair):
        the example's input tokens (for data.group_by_length)."""
        sampler = MixtureSampler(sizes, self.cfg.train.global_batch_size, self.cfg.seed)
        if self.cfg.data.group_by_length:
            sampler = LengthGroupedSampler(sampler, source_length, self.cfg.data.group_by_length, self.cfg.seed)
        return sampler

    def read_inputs(self, bank: PromptBank, train_examples: int, init_tensors: Optional[dict],
                    train_tokens: int = 0) -> None:
        """Reads and checks the stage's input files against the bank's shape (ConfigError naming the
        key); cheap, before the backbone loads. train_examples: Σ of the training tasks' sizes;
        train_tokens: Σ of their examples' target tokens (what a per-token mean loss divides by)."""

    def init_bank(self, bank: PromptBank) -> list[str]:
        """Changes to the initialized prompt bank before DeepSpeed takes it; returns warnings."""
        return []

    # ---------------------------------------------------------- with the backbone
    def model(self, backbone: torch.nn.Module, bank: PromptBank) -> torch.nn.Module:
        """The module DeepSpeed wraps: the frozen backbone with the prompt bank in front."""
        return PromptedT5(backbone, bank)

    def grad_transform(self, device: torch.device) -> Optional[GradTransform]:
        """The change to the particles' reduced gradient each step, or None."""
        return None

    def describe(self, bank: PromptBank) -> list[str]:
        """Lines for the log, once the run is set up."""
        return []

    # ----------------------------------------------------------------- at the end
    def exported(self, tensors: dict) -> dict:
        """The tensors of prompts.safetensors."""
        return tensors

    def embeddings(self, tensors: dict) -> list[tuple[torch.Tensor, list, str, Optional[list]]]:
        """(rows, metadata, tag, metadata header) for TensorBoard's embedding projector."""
        return []

