"""Experiment trackers beside TensorBoard (config key report_to): Weights & Biases and MLflow.

Each is optional (pip install -e '.[wandb]' / '.[mlflow]') and works without a network by
default: wandb in offline mode (WANDB_MODE=online to sync; the run is under
<output_dir>/wandb, `wandb sync` uploads it later), MLflow into a local file store
(<output_dir>/mlruns, or MLFLOW_TRACKING_URI). A resumed run continues the same tracker run:
its id is kept in <output_dir>/<tracker>_run_id. Only rank 0 reports. What they get: the
config (flattened to dotted keys) once, every scalar TensorBoard gets at the same step, and the
selected step's scores (wandb: also as the run's summary).

A run that crashed after its newest checkpoint repeats, when resumed, the steps in between;
they are the same steps (the same batches and dropout draws), and each tracker keeps the points
it already has (Ledger), so every step is in it once, as in TensorBoard (purge_step). How a run
ended is its status: finished, failed (an error; wandb: exit code 1) or killed (SIGTERM or
SIGINT; wandb: exit code 143). A run that starts at step 0 gets new tracker runs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from pathlib import Path

from .errors import ConfigError
from .files import atomic_write
from .report import flatten, warn

KINDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # report_to name -> module


def check_available(kinds: list[str]) -> None:
    """Refuses, before anything loads, a tracker whose library is not installed."""
    for kind in kinds:
        if importlib.util.find_spec(KINDS[kind]) is None:
            extra = "mlflow-skinny" if kind == "mlflow" else kind
            raise ConfigError(f"report_to: {kind} needs the {KINDS[kind]} package, which is not installed: "
                              f"pip install {extra} (or pip install -e '.[{kind}]'), or drop it from report_to")


def _run_id(out_dir: Path, kind: str, new) -> str:
    """The tracker run of this output_dir: the one a resume continues, or a new one."""
    path = out_dir / f"{kind}_run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = new()
    path.write_text(run_id + "\n")
    return run_id


LEDGER = "tracker_steps.json"
KEPT = ("wandb_run_id", "mlflow_run_id", LEDGER)  # what ties an output_dir to its tracker runs


def set_aside_tracker_runs(out_dir: Path, stamp: str) -> None:
    """A run that starts at step 0 (train.resume=never, or no checkpoint to resume) is a new
    computation: it gets new tracker runs, and the earlier ones keep what they logged."""
    for name in KEPT:
        kept = Path(out_dir) / name
        if kept.is_file():
            os.replace(kept, kept.with_name(f"{name}-set-aside-{stamp}"))


class Ledger:
    """The last step at which each tracker got each scalar, kept in <output_dir>/tracker_steps.json
    (rewritten after every step that reached a tracker): fresh() passes only later points. Left
    alone, wandb drops a repeated step with a warning and MLflow records it twice. The points a
    crashed attempt logged after its checkpoint stay as they were; a resume that changes a key
    it may change (train.steps, evaluation) computes those steps anew for TensorBoard only."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LEDGER
        self.last: dict[str, dict[str, int]] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.warned = False

    def fresh(self, kind: str, values: dict, step: int) -> dict:
        seen = self.last.setdefault(kind, {})
        out = {k: v for k, v in values.items() if step > seen.get(k, -1)}
        seen.update({k: step for k in out})
        return out

    def save(self) -> None:
        """A ledger that cannot be written costs at most repeated points after a crash: warned
        once, training goes on."""
        try:
            atomic_write(self.path, lambda p: p.write_text(json.dumps(self.last)))
        except OSError as e:
            if not self.warned:
                warn(f"could not write {self.path} ({e}); after a crash and a resume the trackers may "
                     "get some steps twice")
                self.warned = True


class WandbTracker:
    kind = "wandb"

    def __init__(self, out_dir: Path, name: str, config: dict):
        import wandb

        run_id = _run_id(out_dir, "wandb", lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "bpt_ds"), name=name, id=run_id,
                              resume="allow", dir=str(out_dir), mode=os.environ.get("WANDB_MODE", "offline"),
                              config=flatten(config))
        self.where = str(Path(self.run.dir).parent)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self, outcome: str = "finished") -> None:
        self.run.finish(exit_code={"finished": 0, "failed": 1, "killed": 143}[outcome])


class MlflowTracker:
    kind = "mlflow"

    def __init__(self, out_dir: Path, name: str, config: dict):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A local file store needs no server or database. MLflow 3 keeps it in maintenance mode
            # and asks for this opt-in; its files stay readable by every MLflow version.
            uri = (out_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "bpt_ds")
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        fresh = not (out_dir / "mlflow_run_id").is_file()
        self.run_id = _run_id(out_dir, "mlflow", lambda: client.create_run(experiment_id, run_name=name).info.run_id)
        if fresh:
            from mlflow.entities import Param

            params = [Param(k, str(v)) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                client.log_batch(self.run_id, params=params[i:i + 100])
        else:
            client.update_run(self.run_id, status="RUNNING")  # resumed: it had failed or been killed
        self.where = uri

    def log(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        client, items = self.client, [Metric(k, float(v), stamp, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def summary(self, values: dict) -> None:
        pass  # the scores arrive as metrics (log)

    def close(self, outcome: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status={"finished": "FINISHED", "failed": "FAILED",
                                                        "killed": "KILLED"}[outcome])


def open_trackers(kinds: list[str], out_dir: Path, name: str, config: dict) -> list:
    return [{"wandb": WandbTracker, "mlflow": MlflowTracker}[k](out_dir, name, config) for k in kinds
            if k != "tensorboard"]
