"""Corpus input for ingestion: find the files, read them as example inputs, and claim each key once.

Formats (by extension, optionally compressed .gz/.bz2/.xz/.zst): JSONL (`.jsonl`, `.ndjson`,
`.json`), Parquet, CSV/TSV (header row), plain text (`.txt`: one example per non-empty line).
A local folder holding `train.jsonl`, `train.conll` or `train*.json` is a task folder: its
train/dev/test examples are read with `load_task` (CoNLL gives {'words': [...]}).

Bad input raises DataFormatError naming file and line/row. Empty texts are not errors: they
are yielded, and ingestion skips and counts them (manifest.skipped["empty_text"]).
Both `er ingest --local` and the Ray pipeline read through `read_source`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa

from .embed import is_empty
from .errors import DataFormatError, ErError
from .store import key_digests
from .store import url_to_fs
from .tasks import is_task_folder, pair_input

__all__ = [
    "CorpusRecord", "CorpusRow", "CorpusSource", "CorpusStats", "KeyClaims",
    "batch_token", "find_sources", "key_digests", "read_corpus", "read_source", "scan",
]

# Extension -> reader. A new format is one row here plus one reader below.
FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "tsv",
    ".txt": "text", ".text": "text",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass(frozen=True)
class CorpusSource:
    url: str  # local path or fsspec URL (s3://...)
    fmt: str  # a FORMATS value, or "task" for a task folder

    def where(self, row: int) -> str:
        """How an error names one row: file:line for line formats, row N for Parquet, example N of a task."""
        if self.fmt == "parquet":
            return f"{self.url} row {row}"
        if self.fmt == "task":
            return f"{self.url} (example {row})"
        return f"{self.url}:{row}"


class CorpusRow(NamedTuple):
    row: int  # line number (1-based) for line formats, row number for Parquet, example index for tasks
    inputs: dict  # {'text'}, {'text','text_pair'} or {'words'}; may be empty text (caller skips and counts)
    ident: str | None  # the --id-field value, when one is used; a task example's own id


@dataclass
class CorpusStats:
    rows: int = 0
    empty: int = 0
    complete: bool = True  # False when scan stopped early (`enough` usable rows seen)

    @property
    def usable(self) -> int:
        return self.rows - self.empty


def _format_of(name: str) -> str | None:
    base = name.lower()
    for c in _COMPRESSED:
        if base.endswith(c):
            base = base[: -len(c)]
    return FORMATS.get(os.path.splitext(base)[1])


def find_sources(paths: Iterable[str], storage_options: dict | None = None) -> list[CorpusSource]:
    """Expand files, folders (recursively) and globs, local or remote, into an ordered source list."""
    out: list[CorpusSource] = []
    for p in paths:
        if is_task_folder(p):
            out.append(CorpusSource(os.path.abspath(p), "task"))
            continue
        fs, root = url_to_fs(p, storage_options)
        proto = p.split("://", 1)[0] + "://" if "://" in p else ""
        if any(ch in root for ch in "*?["):
            found = sorted(fs.glob(root))
        elif fs.isdir(root):
            found = sorted(fs.find(root))
        elif fs.exists(root):
            found = [root]
        else:
            raise ErError(f"corpus path {p} does not exist (expected a file, folder, glob or task folder)")
        files = [f for f in found if not os.path.basename(f).startswith((".", "_")) and not fs.isdir(f)]
        known = [f for f in files if _format_of(f)]
        if not known:
            raise ErError(
                f"corpus path {p}: no readable files (found {len(files)}: {[os.path.basename(f) for f in files[:5]]}); "
                f"expected extensions {sorted(FORMATS)}, optionally compressed {list(_COMPRESSED)}"
            )
        for f in known:
            url = proto + f if proto and not f.startswith(proto) else f
            out.append(CorpusSource(url, _format_of(f)))
    seen, unique = set(), []
    for s in out:  # the same file named twice is read once
        if s.url not in seen:
            seen.add(s.url)
            unique.append(s)
    return unique


# ---------------------------------------------------------------- readers


def _lines(f, src: CorpusSource, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
    """Decoded lines with their numbers; bad bytes are reported at their line."""
    for lineno, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(
                f"{src.where(lineno)}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                "re-encode the file as UTF-8"
            ) from None
        if lineno == 1:
            line = line.lstrip("\ufeff")
        yield lineno, line if keep_ends else line.rstrip("\r\n")


PAIR_FIELD = "text_pair"  # a record's second text (premise + hypothesis): encoded as a pair, as a classification task does


def _inputs(value, field: str, where: str) -> dict:
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, list) and all(isinstance(w, str) for w in value):
        return {"words": value}  # pre-split words, like CoNLL
    if isinstance(value, dict):  # an input as er keys it (`er serve`'s miss log): a QA pair keeps its truncation, stride
        fields = {"text": str, "text_pair": str, "truncation": str, "stride": int, "words": list}
        bad = [k for k, v in value.items() if k not in fields or not isinstance(v, fields[k])]
        if not bad and (("words" in value) != ("text" in value)):
            return value
        raise DataFormatError(f"{where}: field {field!r} as an object takes text (with text_pair, truncation, stride) or "
                              f"words; got {sorted(value)}")
    got = "null" if value is None else type(value).__name__
    raise DataFormatError(f"{where}: field {field!r} must be a string (or a list of words, or an input object), got {got}")


def _ident(record: dict, field: str | None, where: str) -> str | None:
    if field is None:
        return None
    if field not in record:
        raise DataFormatError(f"{where}: missing id field {field!r} (fields present: {sorted(record)})")
    v = record[field]
    if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v) == "":
        raise DataFormatError(f"{where}: id field {field!r} must be a non-empty string or integer, got {v!r}")
    return str(v)


def _record_row(record, src: CorpusSource, row: int, text_field: str, id_field: str | None) -> CorpusRow:
    where = src.where(row)
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise DataFormatError(
            f"{where}: missing field {text_field!r} (fields present: {sorted(record)}); pass --text-field if the text is elsewhere"
        )
    inputs = _inputs(record[text_field], text_field, where)
    pair = record.get(PAIR_FIELD)
    if pair is not None and "text" in inputs:
        if not isinstance(pair, str):
            raise DataFormatError(f"{where}: field {PAIR_FIELD!r} must be a string, got {type(pair).__name__}")
        inputs = pair_input(inputs["text"], pair)
    return CorpusRow(row, inputs, _ident(record, id_field, where))


def _read_jsonl(f, src, text_field, id_field):
    for lineno, line in _lines(f, src):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{src.where(lineno)}: not valid JSON ({e.msg}, column {e.colno})") from None
        yield _record_row(record, src, lineno, text_field, id_field)


def _read_text(f, src, text_field, id_field):
    if id_field is not None:
        raise ErError(f"{src.url}: --id-field does not apply to plain text files (one text per line, no fields)")
    for lineno, line in _lines(f, src):
        if line.strip():  # blank lines separate nothing and are not examples
            yield CorpusRow(lineno, {"text": line}, None)


def _read_csv(f, src, text_field, id_field):
    # Line ends kept: a quoted field may span lines.
    reader = csv.reader((line for _, line in _lines(f, src, keep_ends=True)), delimiter="\t" if src.fmt == "tsv" else ",")
    header = next(reader, None)
    if header is None:
        return
    for name in filter(None, (text_field, id_field)):
        if name not in header:
            raise DataFormatError(f"{src.where(1)}: no column {name!r} in the header {header}; pass --text-field/--id-field")
    for values in reader:
        if not values:
            continue
        where = src.where(reader.line_num)
        if len(values) != len(header):
            raise DataFormatError(f"{where}: {len(values)} columns, the header has {len(header)}")
        yield _record_row(dict(zip(header, values)), src, reader.line_num, text_field, id_field)


def _read_parquet(f, src, text_field, id_field):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    names = pf.schema_arrow.names
    for name in filter(None, (text_field, id_field)):
        if name not in names:
            raise DataFormatError(f"{src.url}: no column {name!r} (columns: {names}); pass --text-field/--id-field")
    cols = list(dict.fromkeys(filter(None, (text_field, id_field))))
    row = 0
    for batch in pf.iter_batches(batch_size=4096, columns=cols):
        for record in batch.to_pylist():
            row += 1
            yield _record_row(record, src, row, text_field, id_field)


def _read_task(src, text_field, id_field, limit, storage_options=None):
    from .tasks import example_input, load_task, task_inputs

    if id_field is not None:
        raise ErError(f"{src.url}: --id-field does not apply to task folders (their keys are content hashes, so training can join them)")
    task = load_task(src.url, text_field=text_field, limit=limit, storage_options=storage_options)
    for i, (_, ex) in enumerate(task_inputs(task)):
        yield CorpusRow(i, example_input(ex), None if ex.id is None else str(ex.id))


_READERS = {"jsonl": _read_jsonl, "text": _read_text, "csv": _read_csv, "tsv": _read_csv, "parquet": _read_parquet}


def read_source(
    src: CorpusSource,
    text_field: str = "text",
    id_field: str | None = None,
    storage_options: dict | None = None,
    limit: int | None = None,
) -> Iterator[CorpusRow]:
    """Stream one source's rows (`limit`: the first N rows; per split for a task folder)."""
    if src.fmt == "task":
        yield from _read_task(src, text_field, id_field, limit, storage_options)
        return
    fs, path = url_to_fs(src.url, storage_options)
    try:
        f = fs.open(path, "rb", compression=None if src.fmt == "parquet" else "infer")
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{src.url}: cannot open ({type(e).__name__}: {e})") from None
    with f:
        try:
            for n, r in enumerate(_READERS[src.fmt](f, src, text_field, id_field)):
                if limit is not None and n >= limit:
                    return
                yield r
        except (OSError, EOFError, pa.ArrowException) as e:  # truncated or corrupt compressed/Parquet file
            raise DataFormatError(f"{src.url}: unreadable ({type(e).__name__}: {e})") from None


