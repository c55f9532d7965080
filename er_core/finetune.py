"""Fine-tune one task from a cache in one process: the recipe `er train` runs locally and Ray workers reuse.

Phases, named like torchtune's recipes: _setup_data (task joined to the cache), _setup_model,
then fit, final evaluation, and saving the artefact with the cache fingerprint it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .artifacts import cache_meta, save_trained
from .cache import open_cache
from .errors import CacheMismatchError
from .evaluate import evaluate
from .metrics import majority_baseline, primary_metric
from .models import load_encoder
from .split import lower_fingerprint, split_encoder
from .task_data import SplitData, iter_batches, join_cache, label_map, require_complete
from .tasks import load_task
from .train import FitResult, TrainConfig, build_model, fit, seed_everything


@dataclass
class Prepared:
    task: object
    labels: object
    spec: object
    encoder: object
    tokenizer: object
    data: dict[str, SplitData]
    pad_id: int


def setup_data(cache_url: str, task_dir: str, cfg: TrainConfig, storage_options=None, limit=None, text_field="text",
               splits=None) -> Prepared:
    """Open the cache, check the named model is the one it was built with, join the task's splits (all, or `splits`)."""
    reader = open_cache(cache_url, storage_options=storage_options)
    spec = reader.spec
    encoder, tokenizer = load_encoder(spec.model_name)
    lower, _ = split_encoder(encoder, spec.layer)
    if lower_fingerprint(lower) != spec.lower_fingerprint:
        raise CacheMismatchError(f"model {spec.model_name!r} as loaded here differs from the one cache {cache_url} was built with")
    task = load_task(task_dir, limit=limit, text_field=text_field)
    labels = label_map(task) if task.kind != "qa" else None
    source_reader = None if cfg.method == "full" else reader
    data = {}
    for split in splits or task.splits:
        if split not in task.splits:
            continue
        d = join_cache(task, split, tokenizer, spec.tokenizer, labels, reader=source_reader)
        if source_reader is not None:
            require_complete(d, split, cache_url)
        data[split] = d
    return Prepared(task, labels, spec, encoder, tokenizer, data, tokenizer.pad_token_id or 0)


def cache_task(cache_url: str, task_dir: str, storage_options=None, limit=None) -> int:
    """Ingest the task's examples the cache lacks (the on-the-fly option of `er train --ingest-missing`)."""
    from .recycle import ensure_cached
    from .tasks import example_input

    task = load_task(task_dir, limit=limit)
    return ensure_cached(cache_url, [example_input(e) for exs in task.splits.values() for e in exs], storage_options)


def finetune(cache_url: str, task_dir: str, out_dir: str, cfg: TrainConfig, storage_options=None, limit=None, log=print,
             progress=True, ingest_missing=False) -> dict:
    """Train, evaluate on dev and test, save the artefact and `metrics.json`; return the metrics."""
    if ingest_missing and cfg.method != "full":
        cache_task(cache_url, task_dir, storage_options, limit)
    seed_everything(cfg.seed)
    p = setup_data(cache_url, task_dir, cfg, storage_options, limit)
    kind = p.task.kind
    model = build_model(p.encoder, p.spec.layer, kind, len(p.task.labels) or 2, cfg)
    train, dev = p.data["train"], p.data.get("dev")
    src = cfg.source
    steps = -(-len(train.items) // cfg.batch_size)

    def batches(epoch):
        return (b for _, b in iter_batches(train, cfg.batch_size, src, p.pad_id, shuffle=True, seed=cfg.seed, epoch=epoch))

    def dev_metrics():
        return evaluate(model, dev, src, p.labels, pad_id=p.pad_id) if dev is not None and dev.items else {}

    result: FitResult = fit(model, kind, cfg, batches, steps, dev_metrics, primary_metric(kind), log=log, progress=progress)
    metrics = {
        "task": p.task.name,
        "kind": kind,
        "method": cfg.method,
        "layer": p.spec.layer,
        "best_epoch": result.best_epoch,
        "train_seconds": round(result.train_seconds, 3),
        "train_examples_per_second": round(result.examples_per_second, 2),
        "history": result.history,
    }
    for split in ("dev", "test"):
        if split in p.data and p.data[split].items:
            metrics[split] = evaluate(model, p.data[split], src, p.labels, pad_id=p.pad_id)
            if kind == "classification":
                metrics[f"{split}_majority_baseline"] = majority_baseline(
                    [it.example.label for it in train.items], [it.example.label for it in p.data[split].items]
                )
    meta = {
        "method": cfg.method,
        "task": {"name": p.task.name, "kind": kind, "labels": p.task.labels},
        "model": {"name": p.spec.model_name, "model_type": p.spec.model_type},
        "cache": cache_meta(p.spec),
        "train_config": cfg.to_dict(),
    }
    save_trained(out_dir, model, meta)
    Path(out_dir, "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
