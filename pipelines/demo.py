"""`er demo`: ingest a task folder into a local cache, train on it from the cache, print metrics and speed.

This is what `make demo` runs: local Ray, local disk, the bundled MiniLM.
"""

from __future__ import annotations

import time
from pathlib import Path

from er_core import TrainConfig, finetune
from er_core.outputs import OutputDir

DEFAULT_TASK = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks" / "chemprot"


def main(args) -> int:
    task = Path(args.task) if args.task else DEFAULT_TASK
    if not task.is_dir():
        from er_core import ErError

        raise ErError(f"task folder {task} not found; pass one: er demo PATH/TO/TASK")
    work = Path(args.workdir)
    cache, out = work / "cache", work / f"model-{task.name}"
    claimed = OutputDir.claim(str(work), "demo", overwrite=args.overwrite, flag="--workdir")
    claimed.add(cache.name, out.name)
    limit = args.limit or None
    print(f"== er demo: task {task}, cache {cache}, k={args.layer}, {'all' if not limit else limit} examples per split")

    t0 = time.perf_counter()
    if args.local:
        from er_core import Recycler, ingest_local, load_task
        from er_core.tasks import example_input

        t = load_task(task, limit=limit)
        rec = Recycler.load(layer=args.layer, codec="fp16", max_length=256)
        m = ingest_local((example_input(e) for exs in t.splits.values() for e in exs), str(cache), rec)
    else:
        from pipelines.ingest import ingest

        m = ingest([str(task)], str(cache), layer=args.layer, max_length=256, limit=limit, address=args.address)
    secs = time.perf_counter() - t0
    tot = m.totals
    print(f"== cache: {tot['rows']} examples, {tot['tokens']} tokens, {tot['bytes'] / 1e6:.1f} MB "
          f"({tot['bytes_per_token']} bytes/token) after {secs:.1f}s")

    cfg = TrainConfig(method="reduced", epochs=args.epochs, lr=3e-4, batch_size=32)
    if args.local:
        metrics = finetune(str(cache), str(task), str(out), cfg, limit=limit)
    else:
        from pipelines.train_ray import train_on_ray

        metrics = train_on_ray(str(cache), str(task), str(out), cfg, workers=1, limit=limit, address=args.address)
    from pipelines.train import print_metrics

    claimed.finish()
    print_metrics(metrics)
    print(f"== model saved in {out}; predict with: er predict --cache {cache} --model-dir {out} --corpus {task} --out preds.jsonl")
    return 0
