"""A real 12-layer encoder end to end: ingest a bundled task at half depth, train `reduced` from the cache, and
compare test accuracy with the majority class.

    python -m benchmarks.bench_encoder --task ../shared/data/tasks/sci-cite [--model sentence-transformers/all-mpnet-base-v2]
        [--train 1000 --dev 300 --test 600] [--lrs 1e-4 3e-4] [--seeds 0 1] [--epochs 3] [--report benchmarks/REPORT.md]

The learning rate is chosen on dev (seed 0); the other seeds then run at that rate. Slices of the task keep the run
to minutes on CPU; they are stated in the report.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from er_core import Recycler, TrainConfig, finetune, ingest_local, load_task
from er_core.models import MPNET
from er_core.tasks import example_input

from .report import REPORT, write_section


def run(model: str, task_dir: str, limit: dict, lrs: list[float], seeds: list[int], epochs: int, work: Path) -> dict:
    rec = Recycler.load(model, layer="0.5", codec="fp16", max_length=128)
    task = load_task(task_dir, limit=limit)
    if task.kind != "classification":
        raise SystemExit("bench_encoder reports micro-F1 against the majority class: give a classification task")
    cache = str(work / "cache")
    t0 = time.perf_counter()
    ingest_local((example_input(e) for exs in task.splits.values() for e in exs), cache, rec, progress=False)
    ingest_s = time.perf_counter() - t0

    def train(lr: float, seed: int) -> dict:
        cfg = TrainConfig(method="reduced", epochs=epochs, lr=lr, batch_size=16, seed=seed)
        return finetune(cache, task_dir, str(work / f"m-{lr}-{seed}"), cfg, limit=limit, progress=False, log=lambda r: None)

    by_lr = {lr: train(lr, seeds[0]) for lr in lrs}
    best = max(lrs, key=lambda lr: by_lr[lr]["dev"]["micro_f1"])
    runs = [by_lr[best]] + [train(best, s) for s in seeds[1:]]
    return {"model": model, "layers": rec.encoder.config.num_hidden_layers, "k": rec.spec.layer, "task": task.name,
            "limit": limit, "epochs": epochs, "ingest_s": ingest_s, "best_lr": best, "seeds": seeds,
            "dev_by_lr": {lr: by_lr[lr]["dev"]["micro_f1"] for lr in lrs},
            "test": [r["test"]["micro_f1"] for r in runs], "test_macro": [r["test"]["macro_f1"] for r in runs],
            "majority": runs[0]["test_majority_baseline"]["micro_f1"],
            "majority_macro": runs[0]["test_majority_baseline"]["macro_f1"]}


def markdown(r: dict, command: str) -> str:
    mean = statistics.mean(r["test"])
    std = statistics.stdev(r["test"]) if len(r["test"]) > 1 else 0.0
    lim = ", ".join(f"{k} {v}" for k, v in r["limit"].items())
    dev = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in r["dev_by_lr"].items())
    return f"""## A 12-layer encoder end to end (`python -m benchmarks.bench_encoder`)

{r['model']} ({r['layers']} layers), cut at k={r['k']}, fp16 cache, max length 128; task `{r['task']}` sliced to
{lim} examples; `reduced`, {r['epochs']} epochs, batch 16. The learning rate was chosen on dev with seed 0
(dev micro-F1 by lr: {dev}); seeds {', '.join(map(str, r['seeds']))} then ran at lr {r['best_lr']:g}.
Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, CPU only; ingest took {r['ingest_s']:.0f} s.

| | test micro-F1 | test macro-F1 |
|---|---|---|
| `reduced` at k={r['k']} (mean ± std over seeds) | {mean:.3f} ± {std:.3f} | {statistics.mean(r['test_macro']):.3f} |
| majority class | {r['majority']:.3f} | {r['majority_macro']:.3f} |

Per seed: {', '.join(f'{v:.3f}' for v in r['test'])}. Reproduce: `{command}`.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, help="a classification task folder")
    ap.add_argument("--model", default=MPNET)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--dev", type=int, default=300)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--report", default=str(REPORT))
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="er-bench-encoder-") as tmp:
        r = run(a.model, a.task, {"train": a.train, "dev": a.dev, "test": a.test}, a.lrs, a.seeds, a.epochs, Path(tmp))
    command = (f"python -m benchmarks.bench_encoder --task {a.task} --model {a.model} --train {a.train} --dev {a.dev} "
               f"--test {a.test} --lrs {' '.join(map(str, a.lrs))} --seeds {' '.join(map(str, a.seeds))} --epochs {a.epochs}")
    print(markdown(r, command))
    write_section("encoder-12", markdown(r, command), Path(a.report))


if __name__ == "__main__":
    main()
