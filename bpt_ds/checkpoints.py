"""Checkpoints of the trainable state: what a run resumes from, written so that a crash at any
point leaves the previous one intact, and checked before anything expensive loads.

- TrainState: the loop's resumable counters, one dataclass (to_dict / from_dict).
- choose_checkpoint / pick_checkpoint: the newest intact checkpoint (manifest sizes and sha256),
  refused when another number of ranks or another config wrote it.
- Checkpointer: save (free space agreed by every rank, temporary tag, manifest, rename), load
  (torch.load(weights_only=True): no code from a checkpoint runs), set aside.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .config import RESUME_FREE, RunConfig, compare_fingerprint
from .distributed import barrier, is_comm_failure, rank, world_size
from .errors import CheckpointError, ConfigError
from .files import atomic_write, free_bytes, mib, utc_stamp
from .report import warn
from .trackers import set_aside_tracker_runs



@dataclass
class TrainState:
    """What the training loop carries from step to step and a checkpoint restores."""

    step: int = 0
    best: float = float("-inf")           # the best mean dev score so far
    evals_without_gain: int = 0           # evaluations since it improved (train.patience)
    stopped: bool = False                 # early-stopped: a rerun does not train on
    # The evaluation with the best mean dev score: {"step", "dev", "test"}.
    selected: dict = field(default_factory=dict)
    # Steps skipped for a non-finite loss, gradient or direction: in a row, and in all.
    bad_in_row: int = 0
    bad_total: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        """From a checkpoint's client state; keys that older checkpoints lack take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        state.selected = state.selected or {}
        state.step, state.best = int(state.step), float(state.best)
        return state


def check_same_config(cfg: RunConfig, saved: Optional[dict]) -> None:
    """A checkpoint continues only the computation that wrote it. `saved`: the fingerprint in
    its manifest.json (pick_checkpoint, before the backbone loads) or, for checkpoints from
    before manifests carried it, in its client state (after loading). Checkpoints from before
    this check carry none and are trusted."""
    if saved is None:
        return
    was, now, changed = compare_fingerprint(cfg, saved)
    if changed:
        shown = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"the checkpoint in {checkpoint_dir(cfg)} was written with a different config "
            f"({shown}{', ...' if len(changed) > 6 else ''}); resuming would mix two runs. Use "
            "train.resume=never to start over (the old checkpoints are kept aside), or a new output_dir. "
            f"A resume may change only {', '.join(sorted(RESUME_FREE))}")


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def checkpoint_bytes_estimate(trainable_values: int) -> int:
    """Bytes of one checkpoint before any was written: 16 per trainable value (weights, Adam's two
    moments, master copy) in DeepSpeed's files, 12 more in the rank-independent copy (PORTABLE),
    and DeepSpeed's per-file overhead."""
    return 28 * trainable_values + (world_size() + 1) * 2**16 + 2**20



def _checkpoint_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _weights_only_engine(config):
    """DeepSpeed's TorchCheckpointEngine, loading with torch.load(weights_only=True): no code in a
    checkpoint file runs, only the allow-listed types are rebuilt."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            torch.serialization.add_safe_globals(_checkpoint_globals())
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as e:
                import re

                found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
                first = f"it needs {found.group(1)}" if found else str(e).strip().splitlines()[-1]
                raise CheckpointError(f"checkpoint file {path} holds more than tensors and plain values ({first}); "
                                      "bpt_ds loads checkpoints with torch.load(weights_only=True) and runs no code "
                                      "from them. Was it written by bpt_ds? Use train.resume=never to start over") from None

    return WeightsOnlyCheckpointEngine(config)


MANIFEST = "manifest.json"
# The trainable state in full, independent of the rank count: every trainable tensor's fp32
# value and optimizer state, the optimizer's scalar state, the LR schedule and the loop's state.
# A resume on the rank count that wrote a checkpoint loads DeepSpeed's own files (bit for bit);
# on another rank count it loads this (Checkpointer.load_portable).
PORTABLE = "trainable_state.pt"


def file_digests(directory: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file under directory."""
    out = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[f.relative_to(directory).as_posix()] = {"bytes": f.stat().st_size, "sha256": digest.hexdigest()}
    return out


