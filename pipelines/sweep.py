"""`er sweep SWEEP.yaml`: many tasks x methods x hyper-parameters from one cache, as one Ray Tune experiment.

Phases: load_sweep (parse and validate, every problem reported at once), expand (the grid's trials),
then a `Tuner` over `run_trial`, a function trainable. A one-worker trial (the default) trains in its
own process (`er_core.finetune`, as `er train --workers 0` does) and reports each epoch to Tune; a
trial of several workers runs the usual Ray Train path (`train_on_ray`) and reports through
`TuneReportCallback` (Ray Train V2's Tune pattern). Tune brings what a sweep needs: sampled search
spaces (`search`, `num_samples`), an ASHA scheduler on the dev metric per epoch and per task
(`asha`), a concurrency limit, `--resume` of an interrupted sweep (its state lives in
`<output>/tune`), and a failed trial recorded while the others run.
`full` trials (the baseline: every layer, from raw text) run beside the cached methods.

Exit status: 0 if every trial succeeded or was stopped early by ASHA, 1 if any failed (the table
and results are still written), 2 if the sweep file is invalid (from `er`'s error handler).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import sys
import time
import traceback
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from er_core import ErError, TrainConfig
from er_core.train_config import METHODS  # full: the baseline, every layer from raw text (the cache names the model)
from er_core.outputs import OutputDir
from er_core.store import put_atomic, url_to_fs
from er_core.secrets import find_secrets
from pipelines.configs import Sweep, TaskEntry

LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout", "lora_modules", "lora_variant", "peft_config")  # varied for lora trials only
SAMPLERS = ("choice", "uniform", "loguniform")  # search: {field: {sampler: values}}
ASHA = {"grace_period": 1, "reduction_factor": 2}  # `asha: true`, or these keys to change
TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "method"}


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
        from er_core.store import read_bytes, url_to_fs

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
    for key in ("max_concurrent", "workers", "num_samples"):
        if key in kw and not (_is_int(kw[key]) and kw[key] >= 1):
            problems.append(f"{key} must be an integer >= 1, got {kw[key]!r}")
    kw["tasks"] = _check_tasks(kw.get("tasks"), base, check_paths, problems) if "tasks" in kw else []
    if "limit" in kw:
        _check_limit(kw["limit"], "limit", problems)
    if "methods" in kw:
        m = kw["methods"]
        if not isinstance(m, list) or not m or any(x not in METHODS for x in m):
            problems.append(f"methods must be a non-empty list of {METHODS}, got {m!r}")
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
    if "search" in kw:
        kw["search"] = _check_search(kw["search"], kw.get("grid", {}), problems)
    if _is_int(kw.get("num_samples", 1)) and kw.get("num_samples", 1) > 1 and not kw.get("search"):
        problems.append("num_samples > 1 needs a `search` to sample from (vary seeds with grid: {seed: [0, 1, 2]})")
    if "asha" in kw:
        kw["asha"] = _check_asha(kw["asha"], problems)
    methods = [m for m in kw.get("methods", ["reduced"]) if m in METHODS] if isinstance(kw.get("methods", []), list) else []
    _check_combinations(methods, kw.get("defaults", {}), {**kw.get("grid", {}), **_search_edges(kw.get("search", {}))},
                        problems)
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


def _check_search(search, grid: dict, problems: list[str]) -> dict:
    """{field: {sampler: values}}: a known float field for uniform/loguniform (lo < hi, lo > 0 for log); any for choice."""
    if not isinstance(search, dict):
        problems.append(f"search must be a mapping of TrainConfig fields to {{sampler: values}}, got {search!r}")
        return {}
    out = {}
    for key, spec in search.items():
        where = f"search.{key}"
        if key not in TRAIN_FIELDS or key == "method":
            problems.append(f"search: unknown training field {key!r}; known fields: {', '.join(TRAIN_FIELDS)}")
            continue
        if key in grid:
            problems.append(f"{where}: {key!r} is in the grid too; vary it in one place")
            continue
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS):
            problems.append(f"{where} must be one of {{choice: [...]}}, {{uniform: [lo, hi]}}, {{loguniform: [lo, hi]}}, got {spec!r}")
            continue
        (sampler, values), = spec.items()
        if sampler == "choice":
            checked = _check_train_fields({key: values}, "search", problems, lists=True)
            if key in checked:
                out[key] = {"choice": checked[key]}
            continue
        if "float" not in str(TRAIN_FIELDS[key].type):
            problems.append(f"{where}: {sampler} samples floats, and {key} is not a float field; use choice")
            continue
        bounds = [_coerce(TRAIN_FIELDS[key], v, where, problems) for v in values] if isinstance(values, list) else None
        if bounds is None or len(bounds) != 2:
            problems.append(f"{where}.{sampler} must be [low, high], got {values!r}")
        elif _BAD not in bounds and not (bounds[0] < bounds[1] and (sampler == "uniform" or bounds[0] > 0)):
            problems.append(f"{where}.{sampler} needs low < high{' and low > 0' if sampler == 'loguniform' else ''}, got {values!r}")
        elif _BAD not in bounds:
            out[key] = {sampler: bounds}
    return out


def _search_edges(search: dict) -> dict:
    """Values that bound each search space, so TrainConfig's checks can run on them like on a grid."""
    return {k: next(iter(spec.values())) for k, spec in search.items()}


