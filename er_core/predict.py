"""Batch inference for several trained tasks over one corpus.

Cached examples run only each task's upper layers + head, reading every cached state once for
all tasks; cache misses run the shared frozen lower part first (and may be recorded).
"""

from __future__ import annotations

import numpy as np
import torch

from .artifacts import check_cache, load_trained
from .embed import Embedder
from .errors import ArtifactMismatchError, ErError
from .evaluate import decode, forward
from .manifest import CacheSpec
from .task_data import Item, collate, encode_examples
from .tasks import Example, LabelMap


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
        if self.lower is None:
            raise ArtifactMismatchError("only `full` models given: they do not use the cache; predict with them from text")
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.embed = Embedder(self.lower, self.pad_id, device=device)

    def items(self, examples: list[Example], kind: str) -> list[Item]:
        return encode_examples(kind, examples, self.tokenizer, self.spec.tokenizer, None, with_targets=False)

    @torch.inference_mode()
    def predict(self, examples: list[Example], hidden: list[np.ndarray | None]) -> list[dict]:
        """One dict per example: {task name: prediction}. `hidden[i]` is the cached state or None (miss)."""
        miss = [i for i, h in enumerate(hidden) if h is None]
        if miss:
            base = self.items([examples[i] for i in miss], "classification")
            for i, h in zip(miss, self.embed([it.input_ids for it in base], [it.type_ids for it in base])):
                hidden[i] = h
        out: list[dict] = [{} for _ in examples]
        by_kind: dict[str, list[Item]] = {}
        for name, (meta, model, labels) in self.tasks.items():
            kind = meta["task"]["kind"]
            if kind not in by_kind:
                by_kind[kind] = self.items(examples, kind)
            items = by_kind[kind]
            for s in range(0, len(items), self.batch_size):
                chunk = list(range(s, min(s + self.batch_size, len(items))))
                its = [items[i] for i in chunk]
                if meta["method"] == "full":
                    batch = collate(kind, [it.input_ids for it in its], None, None, self.pad_id, [it.type_ids for it in its])
                else:
                    batch = collate(kind, [it.input_ids for it in its], None, [hidden[i] for i in chunk], self.pad_id)
                logits = forward(model, batch).float().cpu().numpy()
                for r, i in enumerate(chunk):
                    n = len(items[i].input_ids)
                    out[i][name] = decode(kind, items[i], logits[r] if kind == "classification" else logits[r, :n], labels)
        return out
