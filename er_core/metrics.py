"""Task metrics. Every score is a fraction in [0, 1] (QA too, unlike the official SQuAD script's
percentages) so one early-stopping rule and one report format fit all task kinds."""

from __future__ import annotations

import re
import string
from collections import Counter

from .errors import ErError

__all__ = [
    "classification_metrics",
    "majority_baseline",
    "nothing_learned",
    "ner_metrics",
    "qa_metrics",
    "primary_metric",
]

# Early stopping watches this key. SciCite's paper metric is macro-F1; both are always reported.
_PRIMARY = {"classification": "micro_f1", "ner": "f1", "qa": "f1"}


def primary_metric(kind: str) -> str:
    try:
        return _PRIMARY[kind]
    except KeyError:
        raise ErError(f"no primary metric for task kind {kind!r}; known kinds: {sorted(_PRIMARY)}") from None


def _check_pair(y_true, y_pred) -> None:
    if len(y_true) != len(y_pred):
        raise ErError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if not y_true:
        raise ErError("cannot score an empty evaluation set")


def classification_metrics(y_true, y_pred) -> dict[str, float]:
    """Single-label multiclass scores. Micro-F1 equals accuracy here (every item has exactly one
    true and one predicted label). Macro-F1 averages over labels in y_true ∪ y_pred; a label with
    no predictions or no true items scores 0 (sklearn's zero_division=0)."""
    _check_pair(y_true, y_pred)
    y_true, y_pred = list(y_true), list(y_pred)
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    accuracy = correct / len(y_true)
    tp = Counter(t for t, p in zip(y_true, y_pred) if t == p)
    n_true, n_pred = Counter(y_true), Counter(y_pred)
    f1s = []
    for lab in set(n_true) | set(n_pred):
        # F1 = 2tp / (2tp + fp + fn) = 2tp / (#true + #pred); avoids dividing P and R separately.
        f1s.append(2 * tp[lab] / (n_true[lab] + n_pred[lab]))
    return {"accuracy": accuracy, "micro_f1": accuracy, "macro_f1": sum(f1s) / len(f1s)}


def majority_baseline(train_labels, eval_labels) -> dict[str, float]:
    """Scores of always predicting train's most frequent label (ties: the smallest label)."""
    if not train_labels:
        raise ErError("majority_baseline needs at least one training label")
    counts = Counter(train_labels)
    top = max(counts.values())
    majority = min(lab for lab, n in counts.items() if n == top)
    return classification_metrics(list(eval_labels), [majority] * len(eval_labels))


def nothing_learned(kind: str, dev: dict, majority: dict | None = None) -> str | None:
    """Why a run's dev scores say it learned nothing, or None: a classifier no better than always predicting the most
    frequent label, or a tagger/reader that finds nothing (the all-O plateau of too high a learning rate)."""
    primary = _PRIMARY.get(kind)
    score = dev.get(primary) if primary else None
    if score is None:
        return None
    if kind == "classification":
        if majority is None or score > majority["micro_f1"]:
            return None
        why = f"dev {primary} {score:.4f} is no better than always predicting the most frequent label ({majority['micro_f1']:.4f})"
    elif score > 0:
        return None
    else:
        why = f"dev {primary} is 0: the model " + ("tags no entity" if kind == "ner" else "finds no answer")
    return why + "; it learned nothing: try another --lr (a lower one if the loss stalled early) or more --epochs"


def ner_metrics(true_tags, pred_tags) -> dict[str, float]:
    """Entity-level micro precision/recall/F1 via seqeval's default (conlleval) matching: an entity
    counts only if its type and both boundaries match; a stray I-X starts an entity."""
    from seqeval.metrics import f1_score, precision_score, recall_score

    _check_pair(true_tags, pred_tags)
    # seqeval only recognises nested *lists*; tuples would be read as one flat sequence.
    y_true = [list(s) for s in true_tags]
    y_pred = [list(s) for s in pred_tags]
    for i, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ErError(f"sentence {i}: {len(t)} true tags but {len(p)} predicted tags")
    return {
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
    }


# ---------------------------------------------------------------- SQuAD v1.1 (official normalisation)

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _token_f1(pred: str, gold: str) -> float:
    p, g = _normalize_answer(pred).split(), _normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(predictions: dict, references: dict) -> dict[str, float]:
    """SQuAD v1.1 exact match and token F1, each the max over a question's gold answers, averaged
    over `references`; as fractions in [0, 1] (official script: 0-100). A question with no
    prediction scores 0, as in the official script; predictions for unknown ids are ignored."""
    if not references:
        raise ErError("cannot score an empty evaluation set")
    em = f1 = 0.0
    for qid, golds in references.items():
        if not golds:
            raise ErError(f"question {qid!r} has no reference answers")
        pred = predictions.get(qid, "")
        em += max(float(_normalize_answer(pred) == _normalize_answer(g)) for g in golds)
        f1 += max(_token_f1(pred, g) for g in golds)
    n = len(references)
    return {"exact_match": em / n, "f1": f1 / n}
