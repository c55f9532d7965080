"""The settings of `er` commands, each defined once as a typed dataclass field with its help text.

The CLI builds its flags from these fields (`add_flags`); the programs read their settings through
this module, never through the CLI. `er train --config run.yaml` takes the same field names, and the
flags given override the file.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from er_core.store import CODECS, DEFAULT_CODEC
from er_core.errors import ErError
from er_core.models import DEFAULT_MODEL
from er_core.store import StorageConfig
from er_core.train_config import METHODS, TrainConfig

AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}  # ingest's --dtype on GPU -> torch dtype names


def _help(text: str, **kw) -> dict:
    return {"metadata": {"help": text, **kw}}


@dataclass
class IngestConfig:
    """Everything `er ingest` takes besides corpus and cache; each field is the CLI flag of the same name."""

    model: str | None = field(default=None, **_help(
        "HF model id or local folder (default: an existing cache's model, else the bundled MiniLM)"))
    model_revision: str | None = field(default=None, **_help(
        "Hub commit, branch or tag to load the model at; recorded in the cache and reused by every later command "
        "(default: the cache's, else the Hub's latest)"))
    layer: str | int | None = field(default=None, **_help(
        "cut layer k: an int 0..L or a fraction of depth (default: an existing cache's, else 0.5)"))
    codec: str | None = field(default=None, **_help(f"storage precision of the states (default: an existing cache's, else "
                                                    f"{DEFAULT_CODEC})", choices=tuple(sorted(CODECS))))
    text_field: str = field(default="text", **_help("field holding the text in JSONL/Parquet/CSV corpora"))
    id_field: str | None = field(default=None, **_help(
        "use this field as the example key instead of a content hash (trusted ids; the first row of an id wins)"))
    max_length: int | None = field(default=None, **_help(
        "truncate longer texts (counted in the cache); default: an existing cache's, else the model's max"))
    limit: int | None = field(default=None, **_help("only the first N rows of each source (of each split for a task folder)"))
    actors: int | None = field(default=None, **_help(
        "size of the lower-layer actor pool (default: one per GPU, else one single-threaded actor per CPU but one, left to "
        "read with; per core on a local Ray); more than the cluster holds is refused"))
    threads: int | None = field(default=None, **_help("torch threads per CPU actor (default: cores / actors)"))
    shard_rows: int = field(default=512, **_help(
        "rows per shard file, and per call of each stage (tokenize, embed, write); the embedding actor runs them in "
        "length-sorted passes of --batch-size texts and --max-tokens tokens"))
    batch_size: int | None = field(default=None, **_help(
        "texts per forward pass, length-sorted (default: 64 on CPU; on a GPU as many as --max-tokens holds)"))
    max_tokens: int | None = field(default=None, **_help(
        "tokens per forward pass, padding counted (default: 8192 on CPU; on a GPU from its free memory)"))
    dtype: str = field(default="fp32", **_help("mixed precision of the lower layers on GPU", choices=("fp32", *AUTOCAST)))
    commit_every: int = field(default=16, **_help("commit to the cache's log every N shards (and at the end)"))
    commit_seconds: float = field(default=60.0, **_help("... or when this many seconds passed since the last commit"))
    local: bool = field(default=False, **_help("plain single-process loop, no Ray"))
    address: str | None = None  # the command-level --address (a Ray cluster; default a local Ray)
    storage_options: dict | None = None  # from StorageConfig's flags
    progress: bool = True  # er's progress bar (library callers may turn it off)

    def __post_init__(self):
        for name in ("max_length", "actors", "threads", "shard_rows", "batch_size", "max_tokens", "commit_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ErError(f"{name} must be a positive integer, got {v!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise ErError(f"limit must be an integer >= 0, got {self.limit!r}")
        if self.dtype not in ("fp32", *AUTOCAST):
            raise ErError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.codec is not None and self.codec not in CODECS:
            raise ErError(f"codec must be one of {', '.join(sorted(CODECS))}, got {self.codec!r}")
        if not self.commit_seconds > 0:
            raise ErError(f"commit_seconds must be > 0, got {self.commit_seconds!r}")
        if self.model is not None and os.path.isdir(self.model):  # Ray workers run elsewhere; the cache records the model
            self.model = os.path.abspath(self.model)

    def against(self, spec) -> "IngestConfig":
        """The settings left unset taken from an existing cache's spec (None: a new cache), else the defaults: so
        `er ingest MORE --cache CACHE` adds to a cache without repeating how it was built."""
        from dataclasses import replace

        if spec is None:
            return replace(self, model=self.model or DEFAULT_MODEL, layer="0.5" if self.layer is None else self.layer,
                           codec=self.codec or DEFAULT_CODEC)
        # the cache's max length only with its model: a model given by name keeps its own default, as before
        max_length = self.max_length or (spec.tokenizer.max_length if self.model is None else None)
        return replace(self, model=self.model or spec.model_name, layer=spec.layer if self.layer is None else self.layer,
                       codec=self.codec or spec.codec, max_length=max_length)


INGEST_FLAGLESS = ("address", "storage_options", "progress")  # set by command-level flags, or by library callers


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


@dataclass
class TaskEntry:
    path: str
    limit: int | dict | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class Sweep:
    """The keys of a sweep file (`er sweep SWEEP.yaml`); pipelines/sweep.py checks them all at once (`parse_sweep`)."""

    cache: str = field(metadata={"help": "cache URL (local folder or s3://...) every task was ingested into"})
    output: str = field(metadata={"help": "folder (local or s3://) for the trials' models and results.csv/json"})
    tasks: list[TaskEntry] = field(metadata={"help": "task folders, or {path, limit} entries"})
    methods: list[str] = field(default_factory=lambda: ["reduced"], metadata={
        "help": f"the methods each task is trained with, a subset of {', '.join(METHODS)}"})
    defaults: dict = field(default_factory=dict, metadata={"help": "training settings (TrainConfig fields) shared by every trial"})
    grid: dict = field(default_factory=dict, metadata={"help": "training setting -> list of values (cartesian product)"})
    search: dict = field(default_factory=dict, metadata={
        "help": "training setting -> {choice: [...]} or {uniform: [lo, hi]} or {loguniform: [lo, hi]}, sampled per trial"})
    num_samples: int = field(default=1, metadata={"help": "trials sampled from `search` per grid point"})
    asha: dict | bool = field(default=False, metadata={
        "help": "true or {grace_period, reduction_factor}: stop trials early on the dev metric per epoch"})
    limit: int | dict | None = field(default=None, metadata={"help": "examples per split, int or {split: n}"})
    max_concurrent: int = field(default=2, metadata={"help": "trials in flight at once"})
    workers: int = field(default=1, metadata={"help": "workers per trial: 1 trains in the trial's own process, more run Ray Train (data parallel)"})
    resources: dict = field(default_factory=dict, metadata={"help": "{cpus_per_worker, gpus_per_worker} of each worker"})
    storage_path: str | None = field(default=None, metadata={"help": "Ray Train storage of trials of several workers (shared, e.g. s3://, on clusters)"})
    storage_options: dict | None = field(default=None, metadata={"help": "fsspec options for an s3:// cache"})

    @property
    def cpus_per_worker(self) -> float:
        return float(self.resources.get("cpus_per_worker", 1.0))

    @property
    def in_trial(self) -> bool:
        """One worker per trial: it trains in the trial's own process, with no Ray Train run around it."""
        return self.workers == 1

    @property
    def gpus_per_worker(self) -> float:
        return float(self.resources.get("gpus_per_worker", 0.0))


