"""python -m bpt_ds.predict / launch/predict.py: one prediction per input row, in input order.

Against references computed here without DeepSpeed (plain transformers, the prompt prepended
by hand), the metrics a training run reported for the same prompt, and itself on 1, 2 and 3
ranks (ZeRO-3, rows sharded unevenly). Bad input is refused before the backbone loads."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bpt_ds import predict as predict_mod
from bpt_ds.config import to_yaml
from bpt_ds.data.synthetic import SYNTHETIC_TASKS, make_examples
from bpt_ds.runs import load_config
from jobs import ROOT, TRAIN, run_ds

PREDICT = str(ROOT / "launch" / "predict.py")
LABELS = list(SYNTHETIC_TASKS["polarity"].labels)


def fake_run(dest: Path, particles: torch.Tensor, seed: int = 7, **extra) -> Path:
    """A run directory as training leaves it: config.yaml and prompts.safetensors."""
    dest.mkdir(parents=True)
    cfg = load_config(None, [f"seed={seed}", "data.tasks=[polarity]", "data.synthetic_eval_examples=37",
                             f"output_dir={dest}", *[f"{k}={v}" for k, v in extra.items()]])
    (dest / "config.yaml").write_text(to_yaml(cfg))
    save_file({"particles": particles.contiguous()}, str(dest / "prompts.safetensors"))
    return dest


def reference_scores(backbone_path: Path, particles: torch.Tensor, texts: list[str], labels: list[str]) -> torch.Tensor:
    """log of the posterior predictive (1/M) Σ_m p_m(label | x) [rows, labels], by hand: each particle's
    rows prepended to the token embeddings, every label teacher-forced, float64 sums of its tokens."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(backbone_path)
    model = T5ForConditionalGeneration.from_pretrained(backbone_path).eval()
    per_particle = []
    with torch.no_grad():
        for prompt in particles:
            rows = []
            for text in texts:
                ids = tok(text, return_tensors="pt").input_ids
                embeds = torch.cat([prompt[None], model.get_input_embeddings()(ids)], dim=1)
                scores = []
                for label in labels:
                    y = tok(label, return_tensors="pt").input_ids
                    logits = model(inputs_embeds=embeds, labels=y).logits
                    scores.append(torch.log_softmax(logits.double(), -1)[0].gather(1, y[0][:, None]).sum())
                rows.append(torch.stack(scores))
            per_particle.append(torch.stack(rows))
    return torch.logsumexp(torch.stack(per_particle), dim=0) - math.log(len(particles))


def predict_cli(*args: str, cache: Path):
    """python -m bpt_ds.predict in its own process (a job of one: predicting in this process would
    leave its RANK and MASTER_PORT to the subprocesses of later tests)."""
    env = dict(os.environ, BPT_DS_CACHE=str(cache), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bpt_ds.predict", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def no_backbone(monkeypatch):
    """Loading the backbone fails the test: bad input must be refused before it."""
    def refuse(*a, **k):
        raise AssertionError("the backbone was loaded")
    monkeypatch.setattr(predict_mod, "load_backbone", refuse)


@pytest.mark.parametrize("m", [1, 3])
def test_predictions_match_a_hand_computed_posterior_predictive(tmp_path, tiny_backbone_path, m):
    particles = torch.randn(m, 4, 128, generator=torch.Generator().manual_seed(m)) * 0.5
    run = fake_run(tmp_path / "run", particles)
    out = tmp_path / "preds.jsonl"
    proc = predict_cli("--prompts", str(run), "--output", str(out), "train.eval_batch_size=5",
                       cache=tiny_backbone_path.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(out)
    expected = make_examples("polarity", 37, 7, "test")  # the run's seed and its synthetic test split
    assert [r["index"] for r in rows] == list(range(37))
    assert [r["input"] for r in rows] == [e["input"] for e in expected]
    assert [r["target"] for r in rows] == [e["target"] for e in expected]
    scores = reference_scores(tiny_backbone_path, particles, [e["input"] for e in expected], LABELS)
    margin = (scores[:, 0] - scores[:, 1]).abs()
    sure = margin > 1e-4  # ties within float error may go either way
    assert sure.sum() > 30
    assert [r["prediction"] for r, s in zip(rows, sure) if s] == [LABELS[i] for i, s in
                                                                   zip(scores.argmax(1).tolist(), sure) if s]
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())["metrics"]
    assert metrics["examples"] == 37
    assert metrics["accuracy"] == pytest.approx(sum(r["prediction"] == r["target"] for r in rows) / 37)
    assert (f"posterior predictive over {m} particles" if m > 1 else "(the prompt)") in proc.stdout


def test_dropout_is_off_and_labels_of_different_lengths_are_scored_by_their_whole_likelihood(tmp_path,
                                                                                            tiny_backbone_path):
    """What the tiny backbone hides: real T5 checkpoints have dropout 0.1 (predict must score in
    eval mode, the same every time), and real labels differ in length (each label's score is its
    tokens' summed log-likelihood, not their mean: a mean would favour long labels). Two
    particles, labels of 2 to 6 tokens, against the hand-computed posterior predictive (eval mode)."""
    from transformers import AutoTokenizer

    from jobs import dropout_backbone

    backbone = dropout_backbone(tiny_backbone_path, tmp_path / "dropout", 0.1)
    particles = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(5)) * 0.5
    run = fake_run(tmp_path / "run", particles, **{"model.name_or_path": str(backbone)})
    labels = ["positive", "negative", "good", "not good", "so so"]  # 2, 4, 2, 6 and 5 tokens with </s>
    tok = AutoTokenizer.from_pretrained(backbone)
    lengths = {len(tok(label).input_ids) for label in labels}
    assert len(lengths) >= 3, lengths  # lengths that differ (with </s>)
    rows = make_examples("polarity", 23, 11, "validation")
    own = tmp_path / "rows.jsonl"
    own.write_text("".join(json.dumps({"input": r["input"]}) + "\n" for r in rows))
    outs = []
    for i in range(2):
        out = tmp_path / f"preds{i}.jsonl"
        proc = predict_cli("--prompts", str(run), "--input", str(own), "--labels", ",".join(labels), "--output",
                           str(out), "train.eval_batch_size=4", cache=tiny_backbone_path.parent)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]  # no dropout draws (with ds.train() instead of ds.eval() they differed)
    scores = reference_scores(backbone, particles, [r["input"] for r in rows], labels)
    best = scores.topk(2, dim=1).values
    sure = (best[:, 0] - best[:, 1]) > 1e-4
    assert sure.sum() >= 20
    got = [r["prediction"] for r in read_jsonl(tmp_path / "preds0.jsonl")]
    assert [g for g, s in zip(got, sure) if s] == [labels[i] for i, s in zip(scores.argmax(1).tolist(), sure) if s]
    # The reference is not a length-blind one: by mean log-likelihood the picks would differ.
    tokens = torch.tensor([len(tok(label).input_ids) for label in labels], dtype=torch.float64)
    assert (scores / tokens).argmax(1).tolist() != scores.argmax(1).tolist()


