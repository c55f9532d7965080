"""`er sweep SWEEP.yaml`: many tasks x methods x hyper-parameters trained from one cache, concurrently on Ray.

Phases: load_sweep (parse and validate, every problem reported at once), expand (the trials),
run_trials (at most `max_concurrent` in flight), write_results and format_table.

Each trial is a Ray task that calls `train_on_ray`. It reserves no CPU itself: its TorchTrainer
workers reserve the trial's resources. It is pinned to this node, so its output folder and any
relative paths are the driver's. A trial that fails is recorded with its error (the traceback goes
to `<out_dir>/error.txt`) and the others go on.

Exit status: 0 if every trial succeeded, 1 if any failed (the table and results are still written),
2 if the sweep file is invalid (from `er`'s error handler).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
import traceback
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from er_core import ErError, TrainConfig
from er_core.outputs import OutputDir
from er_core.storage import is_local, put_atomic, url_to_fs
from er_core.secrets import find_secrets

METHODS = ("reduced", "lora")  # `full` trains from raw text, not the cache, so it has no place in a sweep
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout")  # varied for lora trials only
TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "method"}


@dataclass
class TaskEntry:
    path: str
    limit: int | dict | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class Sweep:
    cache: str = field(metadata={"help": "cache URL (local folder or s3://...) every task was ingested into"})
    output: str = field(metadata={"help": "folder (local or s3://) for the trials' models and results.csv/json"})
    tasks: list[TaskEntry] = field(metadata={"help": "task folders, or {path, limit} entries"})
    methods: list[str] = field(default_factory=lambda: ["reduced"], metadata={"help": f"subset of {METHODS}"})
    defaults: dict = field(default_factory=dict, metadata={"help": "TrainConfig fields shared by every trial"})
    grid: dict = field(default_factory=dict, metadata={"help": "TrainConfig field -> list of values (cartesian product)"})
    limit: int | dict | None = field(default=None, metadata={"help": "examples per split, int or {split: n}"})
    max_concurrent: int = field(default=2, metadata={"help": "trials in flight at once"})
    workers: int = field(default=1, metadata={"help": "Ray Train workers per trial"})
    resources: dict = field(default_factory=dict, metadata={"help": "{cpus_per_worker, gpus_per_worker}"})
    storage_path: str | None = field(default=None, metadata={"help": "Ray Train storage (shared, e.g. s3://, on clusters)"})
    storage_options: dict | None = field(default=None, metadata={"help": "fsspec options for an s3:// cache"})

    @property
    def cpus_per_worker(self) -> float:
        return float(self.resources.get("cpus_per_worker", 1.0))

    @property
    def gpus_per_worker(self) -> float:
        return float(self.resources.get("gpus_per_worker", 0.0))


@dataclass
class Trial:
    name: str
    task: TaskEntry
    method: str
    params: dict
    cfg: TrainConfig
    out_dir: str


# ---------------------------------------------------------------- load and validate


def load_sweep(path, check_paths: bool = True) -> Sweep:
    """Read a YAML or TOML sweep file (local or s3://); relative paths are taken from the file's folder."""
    if "://" in str(path):
        from er_core.storage import read_bytes, url_to_fs

        url = str(path)
        fs, p = url_to_fs(url)
        try:
            text = read_bytes(fs, p).decode()
        except FileNotFoundError:
            raise ErError(f"sweep file {url} not found") from None
        return parse_sweep(_parse_text(text, url), url.rsplit("/", 1)[0], check_paths=check_paths, source=url)
    path = Path(path)
    if not path.is_file():
        raise ErError(f"sweep file {path} not found")
    return parse_sweep(_parse_text(path.read_text(), str(path)), path.resolve().parent, check_paths=check_paths,
                       source=str(path))


def _parse_text(text: str, source: str):
    toml = source.endswith(".toml")
    if toml:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ErError(f"{source}: TOML sweep files need Python 3.11+ (tomllib); write it as YAML") from None
    try:
        if toml:
            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError: either way a syntax error
        raise ErError(f"sweep file {source} is not valid {'TOML' if toml else 'YAML'}: {e}") from None


def parse_sweep(raw, base: Path | str, check_paths: bool = True, source: str = "sweep") -> Sweep:
    """Validate a parsed sweep; every problem is collected and raised as one ErError."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ErError(f"{source}: expected a mapping of keys (cache, output, tasks, ...), got {type(raw).__name__}")
    known = {f.name: f for f in fields(Sweep)}
    for key in raw:
        if key not in known:
            problems.append(f"unknown key {key!r}; known keys: {', '.join(known)}")
    for key, f in known.items():
        if f.default is MISSING and f.default_factory is MISSING and key not in raw:
            problems.append(f"missing required key {key!r} ({f.metadata['help']})")
    kw = {k: v for k, v in raw.items() if k in known}

    for key in ("cache", "output", "storage_path"):
        if key in kw and not (isinstance(kw[key], str) and kw[key]):
            problems.append(f"{key} must be a non-empty string, got {kw[key]!r}")
    if isinstance(kw.get("cache"), str) and kw["cache"]:
        kw["cache"] = _resolve(kw["cache"], base)
    if isinstance(kw.get("output"), str) and kw["output"]:
        kw["output"] = _resolve(kw["output"], base)
    for key in ("max_concurrent", "workers"):
        if key in kw and not (_is_int(kw[key]) and kw[key] >= 1):
            problems.append(f"{key} must be an integer >= 1, got {kw[key]!r}")
    kw["tasks"] = _check_tasks(kw.get("tasks"), base, check_paths, problems) if "tasks" in kw else []
    if "limit" in kw:
        _check_limit(kw["limit"], "limit", problems)
    if "methods" in kw:
        m = kw["methods"]
        if not isinstance(m, list) or not m or any(x not in METHODS for x in m):
            hint = " ('full' trains from raw text: use `er train --workers 0`)" if isinstance(m, list) and "full" in m else ""
            problems.append(f"methods must be a non-empty list of {METHODS}, got {m!r}{hint}")
    _check_resources(kw.get("resources", {}), problems)
    if "storage_options" in kw and not isinstance(kw["storage_options"], (dict, type(None))):
        problems.append(f"storage_options must be a mapping, got {kw['storage_options']!r}")
    elif find_secrets(kw.get("storage_options")):
        problems.append(f"{', '.join(find_secrets(kw['storage_options']))} holds a credential; er never passes credentials "
                        f"to Ray (they would reach its logs): use the AWS environment, a profile or an instance role")
    if "defaults" in kw:
        kw["defaults"] = _check_train_fields(kw["defaults"], "defaults", problems, lists=False)
    if "grid" in kw:
        kw["grid"] = _check_train_fields(kw["grid"], "grid", problems, lists=True)
    methods = [m for m in kw.get("methods", ["reduced"]) if m in METHODS] if isinstance(kw.get("methods", []), list) else []
    _check_combinations(methods, kw.get("defaults", {}), kw.get("grid", {}), problems)
    if problems:
        raise _report(source, problems)
    return Sweep(**kw)


def _report(source: str, problems: list[str]) -> ErError:
    lines = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
    return ErError(f"{source} has {len(dict.fromkeys(problems))} problem(s):\n{lines}")


def _resolve(p: str, base: Path | str) -> str:
    """A path of the sweep file: URLs as given; relative ones from the file's folder (or URL)."""
    if "://" in p:
        return p
    if "://" in str(base):
        import posixpath

        scheme, rest = str(base).split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, p))}"
    return str((Path(base) / Path(p).expanduser()).resolve())