class CorpusRecord(NamedTuple):
    id: str  # the id field's value, else "<file>:<line>" (or "<file> row N")
    inputs: dict


def read_corpus(paths, text_field="text", id_field=None, storage_options=None, skip_empty=True) -> Iterator[CorpusRecord]:
    """Every row of files, folders or globs with an id, in order (for prediction; empty texts skipped by default)."""
    for src in find_sources(paths, storage_options):
        for r in read_source(src, text_field, id_field, storage_options):
            if not (skip_empty and is_empty(r.inputs)):
                yield CorpusRecord(r.ident if r.ident is not None else src.where(r.row), r.inputs)


def scan(sources, text_field="text", id_field=None, storage_options=None, limit=None, enough: int | None = None) -> CorpusStats:
    """Read the sources in order, streaming, failing on bad input; stop once `enough` non-empty rows were seen
    (None: read every row). An all-empty corpus is always read whole."""
    stats = CorpusStats()
    for src in sources:
        for r in read_source(src, text_field, id_field, storage_options, limit):
            if enough is not None and stats.usable >= enough:  # one row more than enough: the corpus goes on
                stats.complete = False
                return stats
            stats.rows += 1
            stats.empty += is_empty(r.inputs)
    return stats


# ---------------------------------------------------------------- key claims


