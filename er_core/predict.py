"""Batch inference for several trained tasks over one corpus.

Cached examples run only each task's upper layers + head, reading every cached state once for
all tasks; cache misses run the shared frozen lower part first (and may be recorded).
"""

from __future__ import annotations

import numpy as np
import torch

from .artifacts import check_cache, load_trained
from .embed import Embedder
from .errors import ErError
from .evaluate import decode, forward, qa_span
from .store import CacheSpec
from .task_data import Item, collate, encode_examples
from .tasks import Example, LabelMap


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def entities(words, tags) -> list[dict]:
    """BIO tags as entity spans over words: [{type, start, end (exclusive), text}]; a stray I- starts an entity."""
    out, cur = [], None
    for i, tag in enumerate(list(tags) + ["O"]):
        inside = tag.startswith("I-") and cur is not None and cur["type"] == tag[2:]
        if cur is not None and not inside:
            cur["end"] = i
            cur["text"] = " ".join(words[cur["start"]: i])
            out.append(cur)
            cur = None
        if tag != "O" and not inside:
            cur = {"type": tag[2:] if tag[:2] in ("B-", "I-") else tag, "start": i}
    return out


def described(kind: str, item, logits: np.ndarray, pred) -> dict:
    """A prediction with its probability: a label's, or the mean of each entity's first sub-tokens' tag probabilities."""
    if kind == "classification":
        return {"label": pred, "score": round(float(_softmax(logits.astype(np.float64)).max()), 4)}
    probs = _softmax(logits.astype(np.float64)).max(-1)
    first = {}
    for t, w in enumerate(item.word_ids or []):
        if w is not None and w not in first and t < len(probs):
            first[w] = float(probs[t])
    spans = entities(item.example.words, pred)
    for e in spans:
        e["score"] = round(float(np.mean([first.get(w, 0.0) for w in range(e["start"], e["end"])])), 4)
    return {"tags": pred, "entities": spans}


class MultiTaskPredictor:
    """Holds the trained tasks (name -> model) and the lower part they were trained above."""

    def __init__(self, model_dirs: list[str], spec: CacheSpec, batch_size: int = 64, device: str = "cpu"):
        if not model_dirs:
            raise ErError("give at least one --model-dir")
        self.spec, self.batch_size = spec, batch_size
        self.tasks: dict[str, tuple] = {}
        self.lower = self.tokenizer = None
        for d in model_dirs:
            meta, lower, model, tok = load_trained(d)
            check_cache(meta, spec, d)
            name = meta["task"]["name"]
            if name in self.tasks:
                name = f"{name}:{d}"
            labels = LabelMap(meta["task"]["labels"]) if meta["task"]["labels"] else None
            self.tasks[name] = (meta, model.to(device), labels)
            if self.lower is None and lower is not None:
                self.lower, self.tokenizer = lower, tok
            self.tokenizer = self.tokenizer or tok
        self.pad_id = self.tokenizer.pad_token_id or 0
        # Only `full` models (the baseline): every example runs from text, and the cache is not read.
        self.uses_cache = self.lower is not None
        self.embed = Embedder(self.lower, self.pad_id, device=device) if self.uses_cache else None

    def items(self, examples: list[Example], kind: str) -> list[Item]:
        return encode_examples(kind, examples, self.tokenizer, self.spec.tokenizer, None, with_targets=False)

    @torch.inference_mode()
    def predict(self, examples: list[Example], hidden: list[np.ndarray | None], tasks: list[str] | None = None,
                detail: bool = False) -> list[dict]:
        """One dict per example: {task name: prediction}. `hidden[i]`: example i's cached state (its first window's,
        for a QA context read in windows) or None (a miss). Rows the cache did not give run the lower part first.
        `tasks`: only these (default all). `detail`: each prediction with its score (and NER's entity spans), as
        `er serve` answers; the label, tags or answer are the same either way."""
        chosen = {n: t for n, t in self.tasks.items() if tasks is None or n in tasks}
        kinds = {meta["task"]["kind"] for meta, _, _ in chosen.values()}
        by_kind = {kind: self.items(examples, kind) for kind in sorted(kinds)}
        some = next(iter(by_kind.values()))
        owner = np.cumsum([it.window == 0 for it in some]) - 1  # item -> example (windows follow their example)
        states = {it.key: hidden[o] for it, o in zip(some, owner) if it.window == 0 and hidden[o] is not None}
        todo = [it for it in some if it.key not in states] if self.uses_cache else []
        for it, h in zip(todo, self.embed([it.input_ids for it in todo], [it.type_ids for it in todo]) if todo else []):
            states[it.key] = h
        out: list[dict] = [{} for _ in examples]
        for name, (meta, model, labels) in chosen.items():
            kind = meta["task"]["kind"]
            items = by_kind[kind]
            preds = []
            for s in range(0, len(items), self.batch_size):
                its = items[s: s + self.batch_size]
                if meta["method"] == "full":
                    batch = collate(kind, [it.input_ids for it in its], None, None, self.pad_id, [it.type_ids for it in its])
                else:
                    batch = collate(kind, [it.input_ids for it in its], None, [states[it.key] for it in its], self.pad_id)
                logits = forward(model, batch).float().cpu().numpy()
                for r, it in enumerate(its):
                    n = len(it.input_ids)
                    row = logits[r] if kind == "classification" else logits[r, :n]
                    if kind == "qa":
                        preds.append(qa_span(it, row))
                    else:
                        pred = decode(kind, it, row, labels)
                        preds.append(described(kind, it, row, pred) if detail else pred)
            if kind == "qa":  # the best-scoring window's answer
                best: dict[int, tuple[float, str]] = {}
                for o, (sc, text) in zip(owner, preds):
                    if o not in best or sc > best[o][0]:
                        best[o] = (sc, text)
                for o, (sc, text) in best.items():
                    out[o][name] = {"answer": text, "score": round(float(sc), 4)} if detail else text
            else:
                for o, p in zip(owner, preds):
                    out[o][name] = p
        return out
