"""Files a run writes: atomically, with retries on a full or read-only disk, and the checks of
free space and write access that run before any data or weights load.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import ConfigError, SaveError
from .report import line

# Written last into a finished run's output_dir (runner.Runner.finish); bpt_ds.pipeline reads it.
DONE_FILE = "done.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The mode a plain open() gives a new file here: writers that make private temporary files
# (safetensors' save_file writes 0600) would otherwise leave outputs a group cannot read.
FILE_MODE = 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes through a temporary sibling, then renames: readers see old or new, never half.
    The file gets the mode the umask gives new files (FILE_MODE), whatever `write` made it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.chmod(tmp, FILE_MODE)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the bytes reach the disk before the name does
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds path (or would hold it, once created)."""
    return shutil.disk_usage(_existing(path)).free


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def utc_stamp() -> str:
    """Now, for the names of directories moved aside (damaged or set-aside checkpoints)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")



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
            line(f"[bpt_ds] could not write {path}: {error}. Its data stays in memory: free space or fix the "
                 f"permissions; retrying every {interval:.0f} s for {minutes:g} min (train.save_retry_minutes)",
                 err=True)
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
