"""The one output channel of a run: its lines (info and warnings), its TensorBoard log and the
other trackers of report_to (bpt_ds/trackers.py), which get the same scalars.

Lines go through tqdm.write, so that they print above a progress bar instead of through it, and
are flushed at once (under a launcher, stdout is a pipe). Only rank 0 speaks unless a line is
about this rank itself (`warn(..., every_rank=True)`); only rank 0 writes TensorBoard.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

PREFIX = "[bpt_ds]"


def line(message: str, err: bool = False) -> None:
    """One line on stdout (stderr with err), above any progress bar."""
    stream = sys.stderr if err else sys.stdout
    tqdm.write(message, file=stream)
    stream.flush()


def warn(message: str) -> None:
    """A warning line on stderr (the caller decides which ranks say it)."""
    line(f"{PREFIX} warning: {message}", err=True)


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys with plain values (lists and None as text): what
    TensorBoard's HPARAMS tab and the trackers take."""
    out: dict = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out


def peak_memory_mb(on_gpu: bool) -> float:
    """The peak memory of this rank: allocated device memory, or the process's peak RSS on CPU."""
    if on_gpu:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Reporter:
    """Lines and TensorBoard scalars of one rank; rank 0 (is_main) says and writes them."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.writer = None
        self.trackers: list = []          # bpt_ds.trackers: kind, log(values, step), summary(values), close(outcome)
        self.ledger = None                # bpt_ds.trackers.Ledger: the points they already have
        self._pending: dict = {}          # the current step's scalars for the trackers
        self._pending_step: Optional[int] = None

    def open_trackers(self, trackers: list, ledger) -> None:
        """Trackers (rank 0's; bpt_ds.trackers.open_trackers) that get every scalar from now on,
        except the points their ledger (bpt_ds.trackers.Ledger) says they already have."""
        if self.is_main:
            self.trackers, self.ledger = trackers, ledger

    def info(self, message: str) -> None:
        if self.is_main:
            line(f"{PREFIX} {message}")

    def warn(self, message: str, every_rank: bool = False) -> None:
        if self.is_main or every_rank:
            warn(message)

    def open_tensorboard(self, directory: Path, purge_step: Optional[int]) -> None:
        """purge_step: TensorBoard hides what earlier runs in this directory logged from that step on."""
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(directory), purge_step=purge_step)

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(key, value, step)
        if self.trackers:
            if step != self._pending_step:
                self._flush_trackers()
                self._pending_step = step
            self._pending[key] = float(value)

    def _flush_trackers(self) -> None:
        if self._pending:
            logged = False
            for tracker in self.trackers:
                values = self.ledger.fresh(tracker.kind, self._pending, self._pending_step)
                if values:
                    tracker.log(values, self._pending_step)
                    logged = True
            if logged:
                self.ledger.save()
        self._pending = {}

    def scalars(self, values: dict, step: int) -> None:
        for key, value in values.items():
            self.scalar(key, value, step)

    def text(self, key: str, value: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(key, value, step)

    def embedding(self, matrix, metadata: list, tag: str, step: int, header: Optional[list] = None) -> None:
        """Rows of `matrix` in TensorBoard's embedding projector."""
        if self.writer is not None:
            self.writer.add_embedding(matrix, metadata=metadata, metadata_header=header, tag=tag, global_step=step)

    def hparams(self, config: dict, metrics: dict[str, float], step: int) -> None:
        """The run's config (flattened to dotted keys) and its selected scores for TensorBoard's
        HPARAMS tab, which then compares the runs under one --logdir; the scores are also
        scalars of these names (what the tab reads)."""
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(flatten(config), metrics):
                self.writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            self.scalar(key, value, step)
        for tracker in self.trackers:
            tracker.summary(metrics)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.trackers:
            self._flush_trackers()

    def close(self, outcome: str = "finished") -> None:
        """outcome: how the run ended, for the trackers' status: finished, failed or killed."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.trackers:
            self._flush_trackers()
            for tracker in self.trackers:
                tracker.close(outcome)
            self.trackers = []
