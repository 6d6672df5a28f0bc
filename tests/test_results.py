"""The results table: runs' metrics.json into methods x tasks, mean ± std over seeds."""
from __future__ import annotations

import json
import statistics

import pytest

from bpt_ds.results import ResultsError, main, render


def write_run(path, method, seed, test, few_shot=0, dev=None):
    path.mkdir(parents=True)
    tasks = {t: {**m, "score": sum(m.values()) / len(m), "examples": 10, "invalid": 0} for t, m in test.items()}
    run = {"method": method, "stage": "pt", "seed": seed, "few_shot": few_shot,
           "selected": {"step": 5, "dev": dev or tasks, "test": tasks}, "final": {"step": 9, "dev": tasks}}
    (path / "metrics.json").write_text(json.dumps(run))


@pytest.fixture
def runs(tmp_path):
    # PT over 3 seeds on RTE and MRPC (MRPC scores the mean of F1 and accuracy); SPoT over 2.
    for seed, rte, f1, acc in [(1, 0.60, 0.80, 0.70), (2, 0.70, 0.90, 0.80), (3, 0.80, 0.70, 0.60)]:
        write_run(tmp_path / "pt" / f"seed{seed}", "pt", seed, {"rte": {"accuracy": rte},
                                                                "mrpc": {"f1": f1, "accuracy": acc}})
    for seed, rte in [(1, 0.75), (2, 0.85)]:
        write_run(tmp_path / "spot" / f"seed{seed}", "spot", seed, {"rte": {"accuracy": rte}})
    return tmp_path


def test_markdown_table_mean_and_std_over_seeds(runs):
    # PT: RTE 60/70/80 -> 70.0 ± 10.0; MRPC (75, 85, 65) -> 75.0 ± 10.0; Avg per seed (67.5, 77.5, 72.5)
    # -> 72.5 ± 5.0. SPoT: RTE 75/85 -> 80.0 ± 7.1. Columns in the suite's order: MRPC before RTE.
    assert render([str(runs)]) == (
        "| Method | mrpc | rte | Avg |\n"
        "|---|---|---|---|\n"
        "| pt | 75.0 ± 10.0 | 70.0 ± 10.0 | 72.5 ± 5.0 |\n"
        "| spot | – | 80.0 ± 7.1 | 80.0 ± 7.1 |\n")


def test_csv_and_every_metric(runs):
    text = render([str(runs / "pt")], fmt="csv", which="all")
    lines = text.splitlines()
    assert lines[0] == "method,column,mean,std,seeds"
    assert f"pt,mrpc f1,80.0000,{100 * statistics.stdev([0.8, 0.9, 0.7]):.4f},3" in lines
    assert "pt,mrpc accuracy,70.0000,10.0000,3" in lines
    assert "pt,rte accuracy,70.0000,10.0000,3" in lines


def test_few_shot_runs_are_their_own_rows_and_dev_can_be_shown(tmp_path):
    write_run(tmp_path / "a", "pt", 1, {"rte": {"accuracy": 0.5}}, dev={"rte": {"accuracy": 0.9, "score": 0.9}})
    write_run(tmp_path / "b", "pt", 1, {"rte": {"accuracy": 0.6}}, few_shot=16)
    assert render([str(tmp_path)]).splitlines()[2:] == ["| pt | 50.0 | 50.0 |", "| pt k=16 | 60.0 | 60.0 |"]
    assert render([str(tmp_path / "a")], split="dev").splitlines()[2] == "| pt | 90.0 | 90.0 |"


def test_one_run_per_task_fills_one_row(tmp_path):
    """The papers' layout (configs/paper): one run per target task, same method and seed, side by side."""
    write_run(tmp_path / "rte", "bmtpt", 42, {"rte": {"accuracy": 0.5}})
    write_run(tmp_path / "cb", "bmtpt", 42, {"cb": {"accuracy": 0.7, "macro_f1": 0.5}})
    assert render([str(tmp_path)]).splitlines() == ["| Method | rte | cb | Avg |", "|---|---|---|---|",
                                                    "| bmtpt | 50.0 | 60.0 | 55.0 |"]


