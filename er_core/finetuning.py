"""Fine-tune one task from a cache in one process: the recipe `er train` runs locally and Ray workers reuse.

Phases, named like torchtune's recipes: setup_data (task joined to the cache), build the model,
fit (a checkpoint after every epoch), final evaluation (run_metrics), and saving the artefact with
the cache fingerprint it was trained on. The output folder is claimed first (outputs.OutputDir):
new or empty, or an earlier run replaced with `overwrite` or continued with `resume`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .artifacts import cache_meta, save_trained
from .store import Manifest, open_cache
from .devices import model_device
from .errors import CacheMismatchError
from .evaluate import evaluate
from .store import key_digests
from .keys import example_key
from .metrics import majority_baseline, nothing_learned, primary_metric
from .models import load_encoder
from .outputs import OutputDir
from .store import is_local
from .split import lower_fingerprint, split_encoder
from .task_data import SplitData, iter_batches, join_cache, label_map, require_complete
from .tasks import check_task_folder, ensure_dev, example_input, load_task
from .train import STATE_FILE, FitResult, TrainConfig, build_model, fit, load_state, save_state, seed_everything

log_ = logging.getLogger("er.train")
CHECKPOINTS = "checkpoints"


@dataclass
class Prepared:
    task: object
    labels: object
    spec: object
    encoder: object
    tokenizer: object
    data: dict[str, SplitData]
    pad_id: int
    dev_source: str = "dev split"


def prepare_task(task_dir: str, cfg: TrainConfig, limit=None, text_field="text", storage_options=None):
    """The task as training sees it: limited, and with a dev split (held out of train if the task has none)."""
    return ensure_dev(load_task(task_dir, limit=limit, text_field=text_field, storage_options=storage_options), cfg.seed)


def _model_changed(spec, where: str) -> CacheMismatchError:
    return CacheMismatchError(f"model {spec.model_name!r} as loaded here differs from the one cache {where} was built with")


def load_checked_encoder(spec, where: str):
    """The cache's model as loaded here, refused unless its lower layers are the ones the cache was built with."""
    encoder, tokenizer = load_encoder(spec.model_name, spec.model_revision)
    lower, _ = split_encoder(encoder, spec.layer)
    if lower_fingerprint(lower) != spec.lower_fingerprint:
        raise _model_changed(spec, where)
    return encoder, tokenizer


def checked_tokenizer(spec, where: str):
    """The cache's tokenizer, with the model checked against the cache by its spec rather than its weights: the
    remembered one (model_specs), or, if that differs, a freshly computed one. For a driver whose workers load,
    and check, the weights themselves."""
    from .keys import tokenizer_fingerprint
    from .models import load_tokenizer
    from .recycle import cache_spec

    def here(fresh: bool):
        return cache_spec(spec.model_name, spec.layer, spec.codec, spec.tokenizer.max_length, spec.model_revision, fresh=fresh)

    if here(False).lower_fingerprint != spec.lower_fingerprint and here(True).lower_fingerprint != spec.lower_fingerprint:
        raise _model_changed(spec, where)
    tokenizer = load_tokenizer(spec.model_name, spec.model_revision)
    if tokenizer_fingerprint(tokenizer) != spec.tokenizer.fingerprint:
        raise CacheMismatchError(f"the tokenizer of {spec.model_name!r} here differs from the one cache {where} was built with")
    return tokenizer


