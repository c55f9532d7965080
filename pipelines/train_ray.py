"""Ray Train: one task from the cache on `num_workers` data-parallel TorchTrainer workers.

The driver opens the cache once and reads the task once. It locates the train keys through the key
index and builds a Ray Dataset that reads only those rows' bytes (`read_rows`, PLAN_ROWS rows a task,
each row checked against its entry's crc), materialized in the object store before training and split there into
one share per worker (no streaming split, and so no split coordinator, during training): each epoch is
shuffled from that copy, and nothing is read from storage again. Dev and test are read by the driver
(the same index path) and shipped to the workers with the task through the object store; rank 0
evaluates them and broadcasts the scores, so every worker takes the same early-stopping decision.
Workers need neither the task folder nor a cache handle: only the model, to rebuild the upper layers.

Each worker puts its model on `ray.train.torch.get_device()` (its GPU when the run asks for GPUs)
with `prepare_model` (DDP when there are several workers) and er_core moves every batch there.

Every epoch rank 0 reports a checkpoint (weights, optimizer, scheduler, RNG, early-stopping state) to
Ray Train's storage: `OUT/checkpoints` by default, or a shared `storage_path` (s3://...) on a
cluster. A failed worker restarts the run from the last one (`FailureConfig`), and `er train
--resume OUT` continues a run whose driver died (Ray Train V2 restores a run from the same
storage path and name). At the end rank 0 reports the artefact as the final checkpoint and the
driver moves it into OUT (outputs.OutputDir: staged, then marked complete).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from er_core import ErError, TrainConfig, open_cache
from er_core.store import CacheReader
from er_core.finetuning import CHECKPOINTS, Prepared, setup_data
from er_core.outputs import OutputDir
from er_core.secrets import reject_secrets
from er_core.store import is_local, read_bytes, url_to_fs
from er_core.task_data import collate, encode_split, grouped_order, missing_message, padded_states
from er_core.tasks import check_task_folder
from pipelines import cache_rows


PLAN_ROWS = 512  # rows a read task fetches: large enough to merge neighbours, small enough to read in parallel
POLL_S = "0.5"  # how often Train's controller polls its workers, unless RAY_TRAIN_HEALTH_CHECK_INTERVAL_S says


def _target_list(kind: str, target) -> list[int]:
    if kind == "classification":
        return [int(target)]
    if kind == "qa":
        return [int(target[0]), int(target[1])]
    return [int(t) for t in target]


def _from_target_list(kind: str, t: np.ndarray):
    return int(t[0]) if kind == "classification" else (int(t[0]), int(t[1])) if kind == "qa" else np.asarray(t)


def _train_batches(shard, spec, kind, batch_size, seed, epoch, pad_id):
    """Length-grouped, padded batches from this worker's share of the train rows (states, or ids for `full`)."""
    from er_core.store import get_codec

    codec = get_codec(spec.codec)
    for chunk in shard.iter_batches(batch_size=batch_size * 32, batch_format="numpy", local_shuffle_buffer_size=batch_size * 64,
                                    local_shuffle_seed=seed * 1000 + epoch):
        lengths = chunk["length"].astype(np.int64)
        for order in grouped_order(lengths, batch_size, shuffle=True, seed=seed, epoch=epoch):
            targets = [_from_target_list(kind, chunk["target"][i]) for i in order]
            if "input_ids" in chunk:
                types = [t if len(t) else None for t in (chunk["type_ids"][i] for i in order)]
                yield collate(kind, [chunk["input_ids"][i] for i in order], targets, None, pad_id, types)
                continue
            hidden = padded_states(codec, [(chunk["hidden"][i], chunk["scale"][i], int(lengths[i])) for i in order],
                                   spec.hidden_size)
            ids = [np.zeros(int(lengths[i]), np.int64) for i in order]  # only lengths matter for cache-fed batches
            yield collate(kind, ids, targets, hidden, pad_id)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from ray.train.collective import broadcast_from_rank_zero

    from er_core.evaluate import evaluate
    from er_core.finetuning import load_checked_encoder, run_metrics, save_artifact
    from er_core.metrics import primary_metric
    from er_core.train import build_model, fit, load_state, save_state, seed_everything

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    start = ray.train.get_checkpoint()
    if start is not None and _report_final_again(start, rank):
        return
    cfg = TrainConfig(**config["cfg"])
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    seed_everything(cfg.seed)
    p: Prepared = config["prepared"]
    p = ray.get(p) if isinstance(p, ray.ObjectRef) else p
    kind = p.task.kind
    encoder, _ = load_checked_encoder(p.spec, config["cache"])
    model = build_model(encoder, p.spec.layer, kind, len(p.task.labels) or 2, cfg)
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model, move_to_device=device, parallel_strategy="ddp" if world > 1 else None,
                                          parallel_strategy_kwargs={"find_unused_parameters": False} if world > 1 else None)
    core = model.module if hasattr(model, "module") else model
    per_worker = max(1, cfg.batch_size // world)  # the global batch stays cfg.batch_size
    shard = config["shares"][rank]
    steps = math.ceil(config["n_train"] / world / per_worker)
    dev = p.data.get("dev")
    resume = None
    if start is not None:
        with start.as_directory() as d:
            resume = load_state(d)

    def dev_metrics():  # rank 0 evaluates, every rank gets its scores (and so the same early-stopping decision)
        m = evaluate(core, dev, cfg.source, p.labels, pad_id=p.pad_id) if rank == 0 and dev is not None and dev.items else {}
        return broadcast_from_rank_zero(m) if world > 1 else m

    last = {}

    def on_epoch(row, state):
        scalars = epoch_scalars(row, primary_metric(kind))
        last.update(scalars)
        if rank != 0:
            ray.train.report(scalars)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state())
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(d))

    console = config.get("console") if rank == 0 else None  # the driver's progress display, when it has one
    if console is not None:
        shown = on_epoch

        def on_epoch(row, state):
            console.epoch(row)
            shown(row, state)

    res = fit(model, kind, cfg, lambda e: _train_batches(shard, p.spec, kind, per_worker, cfg.seed, e, p.pad_id), steps,
              dev_metrics, primary_metric(kind), resume=resume, on_epoch=on_epoch,
              on_step=console.step if console is not None else None)
    if rank == 0:
        metrics = run_metrics(p, cfg, res, core, workers=world)
        if config["in_process"]:  # Ray Train's local mode reports the folder itself: the driver moves it, then removes it
            d = tempfile.mkdtemp(prefix="er-final-")
            save_artifact(d, p, cfg, core, metrics)
            ray.train.report({**last, "final": 1.0}, checkpoint=ray.train.Checkpoint.from_directory(d))
            return
        with tempfile.TemporaryDirectory() as d:  # copied into Ray Train's storage by report
            save_artifact(d, p, cfg, core, metrics)
            # The last epoch's scalars again: a Tune trial's final result must still carry its metric.
            ray.train.report({**last, "final": 1.0}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"final": 1.0})


