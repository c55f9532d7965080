"""Tokenize example inputs and run them through the frozen lower part, with little padding.

torch is imported where states are computed: tokenizing (ingestion's read and tokenize tasks, every driver) needs none.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .errors import ErError

if TYPE_CHECKING:
    import torch


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
            kw2 = {"is_split_into_words": True, "return_token_type_ids": False}
        elif kind[0] == "pair":
            args = ([inputs[i]["text"] for i in idx], [inputs[i]["text_pair"] for i in idx])
            kw2 = {"truncation": kind[1], "return_token_type_ids": True}
        else:
            args = ([inputs[i]["text"] for i in idx],)
            kw2 = {"return_token_type_ids": False}
        # Only the ids (and a pair's segment ids) are kept: building the other lists per text cost ingestion's CPU side
        # a third of its tokenizing.
        kw2["return_attention_mask"] = False
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


def question_room(tokenizer, question: str, max_length: int) -> int:
    """Context tokens a window holds beside the whole question and the pair's special tokens (<= 0: none)."""
    return max_length - len(tokenizer(question, add_special_tokens=False)["input_ids"]) - tokenizer.num_special_tokens_to_add(pair=True)


def windows(tokenizer, inputs: dict, max_length: int, offsets: bool = False) -> list[Tokenized]:
    """The overlapping windows of a question + context, as transformers' run_qa example makes them: the question
    whole in each, the context in spans of up to max_length tokens overlapping by `stride` tokens (at most half a
    window's context, so short max lengths still move forward)."""
    q, c, stride = inputs["text"], inputs["text_pair"], int(inputs["stride"])
    if not getattr(tokenizer, "is_fast", False):
        raise ErError("reading long QA contexts in windows needs a fast tokenizer (offsets and overflow)")
    room = question_room(tokenizer, q, max_length)
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
    import torch

    out = torch.zeros((len(types), T), dtype=torch.long)
    for r, t in enumerate(types):
        if t is not None:
            out[r, : len(t)] = torch.from_numpy(np.asarray(t, dtype=np.int64))
    return out


CPU_TOKENS = 8192  # tokens per forward pass on CPU (measured best here: benchmarks/bench_ingest.py)
CPU_BATCH = 64  # texts per forward pass on CPU (ingestion's default)


def token_budget(device: str, hidden_size: int, intermediate_size: int, heads: int, max_length: int) -> int:
    """Tokens per forward pass: CPU_TOKENS on CPU; on a GPU as many as half its free memory holds, counting a
    layer's live activations per token in fp32 (states, q/k/v, the FFN, one row of attention scores), so the
    device stays busy without a sweep of batch sizes."""
    if not device.startswith("cuda"):
        return CPU_TOKENS
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    per_token = 4 * (6 * hidden_size + intermediate_size + heads * max_length)
    return int(min(max(free // 2 // per_token, CPU_TOKENS), 1 << 20))


class Embedder:
    """Computes layer-k states of token id sequences with the frozen lower part.

    Rows go through in length-sorted passes of at most `max_tokens` tokens (padding counted) and
    `max_batch` rows. `autocast` is a torch dtype for mixed precision on GPU (e.g. torch.bfloat16).
    `pack` leaves the states on the device in the storage codec and copies each pass to the host once;
    calling the embedder returns float32 numpy arrays of the real tokens only.
    """

    def __init__(self, lower: torch.nn.Module, pad_id: int, device: str = "cpu", autocast=None,
                 max_tokens: int = CPU_TOKENS, max_batch: int = 256):
        self.lower = lower.to(device).eval()
        self.pad_id = pad_id
        self.device = device
        self.autocast = autocast
        self.max_tokens, self.max_batch = max_tokens, max_batch

    def pack(self, rows, codec: str = "fp32"):
        """`rows` (a PackedRows) in length order, with their states encoded by `codec` as `payload` (and `scale`)."""
        import torch

        with torch.inference_mode():
            return self._pack(rows, codec)

    def _pack(self, rows, codec: str):
        import torch

        from .store import get_codec

        if (rows.lengths == 0).any():
            raise ErError("cannot embed an example with zero tokens")
        c = get_codec(codec)
        batches = length_batches(rows.lengths, self.max_tokens, self.max_batch)
        rows = rows.take(np.concatenate(batches)) if batches else rows
        payload, scale, at, pin = [], [], 0, self.device.startswith("cuda")
        for b in batches:
            ids, mask, types = (None if x is None else torch.from_numpy(x) for x in rows.padded(at, at + len(b), self.pad_id))
            at += len(b)
            if pin:
                ids, mask = ids.pin_memory(), mask.pin_memory()
            ids, mask = ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
            with torch.autocast(self.device.split(":")[0], dtype=self.autocast, enabled=self.autocast is not None):
                h = self.lower(ids, mask.long(), None if types is None else types.to(self.device))
            y, extra = c.encode_device(h.float()[mask])  # real tokens only, row after row
            parts = [y.contiguous().view(torch.uint8).reshape(-1)]
            if extra is not None:  # int8's fp32 scales, or fp16's overflow flag
                extra = extra if extra.dtype == torch.float32 else extra.to(torch.uint8)
                parts.append(extra.contiguous().view(torch.uint8).reshape(-1))
            if self.device == "cpu":  # on the host already: no copy
                host = [p.numpy() for p in parts]
            else:
                both = torch.cat(parts).cpu().numpy()  # the pass's one device-to-host copy
                host = [both[:parts[0].numel()], both[parts[0].numel():]]
            payload.append(host[0])
            if codec == "int8":
                scale.append(host[1])
            elif codec == "fp16" and host[1].any():
                raise ErError("hidden states overflow fp16 (|x| > 65504); use codec 'bf16' or 'fp32' for this model")
        empty = np.zeros(0, np.uint8)
        return replace(rows, payload=np.concatenate(payload) if payload else empty,
                       scale=(np.concatenate(scale) if scale else empty) if codec == "int8" else None)

    def __call__(self, ids: list[np.ndarray], types: list | None = None) -> list[np.ndarray]:
        """States of each id sequence as float32 (length, H) arrays; `types`: each one's segment ids or None."""
        from .store import PackedRows

        if any(len(x) == 0 for x in ids):
            raise ErError("cannot embed an example with zero tokens")
        if not ids:
            return []
        tok = [Tokenized(np.asarray(x, np.int32), False, None if types is None else types[i]) for i, x in enumerate(ids)]
        rows = self.pack(PackedRows.of([(str(i), t) for i, t in enumerate(tok)]), "fp32")
        flat = rows.payload.view(np.float32)
        states = np.split(flat.reshape(int(rows.lengths.sum()), -1), np.cumsum(rows.lengths)[:-1])
        out: list[np.ndarray | None] = [None] * len(ids)
        for key, h in zip(rows.keys, states):
            out[int(key)] = h
        return out  # type: ignore[return-value]
