"""What TensorBoard shows of a run, read back with tensorboard's own reader: the HPARAMS tab's
config and selected scores, the trainable parameters and their share of the backbone, and the
model FLOP/s."""
from __future__ import annotations

import json

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from bpt_ds import plan
from jobs import TRAIN, run_ds


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@pytest.mark.slow
def test_tensorboard_holds_hparams_scores_trainable_share_and_model_flops(tmp_path, tiny_backbone_path):
    runs = {}
    for lr in ("0.3", "0.1"):
        out = tmp_path / f"lr{lr}"
        proc = run_ds(1, TRAIN, f"output_dir={out}", f"train.lr={lr}", "train.steps=10", "train.eval_every=5",
                      "train.log_every=5", "data.max_eval_examples=40", cache=tiny_backbone_path.parent, port=29831)
        assert proc.returncode == 0
        acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
        acc.Reload()
        runs[lr] = (out, acc)
    for lr, (out, acc) in runs.items():
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        config = flatten(yaml.safe_load((out / "config.yaml").read_text()))
        assert hparams["train.lr"].number_value == float(lr) == config["train.lr"]
        assert hparams["stage"].string_value == "pt" and hparams["data.tasks"].string_value == "['polarity']"
        assert set(hparams) == set(config)
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert [m.name.tag for m in experiment.metric_infos] == ["hparams/dev_score", "hparams/dev/polarity",
                                                                 "hparams/test_score", "hparams/test/polarity"]
        selected = json.loads((out / "metrics.json").read_text())["selected"]
        assert acc.Scalars("hparams/test_score")[-1].value == pytest.approx(selected["test"]["polarity"]["score"])
        assert acc.Scalars("hparams/dev/polarity")[-1].value == pytest.approx(selected["dev"]["polarity"]["score"])

        dims = plan.dims_from_config(__import__("transformers").AutoConfig.from_pretrained(tiny_backbone_path))
        assert acc.Scalars("model/trainable_parameters")[0].value == 16 * 128
        assert acc.Scalars("model/trainable_share")[0].value == pytest.approx(16 * 128 / plan.param_counts(dims)[0])
        flops = [e.value for e in acc.Scalars("perf/model_tflops_per_s")]
        assert len(flops) == 2 and all(v > 0 for v in flops)
        assert "perf/mfu" not in acc.Tags()["scalars"]  # CPU: no known peak


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla V100-SXM2-32GB", None), ("cpu", None),
])
def test_mfu_divides_by_the_dense_bf16_peak_of_the_part_the_device_name_names(name, peak):
    """H100 PCIe and NVL are slower parts than the SXM one their names also contain; V100 has no
    bf16, so no MFU."""
    assert plan.peak_flops(name) == peak


def test_mfu_is_the_windows_model_flops_per_second_over_the_jobs_summed_peak(monkeypatch):
    """What a GPU run logs, without a GPU: the job's peak is the device's times the ranks (an H100
    PCIe here, 4 ranks), and perf/mfu = model FLOPs of the window / its seconds / that peak."""
    from types import SimpleNamespace

    from bpt_ds import train_log

    monkeypatch.setattr(train_log, "on_gpu", lambda: True)
    monkeypatch.setattr(train_log.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_log.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    monkeypatch.setattr(train_log, "peak_memory_mb", lambda gpu: 0.0)
    peak = train_log.job_peak_flops(4)
    assert peak == 4 * 756e12
    clock = iter([100.0, 102.5, 102.5])  # the window starts at 100 s, is written (and the next starts) at 102.5 s
    monkeypatch.setattr(train_log.time, "perf_counter", lambda: next(clock))
    logged = {}
    report = SimpleNamespace(is_main=True, scalar=lambda k, v, s: logged.__setitem__(k, v),
                             scalars=lambda d, s: logged.update(d))
    task = SimpleNamespace(inputs=[[1, 2, 3]] * 4, targets=[[4]] * 4)
    log = train_log.TrainLog(report, [task], flops=lambda picks: 3e15 * len(picks), peak=peak)
    log.count([(0, 0), (0, 1)])  # 6e15 model FLOPs
    log.write(1, 0, SimpleNamespace(lr=lambda: 0.1, grad_norm=lambda: None),
              SimpleNamespace(transform=None, hook_seconds=0.0))
    assert logged["perf/model_tflops_per_s"] == pytest.approx(6e15 / 2.5 / 1e12)
    assert logged["perf/mfu"] == pytest.approx(6e15 / 2.5 / (4 * 756e12))
