"""report_to: wandb (offline) and MLflow (a local file store) beside TensorBoard, with the real
libraries, reading back what was logged: wandb's own run file (its record format and protobuf),
MLflow through its client. A resumed run continues the same tracker runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bpt_ds.errors import ConfigError
from bpt_ds.runs import load_config
from bpt_ds.trackers import check_available
from jobs import ROOT, TRAIN, run_ds


def wandb_records(path: Path) -> list:
    """The records of a .wandb run file: a 7-byte header (":W&B", magic, version), then LevelDB's
    log format (32 KiB blocks of chunks, each with a 7-byte header: crc, length, type), each whole
    record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            out.append(buf + chunk)
    return [pb.Record.FromString(r) for r in out]


def wandb_logged(out: Path) -> tuple[dict, list[dict], dict]:
    """(config, history rows, summary) of every offline run file under out/wandb."""
    config, history, summary = {}, [], {}
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert files
    for f in files:
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
    return config, history, summary


def wandb_exit_codes(out: Path) -> list[int]:
    """The exit code each attempt's offline run file records, oldest first."""
    codes = []
    for f in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):
        codes += [rec.exit.exit_code for rec in wandb_records(f) if rec.WhichOneof("record_type") == "exit"]
    return codes


def test_report_to_names_known_trackers_and_a_missing_library_fails_first(monkeypatch):
    with pytest.raises(ConfigError, match=r"config key 'report_to' takes distinct names of tensorboard, wandb, "
                                          r"mlflow; got \['tensorboard', 'comet'\]"):
        load_config(None, ["report_to=[tensorboard,comet]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        check_available(["tensorboard", "wandb"])
    assert str(e.value) == ("report_to: wandb needs the wandb package, which is not installed: pip install wandb "
                            "(or pip install -e '.[wandb]'), or drop it from report_to")


@pytest.mark.distributed
def test_wandb_and_mlflow_get_what_tensorboard_gets_and_a_resume_after_a_crash_continues_their_runs(
        tmp_path, tiny_backbone_path, monkeypatch):
    """The first attempt fails at step 7 (a non-finite loss, train.max_bad_steps=1) after its
    step-5 checkpoint and after the trackers got step 6; the rerun resumes at 5, so it computes
    step 6 again. Each tracker ends with one run, every step once, TensorBoard's values, and the
    status of how each attempt ended."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    args = [f"output_dir={out}", "report_to=[tensorboard,wandb,mlflow]", "train.eval_every=5", "train.log_every=1",
            "train.save_every=5", "data.max_eval_examples=20", "train.max_bad_steps=1", "train.steps=10",
            "train.global_batch_size=8", "train.micro_batch_size=8"]  # one forward a step: the fault counts forwards
    cache = tiny_backbone_path.parent
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())

    monkeypatch.setenv("BPT_DS_FAULTS", json.dumps({"nan_loss": {"0": [7]}}))
    failed = run_ds(1, str(ROOT / "tests" / "dist" / "faults.py"), *args, cache=cache, port=29861)
    assert failed.returncode == 4, failed.stderr[-2000:]
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "FAILED"
    first = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    assert first == {1, 2, 3, 4, 5, 6}
    first_wandb = (out / "wandb_run_id").read_text()
    monkeypatch.delenv("BPT_DS_FAULTS")
    resumed = run_ds(1, TRAIN, *args, cache=cache, port=29862)
    assert resumed.returncode == 0
    assert "resumed from step 5" in resumed.stdout
    assert (out / "wandb_run_id").read_text() == first_wandb

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    tb_dev = {e.step: e.value for e in acc.Scalars("dev/polarity/accuracy")}
    assert sorted(tb_loss) == list(range(1, 11)) and sorted(tb_dev) == [5, 10]
    selected = json.loads((out / "metrics.json").read_text())["selected"]

    # MLflow: one run (the resume continued it), its params the config, its metrics TensorBoard's.
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("bpt_ds").experiment_id])] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.3" and run.data.params["data.tasks"] == "['polarity']"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))  # step 6 once, though computed twice
    loss = {m.step: m.value for m in history}
    assert all(loss[s] == pytest.approx(tb_loss[s], abs=1e-6) for s in loss)
    dev = {m.step: m.value for m in client.get_metric_history(run_id, "dev/polarity/accuracy")}
    assert dev == pytest.approx(tb_dev)
    assert run.data.metrics["hparams/test_score"] == pytest.approx(selected["test"]["polarity"]["score"])

    # wandb (offline): the config, the same scalars at the same steps, the selected scores as
    # summary, and each attempt's exit code.
    config, history, summary = wandb_logged(out)
    assert config["train.lr"] == 0.3 and config["stage"] == "pt"
    w_steps = [h["_step"] for h in history if "train/loss" in h]
    assert sorted(w_steps) == list(range(1, 11))
    w_loss = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert all(w_loss[s] == pytest.approx(tb_loss[s], abs=1e-6) for s in w_loss)
    assert summary["hparams/test_score"] == pytest.approx(selected["test"]["polarity"]["score"])
    assert wandb_exit_codes(out) == [1, 0]
    assert len({f.name for f in out.glob("wandb/offline-run-*/run-*.wandb")}) == 1  # one run id, resumed
