"""The prompt bank: the only trainable tensors of a run (plain torch, no DeepSpeed).

prompt(task t, particle m) = S_m ∘ (U_t V_t)   (docs/algorithms.md §1)

S holds M particles of shape [l, d]; U_t [l, r] and V_t [r, d] are optional per-task
low-rank factors. With factors off the prompt is S_m itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError


class PromptBank(nn.Module):
    def __init__(self, num_particles: int, length: int, dim: int,
                 tasks: Sequence[str] = (), rank: int = 0, factor_init_std: float = 0.01):
        super().__init__()
        self.tasks = list(tasks)
        self.rank = rank
        self.particles = nn.Parameter(torch.zeros(num_particles, length, dim))
        # Stage mpt-teachers: particle k is task k's own prompt; evaluation then runs each
        # example under its task's particle instead of the particle mean.
        self.task_particles = False
        # Kept as ints: under ZeRO-3 a partitioned parameter's own .shape is empty.
        self.shape = (num_particles, length, dim)
        if rank > 0:
            if not self.tasks:
                raise ValueError("low-rank factors need at least one task name")
            # Every entry r^(-1/2) makes U V all ones, so the prompt starts at S (plus small noise).
            base = rank ** -0.5
            t = len(self.tasks)
            self.factor_u = nn.Parameter(base + factor_init_std * torch.randn(t, length, rank))
            self.factor_v = nn.Parameter(base + factor_init_std * torch.randn(t, rank, dim))

    @property
    def num_particles(self) -> int:
        return self.shape[0]

    @property
    def length(self) -> int:
        return self.shape[1]

    @property
    def dim(self) -> int:
        return self.shape[2]

    def size(self) -> int:
        """Number of trainable scalars: M·l·d + T·(l + d)·r."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_random(self, std: float, generator: torch.Generator) -> None:
        self.particles.copy_(torch.randn(self.particles.shape, generator=generator) * std)

    @torch.no_grad()
    def init_rows(self, rows: torch.Tensor) -> None:
        """Sets the particles from [M, l, d] rows (e.g. sampled vocabulary embeddings)."""
        if rows.shape != self.particles.shape:
            raise ValueError(f"prompt init rows have shape {tuple(rows.shape)}, "
                             f"the bank needs {tuple(self.particles.shape)}")
        self.particles.copy_(rows.to(self.particles.dtype))

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str, pick: Optional[int] = None,
                     factors_from: Optional[str] = None) -> None:
        """Loads `particles` (and factors of matching tasks) from a prompts file's tensors.

        The file's particles [F, l, d] map onto this bank's M as follows: pick=k starts
        every particle from the file's particle k; otherwise F == M copies them, F == 1
        starts every particle from it, and M == 1 starts from their mean (the aggregate
        of a BMTPT posterior). Factors are taken for tasks present in both, if any, or, with
        factors_from, for every task from one source task or the sources' mean (_load_factors).
        """
        if "particles" not in tensors:
            raise ValueError(f"{source} has no 'particles' tensor (keys: {sorted(tensors)})")
        src = tensors["particles"]
        m, l, d = self.shape
        if not src.is_floating_point() or not bool(torch.isfinite(src).all()):
            raise ValueError(f"{source}: particles hold {'NaN or Inf values' if src.is_floating_point() else src.dtype}; "
                             "a prompt file must hold finite floating-point values")
        if src.dim() != 3 or src.shape[1:] != (l, d):
            raise ValueError(
                f"{source}: particles have shape {tuple(src.shape)}, this run needs [F, {l}, {d}]; "
                + (f"set prompt.length to match the file (and use a backbone with d_model={src.shape[-1]})"
                   if src.dim() == 3 else "a prompts file holds particles [F, length, d_model]"))
        f = src.shape[0]
        if pick is not None:
            if not 0 <= pick < f:
                raise ValueError(f"{source} holds {f} particles; prompt.init_particle={pick} must be "
                                 f"in 0..{f - 1} (or null for their mean)")
            src = src[pick:pick + 1]
        elif f != m and f != 1:
            if m != 1:
                raise ValueError(f"{source} holds {f} particles and this run has {m}: use "
                                 f"prompt.particles={f} to continue all of them, or prompt.particles=1 "
                                 "to start from their mean (or prompt.init_particle=k)")
            src = src.mean(0, keepdim=True)
        self.particles.copy_(src.expand(m, l, d).to(self.particles.dtype))
        if self.rank > 0:
            self._load_factors(tensors, source, factors_from)

    def _load_factors(self, tensors: dict[str, torch.Tensor], source: str, factors_from: Optional[str]) -> None:
        """Factors from a file: by task name, or for every task from one source task's U and V
        (factors_from=<task>) or from the mean U and mean V over the file's tasks ("mean")."""
        names = sorted(k[len("factors."):-len(".U")] for k in tensors if k.startswith("factors.") and k.endswith(".U"))
        shape_u, shape_v = tuple(self.factor_u.shape[1:]), tuple(self.factor_v.shape[1:])
        for name in names:
            u, v = tensors[f"factors.{name}.U"], tensors.get(f"factors.{name}.V")
            if v is None or tuple(u.shape) != shape_u or tuple(v.shape) != shape_v:
                if factors_from is None and name not in self.tasks:
                    continue
                raise ValueError(f"{source}: factors of task '{name}' have shapes {tuple(u.shape)} and "
                                 f"{None if v is None else tuple(v.shape)}; this run needs U {shape_u} and "
                                 f"V {shape_v} (prompt.length, prompt.factors.rank, the backbone's d_model)")
        if factors_from is None:
            for i, task in enumerate(self.tasks):
                if task in names:
                    self.factor_u[i].copy_(tensors[f"factors.{task}.U"])
                    self.factor_v[i].copy_(tensors[f"factors.{task}.V"])
            return
        if not names:
            raise ValueError(f"{source} holds no factors; prompt.factors.init_from={factors_from!r} needs a file "
                             "written by a run with factors (e.g. mpt-distill)")
        if factors_from == "mean":
            u = torch.stack([tensors[f"factors.{n}.U"] for n in names]).mean(0)
            v = torch.stack([tensors[f"factors.{n}.V"] for n in names]).mean(0)
        elif factors_from in names:
            u, v = tensors[f"factors.{factors_from}.U"], tensors[f"factors.{factors_from}.V"]
        else:
            raise ValueError(f"{source} has no factors of task '{factors_from}' (prompt.factors.init_from); "
                             f"its tasks: {', '.join(names)}, or 'mean'")
        self.factor_u.copy_(u.expand_as(self.factor_u))
        self.factor_v.copy_(v.expand_as(self.factor_v))

    # --------------------------------------------------------------- forward
    def forward(self, task_ids: torch.Tensor, aggregate: bool = False,
                particle_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompts for a batch: [M, B, l, d] (every particle on every example), [1, B, l, d]
        for the particle mean (aggregate=True), or [1, B, l, d] with example b under
        particle particle_ids[b] (each particle on its own examples, as SVGD places them).
        With task_particles, aggregate=True runs example b under particle task_ids[b]."""
        if aggregate and self.task_particles:
            particle_ids = task_ids
        if particle_ids is not None:
            s = self.particles[particle_ids][None]                     # [1, B, l, d]
        else:
            s = self.particles.mean(0, keepdim=True) if aggregate else self.particles
            s = s[:, None]                                             # [M', 1, l, d]
        b = task_ids.shape[0]
        if self.rank == 0:
            return s.expand(s.shape[0], b, self.length, self.dim)
        w = torch.bmm(self.factor_u[task_ids], self.factor_v[task_ids])  # [B, l, d]
        return s * w[None]

    def export(self, values: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Tensors for prompts.safetensors: `particles` [M, l, d] and `factors.<task>.U/.V`.

        values: full tensors by parameter name (e.g. gathered fp32 master copies);
        default: this module's own parameters.
        """
        if values is None:
            values = dict(self.named_parameters())
        out = {"particles": values["particles"]}
        if self.rank > 0:
            for i, task in enumerate(self.tasks):
                out[f"factors.{task}.U"] = values["factor_u"][i]
                out[f"factors.{task}.V"] = values["factor_v"][i]
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

def prepend_prompts(prompts: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor):
    """Folds the particle index into the batch: [M, B, l, d] + [B, T, d] -> [M·B, l+T, d].

    Row m·B + b is particle m on example b, so one encoder pass serves every particle.
    """
    m, b, l, _ = prompts.shape
    embeds = embeds.unsqueeze(0).expand(m, *embeds.shape)
    full = torch.cat([prompts.to(embeds.dtype), embeds], dim=2).flatten(0, 1)
    prompt_mask = mask.new_ones(m, b, l)
    full_mask = torch.cat([prompt_mask, mask.unsqueeze(0).expand(m, *mask.shape)], dim=2).flatten(0, 1)
    return full, full_mask


def load_prompts_file(path: str | Path, key: str = "prompt.init_file") -> dict[str, torch.Tensor]:
    """The tensors of a prompts.safetensors file; a run's output directory stands for the file in it,
    and a peft prompt-tuning adapter directory is converted (bpt_ds.peft_io)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return import_peft(str(p))  # a peft prompt-tuning adapter directory
    if p.is_dir():
        p = p / "prompts.safetensors"
        if not p.is_file():
            raise FileNotFoundError(f"{key}: run directory '{path}' has no prompts.safetensors: has that run "
                                    "finished? (a prompt file or run directory is expected)")
    if not p.is_file():
        raise FileNotFoundError(f"{key}: prompt file '{path}' does not exist; point it at the prompts.safetensors "
                                "of an earlier run (or at that run's output directory)")
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises its own error type for a bad header or truncated data
        raise ConfigError(f"{key}: '{p}' is not a safetensors file bpt_ds can read ({e}); point it at the "
                         "prompts.safetensors of an earlier run") from None


# peft prompt-tuning adapters read as prompt files (bpt_ds.peft_io has the mapping and the export).
TASKS_FILE = "tasks.json"


class PeftIOError(ValueError):
    """A prompt file or adapter cannot be converted; the message names the file and the fix."""


def import_peft(adapter_dir: str) -> dict[str, torch.Tensor]:
    """bpt_ds tensors (particles, factors.<task>.U/V) from a peft prompt-tuning adapter."""
    from peft import PeftConfig

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise PeftIOError(f"'{adapter_dir}' has no adapter_config.json: not a peft adapter directory")
    config = PeftConfig.from_pretrained(str(d))
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind not in ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING"):
        raise PeftIOError(f"{adapter_dir}: peft type {kind} is not prompt tuning; bpt_ds imports PROMPT_TUNING and "
                          "MULTITASK_PROMPT_TUNING adapters")
    weights = _adapter_weights(d)
    emb = weights.get("prompt_embeddings")
    if emb is None:
        raise PeftIOError(f"{adapter_dir}: the adapter weights have no 'prompt_embeddings' (keys: {sorted(weights)})")
    length = config.num_virtual_tokens
    subs = config.num_transformer_submodules or 1
    if emb.shape[0] != length * subs:
        raise PeftIOError(f"{adapter_dir}: prompt_embeddings has {emb.shape[0]} rows; the config says "
                          f"{length} virtual tokens x {subs} submodule(s)")
    if subs == 2 and kind == "MULTITASK_PROMPT_TUNING":
        raise PeftIOError(f"{adapter_dir}: a multitask adapter with num_transformer_submodules=2 also prompts the "
                          "decoder, which bpt_ds does not; export it with num_transformer_submodules=1")
    out = {"particles": emb[:length].float()[None].contiguous()}
    if kind == "MULTITASK_PROMPT_TUNING":
        cols, rows = weights["prefix_task_cols"].float(), weights["prefix_task_rows"].float()
        names_file = d / TASKS_FILE
        names = json.loads(names_file.read_text()) if names_file.is_file() else [f"task{i}" for i in range(cols.shape[0])]
        if len(names) != cols.shape[0]:
            raise PeftIOError(f"{names_file} names {len(names)} tasks; the adapter has {cols.shape[0]}")
        for i, name in enumerate(names):
            out[f"factors.{name}.U"] = cols[i, :length].contiguous()
            out[f"factors.{name}.V"] = rows[i].contiguous()
    return out


def _adapter_weights(d: Path) -> dict[str, torch.Tensor]:
    if (d / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(d / "adapter_model.safetensors"))
    if (d / "adapter_model.bin").is_file():
        return torch.load(str(d / "adapter_model.bin"), map_location="cpu", weights_only=True)
    raise PeftIOError(f"'{d}' has no adapter_model.safetensors (or .bin)")