def test_the_runs_eval_cap_is_said_and_can_be_lifted(tmp_path, tiny_backbone_path, monkeypatch):
    """A run trained with data.max_eval_examples=10 evaluated 10 of its 37 test rows; predicting
    its split says it keeps that cap, and data.max_eval_examples=0 predicts every row."""
    monkeypatch.setenv("BPT_DS_CACHE", str(tiny_backbone_path.parent))
    run = fake_run(tmp_path / "run", torch.zeros(1, 4, 128), **{"data.max_eval_examples": 10})
    capped = predict_mod.prepare(predict_mod.parse_args(["--prompts", str(run)]))
    assert len(capped.task.test) == 10
    assert capped.where == ("its test split: the first 10 of its 37 rows, as data.max_eval_examples=10 says; "
                            "data.max_eval_examples=0 predicts them all")
    every = predict_mod.prepare(predict_mod.parse_args(["--prompts", str(run), "data.max_eval_examples=0"]))
    assert len(every.task.test) == 37 and every.where == "its test split"


def test_a_file_of_your_own_with_and_without_targets(tmp_path, tiny_backbone_path):
    particles = torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(0)) * 0.5
    run = fake_run(tmp_path / "run", particles)
    rows = make_examples("polarity", 9, 3, "validation")
    with_targets, without = tmp_path / "labelled.csv", tmp_path / "unlabelled.jsonl"
    with_targets.write_text("input,target\n" + "".join(f"{r['input']},{r['target']}\n" for r in rows))
    without.write_text("".join(json.dumps({"input": r["input"]}) + "\n" for r in rows))
    cache = tiny_backbone_path.parent
    assert predict_cli("--prompts", str(run), "--input", str(with_targets), cache=cache).returncode == 0
    assert predict_cli("--prompts", str(run), "--input", str(without), "--task", "polarity", cache=cache).returncode == 0
    a = read_jsonl(run / "predictions" / "polarity-labelled.jsonl")
    b = read_jsonl(run / "predictions" / "polarity-unlabelled.jsonl")
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]
    assert [r["target"] for r in a] == [r["target"] for r in rows] and "target" not in b[0]
    assert (run / "predictions" / "polarity-labelled.metrics.json").is_file()
    assert not (run / "predictions" / "polarity-unlabelled.metrics.json").exists()
    scores = reference_scores(tiny_backbone_path, particles, [r["input"] for r in rows], LABELS)
    # The labels are the run's task's (polarity): the file's two target words.
    assert sorted(LABELS) == sorted({r["target"] for r in rows})
    assert [r["prediction"] for r in b] == [LABELS[i] for i in scores.argmax(1).tolist()]