def join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_limit(limit, where: str, problems: list[str]) -> None:
    from er_core.tasks import _normalize_limit  # the rule load_task applies, so both agree

    try:
        _normalize_limit(limit)
    except ErError as e:
        problems.append(f"{where}: {e}")


def _check_tasks(tasks, base: Path, check_paths: bool, problems: list[str]) -> list[TaskEntry]:
    if not isinstance(tasks, list) or not tasks:
        problems.append(f"tasks must be a non-empty list of task folders or {{path, limit}} entries, got {tasks!r}")
        return []
    out = []
    for i, t in enumerate(tasks):
        where = f"tasks[{i}]"
        if isinstance(t, dict):
            extra = set(t) - {"path", "limit"}
            if extra:
                problems.append(f"{where}: unknown key(s) {sorted(extra)}; an entry has 'path' and optional 'limit'")
            if "limit" in t:
                _check_limit(t["limit"], f"{where}.limit", problems)
            path, limit = t.get("path"), t.get("limit")
        else:
            path, limit = t, None
        if not isinstance(path, str) or not path:
            problems.append(f"{where}: expected a task folder path, got {path!r}")
            continue
        entry = TaskEntry(_resolve(path, base), limit)
        if check_paths and "://" not in entry.path and not Path(entry.path).is_dir():
            problems.append(f"{where}: task folder {entry.path} not found")
        out.append(entry)
    names = [e.name for e in out]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"tasks: several folders are named {dup!r}; trial names and output folders would clash")
    return out


def _check_resources(res, problems: list[str]) -> None:
    if not isinstance(res, dict):
        problems.append(f"resources must be a mapping {{cpus_per_worker, gpus_per_worker}}, got {res!r}")
        return
    for key, v in res.items():
        if key not in ("cpus_per_worker", "gpus_per_worker"):
            problems.append(f"resources: unknown key {key!r}; known keys: cpus_per_worker, gpus_per_worker")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "cpus_per_worker" and v == 0):
            problems.append(f"resources.{key} must be a number {'> 0' if key == 'cpus_per_worker' else '>= 0'}, got {v!r}")


