"""Processes of a job: joining it, rank helpers, checks every rank must pass, a lost rank, and
the stop flag that SIGTERM and SIGINT set.
"""
from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
import time
import warnings
from typing import Callable, Optional

import torch.distributed as dist

from .errors import ConfigError, LostContact

# torch 2.13 deprecates the collective names DeepSpeed 0.19 calls every step; the warning
# repeats for each call and buries the progress bar. It says nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


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
    import deepspeed  # (imported when a job starts: loading configs stays light)

    if not on_gpu():
        skip_cpu_shm_kernel()
    if on_gpu():
        # Each rank on its own GPU before the first collective: setup gathers objects (checks every
        # rank must agree on, the checkpoint to resume) before DeepSpeed would set the device.
        deepspeed.get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=deepspeed.get_accelerator().communication_backend_name(),
                               timeout=datetime.timedelta(minutes=timeout_minutes))


def skip_cpu_shm_kernel() -> None:
    """On CPU, deepspeed.init_distributed compiles DeepSpeed's shared-memory all-reduce kernel
    (a C++ build of ~30-45 s on a machine's first run) and leaves /dev/shm buffers behind after
    every job. Only DeepSpeed-Inference's inference_all_reduce uses it; training, evaluation and
    predict go through torch.distributed's collectives (gloo). Marking the op unavailable makes
    DeepSpeed skip the build, as on a platform without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# What a lost connection or a timed-out collective looks like from torch: DistError
# subclasses, or gloo's / NCCL's RuntimeError texts.
_COMM_FAILURE_TEXTS = ("Timed out waiting", "Connection reset by peer", "Connection closed by peer",
                       "Connection refused", "Watchdog caught collective operation timeout",
                       "NCCL communicator was aborted", "gloo/transport")


def is_comm_failure(e: BaseException) -> bool:
    """Whether e says a collective failed: a rank died, hung or lost its network."""
    if isinstance(e, (dist.DistError, LostContact)):
        return True
    return isinstance(e, RuntimeError) and any(t in str(e) for t in _COMM_FAILURE_TEXTS)


def unresponsive_ranks(timeout_s: float = 1800.0) -> Optional[list[int]]:
    """After a failed collective: the ranks that do not check in through the job's store within
    half the collective timeout `timeout_s`, 3 to 15 s (lost, hung, or stuck in another
    collective). None when the store cannot be reached: rank 0 hosts it, so then rank 0 itself
    is gone."""
    if not dist.is_initialized():
        return None
    wait_seconds = min(15.0, max(3.0, timeout_s / 2))
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
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


# ------------------------------------------------------------ faults and stops


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



class StopFlag:
    """The first stop signal (SIGTERM or SIGINT) this process got, or None: set by the handlers
    `install` puts in place, read by the step (bpt_ds.step), which all-reduces it so that every
    rank stops at the same step boundary.

    SIGTERM (SLURM preemption or time limit, scancel, a launcher stopping its ranks) and SIGINT
    (Ctrl-C) then no longer kill a rank mid-step: the first is noted, and at the next step
    boundary the ranks agree to save a checkpoint and stop (Preempted). After a SIGINT, SIGINT
    gets its default action back: a second Ctrl-C kills at once (even a rank blocked in a
    collective or a long kernel), without saving."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note)
            signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
            # os.write: print() may be interrupted mid-line by this very handler.
            os.write(2, f"[bpt_ds] rank {rank()}: {signal_name(signum)} received; a checkpoint will be "
                        f"saved at the next step boundary, then the run stops{again}\n".encode())
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