def _check_asha(asha, problems: list[str]) -> dict | bool:
    if asha is False or asha is None:
        return False
    if asha is True:
        return dict(ASHA)
    if not isinstance(asha, dict) or set(asha) - set(ASHA):
        problems.append(f"asha must be true or a mapping with {', '.join(ASHA)}, got {asha!r}")
        return False
    out = {**ASHA, **asha}
    if not (_is_int(out["grace_period"]) and out["grace_period"] >= 1):
        problems.append(f"asha.grace_period must be an integer >= 1 (epochs), got {out['grace_period']!r}")
    if not (isinstance(out["reduction_factor"], (int, float)) and not isinstance(out["reduction_factor"], bool)
            and out["reduction_factor"] > 1):
        problems.append(f"asha.reduction_factor must be a number > 1, got {out['reduction_factor']!r}")
    return out


def _check_combinations(methods: list[str], defaults: dict, grid: dict, problems: list[str]) -> None:
    """TrainConfig's own checks (epochs >= 1, lr > 0, ...) on every method x grid point."""
    for method in methods:
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values))
            try:
                train_config(method, defaults, params)
            except ErError as e:
                where = ", ".join(f"{k}={v}" for k, v in params.items())
                problems.append(f"{method} trials{' with ' + where if where else ''}: {e}")


def train_config(method: str, defaults: dict, params: dict) -> TrainConfig:
    """A trial's TrainConfig: LoRA-only fields apply to lora trials only."""
    merged = {k: v for k, v in {**defaults, **params}.items() if method == "lora" or k not in LORA_ONLY}
    return TrainConfig(method=method, **merged)


# ---------------------------------------------------------------- trials


def expand(sweep: Sweep) -> list[Trial]:
    """Every task x method x grid point; LoRA-only fields vary for lora trials only (no duplicate reduced trials).
    Fields under `search` are sampled per trial by Tune, on top of these."""
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
                cfg = train_config(method, sweep.defaults, params)
                trials.append(Trial(name, task, method, params, cfg, join(sweep.output, name)))
    return trials


def _limit(sweep: Sweep, trial: Trial):
    return trial.task.limit if trial.task.limit is not None else sweep.limit


