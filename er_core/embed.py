"""Tokenize example inputs and run them through the frozen lower part, with little padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ErError
from .keys import TokenizerSettings


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32, real tokens only (special tokens included)
    truncated: bool
    type_ids: np.ndarray | None = None  # int8 segment ids, the tokenizer's own; None when all zero (single texts)


PAIR_TRUNCATION = "only_second"  # a pair's default: QA keeps the question and cuts the context


def pair_truncation(inputs: dict) -> str:
    """How a text pair is cut to the max length: the input's own `truncation` (part of its key), else only_second."""
    return inputs.get("truncation", PAIR_TRUNCATION)


def is_empty(inputs: dict) -> bool:
    if "words" in inputs:
        return not any(w.strip() for w in inputs["words"])
    return not (inputs.get("text") or "").strip()


def tokenize(tokenizer, inputs: list[dict], max_length: int, **kw) -> list[Tokenized]:
    """Tokenize a list of inputs ({'text'}, {'text','text_pair'[,'truncation']} or {'words'}), truncating to
    max_length. Pairs keep the tokenizer's segment ids, which the embeddings of BERT-like families read."""
    out: list[Tokenized | None] = [None] * len(inputs)
    groups: dict[tuple, list[int]] = {}
    for i, inp in enumerate(inputs):
        kind = ("words",) if "words" in inp else (("pair", pair_truncation(inp)) if inp.get("text_pair") is not None else ("text",))
        groups.setdefault(kind, []).append(i)
    for kind, idx in groups.items():
        if kind[0] == "words":
            args = ([list(inputs[i]["words"]) for i in idx],)
            kw2 = {"is_split_into_words": True}
        elif kind[0] == "pair":
            args = ([inputs[i]["text"] for i in idx], [inputs[i]["text_pair"] for i in idx])
            kw2 = {"truncation": kind[1], "return_token_type_ids": True}
        else:
            args = ([inputs[i]["text"] for i in idx],)
            kw2 = {}
        # Tokenize in full first, so truncation is detected (and counted) rather than silent.
        enc = tokenizer(*args, **{**kw2, "truncation": False}, **kw)
        full, types = enc["input_ids"], enc.get("token_type_ids") if kind[0] == "pair" else None
        long = [j for j, ids in enumerate(full) if len(ids) > max_length]
        if long:
            sub = tuple([a[j] for j in long] for a in args)
            cut = tokenizer(*sub, max_length=max_length, **{"truncation": True, **kw2}, **kw)
            for n, j in enumerate(long):
                full[j] = cut["input_ids"][n]
                if types is not None:
                    types[j] = cut["token_type_ids"][n]
        long_set = set(long)
        for j, i in enumerate(idx):
            t = np.asarray(types[j], dtype=np.int8) if types is not None and any(types[j]) else None
            out[i] = Tokenized(np.asarray(full[j], dtype=np.int32), j in long_set, t)
    return out  # type: ignore[return-value]


def length_batches(lengths: list[int] | np.ndarray, max_tokens: int, max_batch: int = 256) -> list[np.ndarray]:
    """Group indices into batches of similar length so padding stays small (batch cost = n * longest)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, cur, longest = [], [], 0
    for i in order:
        n = int(lengths[i])
        if cur and (max(longest, n) * (len(cur) + 1) > max_tokens or len(cur) >= max_batch):
            batches.append(np.asarray(cur))
            cur, longest = [], 0
        cur.append(int(i))
        longest = max(longest, n)
    if cur:
        batches.append(np.asarray(cur))
    return batches


def pad_types(types: list | None, T: int) -> torch.Tensor | None:
    """Segment ids of a batch padded with 0 to length T; None when no row has any (the model's default)."""
    if types is None or all(t is None for t in types):
        return None
    out = torch.zeros((len(types), T), dtype=torch.long)
    for r, t in enumerate(types):
        if t is not None:
            out[r, : len(t)] = torch.from_numpy(np.asarray(t, dtype=np.int64))
    return out


def pad_ids(ids: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.from_numpy(x.astype(np.int64))
        mask[r, : len(x)] = 1
    return input_ids, mask


class Embedder:
    """Computes layer-k states of token id sequences with the frozen lower part.

    `autocast` is a torch dtype for mixed precision on GPU (e.g. torch.bfloat16); states
    are always returned as float32 numpy arrays of the real tokens only.
    """

    def __init__(self, lower: torch.nn.Module, pad_id: int, device: str = "cpu", autocast=None, max_tokens: int = 8192):
        self.lower = lower.to(device).eval()
        self.pad_id = pad_id
        self.device = device
        self.autocast = autocast
        self.max_tokens = max_tokens

    @torch.inference_mode()
    def __call__(self, ids: list[np.ndarray], types: list | None = None) -> list[np.ndarray]:
        """States of each id sequence; `types`: each one's segment ids (Tokenized.type_ids) or None."""
        if any(len(x) == 0 for x in ids):
            raise ErError("cannot embed an example with zero tokens")
        out: list[np.ndarray | None] = [None] * len(ids)
        for batch in length_batches([len(x) for x in ids], self.max_tokens):
            input_ids, mask = pad_ids([ids[i] for i in batch], self.pad_id)
            tt = pad_types(None if types is None else [types[i] for i in batch], input_ids.shape[1])
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            with torch.autocast(self.device.split(":")[0], dtype=self.autocast, enabled=self.autocast is not None):
                h = self.lower(input_ids, mask, None if tt is None else tt.to(self.device))
            h = h.float().cpu().numpy()
            for r, i in enumerate(batch):
                out[i] = h[r, : len(ids[i])]
        return out  # type: ignore[return-value]
