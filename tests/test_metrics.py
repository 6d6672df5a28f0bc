"""Every metric against hand-worked cases (the arithmetic is in the comments)."""
from __future__ import annotations

import math

import pytest

from bpt_ds.metrics import compute, normalize_answer, squad_em, squad_f1


def test_accuracy_counts_invalid_predictions_as_wrong():
    # 2 of 4 right; "yes" is no label: wrong, and counted.
    out = compute(["accuracy"], ["1", "0", "1", "yes"], ["1", "1", "1", "0"], labels=["0", "1"])
    assert out == {"accuracy": 0.5, "score": 0.5, "examples": 4, "invalid": 1}


def test_binary_f1_and_accuracy_mrpc():
    # gold 1 1 0 0 1 / pred 1 0 0 1 1: TP 2, FP 1, FN 1 -> P = R = 2/3, F1 = 2/3; accuracy 3/5.
    out = compute(["f1", "accuracy"], ["1", "0", "0", "1", "1"], ["1", "1", "0", "0", "1"], labels=["0", "1"])
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["score"] == pytest.approx((2 / 3 + 0.6) / 2)
    # An invalid prediction on a positive example is a false negative: TP 1, FN 1, FP 0 -> F1 2/3.
    out = compute(["f1"], ["1", "maybe"], ["1", "1"], labels=["0", "1"])
    assert out["f1"] == pytest.approx(2 / 3) and out["invalid"] == 1


def test_matthews_cola():
    # gold 1 1 0 0 / pred 1 1 1 0: TP 2, FP 1, TN 1, FN 0 -> (2·1 - 1·0) / sqrt(3·2·2·1) = 2/sqrt(12).
    out = compute(["matthews"], ["1", "1", "1", "0"], ["1", "1", "0", "0"], labels=["0", "1"])
    assert out["matthews"] == pytest.approx(2 / math.sqrt(12))


def test_macro_f1_and_accuracy_cb():
    # gold 0 0 1 2 / pred 0 1 1 1. Class 0: P 1, R 1/2, F1 2/3. Class 1: P 1/3, R 1, F1 1/2.
    # Class 2: never predicted, F1 0. Macro-F1 = (2/3 + 1/2 + 0) / 3 = 7/18; accuracy 2/4.
    out = compute(["macro_f1", "accuracy"], ["0", "1", "1", "1"], ["0", "0", "1", "2"], labels=["0", "1", "2"])
    assert out["macro_f1"] == pytest.approx(7 / 18)
    assert out["accuracy"] == 0.5


def test_pearson_spearman_stsb_with_an_unparsable_prediction():
    # x = 1 2 3, y = 1 2 4: cov 3, |dx| sqrt(2), |dy| sqrt(42)/3 -> r = 9 / sqrt(84); ranks agree: rho = 1.
    out = compute(["pearson", "spearman"], ["1.0", "2.0", "3.0"], ["1.0", "2.0", "4.0"])
    assert out["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert out["spearman"] == pytest.approx(1.0)
    assert out["invalid"] == 0
    # "abc" is -1.0 (T5's convention): x = -1 2 3 -> cov 51/9, |dx|^2 78/9, |dy|^2 42/9 -> r = 51 / sqrt(78·42).
    out = compute(["pearson", "spearman"], ["abc", "2.0", "3.0"], ["1.0", "2.0", "4.0"])
    assert out["pearson"] == pytest.approx(51 / math.sqrt(78 * 42))
    assert out["spearman"] == pytest.approx(1.0)
    assert out["invalid"] == 1
    # A constant prediction has no correlation: 0, not NaN.
    out = compute(["pearson", "spearman"], ["2.0", "2.0", "2.0"], ["1.0", "2.0", "4.0"])
    assert out["pearson"] == 0.0 and out["spearman"] == 0.0


def test_multirc_f1a_and_grouped_exact_match():
    # Question a: gold 1 0 1, pred 1 0 1 (right). Question b: gold 0 1, pred 0 0 (wrong). EM = 1/2.
    # F1a over all rows: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 0.8.
    out = compute(["f1a", "em"], ["1", "0", "1", "0", "0"], ["1", "0", "1", "0", "1"], labels=["0", "1"],
                  groups=["a", "a", "a", "b", "b"])
    assert out["f1a"] == pytest.approx(0.8)
    assert out["em"] == 0.5
    with pytest.raises(ValueError, match="metric 'em' needs the group"):
        compute(["em"], ["1"], ["1"], labels=["0", "1"])


def test_squad_normalization_f1_and_em():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an apple a day") == "apple day"
    # pred {cat, sat} vs gold {cat, sat, down}: 2 common -> P 1, R 2/3, F1 0.8; the best gold counts.
    assert squad_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert squad_f1("the cat sat", ["dog", "Cat sat."]) == 1.0
    assert squad_em("The cat", ["a dog", "cat"]) == 1.0
    assert squad_em("cat sat", ["cat"]) == 0.0
    assert squad_f1("", [""]) == 1.0 and squad_f1("", ["cat"]) == 0.0
    out = compute(["squad_f1", "squad_em"], ["the cat sat", "dog"], [["a cat sat down"], ["Dog."]])
    assert out["squad_f1"] == pytest.approx((0.8 + 1.0) / 2)
    assert out["squad_em"] == 0.5
    assert out["invalid"] == 0


def test_bad_calls():
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bleu'\]"):
        compute(["bleu"], [], [])
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        compute(["accuracy"], ["1", "0"], ["1"], labels=["0", "1"])