@dataclass
class ServeConfig:
    """`er serve`'s settings (flags, --config FILE) and the args of the Serve application (`serve deploy`)."""

    cache: str | None = field(default=None, metadata={"help": "cache URL the served models were trained from"})
    model_dir: list[str] = field(default_factory=list, metadata={"help": "trained model folders (er train), served together"})
    name: str = field(default="er", metadata={"help": "Serve application name"})
    route_prefix: str = field(default="/er", metadata={"help": "HTTP route prefix: POST PREFIX/predict, GET PREFIX/models"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP host to bind; beyond 127.0.0.1 only with a token"})
    port: int = field(default=8000, metadata={"help": "HTTP port"})
    token_env: str | None = field(default=None, metadata={
        "help": "environment variable holding a bearer token (16+ characters) every request must carry; never logged"})
    token_sha256: str | None = None  # the token's digest, for `serve deploy` configs that should not hold the token
    max_documents: int = field(default=64, metadata={"help": "documents one request may name"})
    min_replicas: int = field(default=1, metadata={"help": "Upper replicas at least (autoscaling on ongoing requests)"})
    max_replicas: int = field(default=1, metadata={"help": "Upper replicas at most"})
    target_ongoing_requests: int = field(default=8, metadata={"help": "ongoing requests per Upper replica autoscaling aims at (a request's documents go in calls of up to half a batch; each call counts)"})
    max_batch_size: int = field(default=32, metadata={"help": "documents per dynamic batch (@serve.batch)"})
    batch_wait_timeout_s: float = field(default=0.005, metadata={"help": "how long a batch waits to fill"})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "CPUs per Upper replica (the Lookup takes half that)"})
    gpus_per_replica: float | None = field(default=None, metadata={
        "help": "GPUs per Upper replica (default: 1 when the cluster has GPUs, else 0)"})
    lru_rows: int = field(default=1024, metadata={"help": "recent cached rows the Lookup keeps in memory, encoded as cached"})
    refresh_s: float = field(default=10.0, metadata={"help": "how often the Lookup looks for a newer cache version"})
    recycle: bool = field(default=True, metadata={
        "help": "read cached states; off: run every document through all layers (what serving costs without recycling)"})
    miss_log: str | None = field(default=None, metadata={
        "help": "folder for the miss log (JSONL files; default CACHE.misses beside the cache; '' turns it off)"})
    flush_rows: int = field(default=256, metadata={"help": "misses that make the miss log write a file"})
    flush_s: float = field(default=5.0, metadata={"help": "longest a miss waits before the miss log writes it"})
    storage_options: dict | None = None  # from StorageConfig's flags

    def __post_init__(self):
        if isinstance(self.model_dir, str):
            self.model_dir = [self.model_dir]
        ints = ("port", "max_documents", "min_replicas", "max_replicas", "target_ongoing_requests", "max_batch_size",
                "lru_rows", "flush_rows")
        if any(getattr(self, k) < (0 if k == "min_replicas" else 1) for k in ints) or self.max_replicas < self.min_replicas:
            raise ErError("er serve: " + ", ".join(f"{k} {getattr(self, k)}" for k in ints) + ": each must be >= 1 "
                          "(min_replicas >= 0) and max_replicas >= min_replicas")
        if not self.route_prefix.startswith("/"):
            raise ErError(f"route_prefix {self.route_prefix!r} must start with /")

    def require(self) -> "ServeConfig":
        if not self.cache or not self.model_dir:
            raise ErError("er serve needs --cache and at least one --model-dir (or both in --config)")
        return self

    def miss_log_url(self) -> str:
        return "" if self.miss_log == "" else (self.miss_log or self.cache.rstrip("/") + ".misses")

    @property
    def gpus(self) -> float:
        if self.gpus_per_replica is not None:
            return self.gpus_per_replica
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)