def setup_data(cache_url: str, task_dir: str, cfg: TrainConfig, storage_options=None, limit=None, text_field="text",
               splits=None, reader=None, load_model: bool = True) -> Prepared:
    """Open the cache (or use `reader`), check the model, join the task's splits (all, or `splits`), read once.
    `load_model=False`: the tokenizer only (Prepared.encoder is None), for a driver whose workers load the model."""
    reader = reader or open_cache(cache_url, storage_options=storage_options)
    spec = reader.spec
    if load_model:
        encoder, tokenizer = load_checked_encoder(spec, cache_url)
    else:
        encoder, tokenizer = None, checked_tokenizer(spec, cache_url)
    task, dev_source = prepare_task(task_dir, cfg, limit, text_field, storage_options)
    labels = label_map(task) if task.kind != "qa" else None
    source_reader = None if cfg.method == "full" else reader
    if source_reader is not None:  # one index lookup for every split's keys: nearby buckets merge into few requests
        reader.index.lookup(key_digests(example_key(example_input(e), spec.tokenizer) for exs in task.splits.values() for e in exs))
    data = {}
    for split in splits or task.splits:
        if split not in task.splits:
            continue
        d = join_cache(task, split, tokenizer, spec.tokenizer, labels, reader=source_reader)
        if source_reader is not None:
            require_complete(d, split, cache_url, spec)
        data[split] = d
    return Prepared(task, labels, spec, encoder, tokenizer, data, tokenizer.pad_token_id or 0, dev_source)


def cache_task(cache_url: str, task_dir: str, storage_options=None, limit=None) -> int:
    """Ingest the task's examples the cache lacks (the on-the-fly option of `er train --ingest-missing`)."""
    from .recycle import ensure_cached
    from .tasks import example_input

    task = load_task(task_dir, limit=limit, storage_options=storage_options)
    return ensure_cached(cache_url, [example_input(e) for exs in task.splits.values() for e in exs], storage_options)


def run_metrics(p: Prepared, cfg: TrainConfig, result: FitResult, model, workers: int = 1) -> dict:
    """metrics.json of a run, the same whichever path trained it: fit history, dev/test scores, baselines."""
    kind = p.task.kind
    metrics = {
        "task": p.task.name,
        "kind": kind,
        "method": cfg.method,
        "layer": p.spec.layer,
        "workers": workers,
        "device": str(model_device(model)),
        "dev_source": p.dev_source,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.train_seconds, 3),
        "first_step_at": result.first_step_at,
        "train_examples_per_second": round(result.examples_per_second * workers, 2),
        "history": result.history,
        "resumed": result.resumes,
    }
    train = p.task.splits["train"]
    for split in ("dev", "test"):
        if split in p.data and p.data[split].items:
            metrics[split] = evaluate(model, p.data[split], cfg.source, p.labels, pad_id=p.pad_id)
            if kind == "classification":
                metrics[f"{split}_majority_baseline"] = majority_baseline(
                    [ex.label for ex in train], [it.example.label for it in p.data[split].items])
    # e.g. a rate too high for a wide encoder: said, not shipped quietly (er train prints it; a Ray worker's log would hide it)
    warning = nothing_learned(kind, metrics.get("dev", {}), metrics.get("dev_majority_baseline"))
    if warning:
        metrics["warning"] = warning
    return metrics


def run_meta(p: Prepared, cfg: TrainConfig) -> dict:
    """er_model.json of a run: what a later `er predict` needs to rebuild and check it."""
    return {
        "method": cfg.method,
        "task": {"name": p.task.name, "kind": p.task.kind, "labels": p.task.labels},
        "model": {"name": p.spec.model_name, "model_type": p.spec.model_type, "revision": p.spec.model_revision},
        "cache": cache_meta(p.spec),
        "train_config": cfg.to_dict(),
    }


def save_artifact(folder, p: Prepared, cfg: TrainConfig, model, metrics: dict) -> None:
    save_trained(folder, model, run_meta(p, cfg))
    Path(folder, "metrics.json").write_text(json.dumps(metrics, indent=1))