@pytest.mark.parametrize("args, message", [
    (["--prompts", "{tmp}/nowhere"], "--prompts: prompt file '{tmp}/nowhere' does not exist"),
    (["--prompts", "{run}", "--particles", "3"], "--particles 3: '{run}/prompts.safetensors' holds 1 particle(s), 0..0"),
    (["--prompts", "{run}", "--particles", "best"], "--particles expects ensemble, mean or a particle index; got 'best'"),
    (["--prompts", "{run}", "--task", "nope"], "unknown task 'nope' in data.tasks"),
    (["--prompts", "{run}", "--input", "{tmp}/bad.jsonl"], "--input: '{tmp}/bad.jsonl' has no column 'input'; its "
                                                            "columns are: text"),
    (["--prompts", "{run}", "--input", "{tmp}/odd.jsonl", "--task", "polarity"],
     "{tmp}/odd.jsonl, row 2: target 'maybe' is not one of the labels ['positive', 'negative']; fix the row or "
     "pass --labels"),
    (["--prompts", "{run}", "train.steps=3"], "predict: override 'train.steps=3' sets train.steps; predict reads"),
    (["--prompts", "{loose}"], "is not in a run directory with a config.yaml, so the backbone is unknown: add "
                               "model.name_or_path=<the backbone it was trained with>"),
    (["--prompts", "{loose}", "--task", "polarity", "model.name_or_path=tiny"], "holds prompts of width 64; the backbone tiny has "
                                                          "d_model=128: use the backbone the prompt was trained with"),
])
def test_bad_input_is_refused_before_the_backbone_loads(tmp_path, tiny_backbone_path, no_backbone, capsys, args,
                                                        message):
    run = fake_run(tmp_path / "run", torch.zeros(1, 4, 128))
    (tmp_path / "loose").mkdir()
    save_file({"particles": torch.zeros(1, 4, 64)}, str(tmp_path / "loose" / "p.safetensors"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "odd.jsonl").write_text('{"input": "a b", "target": "positive"}\n{"input": "c", "target": "maybe"}\n')
    fill = lambda s: s.format(tmp=tmp_path, run=run, loose=tmp_path / "loose" / "p.safetensors")  # noqa: E731
    assert predict_mod.main([fill(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert fill(message) in err, err


@pytest.mark.distributed
def test_a_trained_run_predicts_its_reported_test_score_identically_on_1_2_and_3_ranks(tmp_path, tiny_backbone_path):
    """A real run (ZeRO-3), then its prompt predicted on 1, 2 and 3 ranks: the JSONL is byte-identical,
    every row once and in order, and the accuracy is the test accuracy its metrics.json reports for
    prompts_best (the rows: 61 test examples, so 2 and 3 ranks get uneven shards). Generation too,
    on 1 and 3 ranks."""
    cache = tiny_backbone_path.parent
    run = tmp_path / "run"
    proc = run_ds(1, TRAIN, "train.steps=20", "train.eval_every=10", "data.synthetic_eval_examples=61",
                  "prompt.particles=2", f"output_dir={run}", cache=cache, port=29811)
    assert proc.returncode == 0
    reported = json.loads((run / "metrics.json").read_text())["selected"]["test"]["polarity"]
    outputs = {}
    for ranks in (1, 2, 3):
        for mode in ("rank", "generate") if ranks != 2 else ("rank",):
            out = tmp_path / f"{mode}{ranks}.jsonl"
            extra = ["--generate"] if mode == "generate" else []
            # the deepspeed launcher on 3 ranks (as a user starts it), torchrun on 2, a job of one
            proc = run_ds(ranks, PREDICT, "--prompts", str(run), "--output", str(out), *extra, cache=cache,
                          port=29812 + ranks, launcher="deepspeed" if ranks == 3 else "auto")
            assert proc.returncode == 0, proc.stderr[-3000:]
            outputs[mode, ranks] = out.read_bytes()
            if mode == "rank":
                assert "posterior predictive over 2 particles" in proc.stdout
    assert outputs["rank", 1] == outputs["rank", 2] == outputs["rank", 3]
    assert outputs["generate", 1] == outputs["generate", 3]
    rows = read_jsonl(tmp_path / "rank1.jsonl")
    assert [r["index"] for r in rows] == list(range(61))
    assert [r["input"] for r in rows] == [e["input"] for e in make_examples("polarity", 61, 42, "test")]
    metrics = json.loads((tmp_path / "rank1.metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] == reported["accuracy"] and metrics["examples"] == reported["examples"] == 61
    generated = read_jsonl(tmp_path / "generate1.jsonl")
    assert len(generated) == 61 and all(isinstance(r["prediction"], str) for r in generated)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