def _check_train_fields(d, where: str, problems: list[str], lists: bool) -> dict:
    """TrainConfig fields only, with values of the field's type; grid values are non-empty lists of them."""
    if not isinstance(d, dict):
        problems.append(f"{where} must be a mapping of TrainConfig fields, got {d!r}")
        return {}
    out = {}
    for key, value in d.items():
        if key == "method":
            problems.append(f"{where}.method: list methods under the top-level 'methods' key instead")
            continue
        if key not in TRAIN_FIELDS:
            problems.append(f"{where}: unknown training field {key!r}; known fields: {', '.join(TRAIN_FIELDS)}")
            continue
        if lists and (not isinstance(value, list) or not value):
            problems.append(f"{where}.{key} must be a non-empty list of values, got {value!r}")
            continue
        values = [_coerce(TRAIN_FIELDS[key], v, f"{where}.{key}", problems) for v in (value if lists else [value])]
        if all(v is not _BAD for v in values):  # bad values are reported; leaving them out keeps later checks quiet
            out[key] = values if lists else values[0]
    return out


_BAD = object()


def _coerce(f, v, where: str, problems: list[str]):
    """Check a value against the TrainConfig field's type; '5e-4' is accepted as a float (PyYAML reads it as a string)."""
    kind = str(f.type)
    if v is None and "None" in kind:  # e.g. lr: null, the method's default
        return None
    if "float" in kind:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        problems.append(f"{where} must be a number ({f.metadata['help']}), got {v!r}")
        return _BAD
    if "int" in kind and not _is_int(v):
        problems.append(f"{where} must be an integer ({f.metadata['help']}), got {v!r}")
        return _BAD
    return v


def _check_combinations(methods: list[str], defaults: dict, grid: dict, problems: list[str]) -> None:
    """TrainConfig's own checks (epochs >= 1, lr > 0, ...) on every method x grid point."""
    for method in methods:
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values))
            try:
                TrainConfig(method=method, **{**defaults, **params})
            except ErError as e:
                where = ", ".join(f"{k}={v}" for k, v in params.items())
                problems.append(f"{method} trials{' with ' + where if where else ''}: {e}")


# ---------------------------------------------------------------- trials


def expand(sweep: Sweep) -> list[Trial]:
    """Every task x method x grid point; LoRA-only fields vary for lora trials only (no duplicate reduced trials)."""
    keys = list(sweep.grid)
    trials = []
    for task in sweep.tasks:
        for method in sweep.methods:
            seen = set()
            for values in itertools.product(*(sweep.grid[k] for k in keys)):
                params = {k: v for k, v in zip(keys, values) if method == "lora" or k not in LORA_ONLY}
                if tuple(params.items()) in seen:
                    continue
                seen.add(tuple(params.items()))
                name = "-".join([task.name, method] + [f"{k}{v}" for k, v in params.items()])
                cfg = TrainConfig(method=method, **{**sweep.defaults, **params})
                trials.append(Trial(name, task, method, params, cfg, join(sweep.output, name)))
    return trials


def run_trial(sweep: Sweep, trial: Trial) -> dict:
    """One trial, start to end; never raises, so a failure comes back as a row like any other."""
    from pipelines.train_ray import train_on_ray

    start = time.time()
    try:
        metrics = train_on_ray(sweep.cache, trial.task.path, trial.out_dir, trial.cfg, workers=sweep.workers,
                               cpus_per_worker=sweep.cpus_per_worker, gpus_per_worker=sweep.gpus_per_worker,
                               storage_options=sweep.storage_options, limit=_limit(sweep, trial),
                               storage_path=sweep.storage_path, name=f"er-sweep-{trial.name}")
        return result_row(trial, start, time.time(), metrics=metrics)
    except Exception as e:  # any failure, Ray's included, belongs to this trial only
        fs, path = url_to_fs(trial.out_dir, sweep.storage_options)
        if is_local(fs):
            fs.makedirs(path, exist_ok=True)
        put_atomic(fs, f"{path}/error.txt", traceback.format_exc().encode())
        return result_row(trial, start, time.time(), error=e)


def _limit(sweep: Sweep, trial: Trial):
    return trial.task.limit if trial.task.limit is not None else sweep.limit