def test_runs_of_one_method_and_seed_become_rows_labelled_by_their_directory(tmp_path):
    """Two configurations of one method (here two lrs, two seeds each) are shown side by side, not
    refused; the seeds of each stay in one row."""
    for lr, base in [("lr-0.1", 0.5), ("lr-0.3", 0.7)]:
        for seed in (1, 2):
            write_run(tmp_path / lr / f"seed{seed}", "pt", seed, {"rte": {"accuracy": base + seed / 10}})
    write_run(tmp_path / "other" / "seed1", "spot", 1, {"rte": {"accuracy": 0.9}})
    assert render([str(tmp_path)]).splitlines()[2:] == ["| pt (lr-0.1) | 65.0 ± 7.1 | 65.0 ± 7.1 |",
                                                        "| pt (lr-0.3) | 85.0 ± 7.1 | 85.0 ± 7.1 |",
                                                        "| spot | 90.0 | 90.0 |"]


def test_errors_name_the_file(tmp_path, capsys):
    # Two runs that no directory tells apart (a run and one nested in it, both seed 1) still clash.
    write_run(tmp_path / "a", "pt", 1, {"rte": {"accuracy": 0.5}})
    write_run(tmp_path / "a" / "seed1", "pt", 1, {"rte": {"accuracy": 0.6}})
    with pytest.raises(ResultsError) as e:
        render([str(tmp_path)])
    assert str(e.value) == (f"{tmp_path / 'a' / 'seed1' / 'metrics.json'} and {tmp_path / 'a' / 'metrics.json'} both "
                            "score task 'rte' as method 'pt' with seed 1; give one of them another `method` in its "
                            "config, or collect them separately")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text('{"polarity": {"accuracy": 1.0}}')
    with pytest.raises(ResultsError, match=r"metrics.json: not a bpt_ds metrics.json \(KeyError"):
        render([str(tmp_path / "c")])
    assert main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == f"bpt_ds.results: error: '{tmp_path / 'nothing'}' does not exist\n"
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no metrics.json under" in capsys.readouterr().err


def test_cli_writes_the_table(runs, tmp_path):
    out = tmp_path / "table.md"
    assert main([str(runs / "spot"), "--output", str(out)]) == 0
    assert out.read_text().splitlines()[2] == "| spot | 80.0 ± 7.1 | 80.0 ± 7.1 |"


def test_plot_draws_each_rows_mean_dev_curve_over_its_seeds(tmp_path):
    """The curves come from the runs' own TensorBoard logs (written here with torch's writer, read
    back with tensorboard's reader); the PNG is drawn from exactly those means."""
    from torch.utils.tensorboard import SummaryWriter

    from bpt_ds.results import curves

    values = {("pt", 1): [0.5, 0.6, 0.7], ("pt", 2): [0.7, 0.8, 0.9], ("spot", 1): [0.8, 0.85, 0.9]}
    for (method, seed), ys in values.items():
        run = tmp_path / method / f"seed{seed}"
        write_run(run, method, seed, {"rte": {"accuracy": ys[-1]}})
        with SummaryWriter(str(run / "tb")) as w:
            for step, y in zip((0, 10, 20), ys):
                w.add_scalar("dev/rte/score", y, step)
                w.add_scalar("dev/rte/accuracy", y, step)
                w.add_scalar("test/rte/score", 0.0, step)
    files = sorted(tmp_path.rglob("metrics.json"))
    got = curves(files)
    assert set(got) == {"pt", "spot"}
    pt = got["pt"]["rte"]
    assert sorted(pt) == [0, 10, 20]
    for step, expected in {0: [0.5, 0.7], 10: [0.6, 0.8], 20: [0.7, 0.9]}.items():
        assert sorted(pt[step]) == pytest.approx(expected)
    out = tmp_path / "curves.png"
    assert main([str(tmp_path), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    (tmp_path / "bare").mkdir()
    write_run(tmp_path / "bare" / "x", "pt", 9, {"rte": {"accuracy": 0.5}})
    with pytest.raises(ResultsError, match="no TensorBoard log beside it"):
        curves([tmp_path / "bare" / "x" / "metrics.json"])
