"""Read task folders (classification JSONL, CoNLL NER, SQuAD QA) into plain `Example`s.

Pure python on purpose: ingestion and training both import this, and neither should pay
for torch just to read files. Nothing here knows a task by name; the format and the label
set come from the files alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import DataFormatError, ErError, LabelError

__all__ = [
    "Example",
    "TaskKind",
    "Task",
    "LabelMap",
    "read_jsonl_classification",
    "read_conll",
    "read_squad",
    "load_task",
    "task_inputs",
    "example_input",
    "ensure_dev",
]

TaskKind = Literal["classification", "ner", "qa"]

# Canonical split order; file stems on the right are accepted as aliases.
SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "test": "test"}

# File extension -> task kind. A table, so a new format is one row plus one reader.
_KIND_BY_EXT = {".jsonl": "classification", ".conll": "ner", ".json": "qa"}

_BIO_TAG = re.compile(r"^(O|[BI]-\S+)$")


@dataclass(frozen=True)
class Example:
    """One input (and its gold output) in whichever shape its task kind needs."""

    id: str  # "split:index" for JSONL/CoNLL, the qa id for SQuAD; stable across reads
    text: str | None = None  # classification: the text; QA: the question
    text_pair: str | None = None  # QA: the context; classification: the second text of a pair
    words: tuple[str, ...] | None = None  # NER: pre-split words
    label: str | None = None  # classification label
    tags: tuple[str, ...] | None = None  # NER: one BIO tag per word
    answers: tuple[tuple[str, int], ...] | None = None  # QA: (answer text, char start in context)
    truncation: str | None = None  # how a pair is cut; None: only_second for QA, longest_first for pairs to classify
    stride: int | None = None  # QA: read a long context in windows overlapping by this many tokens; None: cut it


@dataclass
class Task:
    """A task folder read into memory. `labels` always come from the full train split."""

    name: str  # folder basename
    kind: TaskKind
    splits: dict[str, list[Example]]  # "train", and "dev"/"test" when present
    labels: list[str] = field(default_factory=list)  # classification/ner output space; [] for qa


# ---------------------------------------------------------------- readers


def _split_of(path: Path) -> str:
    """Split name from a file name ('dev.jsonl', 'train-v1.1.json'); falls back to the stem."""
    head = re.split(r"[-_.]", path.name, maxsplit=1)[0].lower()
    return _SPLIT_ALIASES.get(head, path.stem)


def read_jsonl_classification(
    path, text_field: str = "text", label_field: str = "label", split: str | None = None, pair_field: str = "text_pair"
) -> list[Example]:
    """One JSON object a line; `pair_field`, when a row has it, holds a second text (a sentence pair, as in NLI).
    Blank lines are skipped; empty or whitespace-only text is an error (it would tokenize to nothing but special
    tokens and silently train on noise)."""
    path = Path(path)
    split = split or _split_of(path)
    out: list[Example] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for name in (text_field, label_field):
                if name not in row:
                    raise DataFormatError(
                        f"{where}: missing field {name!r} (fields present: {sorted(row)}); "
                        f"pass text_field=/label_field= if the file uses other names"
                    )
            text, label = row[text_field], row[label_field]
            if not isinstance(text, str):
                raise DataFormatError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
            if not text.strip():
                raise DataFormatError(f"{where}: field {text_field!r} is empty")
            # Integer class ids are common in other sets; keep labels as strings throughout.
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise DataFormatError(
                    f"{where}: field {label_field!r} must be a string or integer, got {label!r}"
                )
            pair = row.get(pair_field)
            if pair is not None and (not isinstance(pair, str) or not pair.strip()):
                raise DataFormatError(f"{where}: field {pair_field!r} must be a non-empty string, got {pair!r}")
            out.append(Example(id=f"{split}:{len(out)}", text=text, text_pair=pair, label=str(label)))
    return out


def read_conll(path, split: str | None = None) -> list[Example]:
    """Token per line, token first and BIO tag last; blank line ends a sentence;
    '-DOCSTART-' lines only separate documents."""
    path = Path(path)
    split = split or _split_of(path)
    out: list[Example] = []
    words: list[str] = []
    tags: list[str] = []

    def flush() -> None:
        if words:
            out.append(Example(id=f"{split}:{len(out)}", words=tuple(words), tags=tuple(tags)))
            words.clear()
            tags.clear()

    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                flush()
                continue
            if line.startswith("-DOCSTART-"):
                flush()
                continue
            # Tabs when present, so a token may contain spaces; otherwise any whitespace.
            cols = line.split("\t") if "\t" in line else line.split()
            if len(cols) < 2:
                raise DataFormatError(
                    f"{path}:{lineno}: expected at least 2 columns (token ... tag), got {len(cols)}: {line!r}"
                )
            token, tag = cols[0], cols[-1].strip()
            if not token.strip():
                raise DataFormatError(f"{path}:{lineno}: empty token: {line!r}")
            if not _BIO_TAG.match(tag):
                raise DataFormatError(f"{path}:{lineno}: tag {tag!r} is not BIO (expected O, B-X or I-X)")
            words.append(token)
            tags.append(tag)
    flush()
    return out


def _need(obj, key: str, typ, where: str):
    """Fetch `obj[key]` and check its type, naming the item on failure."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{where}: missing {key!r}")
    val = obj[key]
    if isinstance(val, bool) or not isinstance(val, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise DataFormatError(f"{where}.{key}: expected {name}, got {type(val).__name__}")
    return val


DOC_STRIDE = 128  # tokens two windows of a long QA context share, as transformers' run_qa example


def read_squad(path, stride: int | None = DOC_STRIDE) -> list[Example]:
    """SQuAD v1.1 JSON: data -> paragraphs -> (context, qas -> id, question, answers). Contexts longer than the
    max length are read in windows overlapping by `stride` tokens (None: cut at the max length)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    out: list[Example] = []
    seen: set[str] = set()
    for i, article in enumerate(_need(doc, "data", list, f"{path}")):
        for j, para in enumerate(_need(article, "paragraphs", list, f"{path}: data[{i}]")):
            pwhere = f"{path}: data[{i}].paragraphs[{j}]"
            context = _need(para, "context", str, pwhere)
            for k, qa in enumerate(_need(para, "qas", list, pwhere)):
                qwhere = f"{pwhere}.qas[{k}]"
                qid = str(_need(qa, "id", (str, int), qwhere))
                if qid in seen:  # predictions are keyed by id, so ids must be unique
                    raise DataFormatError(f"{qwhere}: duplicate id {qid!r}")
                seen.add(qid)
                question = _need(qa, "question", str, qwhere)
                if not question.strip():
                    raise DataFormatError(f"{qwhere}.question: empty")
                answers = []
                for m, ans in enumerate(_need(qa, "answers", list, qwhere)):
                    awhere = f"{qwhere}.answers[{m}]"
                    text = _need(ans, "text", str, awhere)
                    start = _need(ans, "answer_start", int, awhere)
                    if not 0 <= start <= len(context):
                        raise DataFormatError(
                            f"{awhere}.answer_start: {start} is outside the context (length {len(context)})"
                        )
                    answers.append((text, start))
                out.append(Example(id=qid, text=question, text_pair=context, answers=tuple(answers), stride=stride))
    return out


# ---------------------------------------------------------------- task folders


def is_task_folder(path) -> bool:
    """A local folder with a train file of a task format: the one rule `er ingest`, `er train` and benchmarks share."""
    p = Path(path)
    return p.is_dir() and any(f.is_file() and f.suffix.lower() in _KIND_BY_EXT and _split_of(f) == "train" for f in p.iterdir())


def task_folders(parent, kind: str | None = None) -> list[Path]:
    """The task folders directly under `parent`, sorted by name; only those of one kind if given."""
    found = sorted(p for p in Path(parent).iterdir() if is_task_folder(p))
    return [p for p in found if kind is None or _find_split_files(p)[0] == kind]


def _find_split_files(folder: Path) -> tuple[str, dict[str, Path]]:
    """Pick the kind from the file extensions and map each split to its file."""
    by_kind: dict[str, dict[str, Path]] = {}
    for p in sorted(folder.iterdir()):
        kind = _KIND_BY_EXT.get(p.suffix.lower())
        split = _split_of(p)
        if kind is None or not p.is_file() or split not in SPLITS:
            continue
        files = by_kind.setdefault(kind, {})
        if split in files:
            raise ErError(f"{folder}: both {files[split].name} and {p.name} look like the {split} split; keep one")
        files[split] = p
    with_train = {k: v for k, v in by_kind.items() if "train" in v}
    if len(with_train) != 1:
        found = sorted(p.name for p in folder.iterdir())
        what = "no train file" if not with_train else f"train files of several formats ({sorted(with_train)})"
        raise ErError(
            f"{folder}: {what}. Expected one of train.jsonl (classification), train.conll (NER) "
            f"or train.json (SQuAD QA), plus optional dev (or validation) and test files of the "
            f"same format; found {found}"
        )
    return next(iter(with_train.items()))


def _limit_for(limit, split: str) -> int | None:
    if limit is None or isinstance(limit, int):
        return limit
    return limit.get(split)


def _normalize_limit(limit):
    """Accept an int, None, or a dict keyed by split (aliases allowed); reject anything else early."""
    if limit is None or (isinstance(limit, int) and not isinstance(limit, bool)):
        if isinstance(limit, int) and limit < 0:
            raise ErError(f"limit must be >= 0, got {limit}")
        return limit
    if isinstance(limit, dict):
        out = {}
        for key, n in limit.items():
            if key not in _SPLIT_ALIASES:
                raise ErError(f"limit has unknown split {key!r}; use one of {sorted(_SPLIT_ALIASES)}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ErError(f"limit[{key!r}] must be an integer >= 0, got {n!r}")
            out[_SPLIT_ALIASES[key]] = n
        return out
    raise ErError(f"limit must be None, an int or a dict of split -> int, got {limit!r}")


def _labels_from_train(kind: str, train: list[Example]) -> list[str]:
    if kind == "classification":
        return sorted({ex.label for ex in train})
    if kind == "ner":
        # Both B- and I- for every entity type seen, so a dev-only I-X of a known type is not "unknown".
        types = {t[2:] for ex in train for t in ex.tags if t != "O"}
        return ["O"] + sorted(f"{p}-{t}" for t in types for p in "BI")
    return []


def check_task_folder(folder, storage_options=None) -> None:
    """Refuse a task folder that is not there (locally: or holds no split files), before a command does any work."""
    if "://" in str(folder) and not str(folder).startswith("file://"):
        from .store import url_to_fs

        fs, path = url_to_fs(str(folder), storage_options)
        if not fs.isdir(path):
            raise ErError(f"task folder {folder} does not exist or is not a folder")
        return
    local = Path(str(folder).removeprefix("file://"))
    if not local.is_dir():
        raise ErError(f"task folder {local} does not exist or is not a directory")
    _find_split_files(local)


def load_task(folder, text_field: str = "text", label_field: str = "label", limit=None, storage_options=None,
              doc_stride: int | None = DOC_STRIDE) -> Task:
    """Read a task folder (local, or a URL such as s3://bucket/tasks/name); the format is detected from the files.

    `limit` (int, or dict split -> int) keeps the first N examples of each split. Labels are read
    from the FULL train split before limiting, so a slice has the same label ids as the full task.
    Dev/test labels (and NER tags) not seen in training raise LabelError here, not mid-training.
    A remote folder is copied to a temporary local folder first (tasks are small), then removed.
    `doc_stride`: QA contexts longer than the max length are read in windows overlapping by this many tokens.
    """
    if "://" in str(folder) and not str(folder).startswith("file://"):
        import shutil
        import tempfile

        from .store import url_to_fs

        check_task_folder(folder, storage_options)
        fs, path = url_to_fs(str(folder), storage_options)
        tmp = tempfile.mkdtemp(prefix="er-task-")
        try:
            local = Path(tmp, path.rstrip("/").rsplit("/", 1)[-1])
            fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True)
            return load_task(local, text_field, label_field, limit, doc_stride=doc_stride)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    check_task_folder(folder)
    folder = Path(str(folder).removeprefix("file://"))
    limit = _normalize_limit(limit)
    kind, files = _find_split_files(folder)
    readers = {
        "classification": lambda p, s: read_jsonl_classification(p, text_field, label_field, split=s),
        "ner": lambda p, s: read_conll(p, split=s),
        "qa": lambda p, s: read_squad(p, doc_stride),
    }
    splits = {s: readers[kind](files[s], s) for s in SPLITS if s in files}
    labels = _labels_from_train(kind, splits["train"])
    if labels:
        _check_labels(LabelMap(labels), splits, files)
    splits = {s: exs[: _limit_for(limit, s)] for s, exs in splits.items()}
    return Task(name=folder.name, kind=kind, splits=splits, labels=labels)


def _check_labels(lmap: "LabelMap", splits: dict[str, list[Example]], files: dict[str, Path]) -> None:
    for split in SPLITS[1:]:
        for ex in splits.get(split, []):
            where = f"{split} (example {ex.id} of {files[split].name})"
            for lab in (ex.tags or ()) if ex.label is None else (ex.label,):
                lmap.encode(lab, where=where)


def task_inputs(task: Task) -> Iterator[tuple[str, Example]]:
    """Every example of every split, in split order, for ingestion."""
    for split in SPLITS:
        for ex in task.splits.get(split, []):
            yield split, ex


def example_input(ex: Example) -> dict:
    """What the tokenizer needs for `ex`, and nothing else: ingestion hashes this to a cache key."""
    if ex.words is not None:
        return {"words": list(ex.words)}
    if ex.text is None:
        raise ErError(f"example {ex.id} has neither text nor words")
    if ex.text_pair is not None:
        cut = ex.truncation or ("only_second" if ex.answers is not None else "longest_first")
        if cut == "longest_first":  # a sentence pair to classify (NLI)
            return pair_input(ex.text, ex.text_pair)
        if cut != "only_second":
            raise ErError(f"example {ex.id}: pair truncation {cut!r} is neither only_second (QA) nor longest_first")
        if ex.stride is not None:  # QA: the question whole in every window of the context
            return {"text": ex.text, "text_pair": ex.text_pair, "stride": int(ex.stride)}
        return {"text": ex.text, "text_pair": ex.text_pair}  # QA: the question kept whole, the context cut
    return {"text": ex.text}


def pair_input(text: str, text_pair: str) -> dict:
    """A sentence pair to classify: the longer text is cut first, as transformers' text-classification example does.
    The strategy is part of the input, so of its cache key."""
    return {"text": text, "text_pair": text_pair, "truncation": "longest_first"}


# ---------------------------------------------------------------- labels


class LabelMap:
    """Label <-> id. `unknown` is "error" (default) or a known label that unseen ones map to
    (e.g. "O" for NER tags, when an approximate score is preferred over a failure)."""

    def __init__(self, labels, unknown: str = "error"):
        self.labels = list(labels)
        if len(set(self.labels)) != len(self.labels):
            raise ErError(f"labels contain duplicates: {self.labels}")
        self._ids = {lab: i for i, lab in enumerate(self.labels)}
        if unknown != "error" and unknown not in self._ids:
            raise ErError(f"unknown={unknown!r} must be 'error' or one of the labels {self.labels}")
        self.unknown = unknown

    @classmethod
    def for_task(cls, task: Task, unknown: str = "error") -> "LabelMap":
        return cls(task.labels, unknown=unknown)

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, label: str, where: str | None = None) -> int:
        i = self._ids.get(label)
        if i is not None:
            return i
        if self.unknown != "error":
            return self._ids[self.unknown]
        place = f" in {where}" if where else ""
        raise LabelError(f"label {label!r}{place} was not seen in training; known labels: {self.labels}")

    def decode(self, i: int) -> str:
        if not 0 <= int(i) < len(self.labels):
            raise LabelError(f"label id {i} is out of range for {len(self.labels)} labels")
        return self.labels[int(i)]


def ensure_dev(task: Task, seed: int = 0, share: float = 0.1) -> tuple[Task, str]:
    """A task with a dev split for early stopping, and a note saying where it came from.

    A task without dev gets a seeded, held-out `share` of train (at least one example) as dev, and
    trains on the rest; the note says so, for the log and metrics.json.
    """
    if task.splits.get("dev"):
        return task, "dev split"
    train = task.splits["train"]
    n = max(1, round(len(train) * share)) if len(train) >= 2 else 0
    if n == 0:
        return task, "none: the task has no dev split and too little train to hold some out; no early stopping"
    import random

    held = set(random.Random(seed).sample(range(len(train)), n))
    splits = dict(task.splits, train=[e for i, e in enumerate(train) if i not in held],
                  dev=[e for i, e in enumerate(train) if i in held])
    note = f"held-out {n} of {len(train)} train examples ({share:.0%}, seed {seed}): the task has no dev split"
    return Task(task.name, task.kind, splits, task.labels), note
