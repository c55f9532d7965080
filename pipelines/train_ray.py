"""Ray Train: one task from the cache on `num_workers` data-parallel TorchTrainer workers.

The driver joins the task's train labels to the cache by key and builds a Ray Dataset that reads
(and checksums) the cache shards, keeping the task's rows; every worker reads its share with
`get_dataset_shard("train")`, groups rows by length into padded batches, and runs er_core's loop
under DDP (gloo on CPU, NCCL on GPU). Dev/test are evaluated on every worker (same weights, same
early-stopping decision).

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
import tempfile
from pathlib import Path

import numpy as np

from er_core import ErError, TrainConfig, open_cache
from er_core.cache import CacheReader
from er_core.finetune import CHECKPOINTS, prepare_task
from er_core.manifest import Manifest
from er_core.outputs import OutputDir
from er_core.secrets import reject_secrets
from er_core.task_data import collate, encode_split, grouped_order, label_map, missing_message


def _target_list(kind: str, target) -> list[int]:
    if kind == "classification":
        return [int(target)]
    if kind == "qa":
        return [int(target[0]), int(target[1])]
    return [int(t) for t in target]


def _from_target_list(kind: str, t: np.ndarray):
    return int(t[0]) if kind == "classification" else (int(t[0]), int(t[1])) if kind == "qa" else np.asarray(t)


class ReadShard:
    """Ray Data UDF: read one cache shard (checksum verified) and keep the rows of one task split."""

    def __init__(self, url: str, manifest_json: bytes, targets: dict, kind: str, storage_options=None):
        self.reader = CacheReader(url, Manifest.from_json(manifest_json, url), storage_options)
        self.shards = {s.path: s for s in self.reader.manifest.shards}
        self.targets, self.kind = targets, kind

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.compute as pc

        tables = []
        for path in batch["path"]:
            t = self.reader.read_shard(self.shards[path], ["key", "length", "hidden", "scale"])
            t = t.filter(pc.is_in(t.column("key"), pa.array(list(self.targets), pa.string())))
            tables.append(t)
        t = pa.concat_tables(tables)
        keys = t.column("key").to_pylist()
        return t.append_column("target", pa.array([self.targets[k] for k in keys], pa.list_(pa.int64())))


def _train_batches(shard, spec, kind, batch_size, seed, epoch, pad_id):
    """Length-grouped, padded batches from this worker's share of the train rows (states, or ids for `full`)."""
    from er_core.codecs import get_codec

    codec = get_codec(spec.codec)
    for chunk in shard.iter_batches(batch_size=batch_size * 32, batch_format="numpy", local_shuffle_buffer_size=batch_size * 64,
                                    local_shuffle_seed=seed * 1000 + epoch):
        lengths = chunk["length"].astype(np.int64)
        for order in grouped_order(lengths, batch_size, shuffle=True, seed=seed, epoch=epoch):
            targets = [_from_target_list(kind, chunk["target"][i]) for i in order]
            if "input_ids" in chunk:
                yield collate(kind, [chunk["input_ids"][i] for i in order], targets, None, pad_id)
                continue
            hidden = [codec.decode(chunk["hidden"][i], chunk["scale"][i], (int(lengths[i]), spec.hidden_size)) for i in order]
            ids = [np.zeros(int(lengths[i]), np.int64) for i in order]  # only lengths matter for cache-fed batches
            yield collate(kind, ids, targets, hidden, pad_id)


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from er_core.finetune import run_metrics, save_artifact, setup_data
    from er_core.evaluate import evaluate
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
    p = setup_data(config["cache"], config["task"], cfg, config["storage_options"], config["limit"], splits=("dev", "test"))
    kind = p.task.kind
    model = build_model(p.encoder, p.spec.layer, kind, len(p.task.labels) or 2, cfg)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) if world > 1 else model
    core = model.module if hasattr(model, "module") else model
    per_worker = max(1, cfg.batch_size // world)  # the global batch stays cfg.batch_size
    shard = ray.train.get_dataset_shard("train")
    steps = math.ceil(config["n_train"] / world / per_worker)
    dev = p.data.get("dev")
    resume = None
    if start is not None:
        with start.as_directory() as d:
            resume = load_state(d)

    def dev_metrics():
        return evaluate(core, dev, cfg.source, p.labels, pad_id=p.pad_id) if dev is not None and dev.items else {}

    def on_epoch(row, state):
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if rank != 0:
            ray.train.report(scalars)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(d, state())
            ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(d))

    res = fit(model, kind, cfg, lambda e: _train_batches(shard, p.spec, kind, per_worker, cfg.seed, e, p.pad_id), steps,
              dev_metrics, primary_metric(kind), resume=resume, on_epoch=on_epoch)
    metrics = run_metrics(p, cfg, res, core, workers=world)
    if rank == 0:
        with tempfile.TemporaryDirectory() as d:
            save_artifact(d, p, cfg, core, metrics)
            ray.train.report({"final": 1.0}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report({"final": 1.0})


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


def train_dataset(cache_url: str, task_dir: str, cfg: TrainConfig, storage_options=None, limit=None):
    """The task's train rows read from the cache shards, with targets; reports examples the cache lacks."""
    import ray.data

    reader = open_cache(cache_url, storage_options=storage_options)
    spec = reader.spec
    tokenizer = _tokenizer(spec.model_name)
    task, _ = prepare_task(task_dir, cfg, limit)  # the same train split (dev held out if need be) as the workers
    items = encode_split(task, "train", tokenizer, spec.tokenizer, label_map(task) if task.kind != "qa" else None)
    if cfg.method == "full":  # the baseline: token ids from the text, no cached states
        rows = [{"input_ids": it.input_ids.tolist(), "length": len(it.input_ids), "target": _target_list(task.kind, it.target)}
                for it in items]
        return ray.data.from_items(rows), len(rows), task
    cached = set(reader.keys())
    missing = [it.example.id for it in items if it.key not in cached]
    if missing:
        raise ErError(missing_message(len(missing), "train", missing, cache_url, spec))
    targets = {it.key: _target_list(task.kind, it.target) for it in items}
    paths = ray.data.from_items([{"path": s.path} for s in reader.manifest.shards])
    ds = paths.map_batches(ReadShard, batch_size=1, fn_constructor_kwargs=dict(
        url=cache_url, manifest_json=reader.manifest.to_json(), targets=targets, kind=task.kind, storage_options=storage_options),
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    return ds, len(targets), task


def _tokenizer(name: str):
    from transformers import AutoTokenizer

    from er_core.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(name))


def train_on_ray(cache_url: str, task_dir: str, out_dir: str, cfg: TrainConfig, workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, storage_options=None, limit=None, address=None, storage_path=None,
                 name: str | None = None, ingest_missing: bool = False, overwrite: bool = False, resume: bool = False,
                 max_failures: int = 3) -> dict:
    """Run one training on Ray Train; the artefact and metrics.json end up in `out_dir`."""
    from pipelines.ray_env import absolute

    reject_secrets(storage_options)  # they travel in train_loop_config and actor arguments
    cache_url, task_dir = absolute(cache_url), absolute(str(task_dir))
    request = {"cache": cache_url, "task": task_dir, "limit": limit, "workers": workers, "cpus_per_worker": cpus_per_worker,
               "gpus_per_worker": gpus_per_worker, "storage_path": storage_path, "name": name, "cfg": cfg.to_dict(),
               "max_failures": max_failures}
    out = OutputDir.claim(absolute(str(out_dir)), "train", overwrite=overwrite, resume=resume, request=request)
    try:
        metrics = _fit_on_ray(out, cache_url, task_dir, cfg, workers, cpus_per_worker, gpus_per_worker, storage_options,
                              limit, address, storage_path, name, ingest_missing, max_failures)
    except BaseException as e:
        out.fail(f"{type(e).__name__}: {e}")
        raise
    return metrics


def _fit_on_ray(out: OutputDir, cache_url, task_dir, cfg, workers, cpus_per_worker, gpus_per_worker, storage_options, limit,
                address, storage_path, name, ingest_missing, max_failures) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_env import ensure_ray

    if ingest_missing and cfg.method != "full":
        from er_core.finetune import cache_task

        added = cache_task(cache_url, task_dir, storage_options, limit)
        if added:
            print(f"ingested {added} examples of {task_dir} missing from {cache_url}")
    ensure_ray(address)
    ds, n_train, task = train_dataset(cache_url, task_dir, cfg, storage_options, limit)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "cache": cache_url, "task": str(task_dir), "storage_options": storage_options,
                           "limit": limit, "n_train": n_train, "threads": max(1, int(cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": ds},
        # Checkpoints every node can reach: under OUT on one machine, a shared storage_path (s3://) on a cluster.
        # The same (storage_path, name) later resumes the run.
        run_config=RunConfig(name=name or "run", storage_path=storage_path or out.local_path(CHECKPOINTS),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise ErError(f"training of {task.name} finished without a checkpoint: {result.error}")
    staged = out.stage()
    result.checkpoint.to_directory(staged)
    out.finish(staged)
    if storage_path is None:
        out.remove(CHECKPOINTS)  # the run is complete: its resume state is no longer needed
    return json.loads(Path(out.path, "metrics.json").read_text())