def run_trial(config: dict, sweep: Sweep, snapshot: dict | None = None) -> None:
    """Tune's function trainable: one trial, in this process or on Ray Train, its epochs reported to Tune as they end.

    A trial whose folder is already complete (it finished before the driver died) reports its
    metrics again instead of training; one left incomplete continues from its last epoch. `snapshot`: the version
    of the cache the driver opened (its state: ~200 bytes an index segment), so no trial opens the cache again."""
    from ray import tune

    from er_core.store import Manifest

    from er_core.outputs import read_status

    trial = {t.name: t for t in expand(sweep)}[config["trial"]]
    sampled = {k: v for k, v in config.get("search", {}).items() if trial.method == "lora" or k not in LORA_ONLY}
    cfg = train_config(trial.method, sweep.defaults, {**trial.params, **sampled})
    out_dir = trial.out_dir + (f"-{tune.get_context().get_trial_id()}" if sweep.search else "")
    status = read_status(out_dir, sweep.storage_options) or {}
    done = _read_metrics(out_dir, sweep.storage_options)
    if done is not None:  # the scheduler and the metric check need what an epoch reports
        from er_core.metrics import primary_metric
        from er_core.train import epoch_score

        best = done["history"][done["best_epoch"] - 1] if done.get("history") else {}
        score = epoch_score(best, primary_metric(done["kind"])) if best else float("nan")
        tune.report({"epoch": len(done.get("history", [])), "dev_score": score, "final": 1.0})
        return
    resume = status.get("status") in ("running", "failed") and "request" in status
    state = Manifest.from_dict(snapshot, sweep.cache) if snapshot else None
    try:
        if sweep.in_trial:
            _train_in_trial(sweep, trial, cfg, out_dir, resume, state)
        else:
            from ray.tune.integration.ray_train import TuneReportCallback

            from pipelines.train_ray import train_on_ray

            train_on_ray(sweep.cache, trial.task.path, out_dir, cfg, workers=sweep.workers,
                         cpus_per_worker=sweep.cpus_per_worker, gpus_per_worker=sweep.gpus_per_worker,
                         storage_options=sweep.storage_options, limit=_limit(sweep, trial), storage_path=sweep.storage_path,
                         name=f"er-sweep-{trial.name}", resume=resume, callbacks=[TuneReportCallback()], snapshot=state)
    except Exception:
        fs, path = url_to_fs(out_dir, sweep.storage_options)
        if fs.exists(path):
            put_atomic(fs, f"{path}/error.txt", traceback.format_exc().encode())
        raise


def _train_in_trial(sweep: Sweep, trial: Trial, cfg: TrainConfig, out_dir: str, resume: bool, snapshot=None) -> None:
    """A one-worker trial trains in its own Tune process (it holds the worker's CPUs and GPUs): a Ray Train run
    around one worker would start six more processes (controller, worker, data and sync actors) for nothing.
    It checkpoints under its output folder each epoch and reports the epoch to Tune; a killed trial fails."""
    import torch
    from ray import tune

    from er_core import finetune
    from pipelines.train_ray import epoch_scalars

    torch.set_num_threads(max(1, int(sweep.cpus_per_worker)))
    finetune(sweep.cache, trial.task.path, out_dir, cfg, storage_options=sweep.storage_options, limit=_limit(sweep, trial),
             log=lambda row: None, progress=False, resume=resume,
             on_epoch=lambda row, primary: tune.report(epoch_scalars(row, primary)),
             device="cuda" if sweep.gpus_per_worker > 0 else "cpu", snapshot=snapshot)


