"""The DeepSpeed seam: config resolution, deepspeed.initialize, steps, evaluation,
checkpoints and TensorBoard. Stages call this; nothing else imports DeepSpeed's engine.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from .config import ConfigError, RunConfig, require_batch_per_particle
from .data.batching import EncodedTask, collate, pad_candidates
from .model import PromptedT5

log = logging.getLogger(__name__)

# torch 2.13 deprecates the collective names DeepSpeed 0.19 calls every step; the warning
# repeats for each call and buries the progress bar. It says nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ processes


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Joins the job the launcher started; a plain `python launch/train.py` becomes a job of one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime

    global _TIMEOUT_S
    _TIMEOUT_S = timeout_minutes * 60
    if on_gpu():
        # Each rank on its own GPU before the first collective: setup gathers objects (checks every
        # rank must agree on, the checkpoint to resume) before DeepSpeed would set the device.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=datetime.timedelta(minutes=timeout_minutes))


_TIMEOUT_S = 1800.0


# What a lost connection or a timed-out collective looks like from torch: DistError
# subclasses, or gloo's / NCCL's RuntimeError texts.
_COMM_FAILURE_TEXTS = ("Timed out waiting", "Connection reset by peer", "Connection closed by peer",
                       "Connection refused", "Watchdog caught collective operation timeout",
                       "NCCL communicator was aborted", "gloo/transport")


def is_comm_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _COMM_FAILURE_TEXTS)


def unresponsive_ranks(wait_seconds: Optional[float] = None) -> Optional[list[int]]:
    """After a failed collective: the ranks that do not check in through the job's store within
    wait_seconds (default: half the collective timeout, 3 to 15 s; lost, hung, or stuck in
    another collective). None when the store cannot be reached: rank 0 hosts it, so then rank
    0 itself is gone."""
    import datetime

    if not dist.is_initialized():
        return None
    if wait_seconds is None:
        wait_seconds = min(15.0, max(3.0, _TIMEOUT_S / 2))
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=wait_seconds))
        store.set(f"bpt_ds/alive/{rank()}", "1")
        deadline = time.monotonic() + wait_seconds
        while True:
            missing = [r for r in range(world_size()) if not store.check([f"bpt_ds/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.5)
    except Exception:  # noqa: BLE001 - any store failure means the same: rank 0 is unreachable
        return None


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_gpu() -> bool:
    return get_accelerator().device_name() != "cpu"


# ------------------------------------------------------------ faults and stops


class Preempted(RuntimeError):
    """A rank got SIGTERM or SIGINT: every rank saved a checkpoint at the next step boundary and
    stopped. `signum` is the signal (launch/train.py exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.signum = signum


class TrainingHalted(RuntimeError):
    """train.max_bad_steps steps in a row were non-finite: training stopped, checkpoints kept."""


class SaveError(RuntimeError):
    """An output could not be written in train.save_retry_minutes; the message says where it went."""


class CheckpointError(ConfigError):
    """No intact checkpoint to resume from, or a checkpoint file that is not plain tensors."""


# The first stop signal this rank got (SIGTERM or SIGINT), or None.
_STOP_SIGNAL: Optional[int] = None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def install_stop_handler() -> None:
    """SIGTERM (SLURM preemption or time limit, scancel, a launcher stopping its ranks) and SIGINT
    (Ctrl-C) no longer kill a rank mid-step: the first is noted, and at the next step boundary the
    ranks agree (one all-reduce, Engine.train_step) to save a checkpoint and stop (Preempted).
    After a SIGINT, SIGINT gets its default action back: a second Ctrl-C kills at once (even a
    rank blocked in a collective or a long kernel), without saving."""
    if threading.current_thread() is not threading.main_thread():
        return

    def note(signum, frame):
        global _STOP_SIGNAL
        if _STOP_SIGNAL is None:
            _STOP_SIGNAL = signum
            again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            # os.write: print() may be interrupted mid-line by this very handler.
            os.write(2, f"[bpt_ds] rank {rank()}: {signal_name(signum)} received; a checkpoint will be "
                        f"saved at the next step boundary, then the run stops{again}\n".encode())
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds path (or would hold it, once created)."""
    return shutil.disk_usage(_existing(path)).free


def warn(message: str) -> None:
    """A warning line on stderr (callers decide which ranks say it)."""
    print(f"[bpt_ds] warning: {message}", file=sys.stderr, flush=True)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def utc_stamp() -> str:
    """Now, for the names of directories moved aside (damaged or set-aside checkpoints)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def checkpoint_bytes_estimate(trainable_values: int) -> int:
    """Bytes of one checkpoint before any was written: 16 per trainable value (weights, Adam's two
    moments, master copy) and DeepSpeed's per-file overhead."""
    return 16 * trainable_values + (world_size() + 1) * 2**16 + 2**20


def on_every_rank(check: Callable[[], None]) -> None:
    """Runs a check that may raise ConfigError on every rank; when it fails on any rank, every rank
    raises that error (naming the rank), instead of the others hanging in the next collective."""
    try:
        check()
        problem = None
    except ConfigError as e:
        problem = str(e)
    problems = [problem]
    if world_size() > 1:
        problems = [None] * world_size()
        dist.all_gather_object(problems, problem)
    failed = [(r, p) for r, p in enumerate(problems) if p is not None]
    if failed:
        r, p = failed[0]
        raise ConfigError(p if world_size() == 1 else f"rank {r}: {p}")


def check_writable(directory: Path, key: str = "output_dir") -> None:
    """Creates directory and writes, syncs and deletes a probe file in it; a ConfigError naming
    the key otherwise (before any data or weights load)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{socket.gethostname()}-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"bpt_ds")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: cannot write to '{directory}' ({e.strerror or e}); choose a directory this job "
                          f"can write to on every node, e.g. {key}=$HOME/runs/<name>") from None


def check_free_space(directory: Path, need: int, what: str, key: str = "output_dir") -> None:
    free = free_bytes(directory)
    if free < need:
        raise ConfigError(f"{key}: the file system of '{directory}' has {mib(free)} free, and {what} need about "
                          f"{mib(need)}; free some space or choose another {key}")


def write_with_retry(path: Path, write: Callable[[Path], None], minutes: float, interval: float = 30.0) -> float:
    """atomic_write that survives a full or read-only disk for a while: on OSError it says so and
    retries every `interval` seconds for `minutes`, the data staying in memory; then it writes
    the file into a rescue directory under the system's temporary directory and raises SaveError
    naming it. Returns the minutes spent waiting."""
    started = time.monotonic()
    deadline = started + minutes * 60
    told = False
    while True:
        try:
            atomic_write(path, write)
            return (time.monotonic() - started) / 60 if told else 0.0
        except OSError as e:
            error = e
            try:
                path.with_name(f".tmp-{path.name}").unlink(missing_ok=True)
            except OSError:
                pass
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not told:
            print(f"[bpt_ds] could not write {path}: {error}. Its data stays in memory: free space or fix the "
                  f"permissions; retrying every {interval:.0f} s for {minutes:g} min (train.save_retry_minutes)",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(min(interval, left))
    rescue = Path(tempfile.gettempdir()) / f"bpt_ds-rescue-{os.getpid()}" / path.name
    try:
        atomic_write(rescue, write)
        where = f"it was written to {rescue} instead; copy it to {path.parent} once there is room"
    except OSError as e:
        where = f"writing it to {rescue} failed too ({e})"
    raise SaveError(f"could not write {path}: {error}; {where}")


# A DeepSpeed checkpoint file holds tensors, numbers, strings and these three DeepSpeed types; a
# file that needs anything else to unpickle is refused rather than trusted.
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
                if written_by != world_size():
                    choice = [("error", f"checkpoint {root / tag} was written by {written_by} rank(s) and this run "
                                        f"has {world_size()}: ZeRO keeps optimizer state per rank. Launch "
                                        f"{written_by} rank(s) to resume, or start over with train.resume=never")]
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


def find_ds_config(name: str) -> Path:
    if name == "auto":
        name = "ds_configs/zero3_bf16.json" if on_gpu() else "ds_configs/cpu_zero3.json"
    for candidate in (Path(name), PROJECT_ROOT / name):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"deepspeed.config: file '{name}' does not exist; use one of "
                      f"{', '.join(sorted(p.name for p in (PROJECT_ROOT / 'ds_configs').glob('*.json')))} "
                      "in ds_configs/ or your own DeepSpeed JSON")


def resolve_ds_config(cfg: RunConfig, world: int) -> dict:
    """DeepSpeed's own JSON, with batch sizes, clipping and precision filled from the run config.

    Those keys may say "auto" (or be absent) in the JSON; a concrete value that disagrees
    with the run config is an error rather than a silent override. data_types.grad_accum_dtype
    ("auto" or absent) becomes fp32, also under bf16; any other value is refused.
    """
    path = find_ds_config(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: '{path}' is not valid JSON: {e}") from None
    t = cfg.train
    micro = micro_batch_size(t.global_batch_size, t.micro_batch_size, world)
    filled = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.global_batch_size // (micro * world),
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"{path}: '{key}' is {ds[key]} but the run config gives {value}; "
                              "set it to \"auto\" in the JSON and choose it under train.*")
        ds[key] = value
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"{path}: fp16 is enabled; T5 overflows in fp16. Use model.dtype=bf16 "
                          "(\"bf16\": {\"enabled\": \"auto\"}) or fp32")
    bf16 = ds.setdefault("bf16", {})
    in_json = bf16.get("enabled", "auto")
    if in_json not in ("auto", True, False):
        raise ConfigError(f"{path}: bf16.enabled must be true, false or \"auto\"; got {in_json!r}")
    if cfg.model.dtype == "auto" and in_json != "auto":
        want = bool(in_json)  # the DeepSpeed JSON decides when the run config leaves it open
    else:
        want = model_dtype(cfg) == "bf16"
        if in_json not in ("auto", want):
            raise ConfigError(f"{path}: bf16.enabled is {in_json} but model.dtype is "
                              f"{cfg.model.dtype}; set bf16.enabled to \"auto\" or change model.dtype")
    bf16["enabled"] = want
    # Gradients accumulate over micro-batches (and reach the gradient hook and the fp32 master
    # weights) in fp32; DeepSpeed's default is the model dtype, i.e. bf16 sums under bf16.
    data_types = ds.setdefault("data_types", {})
    if not isinstance(data_types, dict):
        raise ConfigError(f"{path}: data_types must be an object, e.g. {{\"grad_accum_dtype\": \"auto\"}}; "
                          f"got {data_types!r}")
    accum = data_types.get("grad_accum_dtype", "auto")
    if accum not in ("auto", "fp32", "float32", "float", "torch.float32"):
        raise ConfigError(f"{path}: data_types.grad_accum_dtype is {accum!r}; bpt_ds accumulates gradients in "
                          "fp32 (the gradient hook (SVGD, the prior, per-teacher clipping) and the fp32 master "
                          "weights need them unrounded): set it to \"auto\" (or \"fp32\") in the JSON")
    data_types["grad_accum_dtype"] = "fp32"
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if want and stage in (0, "0"):
        # DeepSpeed 0.19 has no fp32 accumulation for bf16 weights without ZeRO: deepspeed.initialize
        # would fail with "unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32".
        raise ConfigError(f"{path}: bf16 without ZeRO (zero_optimization.stage 0 or absent) would accumulate "
                          "gradients in bf16, which bpt_ds does not do; set zero_optimization.stage to 1, 2 or 3 "
                          "(ds_configs/replicated_bf16.json keeps the whole backbone on every GPU with ZeRO-2), "
                          "or train in fp32 (model.dtype=fp32)")
    # The optimizer is ours (torch AdamW with per-part learning rates), which ZeRO accepts
    # only when told so.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)
    return ds


def micro_batch_size(global_batch: int, micro: Optional[int], world: int) -> int:
    """The per-rank micro-batch: as configured, or the largest divisor of global/world up to 16."""
    if global_batch % world:
        raise ConfigError(f"train.global_batch_size ({global_batch}) must be a multiple of the world "
                          f"size ({world}); e.g. train.global_batch_size={world * max(1, global_batch // world)}")
    per_rank = global_batch // world
    if micro is None:
        return max(m for m in range(1, min(16, per_rank) + 1) if per_rank % m == 0)
    if per_rank % micro:
        raise ConfigError(
            f"train.global_batch_size ({global_batch}) must be a multiple of train.micro_batch_size "
            f"({micro}) x world size ({world}); e.g. train.micro_batch_size={per_rank} (or null for auto)")
    return micro


def model_dtype(cfg: RunConfig) -> str:
    """The dtype model.dtype asks for; "auto" is bf16 on GPUs and fp32 on CPU."""
    if cfg.model.dtype == "auto":
        return "bf16" if on_gpu() else "fp32"
    return cfg.model.dtype


def check_memory(cfg: RunConfig, ds_config: dict, model_path: str, placement: str):
    """The planner's estimate for this run on this hardware (bpt_ds.plan.check_run): raises
    ConfigError when it cannot fit; None with deepspeed.memory_check=false. Host memory is always
    checked: deepspeed.host_memory_gb, else this machine's total. Without a GPU (and without
    deepspeed.device_memory_gb) there is no device: every local rank's states and activations
    are in host memory, and check_run adds them to what loading takes."""
    from .plan import THIS_MACHINE, check_run, machine_memory

    ds = cfg.deepspeed
    device_memory = None
    if ds.device_memory_gb is not None:
        device_memory = int(ds.device_memory_gb * 2**30)
    elif on_gpu():
        device_memory = get_accelerator().total_memory()
    if ds.host_memory_gb is not None:
        host_memory, source = int(ds.host_memory_gb * 2**30), "deepspeed.host_memory_gb"
    else:
        host_memory, source = machine_memory(), THIS_MACHINE
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world_size())
    return check_run(cfg, ds_config, model_path, placement, world_size(), local, device_memory, host_memory,
                     source)


def ds_dtype(ds_config: dict) -> str:
    """The dtype a resolved DeepSpeed config trains in (what the backbone must be loaded as)."""
    return "bf16" if ds_config["bf16"]["enabled"] else "fp32"


# -------------------------------------------------------------------- schedule


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


# ---------------------------------------------------------------------- engine


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes through a temporary sibling, then renames: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the bytes reach the disk before the name does
    finally:
        os.close(fd)
    os.replace(tmp, path)


GradHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepStats:
    """Loss sums and their units of one rank, per particle and per task, and per task for each
    extra loss term a model reports (mpt-distill's plm / logits_kl / hidden_mse), for logging.
    A row's loss is summed over its target tokens; its units are its target tokens (per-token
    convention) or 1 (per-example: bmtpt-source), so a reduced mean is the loss the stage
    minimizes: mean token cross-entropy, or mean summed negative log-likelihood per example."""

    particle_sum: torch.Tensor
    particle_units: torch.Tensor
    task_sum: torch.Tensor
    task_units: torch.Tensor
    terms: tuple = ()
    term_sum: Optional[torch.Tensor] = None   # [len(terms), tasks]

    @classmethod
    def zeros(cls, particles: int, tasks: int, device, terms: tuple = ()) -> "StepStats":
        z = lambda *n: torch.zeros(*n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(particles), z(particles), z(tasks), z(tasks), tuple(terms), z(len(terms), tasks))

    def add(self, rows: torch.Tensor, units: torch.Tensor, particles: torch.Tensor, tasks: torch.Tensor,
            extra: Optional[dict] = None) -> None:
        rows, units = rows.double(), units.double()
        self.particle_sum.index_add_(0, particles, rows)
        self.particle_units.index_add_(0, particles, units)
        self.task_sum.index_add_(0, tasks, rows)
        self.task_units.index_add_(0, tasks, units)
        for i, name in enumerate(self.terms):
            self.term_sum[i].index_add_(0, tasks, extra[name].double())

    def merge(self, other: "StepStats") -> None:
        for f in ("particle_sum", "particle_units", "task_sum", "task_units", "term_sum"):
            getattr(self, f).add_(getattr(other, f))

    def reduced(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple[float, torch.Tensor]]]:
        """(mean loss per particle, mean loss per task, {term: (mean, mean per task)}) over all
        ranks (collective), per unit; NaN where no rows."""
        packed = torch.cat([self.particle_sum, self.particle_units, self.task_sum, self.task_units,
                            self.term_sum.flatten()])
        if world_size() > 1:
            dist.all_reduce(packed)
        m, t = self.particle_sum.numel(), self.task_sum.numel()
        ps, pr, ts, tr, terms = packed.split([m, m, t, t, len(self.terms) * t])
        nan = torch.tensor(float("nan"), dtype=packed.dtype, device=packed.device)
        per_task = lambda sums: torch.where(tr > 0, sums / tr.clamp(min=1), nan).float().cpu()  # noqa: E731
        out = {name: ((row.sum() / tr.sum().clamp(min=1)).item(), per_task(row))
               for name, row in zip(self.terms, terms.view(len(self.terms), t))}
        return torch.where(pr > 0, ps / pr.clamp(min=1), nan).float().cpu(), per_task(ts), out


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Placement:
    """Which rows of the global batch a rank runs, and under which particle.

    mode "every": every rank runs every particle on its 1/R share of the global batch
    (independent particles, as in stage pt: each particle sees the whole global batch).
    mode "split" (SVGD): the global batch is cut into M consecutive blocks of B/M
    examples, block m belonging to particle m; rank r runs rows [r·B/R, (r+1)·B/R). With
    M a multiple of R a rank holds M/R whole particles; with R a multiple of M, R/M ranks
    share a particle and split its block. The assignment depends on (B, M) only, never on
    R, so 1 rank and R ranks compute the same thing.
    """

    mode: Literal["every", "split"]
    particles: int
    world: int
    global_batch: int

    @classmethod
    def make(cls, mode: str, particles: int, world: int, global_batch: int) -> "Placement":
        if mode == "split":
            if particles % world and world % particles:
                fits = sorted({m for m in (world // 2, world, 2 * world, 4 * world) if m >= 1 and
                               (m % world == 0 or world % m == 0)})
                raise ConfigError(
                    f"prompt.particles ({particles}) and the number of ranks ({world}) do not fit: SVGD "
                    f"places whole particles on ranks, so one must be a multiple of the other; e.g. "
                    f"prompt.particles={' or '.join(map(str, fits))}, or launch a number of ranks that "
                    f"divides or is a multiple of {particles}")
            require_batch_per_particle(global_batch, particles)
        return cls(mode, particles, world, global_batch)

    def examples_per_particle(self) -> int:
        return self.global_batch if self.mode == "every" else self.global_batch // self.particles

    def rank_rows(self, r: int) -> tuple[int, int]:
        per_rank = self.global_batch // self.world
        return r * per_rank, (r + 1) * per_rank

    def row_particles(self, r: int) -> Optional[torch.Tensor]:
        """The particle of each of rank r's rows (split), or None (every particle on every row)."""
        if self.mode == "every":
            return None
        lo, hi = self.rank_rows(r)
        return torch.arange(lo, hi) // self.examples_per_particle()

    def local_particles(self, r: int) -> list[int]:
        rows = self.row_particles(r)
        return list(range(self.particles)) if rows is None else sorted(set(rows.tolist()))

    def row_weight(self, accumulation: int) -> float:
        """R · accumulation: what undoes DeepSpeed's division by the accumulation steps and its
        average over R ranks. train_step divides it by each row's `loss_denominator` (row_weights)."""
        return float(self.world * accumulation)

    def particle_denominators(self, units: torch.Tensor) -> torch.Tensor:
        """For each example of the global batch ([B] units: its target tokens, or 1), the units of
        its particle's share of the global batch: the whole batch ("every"), or its block
        ("split"). Every rank computes the same global batch, so the same counts."""
        if self.mode == "every":
            return units.sum().expand(units.shape[0]).clone()
        e = self.examples_per_particle()
        return units.view(self.particles, e).sum(1).repeat_interleave(e)


