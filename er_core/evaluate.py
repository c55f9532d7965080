"""Turn head outputs into task predictions (labels, word tags, answer spans) and score them."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from . import devices
from .metrics import classification_metrics, ner_metrics, qa_metrics
from .task_data import Item, SplitData, iter_batches


def decode(kind: str, item: Item, logits: np.ndarray, labels) -> object:
    """One example's prediction from its (unpadded) logits."""
    if kind == "classification":
        return labels.decode(int(logits.argmax()))
    if kind == "ner":
        # A word's tag is the first sub-token's; words cut off by truncation are tagged O.
        tags = ["O"] * len(item.example.words)
        prev = None
        for t, w in enumerate(item.word_ids or []):
            if w is not None and w != prev and t < len(logits):
                tags[w] = labels.decode(int(logits[t].argmax()))
            prev = w
        return tags
    if kind == "qa":
        return qa_span(item, logits)[1]
    raise ValueError(kind)


def qa_span(item: Item, logits: np.ndarray) -> tuple[float, str]:
    """(score, answer) of one window: the best span of its context tokens, cut from the full context by offsets."""
    ok = np.array([o is not None for o in item.offsets[: len(logits)]], dtype=bool)
    best, s, e = best_span(logits[: len(ok), 0], logits[: len(ok), 1], ok)
    return (best, "") if s < 0 else (best, item.example.text_pair[item.offsets[s][0]: item.offsets[e][1]])


def best_answers(items: list[Item], spans: list[tuple[float, str]]) -> dict[str, str]:
    """Example id -> the answer of its best-scoring window (run_qa's rule across the windows of a long context)."""
    best: dict[str, tuple[float, str]] = {}
    for it, (sc, text) in zip(items, spans):
        if it.example.id not in best or sc > best[it.example.id][0]:
            best[it.example.id] = (sc, text)
    return {k: text for k, (_, text) in best.items()}


MAX_ANSWER_TOKENS = 30


def best_span(start: np.ndarray, end: np.ndarray, ok: np.ndarray, max_len: int = MAX_ANSWER_TOKENS) -> tuple[float, int, int]:
    """(score, s, e) with the highest start[s] + end[e] over s <= e < s + max_len, both allowed by `ok`
    (context tokens); (-inf, -1, -1) if none. Exact, O(n): for each end, the best start in its window
    comes from a deque of starts with decreasing scores (a sliding-window maximum)."""
    best, window = (-np.inf, -1, -1), deque()
    for e in range(len(ok)):
        if ok[e]:
            while window and start[window[-1]] < start[e]:  # ties keep the earlier start
                window.pop()
            window.append(e)
        while window and window[0] <= e - max_len:
            window.popleft()
        if ok[e] and window and start[window[0]] + end[e] > best[0]:
            best = (float(start[window[0]] + end[e]), window[0], e)
    return best


def score(kind: str, items: list[Item], preds: list) -> dict:
    if kind == "classification":
        return classification_metrics([it.example.label for it in items], preds)
    if kind == "ner":
        return ner_metrics([list(it.example.tags) for it in items], preds)
    refs = {it.example.id: [a for a, _ in it.example.answers] for it in items}
    return qa_metrics(best_answers(items, preds), refs)  # preds: (score, answer) per window


@torch.inference_mode()
def predict(model, data: SplitData, source: str, labels, batch_size: int = 64, pad_id: int = 0) -> list:
    """Predictions for every item of `data`, in item order; for QA, (score, answer) per window."""
    was_training = model.training
    model.eval()
    preds: list = [None] * len(data.items)
    for order, batch in iter_batches(data, batch_size, source, pad_id):
        logits = forward(model, batch).float().cpu().numpy()
        for r, i in enumerate(order):
            n = len(data.items[i].input_ids)
            if data.kind == "qa":  # scored, so the windows of one example can be compared
                preds[i] = qa_span(data.items[i], logits[r, :n])
            else:
                preds[i] = decode(data.kind, data.items[i], logits[r] if data.kind == "classification" else logits[r, :n], labels)
    model.train(was_training)
    return preds


def evaluate(model, data: SplitData, source: str, labels, batch_size: int = 64, pad_id: int = 0) -> dict:
    if not data.items:
        return {}
    return score(data.kind, data.items, predict(model, data, source, labels, batch_size, pad_id))


def forward(model, batch: dict) -> torch.Tensor:
    """Run a model on a batch fed either with cached states or with token ids (moved to the model's device)."""
    return call(model, devices.to_device(batch, devices.model_device(model)))


def call(model, batch: dict) -> torch.Tensor:
    """Run a model on a batch already on its device."""
    if "hidden_states" in batch:
        return model(batch["hidden_states"], batch["attention_mask"])
    if "token_type_ids" in batch:  # a text pair, for families whose embeddings read segments
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return model(batch["input_ids"], batch["attention_mask"])