def _progress(total: int):
    """A Tune callback printing one line per trial start and end, in place of Tune's own tables."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.best = {}  # trial id -> best dev score so far

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"[{_done(trials)}/{total}] start {trial.config['trial']}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "dev_score" in result:
                self.best[trial.trial_id] = max(result["dev_score"], self.best.get(trial.trial_id, float("-inf")))

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            best = self.best.get(trial.trial_id)
            metric = f": best dev {best:.4f}, {r.get('epoch')} epoch(s) run" if best is not None else ""
            print(f"[{_done(trials)}/{total}] done {trial.config['trial']}{metric}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"[{_done(trials)}/{total}] FAILED {trial.config['trial']}", flush=True)

    return Progress()


def _done(trials) -> int:
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def run_trials(sweep: Sweep, trials: list[Trial], max_concurrent: int, resume: bool = False, address=None,
               snapshot: dict | None = None):
    """The Tune experiment under `<output>/tune`: started, or restored with --resume. Returns its ResultGrid."""
    from ray import tune

    from pipelines.ray_env import ensure_ray
    from pipelines.train_ray import ray_storage

    ensure_ray(address)
    # Tune's older reporter is silent at verbose=0 (the newer one prints its banner anyway); er prints its own lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C: a KeyboardInterrupt, as in every er command (the sweep is left resumable), not Tune's own handler,
    # which ends fit() as if the sweep were done and hides the trials not yet started.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    storage = ray_storage(sweep.output, sweep.storage_options)
    # A one-worker trial trains in its own process and holds the worker's resources; a bigger one runs Ray Train,
    # whose workers hold them.
    resources = {"CPU": sweep.cpus_per_worker, "GPU": sweep.gpus_per_worker} if sweep.in_trial else {"CPU": 0.01}
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, snapshot=snapshot), resources)
    if resume:
        experiment, fs = join(storage["storage_path"], "tune"), storage.get("storage_filesystem")
        if not tune.Tuner.can_restore(experiment, storage_filesystem=fs):
            raise ErError(f"cannot resume: {join(sweep.output, 'tune')} holds no Tune experiment state; "
                          f"run the sweep without --resume")
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False, storage_filesystem=fs)
        return tuner.fit()
    space = {"trial": tune.grid_search([t.name for t in trials])}
    if sweep.search:
        space["search"] = {k: getattr(tune, sampler)(*v) if sampler != "choice" else tune.choice(v)
                           for k, spec in sweep.search.items() for sampler, v in spec.items()}
    scheduler = None
    if sweep.asha:
        from pipelines.asha import PerTaskASHA

        # stop_last_trials=False: a trial at its last epoch has yet to save its model.
        scheduler = PerTaskASHA({t.name: t.task.name for t in trials}, time_attr="epoch", stop_last_trials=False,
                                max_t=max(t.cfg.epochs for t in trials), **sweep.asha)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric="dev_score", mode="max", scheduler=scheduler, num_samples=sweep.num_samples,
                                    max_concurrent_trials=max_concurrent,
                                    trial_name_creator=lambda t: t.config["trial"],
                                    trial_dirname_creator=lambda t: f"{t.config['trial']}-{t.trial_id}"),
        run_config=tune.RunConfig(name="tune", **storage, verbose=0, callbacks=[_progress(len(trials) * sweep.num_samples)],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    return tuner.fit()


# ---------------------------------------------------------------- results

COLUMNS = ["trial", "task", "kind", "method", "params", "status", "metric", "dev", "test_micro_f1", "test_macro_f1",
           "test_f1", "best_epoch", "epochs_run", "train_seconds", "train_examples_per_second", "out_dir", "error"]


def result_rows(sweep: Sweep, trials: list[Trial], grid) -> list[dict]:
    """One row per Tune trial, in the sweep's order: ok (metrics.json written), stopped (by ASHA), or failed."""
    from er_core.metrics import primary_metric

    by_name = {t.name: t for t in trials}
    rows = []
    for result in grid:
        trial = by_name[result.config["trial"]]
        sampled = {k: v for k, v in result.config.get("search", {}).items() if trial.method == "lora" or k not in LORA_ONLY}
        last = result.metrics or {}
        out_dir = trial.out_dir + (f"-{last.get('trial_id') or _trial_id(result)}" if sweep.search else "")
        row = dict.fromkeys(COLUMNS)
        row.update(trial=trial.name, task=trial.task.name, method=trial.method, params={**trial.params, **sampled},
                   out_dir=out_dir, epochs_run=last.get("epoch"))
        metrics = _read_metrics(out_dir, sweep.storage_options)
        if result.error is not None:
            msg = str(result.error).strip() or type(result.error).__name__
            row.update(status="failed", error=f"{type(result.error).__name__}: {msg}"[-2000:])
        elif metrics is None:
            row.update(status="stopped", dev=last.get("dev_score"))
        else:
            primary = primary_metric(metrics["kind"])
            test = metrics.get("test", {})
            row.update(status="ok", kind=metrics["kind"], metric=primary, dev=metrics.get("dev", {}).get(primary),
                       best_epoch=metrics["best_epoch"], epochs_run=len(metrics.get("history", [])) or row["epochs_run"],
                       train_seconds=metrics["train_seconds"], train_examples_per_second=metrics["train_examples_per_second"],
                       **{f"test_{k}": test.get(k) for k in ("micro_f1", "macro_f1", "f1")})
        rows.append(row)
    order = {t.name: i for i, t in enumerate(trials)}
    return sorted(rows, key=lambda r: order[r["trial"]])


def _trial_id(result) -> str:
    return Path(result.path).name.rsplit("-", 1)[-1]


def _read_metrics(out_dir: str, storage_options) -> dict | None:
    from er_core.outputs import read_status

    if (read_status(out_dir, storage_options) or {}).get("status") != "complete":
        return None
    fs, path = url_to_fs(out_dir, storage_options)
    return json.loads(fs.cat_file(f"{path}/metrics.json"))