def epoch_scalars(row: dict, primary: str) -> dict:
    """An epoch's numbers as reported to Ray, with `dev_score`: what a Tune scheduler ranks trials by."""
    from er_core.train import epoch_score

    return {**{k: v for k, v in row.items() if isinstance(v, (int, float))}, "dev_score": epoch_score(row, primary)}


def _report_final_again(checkpoint, rank: int) -> bool:
    """A run restored after its final artefact was reported (the driver died while collecting it): report it again."""
    import ray.train

    with checkpoint.as_directory() as d:
        if not Path(d, "er_model.json").exists():
            return False
        if rank == 0:
            with tempfile.TemporaryDirectory() as copy:
                checkpoint.to_directory(copy)
                ray.train.report({"final": 1.0}, checkpoint=ray.train.Checkpoint.from_directory(copy))
        else:
            ray.train.report({"final": 1.0})
    return True


def train_dataset(reader: CacheReader, p: Prepared, cfg: TrainConfig, storage_options=None):
    """The task's train rows with targets: a Ray Dataset reading only those rows' bytes."""
    import ray.data

    kind = p.task.kind
    items = encode_split(p.task, "train", p.tokenizer, p.spec.tokenizer, p.labels)
    if cfg.method == "full":  # the baseline: token ids from the text, no cached states
        rows = [{"input_ids": it.input_ids.tolist(), "length": len(it.input_ids), "target": _target_list(kind, it.target),
                 "type_ids": [] if it.type_ids is None else it.type_ids.tolist()} for it in items]
        return ray.data.from_items(rows), len(rows)
    locs = reader.locate([it.key for it in items])
    at = {k: i for i, k in enumerate(locs.column("key").to_pylist())}
    missing = [it.example.id for it in items if it.key not in at]
    if missing:
        raise ErError(missing_message(len(missing), "train", missing, reader.url, p.spec))
    lengths = locs.column("length").to_numpy()
    for it in items:  # the key covers the tokenizer settings; the length is a cheap second proof of the join
        if lengths[at[it.key]] != len(it.input_ids):
            raise ErError(f"train example {it.example.id}: the cache holds {lengths[at[it.key]]} tokens for its key, "
                          f"the tokenizer gives {len(it.input_ids)}; the cache {reader.url} is inconsistent")
    # One plan entry per example (duplicate texts keep their own labels), in shard order so that neighbouring rows
    # are fetched together, cut into read tasks of PLAN_ROWS rows.
    plan_locs = locs.take(np.array([at[it.key] for it in items]))
    order = np.argsort(plan_locs.column("name").to_numpy(zero_copy_only=False), kind="stable")
    plan = [{"locs": cache_rows.plan_bytes(plan_locs.take(sel)),
             "targets": [_target_list(kind, items[i].target) for i in sel.tolist()]}
            for sel in np.array_split(order, max(1, -(-len(order) // PLAN_ROWS)))]
    ds = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        cache_rows.read_rows, batch_size=1, batch_format="numpy", num_cpus=0.5,
        fn_kwargs={"url": reader.url, "spec_json": json.dumps(p.spec.to_dict()),
                   "storage_options_json": json.dumps(storage_options or {}), "columns": ["key", "length", "hidden", "scale"]})
    return ds, len(items)


def _fit_keeping_sigint(trainer):
    """trainer.fit(), then the SIGINT handler as it was: Ray Train installs its own (abort the run) and leaves it,
    so a later Ctrl-C, or an ingest heartbeat's interrupt, in the same process would no longer raise KeyboardInterrupt."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def ray_storage(url: str, storage_options=None) -> dict:
    """RunConfig's storage arguments for a folder or URL: er's own filesystem for URLs (endpoint, timeouts),
    so Ray Train and Tune write where er reads."""
    if "://" not in url:
        return {"storage_path": url}
    import pyarrow.fs as pafs

    fs, path = url_to_fs(url, storage_options)
    return {"storage_path": path, "storage_filesystem": pafs.PyFileSystem(pafs.FSSpecHandler(fs))}


def train_on_ray(cache_url: str, task_dir: str, out_dir: str, cfg: TrainConfig, workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, storage_options=None, limit=None, address=None, storage_path=None,
                 name: str | None = None, ingest_missing: bool = False, overwrite: bool = False, resume: bool = False,
                 max_failures: int = 3, callbacks=None, progress: bool = False, snapshot=None) -> dict:
    """Run one training on Ray Train; the artefact and metrics.json end up in `out_dir`.
    `callbacks`: Ray Train callbacks, e.g. Tune's TuneReportCallback when a sweep trial runs it.
    `snapshot`: a version of the cache already opened (a sweep's); else the latest is opened here, once.
    `progress`: a bar per epoch and a line per epoch on stderr (train_progress)."""
    from pipelines.ray_env import absolute

    reject_secrets(storage_options)  # they travel in train_loop_config and actor arguments
    cache_url, task_dir = absolute(cache_url), absolute(str(task_dir))
    check_task_folder(task_dir, storage_options)  # before the output is claimed and Ray started
    request = {"cache": cache_url, "task": task_dir, "limit": limit, "workers": workers, "cpus_per_worker": cpus_per_worker,
               "gpus_per_worker": gpus_per_worker, "storage_path": storage_path, "name": name, "cfg": cfg.to_dict(),
               "max_failures": max_failures}
    out = OutputDir.claim(absolute(str(out_dir)), "train", overwrite=overwrite, resume=resume, request=request,
                          storage_options=storage_options)
    try:
        metrics = _fit_on_ray(out, cache_url, task_dir, cfg, workers, cpus_per_worker, gpus_per_worker, storage_options,
                              limit, address, storage_path, name, ingest_missing, max_failures, callbacks, progress,
                              snapshot)
    except BaseException as e:
        out.fail(f"{type(e).__name__}: {e}")
        raise
    return metrics


def _fit_on_ray(out: OutputDir, cache_url, task_dir, cfg, workers, cpus_per_worker, gpus_per_worker, storage_options, limit,
                address, storage_path, name, ingest_missing, max_failures, callbacks, progress=False, snapshot=None) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_env import ensure_ray

    if ingest_missing and cfg.method != "full":
        from er_core.finetuning import cache_task

        added = cache_task(cache_url, task_dir, storage_options, limit)
        if added:
            print(f"ingested {added} examples of {task_dir} missing from {cache_url}")
    ensure_ray(address)
    import ray

    from pipelines.placement import Cluster, check_shared

    # Ray Train's checkpoints: somewhere every worker's node can write and the driver can read.
    checkpoints = storage_path or (out.local_path(CHECKPOINTS) if is_local(out.fs) else out.child(CHECKPOINTS))
    cluster = Cluster.current(local=(address or os.environ.get("RAY_ADDRESS") or "local") == "local")
    check_shared(cache_url, cluster, "cache")
    check_shared(checkpoints, cluster, "checkpoint folder (under --out; or give --storage-path s3://...)")
    storage = ray_storage(checkpoints, storage_options)
    # Opened once for the whole run: workers get located rows, never the cache.
    reader = open_cache(cache_url, storage_options=storage_options, manifest=None if ingest_missing else snapshot)
    p = setup_data(cache_url, task_dir, cfg, storage_options, limit, splits=("dev", "test"), reader=reader, load_model=False)
    cfg = cfg.for_encoder(p.spec.hidden_size)
    ds, n_train = train_dataset(reader, p, cfg, storage_options)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    say(f"reading {n_train} train examples of {p.task.name} " + ("(text)" if cfg.method == "full" else f"from {cache_url}"))
    t0 = time.perf_counter()
    # Blocks in plan order, not in the order read tasks finish: the same seed on the same cache, the same model.
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()  # read once: every epoch of every worker is shuffled from this copy
    # Each worker's share of it, split once here: Ray Train's `datasets=` would start one more actor per run (a
    # split coordinator) to stream what already sits in the object store.
    shares = [ds] if workers <= 1 else ds.split(workers, equal=True)
    say(f"read in {time.perf_counter() - t0:.1f} s; training {cfg.method} on {workers or 1} worker(s), at most {cfg.epochs} epochs")
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    from contextlib import nullcontext

    from er_core.metrics import primary_metric
    from pipelines.train_progress import Console

    console = Console(cfg.epochs, primary_metric(p.task.kind)) if progress else None
    # Train's controller steps from one state to the next at most once per poll of its workers (2 s by default):
    # a run of a few epochs spent ~4 s of its start and end waiting on those polls. fit() hands it on to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_S)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "cache": cache_url, "n_train": n_train, "shares": shares, "in_process": workers == 0, "threads": max(1, int(cpus_per_worker)),
                           "prepared": ray.put(replace(p, tokenizer=None)),
                           "console": console.sender() if console else None},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # Checkpoints every node can reach: under OUT on one machine, a shared storage_path (s3://) on a cluster.
        # The same (storage_path, name) later resumes the run.
        run_config=RunConfig(name=name or "run", **storage, failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks),
    )
    with console or nullcontext():
        result = _fit_keeping_sigint(trainer)
    if result.checkpoint is None:
        raise ErError(f"training of {p.task.name} finished without a checkpoint: {result.error}")
    staged = out.stage()
    result.checkpoint.to_directory(staged)
    if workers == 0:
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    out.finish(staged)
    if storage_path is None:
        out.remove(CHECKPOINTS)  # the run is complete: its resume state is no longer needed
    return json.loads(read_bytes(out.fs, f"{out.path}/metrics.json"))
