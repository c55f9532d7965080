"""`er train`: one task, one method, from the cache; on Ray Train workers or (--workers 0) in this process."""

from __future__ import annotations

import json

from er_core import finetune


def print_metrics(m: dict) -> None:
    print(f"task {m['task']} ({m['kind']}), method {m['method']}, k={m['layer']}, best epoch {m['best_epoch']}, "
          f"{m['train_examples_per_second']} train examples/s")
    for split in ("dev", "test"):
        if split in m:
            base = m.get(f"{split}_majority_baseline")
            line = "  ".join(f"{k}={v:.4f}" for k, v in m[split].items())
            print(f"  {split:4s} {line}" + (f"   (majority baseline micro_f1={base['micro_f1']:.4f})" if base else ""))


def main(args) -> int:
    from pipelines.cli import storage_options, train_config

    cfg = train_config(args)
    if args.workers == 0:
        metrics = finetune(args.cache, args.task, args.out, cfg, storage_options=storage_options(args), limit=args.limit,
                           log=lambda row: print(json.dumps(row)), ingest_missing=args.ingest_missing)
    else:
        from pipelines.train_ray import train_on_ray

        metrics = train_on_ray(args.cache, args.task, args.out, cfg, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                               gpus_per_worker=args.gpus_per_worker, storage_options=storage_options(args), limit=args.limit,
                               address=args.address, ingest_missing=args.ingest_missing)
    print_metrics(metrics)
    print(f"wrote {args.out}/metrics.json")
    return 0
