"""`er train`: one task, one method, from the cache; on Ray Train workers or (--workers 0) in this process."""

from __future__ import annotations

import json
import sys

from er_core import ErError, TrainConfig, finetune
from er_core.outputs import read_status


def print_metrics(m: dict) -> None:
    """The run's summary: one header line, then a table of the dev and test metrics (and the majority baseline)."""
    print(f"task {m['task']} ({m['kind']}), method {m['method']}, k={m['layer']}, best epoch {m['best_epoch']}, "
          f"{m['train_examples_per_second']} train examples/s")
    if m.get("dev_source", "dev split") != "dev split":
        print(f"  dev  = {m['dev_source']}")
    splits = [s for s in ("dev", "test") if s in m]
    names = list(dict.fromkeys(k for s in splits for k in m[s]))
    rows = [["split", *names, "majority micro_f1"]]
    for split in splits:
        base = m.get(f"{split}_majority_baseline")
        rows.append([split, *(f"{m[split][k]:.4f}" if k in m[split] else "" for k in names),
                     f"{base['micro_f1']:.4f}" if base else ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if m.get("warning"):
        print(f"warning: {m['warning']}", file=sys.stderr)


def resume_request(out: str) -> dict:
    """What an interrupted `er train` was asked to do, from its output folder's marker."""
    m = read_status(out)
    if m is None or m.get("kind") != "train" or "request" not in m:
        raise ErError(f"--resume {out}: not an er train output started by this version of er (no run request recorded)")
    return m["request"]


def main(args) -> int:
    from pipelines.configs import resolved, train_settings

    run, cfg, storage = train_settings(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(resolved((run, cfg, storage)), sort_keys=False), end="")
        from er_core.train_config import WIDE, default_head_lr, default_lr

        def rate(r):
            return "lr" if r is None else f"{r:g}"

        for name, default in (("lr", default_lr), ("head_lr", default_head_lr)):
            if getattr(cfg, name) is None:  # settled at training, from the cache's encoder
                narrow, wide = default(cfg.method), default(cfg.method, WIDE)
                print(f"# {name} null: {cfg.method}'s default, {rate(narrow)}"
                      + (f", or {rate(wide)} on an encoder of hidden size >= {WIDE}" if wide != narrow else ""))
        return 0
    opts = storage.options()
    if args.resume:
        req = resume_request(args.resume)
        out, cache, task, limit = args.resume, req["cache"], req["task"], req["limit"]
        cfg = TrainConfig(**req["cfg"])
        workers = req["workers"]
        ray_kw = {k: req[k] for k in ("cpus_per_worker", "gpus_per_worker", "storage_path", "name", "max_failures") if k in req}
        print(f"resuming {out}: {cfg.method} on {task} from {cache}, {workers} worker(s)")
    else:
        if not (run.cache and run.task and run.out):
            raise ErError("er train needs --cache, --task and --out (or --resume OUT to continue an interrupted run)")
        out, cache, task, limit, workers = run.out, run.cache, run.task, run.limit, run.workers
        ray_kw = dict(cpus_per_worker=run.cpus_per_worker, gpus_per_worker=run.gpus_per_worker, max_failures=run.max_failures,
                      storage_path=run.storage_path)
    common = dict(storage_options=opts, limit=limit, ingest_missing=run.ingest_missing, overwrite=args.overwrite,
                  resume=bool(args.resume))
    if workers == 0:
        metrics = finetune(cache, task, out, cfg, log=lambda row: print(json.dumps(row), file=sys.stderr), **common)
    else:
        from pipelines.train_ray import train_on_ray

        metrics = train_on_ray(cache, task, out, cfg, workers=workers, address=args.address, progress=True, **common, **ray_kw)
    print_metrics(metrics)
    print(f"wrote {out}/metrics.json")
    return 0