def checkpoint_problem(path: Path) -> Optional[str]:
    """None when the checkpoint directory holds every file its manifest lists, with the listed size
    and sha256 (or, written before manifests existed, has no manifest and is not empty); otherwise
    what is wrong."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None if any(path.iterdir()) else "it is empty"  # written before manifests: unverified
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    found = file_digests(path)
    for name, want in files.items():
        have = found.get(name)
        if have is None:
            return f"{name} is missing"
        if have["bytes"] != want["bytes"]:
            return f"{name} has {have['bytes']:,} bytes, the manifest says {want['bytes']:,} (truncated?)"
        if have["sha256"] != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def choose_checkpoint(root: Path) -> tuple[Optional[str], list[str]]:
    """The newest checkpoint under root that passes checkpoint_problem, and a warning for each newer
    one that does not. Damaged ones are renamed damaged-<tag>-<time> (kept, never loaded) and
    `latest` is pointed at the chosen one. Raises CheckpointError when checkpoints exist but none
    is intact."""
    if not root.is_dir():
        return None, []
    tags = sorted((d.name for d in root.iterdir() if d.is_dir() and d.name.startswith("step")), reverse=True)
    warnings_, bad = [], []
    stamp = utc_stamp()
    for tag in tags:
        problem = checkpoint_problem(root / tag)
        if problem is None:
            if bad:
                atomic_write(root / "latest", lambda p: p.write_text(tag))
            if not (root / tag / MANIFEST).is_file():
                warnings_.append(f"checkpoint {root / tag} has no {MANIFEST} (written by an earlier bpt_ds): it is "
                                 "loaded without checking its files")
            return tag, warnings_
        aside = root / f"damaged-{tag}-{stamp}"
        os.replace(root / tag, aside)
        bad.append(f"{tag}: {problem}")
        warnings_.append(f"checkpoint {root / tag} is damaged: {problem}. It was moved to {aside} and is not "
                         "loaded; trying the one before it")
    if bad:
        raise CheckpointError(f"no intact checkpoint in {root} ({'; '.join(bad)}; each moved to damaged-*). "
                              "Rerun to start from step 0, or restore a copy of the checkpoints")
    return None, []


def pick_checkpoint(root: Path, check: Optional[Callable[[Optional[dict]], None]] = None) -> Optional[str]:
    """The checkpoint a resumed run loads (collective): rank 0 runs choose_checkpoint and prints its
    warnings, every rank gets its answer. Raises CheckpointError on every rank when no checkpoint is
    intact, the newest was written by another number of ranks, or `check` (given the config
    fingerprint in its manifest, None when the manifest has none) raises a ConfigError: the run
    cannot continue it. Cheap: runs before the backbone loads."""
    choice: list = [None]
    if rank() == 0:
        try:
            tag, notes = choose_checkpoint(root)
            for note in notes:
                warn(note)
            choice = [("ok", tag)]
            if tag is not None and (root / tag / MANIFEST).is_file():
                manifest = json.loads((root / tag / MANIFEST).read_text())
                written_by = manifest.get("world_size", world_size())
                if written_by != world_size() and PORTABLE not in manifest.get("files", {}):
                    choice = [("error", f"checkpoint {root / tag} was written by {written_by} rank(s) and this run "
                                        f"has {world_size()}, and it has no rank-independent copy ({PORTABLE}: written "
                                        f"by a bpt_ds from before 2026-12): its optimizer state is per rank. "
                                        f"Launch {written_by} rank(s) to resume, or start over with "
                                        "train.resume=never")]
                elif check is not None:
                    check(manifest.get("config"))
        except Exception as e:  # noqa: BLE001 - whatever it is, every rank must hear of it, or they hang
            choice = [("error", str(e) if isinstance(e, ConfigError) else
                       f"could not check the checkpoints in {root}: {type(e).__name__}: {e}")]
    if world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    kind, value = choice[0]
    if kind == "error":
        raise CheckpointError(value)
    return value


# ------------------------------------------------------------- DeepSpeed config


class Checkpointer:
    """Saves and restores one run's trainable state through its DeepSpeed engine `ds`, under root
    (output_dir/checkpoints), keeping the newest `keep`. trainable_values: the prompt bank's size
    in full (for the free-space estimate before the first checkpoint)."""

    def __init__(self, ds, root: Path, keep: int, trainable_values: int):
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        self.ds, self.root, self.keep, self.trainable_values = ds, Path(root), keep, trainable_values
        self.last_checkpoint_bytes: Optional[int] = None
        self.newest: Optional[str] = None  # the newest checkpoint written or resumed from
        self.written_by: Optional[int] = None  # the rank count of the checkpoint loaded
        if type(ds.checkpoint_engine) is TorchCheckpointEngine:  # DeepSpeed's default engine
            ds.checkpoint_engine = _weights_only_engine(ds._config)
        elif rank() == 0:
            warn(f"the DeepSpeed config selects checkpoint engine {type(ds.checkpoint_engine).__name__}; "
                 "checkpoints are then loaded by it, not with torch.load(weights_only=True)")

    def bytes_estimate(self) -> int:
        """Bytes the next checkpoint needs: the last one's size (plus a margin), or before the first,
        checkpoint_bytes_estimate of the prompt bank."""
        if self.last_checkpoint_bytes is not None:
            return int(self.last_checkpoint_bytes * 1.1) + 2**20
        return checkpoint_bytes_estimate(self.trainable_values)

    def save(self, state: TrainState, fingerprint: dict, schedule_steps: int) -> Optional[Path]:
        """Trainable tensors and optimizer state only; the frozen backbone is not copied.

        Every rank first checks the free space where it writes (one all-reduce): when any rank
        lacks room for a checkpoint, none is written (None is returned), the previous checkpoints
        stay, and training goes on with its state in memory; the next save tries again.

        DeepSpeed writes into a temporary tag; rank 0 adds a manifest (size and sha256 of every
        file), renames the directory into place and then updates `latest` atomically, so a crash
        at any point leaves the previous checkpoint intact, and a damaged file is detected on
        resume (choose_checkpoint).
        """
        root, step = self.root, state.step
        # `config`: the fingerprint that pick_checkpoint compares before the backbone loads;
        # `schedule_steps`: the total the LR schedule runs over (a resume with another train.steps
        # says what changes).
        client_state = {**state.to_dict(), "config": fingerprint, "schedule_steps": schedule_steps}
        need = self.bytes_estimate()
        free = torch.tensor(float(free_bytes(root)), dtype=torch.float64)
        if world_size() > 1:
            free = free.to(self.ds.device)
            dist.all_reduce(free, op=dist.ReduceOp.MIN)
        if free.item() < need:
            if rank() == 0:
                warn(f"checkpoint of step {step} not written: {mib(free.item())} free on the file system of "
                     f"{root} (the fullest a rank writes to), it needs about {mib(need)}. The previous checkpoint "
                     "is kept and training goes on with its state in memory; the next save tries again. Free "
                     "some space.")
            return None
        tag, tmp = f"step{step:08d}", f".tmp-step{step:08d}"
        if rank() == 0 and root.is_dir():
            for leftover in root.glob(".tmp-step*"):  # from a save that a crash interrupted
                shutil.rmtree(leftover)
        barrier()
        self.ds.save_checkpoint(str(root), tag=tmp, client_state=client_state,
                                save_latest=False, exclude_frozen_parameters=True)
        portable = self.portable_state(client_state)  # collective: every rank gathers
        barrier()
        if rank() == 0:
            if portable is not None:
                torch.save(portable, root / tmp / PORTABLE)
            files = file_digests(root / tmp)
            manifest = {"format": 1, "step": step, "world_size": world_size(), "files": files}
            manifest["config"] = fingerprint
            atomic_write(root / tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
            if (root / tag).exists():
                shutil.rmtree(root / tag)
            os.replace(root / tmp, root / tag)
            atomic_write(root / "latest", lambda p: p.write_text(tag))
            done = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step"))
            for old in done[: -self.keep]:
                shutil.rmtree(old)
            self.last_checkpoint_bytes = sum(f["bytes"] for f in files.values())
        size = [self.last_checkpoint_bytes]
        if world_size() > 1:
            dist.broadcast_object_list(size, src=0)
        self.last_checkpoint_bytes = size[0]
        self.newest = str(root / tag)
        return root / tag

    # ------------------------------------------------------------ rank-independent state
    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.ds.module.bank.named_parameters()]

    def _inner_optimizer(self):
        """The torch optimizer that holds the state (inside DeepSpeed's ZeRO optimizer, if any)."""
        return getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)

    def portable_state(self, client_state: dict) -> dict:
        """PORTABLE's content (collective): each trainable tensor's full fp32 value and full
        optimizer state per key, gathered from the ZeRO partitions, plus the optimizer's scalar
        state (e.g. AdamW's step), the LR scheduler's state and the client state. Without ZeRO
        (stage 0) every rank holds all of it: the optimizer's own state_dict."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        inner, stage = self._inner_optimizer(), self.ds.zero_optimization_stage()
        common = {"format": 1, "lr_scheduler": self.ds.lr_scheduler.state_dict(), "client_state": client_state}
        if stage == 0:
            return {**common, "values": {n: p.detach().float().cpu().clone() for n, p in self._trainable()},
                    "optimizer_state_dict": inner.state_dict()}
        tensor_keys, scalars = set(), {}
        for state in inner.state.values():
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    tensor_keys.add(key)
                elif torch.is_tensor(value) or isinstance(value, (int, float)):
                    scalars[key] = float(value)
        if world_size() > 1:  # every rank must make the same collectives below
            every = [None] * world_size()
            dist.all_gather_object(every, sorted(tensor_keys))
            tensor_keys = set().union(*every)
        if stage in (1, 2):
            values, optim = self._zero12_gather(inner, sorted(tensor_keys))
            return {**common, "values": values, "optimizer": optim, "optimizer_scalars": scalars}
        values, optim = {}, {}
        for name, param in self._trainable():
            full = safe_get_full_fp32_param(param)
            values[name] = (full if full is not None else param.detach()).float().cpu().clone()
            for key in sorted(tensor_keys):
                state = safe_get_full_optimizer_state(param, key)
                if state is not None:
                    optim[f"{name}/{key}"] = state.float().cpu().clone()
        return {**common, "values": values, "optimizer": optim, "optimizer_scalars": scalars}

    def _zero12_slices(self):
        """Under ZeRO-1/2: for each parameter group, its data-parallel group, that group's size and
        this rank's place in it, its flat fp32 partition on this rank and [(name, offset, shape)] of the trainable tensors in the group's
        flat buffer. Each rank holds an equal slice of that buffer (DeepSpeed pads it to a multiple
        of the rank count). DeepSpeedZeroOptimizer (ZeRO-2; ZeRO-1 in fp32) flattens its
        round_robin_bit16_groups with alignment gaps (round_robin_bit16_offsets); BF16_Optimizer
        (ZeRO-1 with bf16 weights) flattens bf16_groups back to back."""
        z, names = self.ds.optimizer, {id(p): n for n, p in self._trainable()}
        if hasattr(z, "single_partition_of_fp32_groups"):
            groups, offsets, flats = z.round_robin_bit16_groups, z.round_robin_bit16_offsets, z.single_partition_of_fp32_groups
        elif hasattr(z, "fp32_groups_flat_partition"):
            groups, flats = z.bf16_groups, z.fp32_groups_flat_partition
            offsets = [[sum(q.numel() for q in params[:j]) for j in range(len(params))] for params in groups]
        else:
            raise CheckpointError(f"DeepSpeed's {type(z).__name__} under ZeRO stage {self.ds.zero_optimization_stage()} "
                                  "has no flat fp32 partitions that bpt_ds knows how to read; use ZeRO-3 "
                                  "(ds_configs/zero3_bf16.json) or ZeRO-2 (ds_configs/replicated_bf16.json)")
        for i, params in enumerate(groups):
            layout = [(names[id(p)], off, tuple(p.shape)) for p, off in zip(params, offsets[i])]
            group = z.real_dp_process_group[i]
            world, part = ((dist.get_world_size(group=group), dist.get_rank(group=group)) if world_size() > 1
                           else (1, 0))
            yield group, world, part, flats[i], layout

    def _zero12_gather(self, inner, keys: list[str]) -> tuple[dict, dict]:
        """The full fp32 values and optimizer state (per key) of every trainable tensor under
        ZeRO-1/2 (collective): each group's flat partitions all-gathered from every rank, then
        cut at the tensors' offsets. (DeepSpeed's per-tensor fragment getters fail for tensors a
        rank holds no part of: "exp_avg not found in optimizer state fragment".)"""
        values, optim = {}, {}
        for group, world, _, flat, layout in self._zero12_slices():
            state = inner.state.get(flat, {})
            for key in [None, *keys]:
                mine = flat.detach() if key is None else state.get(key, torch.zeros_like(flat))
                mine = mine.float().to(self.ds.device)
                pieces = [mine]
                if world > 1:
                    pieces = [torch.empty_like(mine) for _ in range(world)]
                    dist.all_gather(pieces, mine, group=group)
                full = torch.cat(pieces).cpu()
                for name, off, shape in layout:
                    n = int(torch.Size(shape).numel())
                    piece = full[off:off + n].view(shape).clone()
                    if key is None:
                        values[name] = piece
                    else:
                        optim[f"{name}/{key}"] = piece
        return values, optim

    def _zero12_scatter(self, inner, saved: dict, keys: list[str]) -> None:
        """Writes this rank's slice of the saved full state into its ZeRO-1/2 flat partitions:
        the fp32 master values and each optimizer state tensor."""
        for _, world, part, flat, layout in self._zero12_slices():
            size = flat.numel()
            for key in [None, *keys]:
                full = torch.zeros(size * world)
                for name, off, shape in layout:
                    value = saved["values"][name] if key is None else saved["optimizer"][f"{name}/{key}"]
                    full[off:off + value.numel()] = value.flatten()
                mine = full[part * size:(part + 1) * size]
                target = flat.data if key is None else inner.state[flat][key]
                target.copy_(mine.to(target.device, target.dtype))

    def load_portable(self, tag: str) -> dict:
        """Restores PORTABLE of checkpoint `tag` on any number of ranks: every rank reads the full
        state and keeps its part: the model's copy of each trainable tensor (gathered, set, and
        partitioned again under ZeRO-3), its fp32 master and optimizer state (under ZeRO-3 this
        rank's slice of the padded flat tensor, written directly: the full setters require
        sizes the rank count divides), then the optimizer's scalars and the schedule. Returns
        the client state."""
        import deepspeed
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        saved = torch.load(self.root / tag / PORTABLE, map_location="cpu", weights_only=True)
        stage, inner, device = self.ds.zero_optimization_stage(), self._inner_optimizer(), self.ds.device
        zero3 = stage == 3
        for name, param in self._trainable():
            value = saved["values"][name]
            if tuple(value.shape) != tuple(getattr(param, "ds_shape", param.shape)):
                raise ConfigError(f"checkpoint {self.root / tag}: {name} has shape {list(value.shape)}, this run's "
                                  f"is {list(getattr(param, 'ds_shape', param.shape))}; use a new output_dir, or "
                                  "train.resume=never")
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=zero3):
                param.data.copy_(value.to(param.device, param.dtype))  # the model's (low-precision) copy
        if "optimizer_state_dict" in saved:  # written without ZeRO: the optimizer's own state
            if stage != 0:
                raise ConfigError(f"checkpoint {self.root / tag} was written without ZeRO (stage 0) and this run uses "
                                  f"ZeRO stage {stage}; resume with the DeepSpeed config that wrote it, or "
                                  "train.resume=never")
            inner.load_state_dict(saved["optimizer_state_dict"])
        else:
            if stage == 0:
                raise ConfigError(f"checkpoint {self.root / tag} was written under ZeRO and this run has no ZeRO "
                                  "(stage 0); resume with the DeepSpeed config that wrote it, or train.resume=never")
            # torch optimizers create their state at their first step: create it (for the flat fp32
            # partitions ZeRO hands them) so that the saved state can be written into it.
            keys = sorted({k.rpartition("/")[2] for k in saved["optimizer"]})
            on_device = bool(inner.defaults.get("fused") or inner.defaults.get("capturable"))
            # ZeRO-3 hands the optimizer its flat partitions only for the step; ZeRO-1/2 keep them in its groups.
            flats = getattr(self.ds.optimizer, "fp32_partitioned_groups_flat", None) or [
                flat for group in inner.param_groups for flat in group["params"]]
            for flat in flats:
                state = inner.state[flat]
                for key in keys:
                    if not torch.is_tensor(state.get(key)):
                        state[key] = torch.zeros_like(flat)
                for key, value in saved["optimizer_scalars"].items():
                    state[key] = torch.tensor(value, dtype=torch.float32, device=flat.device if on_device else "cpu")
            if not zero3:
                self._zero12_scatter(inner, saved, keys)
            for name, param in (self._trainable() if zero3 else ()):
                # this rank's slice of the padded partition, written directly (the full setters
                # require sizes the rank count divides)
                z3 = self.ds.optimizer
                size, part = param.ds_tensor.numel(), z3._get_param_partition_rank(param)
                full = {None: saved["values"][name], **{key.rpartition("/")[2]: v for key, v in saved["optimizer"].items()
                                                        if key.rpartition("/")[0] == name}}
                for key, value in full.items():
                    padded = torch.zeros(size * z3._get_param_partition_world_size(param))
                    padded[:value.numel()] = value.flatten()
                    mine = padded[part * size:(part + 1) * size].to(device)
                    if key is None:
                        safe_set_local_fp32_param(param, mine)
                    else:
                        safe_set_local_optimizer_state(param, mine, key)
        self.ds.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        step = int(saved["client_state"]["step"])
        self.ds.global_steps, self.ds.global_samples = step, step * self.ds.train_batch_size()
        return saved["client_state"]

    def load(self, tag: str) -> tuple[TrainState, dict]:
        """Restores checkpoint `tag` (from pick_checkpoint) into the engine; returns the loop's state
        and the whole client state (with `config`, `schedule_steps`: None in older checkpoints).
        Written by this many ranks: DeepSpeed's own files; by another number: PORTABLE."""
        root = self.root
        manifest = root / tag / MANIFEST
        written_by = json.loads(manifest.read_text()).get("world_size") if manifest.is_file() else None
        self.written_by = written_by
        if written_by not in (None, world_size()):
            client_state = self.load_portable(tag)
            self.last_checkpoint_bytes = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file())
            self.newest = str(root / tag)
            return TrainState.from_dict(client_state), client_state
        try:
            _, client_state = self.ds.load_checkpoint(str(root), tag=tag, load_module_strict=False,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, KeyError, AssertionError) as e:
            if is_comm_failure(e):
                raise  # a rank was lost while loading: launch/train.py names it
            raise ConfigError(f"checkpoint {root / tag} does not fit this run (was the prompt, particle or "
                              f"factor setup, or the number of ranks, changed?): {e}. Use a new output_dir, or "
                              "train.resume=never") from None
        if client_state is None:
            raise ConfigError(f"could not load checkpoint {root / tag}; use a new output_dir, or train.resume=never")
        self.last_checkpoint_bytes = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file())
        self.newest = str(root / tag)
        return TrainState.from_dict(client_state), client_state

    def set_aside(self) -> Optional[Path]:
        """train.resume=never: earlier checkpoints (and the earlier TensorBoard log, which the new
        run's curves would mix with) move to dated siblings instead of being deleted. Returns
        where the checkpoints went, if there were any."""
        root = self.root
        stamp = utc_stamp()
        moved = None
        if rank() == 0:
            for old in (root, root.with_name("tb")):
                if old.is_dir() and any(old.iterdir()):
                    target = old.with_name(f"{old.name}-set-aside-{stamp}")
                    os.replace(old, target)
                    moved = target if old == root else moved
            set_aside_tracker_runs(root.parent, stamp)  # a fresh start is a new tracker run
        barrier()
        return moved
