"""The settings of `er` commands, each defined once as a typed dataclass field with its help text.

The CLI builds its flags from these fields (`add_flags`); the programs read their settings through
this module, never through the CLI. `er train --config run.yaml` takes the same field names, and the
flags given override the file.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from er_core.errors import ErError
from er_core.storage import StorageConfig
from er_core.train_config import TrainConfig


@dataclass
class TrainRun:
    """What `er train` runs on and where, besides the training settings (TrainConfig) and S3 (StorageConfig)."""

    cache: str | None = field(default=None, metadata={"help": "cache URL the task's examples were ingested into"})
    task: str | None = field(default=None, metadata={
        "help": "task folder (local or s3://): train/dev/test .jsonl (classification), .conll (NER) or SQuAD .json; "
                "without dev, a seeded 10% of train is held out for early stopping"})
    out: str | None = field(default=None, metadata={
        "help": "output folder, new or empty, local or s3://: trained weights, er_model.json, metrics.json"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N examples of each split (quick runs)"})
    workers: int = field(default=1, metadata={"help": "data-parallel Ray Train workers (0 = in this process, no Ray)"})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "CPUs each worker reserves"})
    gpus_per_worker: float = field(default=0.0, metadata={
        "help": "GPUs each worker reserves (1: its model and batches on that GPU, NCCL between workers)"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Ray Train keeps the run's checkpoints (default OUT/checkpoints, removed when the run completes); on a "
                "multi-node cluster a place every node reaches, e.g. s3://bucket/ckpt"})
    max_failures: int = field(default=3, metadata={
        "help": "worker failures Ray Train recovers from (from the last epoch checkpoint) before giving up"})
    ingest_missing: bool = field(default=False, metadata={
        "help": "ingest task examples the cache lacks (with the cache's model and k) instead of failing"})

    def __post_init__(self):
        if self.workers < 0 or self.max_failures < 0 or (self.limit is not None and self.limit < 1):
            raise ErError(f"workers ({self.workers}) and max_failures ({self.max_failures}) must be >= 0, limit >= 1")


TRAIN_CONFIGS = (TrainRun, TrainConfig, StorageConfig)  # the sections of `er train --config`, flat


def _kind(cls, f) -> type:
    """int, float, str or bool from a field's annotation (Optional unwrapped)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple = (), metavars: dict | None = None) -> None:
    """One flag per field (--field-name), with the field's type, choices and help; a flag not given leaves no
    attribute on the namespace (SUPPRESS), so a config file or the dataclass default applies."""
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, default = _kind(cls, f), _default(f)
        shown = "" if default is None or default is False or default is MISSING else f" (default {default})"
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": (f.metadata.get("help", "") + shown).replace("%", "%%")}
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kw)
        else:
            parser.add_argument(flag, type=str if kind is dict else _checked(cls, f.name, kind), choices=f.metadata.get("choices"),
                                metavar=(metavars or {}).get(f.name), **kw)


def _checked(cls, name: str, kind: type):
    """A flag's converter that also applies the dataclass's own checks, so a bad value is a usage error at parse time."""
    def convert(text: str):
        value = kind(text)
        try:
            cls(**{name: value})
        except ErError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its message: "invalid int value"
    return convert


def field_docs(cls, skip: tuple = (), width: int = 100) -> str:
    """`name (type, default X): help` for every field, wrapped: the documentation of a config file's keys."""
    import textwrap

    out = []
    for f in fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        head = f"{f.name} ({_kind(cls, f).__name__}" + ("" if default is None else f", default {default}") + "): "
        out.append(textwrap.fill(head + f.metadata.get("help", ""), width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(out)


def given(cls, args) -> dict:
    """The fields of `cls` set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def read_config_file(path: str) -> dict:
    """A flat YAML or JSON mapping of `er train` settings; an unknown key is an error naming the known ones."""
    p = Path(path)
    if not p.is_file():
        raise ErError(f"--config {path}: no such file")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ErError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for c in TRAIN_CONFIGS for f in fields(c)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ErError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


def train_settings(args) -> tuple[TrainRun, TrainConfig, StorageConfig]:
    """`er train`'s settings: the --config file if any, then the flags given over it, then the fields' defaults."""
    base = read_config_file(args.config) if getattr(args, "config", None) else {}
    out = []
    for cls in TRAIN_CONFIGS:
        values = {**{f.name: base[f.name] for f in fields(cls) if f.name in base}, **given(cls, args)}
        if cls is TrainConfig and isinstance(values.get("peft_config"), str):
            from er_core.train import read_peft_config

            values["peft_config"] = read_peft_config(values["peft_config"])
        try:
            out.append(cls(**values))
        except TypeError as e:
            raise ErError(f"er train settings: {e}") from None
    return tuple(out)


def resolved(settings) -> dict:
    """The settings as one flat mapping, as `--config` reads them (`er train --print-config`)."""
    return {k: v for s in settings for k, v in asdict(s).items()}


def storage_options(args) -> dict | None:
    """fsspec/s3fs options from a command's storage flags."""
    return StorageConfig(**given(StorageConfig, args)).options()
