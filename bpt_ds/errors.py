"""The errors bpt_ds raises on purpose, each with the exit code launch/train.py gives it.

Nothing here imports the rest of bpt_ds: every module may raise these.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the fix (exit 2)."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, row and fix (exit 2)."""


class CheckpointError(ConfigError):
    """No intact checkpoint to resume from, or a checkpoint file that is not plain tensors (exit 2)."""


class Preempted(RuntimeError):
    """A rank got SIGTERM or SIGINT: every rank saved a checkpoint at the next step boundary and
    stopped. `signum` is the signal (launch/train.py exits with 128 + signum)."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.signum = signum


class TrainingHalted(RuntimeError):
    """train.max_bad_steps steps in a row were non-finite: training stopped, checkpoints kept (exit 4)."""


class SaveError(RuntimeError):
    """An output could not be written in train.save_retry_minutes; the message says where it went (exit 5)."""


class LostContact(RuntimeError):
    """A collective failed during a run (a rank died, hung or lost its network); `timeout_s` is the
    run's collective timeout (deepspeed.timeout_minutes), how long the survivors wait for the
    lost rank to check in (exit 3)."""

    def __init__(self, message: str, timeout_s: float):
        super().__init__(message)
        self.timeout_s = timeout_s