def run_trials(sweep: Sweep, trials: list[Trial], max_concurrent: int, address=None, log=print) -> list[dict]:
    """Keep at most max_concurrent trials in flight; rows come back in trial order, results written as they land."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipelines.ray_env import ensure_ray

    ensure_ray(address)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # max_retries=0: a trial that crashed its process is reported, not silently run again.
    remote = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_trial)
    queue, pending, rows = list(enumerate(trials)), {}, [None] * len(trials)
    try:
        while queue or pending:
            while queue and len(pending) < max_concurrent:
                i, t = queue.pop(0)
                pending[remote.remote(sweep, t)] = (i, t, time.time())
                log(f"[{i + 1}/{len(trials)}] start {t.name}")
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i, t, submitted = pending.pop(ref)
            try:
                rows[i] = ray.get(ref)
            except Exception as e:  # the trial's worker process died (killed, out of memory)
                rows[i] = result_row(t, submitted, time.time(), error=e)
            log(f"[{i + 1}/{len(trials)}] {_summary(rows[i])}")
            write_results([r for r in rows if r is not None], sweep.output, sweep.storage_options)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True, recursive=True)
        raise
    return rows


# ---------------------------------------------------------------- results

COLUMNS = ["trial", "task", "kind", "method", "params", "status", "metric", "dev", "test_micro_f1", "test_macro_f1",
           "test_f1", "best_epoch", "train_seconds", "train_examples_per_second", "start", "end", "out_dir", "error"]


def result_row(trial: Trial, start: float, end: float, metrics: dict | None = None, error: BaseException | None = None) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(trial=trial.name, task=trial.task.name, method=trial.method, params=dict(trial.params),
               start=round(start, 3), end=round(end, 3), out_dir=trial.out_dir)
    if error is not None:
        msg = str(error).strip() or type(error).__name__
        row.update(status="failed", error=f"{type(error).__name__}: {msg}"[:2000])
        return row
    from er_core.metrics import primary_metric

    primary = primary_metric(metrics["kind"])
    test = metrics.get("test", {})
    row.update(status="ok", kind=metrics["kind"], metric=primary, dev=metrics.get("dev", {}).get(primary),
               best_epoch=metrics["best_epoch"], train_seconds=metrics["train_seconds"],
               train_examples_per_second=metrics["train_examples_per_second"],
               **{f"test_{k}": test.get(k) for k in ("micro_f1", "macro_f1", "f1")})
    return row


def _summary(row: dict) -> str:
    took = f"{row['end'] - row['start']:.0f}s"
    if row["status"] != "ok":
        return f"FAILED {row['trial']} after {took}: {row['error'].splitlines()[0][:300]}"
    return f"done {row['trial']} in {took}: test {row['metric']}={_fmt(row['test_' + row['metric']])}"


def write_results(rows: list[dict], output: str, storage_options: dict | None = None) -> None:
    """results.json (params as a mapping) and results.csv (params as `k=v k=v`), one row per trial; each replaced whole."""
    fs, path = url_to_fs(output, storage_options)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow({**r, "params": " ".join(f"{k}={v}" for k, v in r["params"].items())})
    for name, text in (("results.json", json.dumps(rows, indent=1)), ("results.csv", buf.getvalue())):
        put_atomic(fs, f"{path}/{name}", text.encode())  # a rename on disk, one PUT on object storage


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict]) -> str:
    """Per task (in sweep order), one line per trial: method, params, dev/test primary metric, train time, examples/s."""
    head = ["task", "method", "params", "status", "metric", "dev", "test", "best_ep", "train_s", "ex/s", "wall_s"]
    body = []
    for r in rows:
        test = r.get(f"test_{r['metric']}") if r["metric"] else None
        body.append([r["task"], r["method"], " ".join(f"{k}={v}" for k, v in r["params"].items()) or "-", r["status"],
                     r["metric"] or "-", _fmt(r["dev"]), _fmt(test), _fmt(r["best_epoch"]), _fmt(r["train_seconds"], 1),
                     _fmt(r["train_examples_per_second"], 1), f"{r['end'] - r['start']:.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    failed = [f"  {r['trial']}: {r['error']}" for r in rows if r["status"] != "ok"]
    return "\n".join(lines + (["failed trials:"] + failed if failed else []))


def main(args) -> int:
    from er_core import open_cache

    sweep = load_sweep(args.sweep)
    max_concurrent = args.max_concurrent or sweep.max_concurrent
    if max_concurrent < 1:
        raise ErError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    open_cache(sweep.cache, storage_options=sweep.storage_options)  # fail once here, not once per trial
    trials = expand(sweep)
    out = OutputDir.claim(sweep.output, "sweep", overwrite=args.overwrite, flag="output:", storage_options=sweep.storage_options)
    out.add("results.csv", "results.json", *(t.name for t in trials))
    print(f"== er sweep {args.sweep}: {len(trials)} trials, at most {max_concurrent} at once, cache {sweep.cache}")
    try:
        rows = run_trials(sweep, trials, max_concurrent, address=args.address)
    except BaseException as e:
        out.fail(f"{type(e).__name__}: {e}")
        raise
    out.finish()
    print(format_table(rows))
    print(f"wrote {join(sweep.output, 'results.csv')} and results.json")
    return 1 if any(r["status"] != "ok" for r in rows) else 0