def row_weights(mb: dict, row_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pops the micro-batch's `loss_units` and `loss_denominator` (PromptTuning.batches_at) and
    returns (weight of each example's summed loss, its units): row_weight / denominator. With
    Placement.row_weight, each particle's gradient after DeepSpeed's reduction is that of its
    summed loss over its share of the global batch divided by that share's units (target tokens,
    or examples), on any number of ranks and micro-batches."""
    units, denominator = mb.pop("loss_units"), mb.pop("loss_denominator")
    return row_weight / denominator.double(), units


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW whose step becomes a no-op while `skip` is set: a step with a non-finite loss,
    gradient or SVGD direction moves neither the prompts nor Adam's moments and step count."""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def _set_full_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Replaces the (reduced) gradient of param by value, the full unpadded tensor that every rank
    computed alike, kept in the accumulation dtype (fp32: no rounding of value).

    Under ZeRO-3 each rank writes its own partition through DeepSpeed's local API. ZeRO-3 pads a
    parameter's partitions to ceil(numel / ranks) values, and DeepSpeed 0.19.8's full-tensor
    setter (safe_set_full_grad -> set_fp32_grad_for_param) cuts the unpadded value at rank x
    partition size: whenever numel does not divide by the ranks, the last rank's cut runs past
    the end ("start (684) + length (342) exceeds dimension size (1024)" for 1,024 values on 3
    ranks). Here the cut stops at numel and the padding is written as zeros, as DeepSpeed's
    reduce-scatter leaves it."""
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad

    if not hasattr(param, "ds_id"):
        safe_set_full_grad(param, value)  # ZeRO-1/2 or none: DeepSpeed cuts by fragment address
        return
    flat = value.reshape(-1)
    if flat.numel() != param.ds_numel:
        raise RuntimeError(f"gradient hook returned {flat.numel()} values for a parameter of {param.ds_numel}")
    part = param.ds_tensor.numel()
    group = getattr(param, "ds_process_group", None)
    start = min(flat.numel(), dist.get_rank(group=group) * part if dist.is_initialized() else 0)
    mine = flat[start:start + part]
    if mine.numel() < part:
        mine = torch.cat([mine, mine.new_zeros(part - mine.numel())])
    safe_set_local_grad(param, mine)


class Engine:
    def __init__(self, cfg: RunConfig, model: PromptedT5, ds_config: dict):
        self.cfg = cfg
        self.model = model
        t = cfg.train
        bank = model.bank
        groups = [{"params": [bank.particles], "lr": t.lr, "name": "particles"}]
        if bank.rank > 0:
            groups.append({"params": [bank.factor_u, bank.factor_v],
                           "lr": t.factor_lr if t.factor_lr is not None else t.lr, "name": "factors"})
        self.base_optimizer = optimizer = SkippableAdamW(groups, lr=t.lr, weight_decay=t.weight_decay,
                                                         fused=True if t.fused_adamw else None)
        # Over this run's train.steps; a resume with more (or fewer) steps rebuilds it (follow_schedule).
        self.lr_factor = factor = lr_lambda(t.schedule, t.warmup_steps, t.steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if type(self.ds.checkpoint_engine) is TorchCheckpointEngine:  # DeepSpeed's default engine
            self.ds.checkpoint_engine = _weights_only_engine(self.ds._config)
        elif rank() == 0:
            warn(f"the DeepSpeed config selects checkpoint engine {type(self.ds.checkpoint_engine).__name__}; "
                 "checkpoints are then loaded by it, not with torch.load(weights_only=True)")
        if cfg.model.compile != "none":
            # torch.compile of the whole prompted model; the first steps (and new input shapes
            # until dynamo marks them dynamic) pay for the compilation.
            if rank() == 0:
                print(f"[bpt_ds] model.compile={cfg.model.compile}: the prompted model runs under torch.compile",
                      flush=True)
                if self.ds.zero_optimization_stage() == 3 and not self.ds.is_deepcompile_enabled():
                    warn("under ZeRO-3 the compiled graph breaks at every module (DeepSpeed gathers each "
                         "module's weights outside it); compile pays with a replicated backbone "
                         "(ds_configs/replicated_bf16.json, when python -m bpt_ds.plan says it fits)")
            self.ds.compile(backend=cfg.model.compile)
        self.device = self.ds.device
        self.hook_seconds = 0.0  # wall time in the gradient hook (gathers + SVGD), for perf logging
        # Of the latest step: why it was skipped ("loss", "gradient", "direction") or None, and
        # whether a rank asked the run to stop (SIGTERM or SIGINT), and which signal: each rank keeps
        # the first it got, and across ranks SIGTERM wins (the all-reduce takes the largest number).
        self.skipped: Optional[str] = None
        self.stop_requested = False
        self.stop_signal: Optional[int] = None
        self.last_checkpoint_bytes: Optional[int] = None

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict], row_weight: float,
                   grad_hook: Optional[GradHook] = None) -> "StepStats":
        """One optimizer step over this rank's micro-batches.

        Each row's loss (summed over its target tokens) is multiplied by row_weight divided by
        its micro-batch's `loss_denominator` before backward (row_weights). DeepSpeed divides
        by the accumulation steps and averages over ranks; Placement.row_weight undoes exactly
        that, so the particles' gradient is, row by row, the gradient of each particle's loss
        per unit (target token or example) over its share of the step's global batch.

        grad_hook(theta, grad) -> grad runs once per optimizer step, after the last
        backward (gradients reduced over ranks) and before the optimizer: it sees the
        full fp32 particles [M, l, d] and their full gradient, on every rank alike, and
        returns the gradient the optimizer is to use (SVGD's -phi, a prior's term).
        """
        self.ds.train()
        bank = self.model.bank
        stats = None
        bad_loss = torch.zeros((), device=self.device)
        for mb in micro_batches:
            mb = self._to_device(mb)
            weights, units = row_weights(mb, row_weight)
            rows, particles, *extra = self.ds(**mb)
            extra = extra[0] if extra else {}
            if stats is None:
                stats = StepStats.zeros(bank.num_particles, len(bank.tasks) or 1, self.device, tuple(extra))
            bad_loss = torch.maximum(bad_loss, (~torch.isfinite(rows.detach())).any().float())
            reps = rows.shape[0] // weights.shape[0]  # placement "every": M rows per example
            weights, units = weights.repeat(reps), units.repeat(reps)
            self.ds.backward((rows * weights.to(rows.dtype)).sum())
            boundary = self.ds.is_gradient_accumulation_boundary()
            if boundary:
                self.skipped = self._check_step(bad_loss, grad_hook)
                # A skipped step: DeepSpeed still clips and clears the gradients, the optimizer moves nothing.
                self.base_optimizer.skip = self.skipped is not None
            skipped_by_deepspeed = self.ds.skipped_steps
            try:
                self.ds.step()
            finally:
                self.base_optimizer.skip = False
            if boundary and self.ds.skipped_steps > skipped_by_deepspeed:
                # DeepSpeed's ZeRO optimizers also drop a step whose gradient norm is not finite, and
                # then do not step the schedule; a skipped SVGD direction does. The schedule follows
                # the data steps in both cases.
                self.skipped = self.skipped or "gradient"
                if self.scheduler is not None:
                    self.scheduler.step()
            stats.add(rows.detach(), units, particles, mb["task_ids"].repeat(reps), extra)
        return stats

    def _check_step(self, bad_loss: torch.Tensor, grad_hook: Optional["GradHook"]) -> Optional[str]:
        """At the accumulation boundary, before the optimizer: one all-reduce tells every rank
        whether any rank saw a non-finite loss or gradient, and whether any rank was asked to stop.
        Then the gradient hook runs (SVGD, a prior), and its direction is checked too. Returns why
        the step must be skipped, or None."""
        flags = torch.stack([bad_loss.float(),
                             torch.tensor(0.0 if self._local_grads_finite() else 1.0, device=self.device),
                             torch.tensor(float(_STOP_SIGNAL or 0), device=self.device)])
        if world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss_any, bad_grad_any, stop_any = flags.tolist()
        if stop_any > 0 and not self.stop_requested:
            self.stop_requested, self.stop_signal = True, int(stop_any)
        if bad_loss_any > 0:
            return "loss"
        if bad_grad_any > 0:
            return "gradient"
        if grad_hook is not None:
            started = time.perf_counter()
            finite = self._apply_grad_hook(grad_hook)
            self.hook_seconds += time.perf_counter() - started
            if not finite:
                return "direction"
        return None

    def _local_grads_finite(self) -> bool:
        """Whether this rank's share of the trainable gradients is finite (ZeRO-3: its partition;
        otherwise the full gradient, which every rank assembles alike)."""
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        for param in self.model.bank.parameters():
            if not param.requires_grad:
                continue
            grad = safe_get_local_grad(param) if hasattr(param, "ds_id") else safe_get_full_grad(param)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                return False
        return True

    def _apply_grad_hook(self, hook: "GradHook") -> bool:
        # DeepSpeed documents these for "modifying partitioned states": after backward, before
        # step. Under ZeRO-3 the getters all-gather the fp32 partitions (gradients: in the
        # accumulation dtype, fp32 by resolve_ds_config); every rank computes the same full
        # tensor and writes back its own partition (_set_full_grad).
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        param = self.model.bank.particles
        theta = safe_get_full_fp32_param(param)
        if theta is None:
            theta = param.detach()
        grad = safe_get_full_grad(param)
        if grad is None:
            raise RuntimeError("the particles have no gradient after backward; is the prompt bank frozen?")
        shape = self.model.bank.shape
        new = hook(theta.float().reshape(shape), grad.float().reshape(shape))
        # Every rank computes the same direction; the all-reduce only makes the verdict certain.
        bad = torch.tensor(0.0 if bool(torch.isfinite(new).all()) else 1.0, device=self.device)
        if world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            return False
        _set_full_grad(param, new.to(torch.float32).reshape(grad.shape))
        return True

    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def follow_schedule(self) -> tuple[float, float]:
        """After load_checkpoint: sets every group's LR to this run's schedule at the restored step.
        The optimizer state brings back the LR the checkpoint's schedule had for the next step; when
        train.steps changed, that is not this run's (e.g. 0 after a finished linear decay), and the
        scheduler would only correct it after that step. Returns the particles' LR (before, after);
        equal when the schedule is unchanged (the same expression as LambdaLR's, so bit for bit)."""
        sched = self.scheduler
        before = self.lr()
        for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
            group["lr"] = base * self.lr_factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
        return before, self.lr()

    @torch.no_grad()
    def predict(self, tasks: list[EncodedTask], batch_size: int, pad_id: int, ensemble: bool = False,
                generate: bool = False, max_new_tokens: int = 32) -> dict[str, list]:
        """Predictions of every example of every task, in example order, the same on every rank.

        ensemble (M > 1 particles): what is scored is the particles' posterior predictive
        (1/M) Σ_m p_m(y | x), maximized over a candidate set; otherwise the bank's aggregate
        prompt (the prompt itself for M = 1; each task's teacher under task_particles).
        Rank classification (classification and regression tasks unless `generate`): the index of
        the best-scoring verbalized label. Generation (QA tasks, and all with `generate`): the
        greedy output's token ids; with ensemble, the particles' greedy outputs are the
        candidates, each scored under every particle (PromptedT5.generate).

        Examples are sharded over ranks (rank r takes r, r + R, ...) and gathered once, so each
        one is predicted exactly once. Every rank runs the same number of forward passes (ZeRO-3
        gathers parameters collectively), padding its shard with placeholders it drops; generation
        passes synced_gpus under ZeRO-3 so that a rank whose batch finishes early keeps stepping
        with the others instead of hanging them.
        """
        self.ds.eval()
        r, w = rank(), world_size()
        synced = w > 1 and self.ds.zero_optimization_stage() == 3
        results = {}
        for task in tasks:
            n = len(task.inputs)
            mine = list(range(r, n, w))
            per_rank = math.ceil(n / w)
            mine += [-1] * (per_rank - len(mine))
            by_generation = generate or task.kind == "qa"
            candidates = None if by_generation else pad_candidates(task.label_ids).to(self.device)
            preds: list[tuple[int, Any]] = []
            for start in range(0, per_rank, batch_size):
                chunk = mine[start:start + batch_size]
                batch = self._to_device(collate([task], [(0, max(i, 0)) for i in chunk], pad_id))
                if by_generation:
                    out = self.model.generate(batch["input_ids"], batch["attention_mask"], batch["task_ids"],
                                              max_new_tokens=max_new_tokens, synced_gpus=synced,
                                              ensemble=ensemble).tolist()
                else:
                    out = self.model.score_candidates(batch["input_ids"], batch["attention_mask"],
                                                      batch["task_ids"], candidates, ensemble=ensemble)
                    out = out.argmax(-1).tolist()
                preds += [(i, p) for i, p in zip(chunk, out) if i >= 0]
            gathered: list[Any] = [None] * w
            if w > 1:
                dist.all_gather_object(gathered, preds)
            else:
                gathered = [preds]
            pairs = dict(p for part in gathered for p in part)
            if sorted(pairs) != list(range(n)) or sum(len(part) for part in gathered) != n:
                raise RuntimeError(f"evaluation of {task.name} gathered {sum(len(p) for p in gathered)} "
                                   f"predictions for {n} examples")
            results[task.name] = [pairs[i] for i in range(n)]
        return results

    # --------------------------------------------------------------- checkpoints
    def checkpoint_dir(self) -> Path:
        return checkpoint_dir(self.cfg)

    def checkpoint_bytes_estimate(self) -> int:
        """Bytes the next checkpoint needs: the last one's size (plus a margin), or before the first,
        checkpoint_bytes_estimate of the prompt bank."""
        if self.last_checkpoint_bytes is not None:
            return int(self.last_checkpoint_bytes * 1.1) + 2**20
        # (bank.size() counts what this rank holds, 0 once ZeRO-3 has partitioned the bank.)
        return checkpoint_bytes_estimate(sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                             for p in self.model.bank.parameters()))

    def save_checkpoint(self, step: int, client_state: dict) -> Optional[Path]:
        """Trainable tensors and optimizer state only; the frozen backbone is not copied.

        Every rank first checks the free space where it writes (one all-reduce): when any rank
        lacks room for a checkpoint, none is written (None is returned), the previous checkpoints
        stay, and training goes on with its state in memory; the next save tries again.

        DeepSpeed writes into a temporary tag; rank 0 adds a manifest (size and sha256 of every
        file), renames the directory into place and then updates `latest` atomically, so a crash
        at any point leaves the previous checkpoint intact, and a damaged file is detected on
        resume (choose_checkpoint).
        """
        root = self.checkpoint_dir()
        need = self.checkpoint_bytes_estimate()
        free = torch.tensor(float(free_bytes(root)), dtype=torch.float64)
        if world_size() > 1:
            free = free.to(self.device)
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
        barrier()
        if rank() == 0:
            files = file_digests(root / tmp)
            manifest = {"format": 1, "step": step, "world_size": world_size(), "files": files}
            if "config" in client_state:
                # The config fingerprint, so that pick_checkpoint refuses a resume under another
                # config before the backbone loads.
                manifest["config"] = client_state["config"]
            atomic_write(root / tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
            if (root / tag).exists():
                shutil.rmtree(root / tag)
            os.replace(root / tmp, root / tag)
            atomic_write(root / "latest", lambda p: p.write_text(tag))
            done = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step"))
            for old in done[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old)
            self.last_checkpoint_bytes = sum(f["bytes"] for f in files.values())
        size = [self.last_checkpoint_bytes]
        if world_size() > 1:
            dist.broadcast_object_list(size, src=0)
        self.last_checkpoint_bytes = size[0]
        return root / tag

    def load_checkpoint(self, tag: str) -> dict:
        """Restores checkpoint `tag` (from pick_checkpoint); returns its client state."""
        root = self.checkpoint_dir()
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
        client_state["checkpoint"] = tag
        return client_state

    def set_aside_checkpoints(self) -> Optional[Path]:
        """train.resume=never: earlier checkpoints (and the earlier TensorBoard log, which the new
        run's curves would mix with) move to dated siblings instead of being deleted. Returns
        where the checkpoints went, if there were any."""
        root = self.checkpoint_dir()
        stamp = utc_stamp()
        moved = None
        if rank() == 0:
            for old in (root, root.with_name("tb")):
                if old.is_dir() and any(old.iterdir()):
                    target = old.with_name(f"{old.name}-set-aside-{stamp}")
                    os.replace(old, target)
                    moved = target if old == root else moved
        barrier()
        return moved

    # ------------------------------------------------------------------- export
    def full_trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The fp32 master values of the prompt bank, gathered in full (collective: all ranks call)."""
        from deepspeed.utils import safe_get_full_fp32_param

        bank = self.model.bank
        full = {}
        for name, param in bank.named_parameters():
            value = safe_get_full_fp32_param(param)
            if value is None:  # not under a ZeRO optimizer: the parameter is the master copy
                value = param.detach()
            full[name] = value.float().cpu().clone()
        return full


def peak_memory_mb() -> float:
    if on_gpu():
        return get_accelerator().max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