def _remove_stopped(url: str, storage_options) -> None:
    """Remove a stopped trial's folder. Its processes may still be winding down (writing a checkpoint or its
    marker) as Tune returns, so remove until the folder stays gone."""
    fs, path = url_to_fs(url, storage_options)
    for _ in range(20):
        try:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        except OSError:  # a file vanished under the walk, or a new one appeared (ENOTEMPTY): the trial's last writes
            pass
        time.sleep(0.5)
        if not fs.exists(path):
            time.sleep(1.0)
            if not fs.exists(path):
                return
    print(f"warning: could not remove {url}, the folder of a stopped trial: something still writes there", file=sys.stderr)


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
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) and abs(v) < 1e-3 else \
        f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def format_table(rows: list[dict]) -> str:
    """Per task (in sweep order), one line per trial: method, params, dev/test primary metric, train time, examples/s."""
    head = ["task", "method", "params", "status", "metric", "dev", "test", "best_ep", "epochs", "train_s", "ex/s"]
    body = []
    for r in rows:
        test = r.get(f"test_{r['metric']}") if r["metric"] else None
        body.append([r["task"], r["method"], " ".join(f"{k}={_fmt(v, 3)}" for k, v in r["params"].items()) or "-", r["status"],
                     r["metric"] or "-", _fmt(r["dev"]), _fmt(test), _fmt(r["best_epoch"]), _fmt(r["epochs_run"]),
                     _fmt(r["train_seconds"], 1), _fmt(r["train_examples_per_second"], 1)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    failed = [f"  {r['trial']}: {r['error']}" for r in rows if r["status"] == "failed"]
    return "\n".join(lines + (["failed trials:"] + failed if failed else []))


def _check_reachable(sweep: Sweep, address) -> None:
    """Trials run on any node, and the driver reads what they write: refuse local paths some node cannot see."""
    from pipelines.placement import Cluster, check_shared
    from pipelines.ray_env import ensure_ray

    ensure_ray(address)
    cluster = Cluster.current(local=False)
    check_shared(sweep.cache, cluster, "cache")
    check_shared(sweep.output, cluster, "sweep output")
    for task in sweep.tasks:
        check_shared(task.path, cluster, "task folder")


def main(args) -> int:
    from er_core import open_cache

    sweep = load_sweep(args.sweep)
    max_concurrent = getattr(args, "max_concurrent", sweep.max_concurrent)  # the flag, else the file's
    if max_concurrent < 1:
        raise ErError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    # Opened once: every trial reads this version (fails once here, not once per trial).
    snapshot = open_cache(sweep.cache, storage_options=sweep.storage_options).manifest.to_dict()
    _check_reachable(sweep, args.address)  # before the output is claimed: a refused sweep leaves nothing behind
    trials = expand(sweep)
    request = {"sweep": json.loads(json.dumps(asdict(sweep), default=str))}
    out = OutputDir.claim(sweep.output, "sweep", overwrite=args.overwrite, resume=args.resume, request=request, flag="output:",
                          storage_options=sweep.storage_options)
    if args.resume and out.request.get("sweep") != request["sweep"]:
        raise ErError(f"cannot resume: {args.sweep} changed since the sweep in {sweep.output} started; "
                      f"restore the file, or start again with --overwrite")
    if not sweep.search:
        out.add(*(t.name for t in trials))
    out.add("results.csv", "results.json", "tune")
    print(f"== er sweep {args.sweep}: {len(trials) * sweep.num_samples} trials, at most {max_concurrent} at once, "
          f"cache {sweep.cache}{' (resumed)' if args.resume else ''}")
    try:
        grid = run_trials(sweep, trials, max_concurrent, resume=args.resume, address=args.address, snapshot=snapshot)
        rows = result_rows(sweep, trials, grid)
        for r in rows:  # an early-stopped trial leaves only its epoch checkpoints: no model, so nothing to keep
            if r["status"] == "stopped":
                _remove_stopped(r.pop("out_dir"), sweep.storage_options)
                r["out_dir"] = None
        if sweep.search:
            out.add(*(Path(r["out_dir"]).name for r in rows if r["out_dir"]))
        write_results(rows, sweep.output, sweep.storage_options)
    except BaseException as e:
        out.fail(f"{type(e).__name__}: {e}")
        raise
    out.finish()
    print(format_table(rows))
    print(f"wrote {join(sweep.output, 'results.csv')} and results.json")
    return 1 if any(r["status"] == "failed" for r in rows) else 0
