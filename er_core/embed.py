"""Tokenize example inputs and run them through the frozen lower part, with little padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ErError


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32, real tokens only (special tokens included)
    truncated: bool
    type_ids: np.ndarray | None = None  # int8 segment ids, the tokenizer's own; None when all zero (single texts)
    offsets: list | None = None  # QA windows with offsets asked for: each token's char span in the context, None elsewhere


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
            try:
                cut = tokenizer(*sub, max_length=max_length, **{"truncation": True, **kw2}, **kw)
            except Exception as e:  # only_second with a first text past the max length: nothing left to cut
                if "Truncation error" not in str(e):
                    raise
                raise ErError(f"a text pair's first text (QA: the question) leaves no room for the second at max length "
                              f"{max_length}; raise --max-length") from None
            for n, j in enumerate(long):
                full[j] = cut["input_ids"][n]
                if types is not None:
                    types[j] = cut["token_type_ids"][n]
        long_set = set(long)
        for j, i in enumerate(idx):
            t = np.asarray(types[j], dtype=np.int8) if types is not None and any(types[j]) else None
            out[i] = Tokenized(np.asarray(full[j], dtype=np.int32), j in long_set, t)
    return out  # type: ignore[return-value]


def is_strided(inputs: dict) -> bool:
    """A question + long context read in overlapping windows (one cache row each) rather than cut."""
    return inputs.get("stride") is not None


def tokenize_rows(tokenizer, inputs: list[dict], max_length: int) -> list[tuple[int, int, Tokenized]]:
    """(input index, window, tokens) for every cache row of `inputs`: one per input, or one per window of a
    strided QA input (its key: keys.window_key)."""
    plain = [i for i, inp in enumerate(inputs) if not is_strided(inp)]
    rows = [(i, 0, t) for i, t in zip(plain, tokenize(tokenizer, [inputs[i] for i in plain], max_length))]
    for i, inp in enumerate(inputs):
        if is_strided(inp):
            rows += [(i, w, t) for w, t in enumerate(windows(tokenizer, inp, max_length))]
    return sorted(rows, key=lambda r: r[:2])


def windows(tokenizer, inputs: dict, max_length: int, offsets: bool = False) -> list[Tokenized]:
    """The overlapping windows of a question + context, as transformers' run_qa example makes them: the question
    whole in each, the context in spans of up to max_length tokens overlapping by `stride` tokens (at most half a
    window's context, so short max lengths still move forward)."""
    q, c, stride = inputs["text"], inputs["text_pair"], int(inputs["stride"])
    if not getattr(tokenizer, "is_fast", False):
        raise ErError("reading long QA contexts in windows needs a fast tokenizer (offsets and overflow)")
    room = max_length - len(tokenizer(q, add_special_tokens=False)["input_ids"]) - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= 0:
        raise ErError(f"QA question {q[:40]!r} leaves no room for its context at max length {max_length}; raise --max-length")
    stride = min(stride, room // 2)  # windows move forward at least half their context (the tokenizer needs stride < room)
    enc = tokenizer(q, c, truncation="only_second", max_length=max_length, stride=stride, return_overflowing_tokens=True,
                    return_token_type_ids=True, return_offsets_mapping=offsets)
    out = []
    for j, ids in enumerate(enc["input_ids"]):
        types = enc["token_type_ids"][j]
        spans = None
        if offsets:
            spans = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][j], enc.sequence_ids(j))]
        out.append(Tokenized(np.asarray(ids, dtype=np.int32), False,
                             np.asarray(types, dtype=np.int8) if any(types) else None, spans))
    return out


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