def finetune(cache_url: str, task_dir: str, out_dir: str, cfg: TrainConfig, storage_options=None, limit=None, log=print,
             progress=True, ingest_missing=False, overwrite=False, resume=False, device: str = "cpu",
             on_epoch: Callable[[dict, str], None] | None = None, snapshot: Manifest | None = None) -> dict:
    """Train, evaluate on dev and test, save the artefact and `metrics.json` into `out_dir`; return the metrics.

    A checkpoint is written under `out_dir` after every epoch (on object storage too); `resume=True` continues
    an interrupted run from it. `on_epoch(row, primary)` follows each checkpoint with the epoch's row and the
    task's primary metric, e.g. to report the epoch to a scheduler. `snapshot`: a version of the cache already
    opened (a sweep's driver opens it once for every trial); else the latest is opened here.
    """
    check_task_folder(task_dir, storage_options)  # a mistyped --task leaves no output folder behind
    request = {"cache": str(cache_url), "task": str(task_dir), "limit": limit, "workers": 0, "cfg": cfg.to_dict()}
    out = OutputDir.claim(str(out_dir), "train", overwrite=overwrite, resume=resume, request=request,
                          storage_options=storage_options)
    try:
        return _finetune(cache_url, task_dir, out, cfg, storage_options, limit, log, progress, ingest_missing, device,
                         on_epoch, snapshot)
    except BaseException as e:
        out.fail(f"{type(e).__name__}: {e}")
        raise


def _finetune(cache_url, task_dir, out: OutputDir, cfg, storage_options, limit, log, progress, ingest_missing, device,
              on_epoch, snapshot=None) -> dict:
    if ingest_missing and cfg.method != "full":
        cache_task(cache_url, task_dir, storage_options, limit)
    seed_everything(cfg.seed)
    reader = open_cache(cache_url, storage_options=storage_options, manifest=snapshot) if snapshot else None
    p = setup_data(cache_url, task_dir, cfg, storage_options, limit, reader=reader)
    cfg = cfg.for_encoder(p.spec.hidden_size)
    if p.dev_source != "dev split":
        log_.warning("%s: dev for early stopping is %s", p.task.name, p.dev_source)
    kind = p.task.kind
    model = build_model(p.encoder, p.spec.layer, kind, len(p.task.labels) or 2, cfg).to(device)
    train, dev = p.data["train"], p.data.get("dev")
    src = cfg.source
    steps = -(-len(train.items) // cfg.batch_size)
    checkpoints = _Checkpoints(out)

    def batches(epoch):
        return (b for _, b in iter_batches(train, cfg.batch_size, src, p.pad_id, shuffle=True, seed=cfg.seed, epoch=epoch))

    def dev_metrics():
        return evaluate(model, dev, src, p.labels, pad_id=p.pad_id) if dev is not None and dev.items else {}

    def saved(row, state):
        checkpoints.save(state())
        if on_epoch is not None:
            on_epoch(row, primary_metric(kind))

    try:
        result = fit(model, kind, cfg, batches, steps, dev_metrics, primary_metric(kind), log=log, progress=progress,
                     resume=checkpoints.load(), on_epoch=saved)
        metrics = run_metrics(p, cfg, result, model)
        staged = out.stage()
        save_artifact(staged, p, cfg, model, metrics)
        out.finish(staged)
        checkpoints.remove()  # the run is complete: its resume state is no longer needed
    finally:
        checkpoints.close()
    return metrics


class _Checkpoints:
    """The training state under OUT/checkpoints: written on local disk, and copied (one PUT) for an output on
    object storage, so a run restarted on another machine resumes too."""

    def __init__(self, out: OutputDir):
        self.out = out
        self.local = out.local_path(CHECKPOINTS) if is_local(out.fs) else tempfile.mkdtemp(prefix="er-checkpoints-")
        self.remote = None if is_local(out.fs) else f"{out.path}/{CHECKPOINTS}/{STATE_FILE}"

    def load(self) -> dict | None:
        if self.remote is not None and self.out.fs.exists(self.remote):
            os.makedirs(self.local, exist_ok=True)
            self.out.fs.get_file(self.remote, os.path.join(self.local, STATE_FILE))
        return load_state(self.local)

    def save(self, state: dict) -> None:
        save_state(self.local, state)
        if self.remote is not None:
            self.out.add(CHECKPOINTS)
            self.out.fs.put_file(os.path.join(self.local, STATE_FILE), self.remote)  # an object appears whole, or not

    def remove(self) -> None:
        self.out.remove(CHECKPOINTS)

    def close(self) -> None:
        """Drop the local copy of a remote checkpoint, however the run ended (the remote one stays for a resume)."""
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)
