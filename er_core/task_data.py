"""A task's labels joined to the cache by key, and the padded, length-grouped batches training reads.

Each example is tokenized again (cheap) to get what labels need (word ids for NER, offsets
for QA); its token ids must equal the cached ones, which proves the join is right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .store import get_codec
from .embed import is_strided, pad_types, tokenize, windows
from .errors import CacheMismatchError, ErError
from .heads import IGNORE
from .keys import TokenizerSettings, example_key, window_key
from .tasks import Example, LabelMap, Task, example_input


@dataclass
class Item:
    key: str
    input_ids: np.ndarray
    target: object  # int (classification), int array (ner), (start, end) (qa)
    example: Example
    word_ids: list | None = None  # ner: word index per token
    offsets: list | None = None  # qa: char span per context token, None elsewhere
    type_ids: np.ndarray | None = None  # segment ids of a pair (the full model's input; the cache needs none)
    window: int = 0  # QA: which window of a long context (an example has one item per window)


@dataclass
class SplitData:
    kind: str
    items: list[Item]
    rows: object = None  # CachedRows with these keys, for cache-fed batches
    missing: list[Example] = field(default_factory=list)

    def lengths(self) -> np.ndarray:
        return np.asarray([len(it.input_ids) for it in self.items])


def label_map(task: Task) -> LabelMap:
    return LabelMap(task.labels)


def align(kind: str, ex: Example, tokenizer, max_length: int) -> tuple[list | None, list | None]:
    """What decoding needs beyond the ids: word index per token (ner) or context char span per token (qa)."""
    if kind == "ner":
        return tokenizer(list(ex.words), is_split_into_words=True, truncation=True, max_length=max_length).word_ids(), None
    if kind == "qa":
        enc = tokenizer(ex.text, ex.text_pair, truncation="only_second", max_length=max_length, return_offsets_mapping=True)
        return None, [o if s == 1 else None for o, s in zip(enc["offset_mapping"], enc.sequence_ids())]
    return None, None


def _target(kind: str, ex: Example, labels: LabelMap | None, where: str, word_ids, offsets):
    if kind == "classification":
        return labels.encode(ex.label, where=where)
    if kind == "ner":
        target = np.full(len(word_ids), IGNORE, dtype=np.int64)
        prev = None
        for t, w in enumerate(word_ids):
            if w is not None and w != prev:
                target[t] = labels.encode(ex.tags[w], where=where)
            prev = w
        return target
    if kind == "qa":
        # run_qa's rule: a window whose context does not hold the whole answer points at [CLS]
        ctx = [t for t, o in enumerate(offsets) if o is not None]
        if ex.answers and ctx:
            text, start = ex.answers[0]
            end = start + len(text)
            if offsets[ctx[0]][0] <= start and end <= offsets[ctx[-1]][1]:
                inside = [t for t in ctx if offsets[t][0] < end and offsets[t][1] > start]
                if inside:
                    return (inside[0], inside[-1])
        return (0, 0)
    raise ErError(f"unknown task kind {kind!r}")


def encode_examples(kind: str, examples: list[Example], tokenizer, settings: TokenizerSettings, labels: LabelMap | None,
                    split: str = "", with_targets: bool = True) -> list[Item]:
    """Tokenize examples, key them, and (with_targets) turn their labels into per-example or per-token targets.
    A QA example read in windows gives one item per window, in window order."""
    inputs = [example_input(ex) for ex in examples]
    plain = iter(tokenize(tokenizer, [inp for inp in inputs if not is_strided(inp)], settings.max_length))
    items = []
    for ex, inp in zip(examples, inputs):
        where = f"{split} example {ex.id}"
        if is_strided(inp):
            for w, tok in enumerate(windows(tokenizer, inp, settings.max_length, offsets=True)):
                target = _target(kind, ex, labels, where, None, tok.offsets) if with_targets else None
                items.append(Item(window_key(inp, settings, w), tok.input_ids, target, ex, None, tok.offsets, tok.type_ids, w))
            continue
        tok = next(plain)
        word_ids, offsets = align(kind, ex, tokenizer, settings.max_length)
        target = _target(kind, ex, labels, where, word_ids, offsets) if with_targets else None
        items.append(Item(example_key(inp, settings), tok.input_ids, target, ex, word_ids, offsets, tok.type_ids))
    return items


def encode_split(task: Task, split: str, tokenizer, settings: TokenizerSettings, labels: LabelMap | None) -> list[Item]:
    return encode_examples(task.kind, task.splits[split], tokenizer, settings, labels, split)


def join_cache(task: Task, split: str, tokenizer, settings, labels, reader=None, rows=None) -> SplitData:
    """Match a split's examples to cache rows by key; report the examples the cache lacks."""
    items = encode_split(task, split, tokenizer, settings, labels)
    if reader is None and rows is None:
        return SplitData(task.kind, items)
    if rows is None:
        rows = reader.load({it.key for it in items})
    lacking = {}  # id -> example: an example is missing when any of its windows is
    for it in items:
        i = rows.index.get(it.key)
        if i is None:
            lacking.setdefault(it.example.id, it.example)
        elif not np.array_equal(np.asarray(rows.input_ids[i], dtype=np.int32), it.input_ids):
            raise CacheMismatchError(f"{split} example {it.example.id}: cached token ids differ from the tokenizer's; the cache was built with other settings")
    present = [it for it in items if it.example.id not in lacking]
    return SplitData(task.kind, present, rows, list(lacking.values()))