SERVE_FLAGLESS = ("cache", "model_dir", "token_sha256", "storage_options")


def serve_settings(args) -> ServeConfig:
    """`er serve`'s settings: the --config file if any, then the flags given over it, then the defaults."""
    base = read_config_file(args.config, (ServeConfig,)) if getattr(args, "config", None) else {}
    values = {**base, **given(ServeConfig, args), "storage_options": storage_options(args)}
    try:
        return ServeConfig(**values).require()
    except TypeError as e:
        raise ErError(f"er serve settings: {e}") from None


SWEEP_FLAGS = ("max_concurrent",)  # sweep keys that `er sweep` flags override


def _kind(cls, f) -> type:
    """int, float, str or bool from a field's annotation (Optional unwrapped)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def add_flags(parser: argparse.ArgumentParser, cls, skip: tuple = (), metavars: dict | None = None,
              default_from: str | None = None) -> None:
    """One flag per field (--field-name), with the field's type, choices and help; a flag not given leaves no
    attribute on the namespace (SUPPRESS), so a config file or the dataclass default applies. default_from: where
    the value comes from when the flag is not given (e.g. "the sweep file"), said in the help instead of a default."""
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, default = _kind(cls, f), _default(f)
        shown = "" if default is None or default is False or default is MISSING else f" (default {default})"
        shown = f" (default: {default_from}'s, else {default})" if default_from else shown
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": (f.metadata.get("help", "") + shown).replace("%", "%%")}
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kw)
        else:
            parser.add_argument(flag, type=str if kind is dict else _checked(cls, f.name, kind), choices=f.metadata.get("choices"),
                                metavar=(metavars or {}).get(f.name), **kw)


def _checked(cls, name: str, kind: type):
    """A flag's converter that also applies the dataclass's own checks, so a bad value is a usage error at parse time
    (when the class can be built from that field alone: a sweep file's keys are checked when the file is read)."""
    alone = all(f.default is not MISSING or f.default_factory is not MISSING for f in fields(cls) if f.name != name)

    def convert(text: str):
        value = kind(text)
        try:
            if alone:
                cls(**{name: value})
        except ErError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its message: "invalid int value"
    return convert


def _type_name(cls, f) -> str:
    """A field's type as a reader of a config file sees it: `int or dict` (Optional left out)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    return " or ".join(getattr(typing.get_origin(a), "__name__", None) or a.__name__ for a in args)


def field_docs(cls, skip: tuple = (), width: int = 100) -> str:
    """`name (type, default X): help` for every field, wrapped: the documentation of a config file's keys."""
    import textwrap

    out = []
    for f in fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        head = f"{f.name} ({_type_name(cls, f)}" + ("" if default is None or default is MISSING else f", default {default}") + "): "
        out.append(textwrap.fill(head + f.metadata.get("help", ""), width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(out)


def settings_tables() -> str:
    """README's tables of every setting, one per config (field, flag, type, default, help): the same definitions
    the flags, `er train --config` and `er sweep --help` come from (`python -m pipelines.configs README.md`)."""
    out = []
    for cls, flags, title in ((TrainRun, True, "`er train`: what it runs on (`TrainRun`)"),
                              (TrainConfig, True, "`er train`, and a sweep's `defaults`/`grid`/`search` keys (`TrainConfig`)"),
                              (IngestConfig, True, "`er ingest` (`IngestConfig`)"),
                              (StorageConfig, True, "S3, on every command that reads or writes a cache (`StorageConfig`)"),
                              (Sweep, SWEEP_FLAGS, "`er sweep`: the keys of a sweep file (`Sweep`)"),
                              (ServeConfig, True, "`er serve`, and the args of its `serve deploy` config (`ServeConfig`)")):
        out += [f"**{title}**", "", "| setting | flag | type | default | what it does |", "|---|---|---|---|---|"]
        for f in fields(cls):
            if "help" not in f.metadata:
                continue  # set by command-level flags or by library callers
            default = _default(f)
            shown = "" if default is None or default is MISSING else f"`{default}`"
            text = f.metadata["help"].replace("|", "\\|")
            flag = f"`--{f.name.replace('_', '-')}`" if flags is True or f.name in flags else ""
            out.append(f"| `{f.name}` | {flag} | {_type_name(cls, f)} | {shown} | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


README_MARKERS = ("<!-- begin settings: generated from pipelines/configs.py by `python -m pipelines.configs README.md` -->",
                  "<!-- end settings -->")


def write_readme(path: str) -> None:
    """Replace README's settings block with `settings_tables()`."""
    p = Path(path)
    text = p.read_text()
    begin, end = README_MARKERS
    head, rest = text.split(begin, 1)
    p.write_text(head + begin + "\n" + settings_tables() + end + rest.split(end, 1)[1])


def given(cls, args) -> dict:
    """The fields of `cls` set on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def read_config_file(path: str, classes: tuple | None = None) -> dict:
    """A flat YAML or JSON mapping of a command's settings (`er train`'s by default); an unknown key is an error naming
    the known ones."""
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
    known = {f.name for c in (classes or TRAIN_CONFIGS) for f in fields(c)}
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


if __name__ == "__main__":
    import sys

    write_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
