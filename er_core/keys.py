"""Stable per-example cache keys and the tokenizer settings they depend on.

A key is a content hash of the example's input (text, text pair or pre-split words)
plus the tokenizer settings, so the same text met in two tasks or two ingestion runs
maps to one cache row, and a change of tokenizer can never reuse a stale row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class TokenizerSettings:
    name: str
    fingerprint: str  # hash of class, vocabulary and normalisation flags
    max_length: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    flags = {k: getattr(tokenizer, k, None) for k in ("do_lower_case", "padding_side", "truncation_side")}
    flags["special"] = tokenizer.all_special_tokens
    h.update(json.dumps(flags, sort_keys=True, default=str).encode())
    return h.hexdigest()


def tokenizer_settings(tokenizer, name: str, max_length: int | None = None) -> TokenizerSettings:
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 512
    return TokenizerSettings(name=name, fingerprint=tokenizer_fingerprint(tokenizer), max_length=int(max_length or limit))


def example_key(inputs: dict, settings: TokenizerSettings) -> str:
    """Key of one example input: {'text': ...}, {'text': q, 'text_pair': c} or {'words': [...]}."""
    payload = json.dumps(
        {"in": inputs, "tok": settings.fingerprint, "max": settings.max_length}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def window_key(inputs: dict, settings: TokenizerSettings, window: int) -> str:
    """Key of one window of a strided QA input. Window 0's is the input's own key, so "is this input cached?"
    stays one lookup."""
    return example_key(inputs if window == 0 else {**inputs, "window": window}, settings)