def require_complete(data: SplitData, split: str, url: str, spec=None) -> None:
    if data.missing:
        raise ErError(missing_message(len(data.missing), split, [ex.id for ex in data.missing], url, spec))


def missing_message(n: int, split: str, ids: list[str], url: str, spec=None) -> str:
    """Why examples may be missing from a cache, and the two ways to fill it."""
    made = f" (made with {spec.model_name}, --layer {spec.layer}, max length {spec.tokenizer.max_length})" if spec else ""
    return (f"{n} {split} examples are not in the cache {url}{made}, e.g. {', '.join(ids[:5])}. Ingest the task folder "
            f"into this cache (`er ingest TASK_DIR --cache {url}`), or pass `er train --ingest-missing` to embed them "
            f"now; if you did ingest it, it went into another cache (other model, --layer or --max-length)")


def grouped_order(lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0) -> list[np.ndarray]:
    """Batches of similar length; with shuffle, a new random grouping each epoch, every row once."""
    n = len(lengths)
    rng = np.random.default_rng(seed * 1_000_003 + epoch)
    idx = rng.permutation(n) if shuffle else np.arange(n)
    chunk = batch_size * 50
    batches = []
    for s in range(0, n, chunk):
        part = idx[s : s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padded_states(codec, rows, hidden_size: int) -> torch.Tensor:
    """Cached rows `(payload, scale, length)` decoded straight into one zero-padded float32 (B, T, H) batch:
    no float32 copy per row; in pinned memory when a GPU is present, so the move to it is asynchronous."""
    T = max(n for _, _, n in rows)
    t = torch.empty((len(rows), T, hidden_size), dtype=torch.float32, pin_memory=torch.cuda.is_available())
    out = t.numpy()
    for r, (payload, scale, n) in enumerate(rows):
        codec.decode_into(payload, scale, out[r, :n])
        out[r, n:] = 0
    return t


def collate(kind: str, ids: list[np.ndarray], targets: list | None, hidden, pad_id: int,
            types: list | None = None) -> dict:
    """Pad one batch. `hidden` given (rows of states, or a padded batch from `padded_states`): cache-fed batch;
    else: token ids (and `types`, segment ids) for the full model."""
    B, T = len(ids), max(len(x) for x in ids)
    mask = torch.zeros(B, T, dtype=torch.long)
    batch: dict = {}
    if isinstance(hidden, torch.Tensor):
        batch["hidden_states"] = hidden
    elif hidden is not None:
        H = hidden[0].shape[-1]
        hs = np.zeros((B, T, H), dtype=np.float32)
        for r, h in enumerate(hidden):
            hs[r, : len(h)] = h
        batch["hidden_states"] = torch.from_numpy(hs)
    else:
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        batch["input_ids"] = input_ids
        tt = pad_types(types, T)
        if tt is not None:
            batch["token_type_ids"] = tt
    for r, x in enumerate(ids):
        mask[r, : len(x)] = 1
    batch["attention_mask"] = mask
    if targets is None:  # inference
        return batch
    if kind == "classification":
        batch["labels"] = torch.tensor([int(t) for t in targets], dtype=torch.long)
    elif kind == "ner":
        lab = torch.full((B, T), IGNORE, dtype=torch.long)
        for r, t in enumerate(targets):
            lab[r, : len(t)] = torch.from_numpy(np.asarray(t, dtype=np.int64))
        batch["labels"] = lab
    elif kind == "qa":
        batch["start_positions"] = torch.tensor([t[0] for t in targets], dtype=torch.long)
        batch["end_positions"] = torch.tensor([t[1] for t in targets], dtype=torch.long)
    return batch


def iter_batches(data: SplitData, batch_size: int, source: str, pad_id: int, shuffle=False, seed=0, epoch=0):
    """Yield (item indices, batch) pairs; `source` is 'cache' (layer-k states) or 'text' (token ids)."""
    for order in grouped_order(data.lengths(), batch_size, shuffle, seed, epoch):
        its = [data.items[i] for i in order]
        hidden = None
        if source == "cache":
            rows = data.rows
            at = [rows.index[it.key] for it in its]
            hidden = padded_states(get_codec(rows.codec), [(rows._hidden[i], rows._scale[i], int(rows.lengths[i])) for i in at],
                                   rows.hidden_size)
        yield order, collate(data.kind, [it.input_ids for it in its], [it.target for it in its], hidden, pad_id,
                             [it.type_ids for it in its] if hidden is None else None)
