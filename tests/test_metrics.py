"""Metrics against values worked out by hand."""

import pytest

from er_core.errors import ErError
from er_core.metrics import classification_metrics, majority_baseline, ner_metrics, primary_metric, qa_metrics


def test_classification_by_hand():
    # a: tp=1, #true=2, #pred=1 -> F1 2/3;  b: tp=1, #true=1, #pred=2 -> 2/3;  c: tp=1 of 1/1 -> 1.
    m = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert m["accuracy"] == m["micro_f1"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_macro_counts_labels_only_predicted():
    # 2 is never true but predicted once: it enters the macro average with F1 0.
    m = classification_metrics([0, 0, 1], [0, 0, 2])
    assert m["macro_f1"] == pytest.approx((1 + 0 + 0) / 3)


def test_classification_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    t = [0, 1, 2, 2, 1, 0, 3, 3, 1]
    p = [0, 2, 2, 1, 1, 0, 3, 0, 4]
    m = classification_metrics(t, p)
    assert m["macro_f1"] == pytest.approx(sk.f1_score(t, p, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(sk.f1_score(t, p, average="micro"))


def test_classification_rejects_length_mismatch():
    with pytest.raises(ErError, match="3 items but y_pred has 2"):
        classification_metrics([1, 2, 3], [1, 2])


def test_majority_baseline():
    m = majority_baseline(["x", "y", "y"], ["y", "x", "y", "z"])
    assert m["accuracy"] == 0.5
    # y: tp=2, #true=2, #pred=4 -> 2/3; x and z never predicted -> 0.
    assert m["macro_f1"] == pytest.approx((2 / 3) / 3)
    assert majority_baseline(["b", "a"], ["a"])["accuracy"] == 1.0  # tie -> smallest label


def test_ner_partially_wrong_entity():
    true = [["B-D", "I-D", "O", "B-D"], ["O", "B-D"]]
    # Sentence 1: first entity truncated (wrong), second right. Sentence 2: right, plus a spurious one.
    pred = [("B-D", "O", "O", "B-D"), ("B-D", "B-D")]
    m = ner_metrics(true, pred)
    # true entities 3; predicted 4 (D[0:1], D[3], D[0], D[1]); correct 2.
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_ner_stray_inside_tag_counts_as_entity():
    # conlleval mode: I-D after O starts an entity, so it matches a B-D of the same span.
    assert ner_metrics([["O", "B-D"]], [["O", "I-D"]])["f1"] == 1.0


def test_qa_normalisation_and_f1():
    refs = {"q1": ["The Berkeley campus"], "q2": ["2016", "in 2016"], "q3": ["x"]}
    preds = {"q1": "berkeley campus!", "q2": "2016 year"}  # q3 unanswered -> 0
    m = qa_metrics(preds, refs)
    assert m["exact_match"] == pytest.approx(1 / 3)
    # q1 exact -> 1; q2 best vs "2016": P=1/2, R=1 -> 2/3; q3 -> 0.
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_primary_metric():
    assert [primary_metric(k) for k in ("classification", "ner", "qa")] == ["micro_f1", "f1", "f1"]
    with pytest.raises(ErError, match="'regression'"):
        primary_metric("regression")


def test_nothing_learned_names_a_constant_classifier_and_an_empty_tagger_only():
    from er_core.metrics import nothing_learned

    base = {"micro_f1": 0.6}
    assert "most frequent label (0.6000)" in nothing_learned("classification", {"micro_f1": 0.6}, base)
    assert "most frequent label" in nothing_learned("classification", {"micro_f1": 0.4}, base)
    assert nothing_learned("classification", {"micro_f1": 0.61}, base) is None
    assert nothing_learned("classification", {"micro_f1": 0.2}, None) is None  # no baseline, no claim
    assert "tags no entity" in nothing_learned("ner", {"f1": 0.0})
    assert "finds no answer" in nothing_learned("qa", {"f1": 0.0, "exact_match": 0.0})
    assert nothing_learned("ner", {"f1": 0.01}) is None and nothing_learned("ner", {}) is None