def _array(digests) -> np.ndarray:
    return np.array(digests, dtype="S16") if len(digests) else np.empty(0, dtype="S16")


class KeyClaims:
    """The keys cached or being ingested: each key is claimed by exactly one batch.

    Cached keys are asked of the cache's key index (`index`, read bucket by bucket for the keys asked
    about only) or given up front (`existing`). Memory stays near 16 bytes a key claimed in this run:
    claims go to a set, merged into a sorted digest array every `merge_every` claims. A claim names its batch (`token`); a retried batch (a worker died
    mid-batch) gets its first answer again, so its keys are neither lost nor claimed twice.
    """

    def __init__(self, existing: Iterable[str] | np.ndarray = (), merge_every: int = 200_000, index=None):
        self.index = index
        if index is not None:
            index.bloom = True  # claimed keys are mostly new: each segment's filter answers most of them
        arr = existing if isinstance(existing, np.ndarray) else key_digests(existing)
        self._sorted = np.unique(arr.astype("S16"))
        self._recent: set[bytes] = set()
        self._answers: dict[bytes, bytes] = {}
        self.merge_every = merge_every
        self.claimed = 0  # keys granted in this run
        self._empty: dict = {}  # empty rows per source, as the read stage counts them (a retried read counts once)

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def stats(self) -> dict:
        return {"known": len(self), "claimed": self.claimed}

    def count_empty(self, source, n: int) -> None:
        """The read stage's count of empty rows in `source` (idempotent: a retried read sets it again)."""
        self._empty[source] = n

    def empty_rows(self) -> int:
        return sum(self._empty.values())

    def _known(self, d: np.ndarray) -> np.ndarray:
        known = np.zeros(len(d), dtype=bool)
        if len(self._sorted) and len(d):
            idx = np.minimum(np.searchsorted(self._sorted, d), len(self._sorted) - 1)
            known = self._sorted[idx] == d
        if self.index is not None and len(d):
            known |= self.index.holds(d)
        return known

    def claim(self, keys: list[str], token: bytes | None = None) -> np.ndarray:
        """Bool mask: True where the caller must ingest the key (not cached, not claimed before)."""
        if token is not None and token in self._answers:
            return np.unpackbits(np.frombuffer(self._answers[token], np.uint8), count=len(keys)).astype(bool)
        digests = key_digests(keys)
        mask = ~self._known(digests)
        for i in np.flatnonzero(mask):
            d = digests[i]
            if d in self._recent:  # claimed earlier, or earlier in this very batch
                mask[i] = False
            else:
                self._recent.add(d)
        self.claimed += int(mask.sum())
        if token is not None:
            self._answers[token] = np.packbits(mask).tobytes()
        if len(self._recent) >= self.merge_every:
            self._sorted = np.union1d(self._sorted, _array(list(self._recent)))
            self._recent.clear()
        return mask


def batch_token(src: np.ndarray, row: np.ndarray) -> bytes:
    """A batch's identity from its rows' (source, row) numbers: equal on a retry, unique otherwise."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(src, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(row, dtype=np.int64).tobytes())
    return h.digest()
