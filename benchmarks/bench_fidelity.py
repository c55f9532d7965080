"""Fidelity and cost of recycling, side by side in one run: does `reduced`/`lora` at k = L/2 match `full`?

Bundled MiniLM (L=6). Every task folder of --data (no task named in code), sliced by --limit:

1. one ingestion of every task's slice at k = L/2 (fp16), timed;
2. accuracy table: task x method (full, reduced, lora at the shipped defaults) x seeds; each run is
   `finetune` in this process, timed from its call to metrics.json; the paired difference to `full`
   (same seed, same data order) as mean +- std over seeds, in points of the task's main metric;
3. accuracy vs k: the first classification and the first NER task, `reduced` at every k = 0..L-1
   (k = L leaves no layer to train), each from a cache of its slice at that k;
4. codec cost: the first classification task, `reduced` from fp32, fp16 and int8 caches;
5. break-even: one ingestion plus N `reduced` runs against N `full` runs, from the measured times.

    python -m benchmarks.bench_fidelity --data ../shared/data/tasks [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from er_core import Recycler, TrainConfig, finetune, ingest_local, load_task
from er_core.metrics import primary_metric
from er_core.tasks import example_input

from .report import write_section

METHODS = ("full", "reduced", "lora")
HERE = Path(__file__).resolve().parent


def task_dirs(data: Path) -> list[Path]:
    return sorted(p for p in Path(data).iterdir() if any(p.glob("train.*")))


def _ingest(tasks: dict, url: str, layer: int, codec: str, limit: dict) -> float:
    t0 = time.perf_counter()
    rec = Recycler.load("bundled", layer=layer, codec=codec)
    inputs = [example_input(e) for t in tasks.values() for exs in t.splits.values() for e in exs]
    ingest_local(inputs, url, rec, progress=False)
    return time.perf_counter() - t0


def _train(cache: str, task_dir: Path, out: Path, cfg: TrainConfig, limit: dict) -> dict:
    t0 = time.perf_counter()
    m = finetune(cache, str(task_dir), str(out), cfg, limit=limit, log=lambda row: None, progress=False)
    primary = primary_metric(m["kind"])
    return {"wall_seconds": round(time.perf_counter() - t0, 2), "train_examples_per_second": m["train_examples_per_second"],
            "metric": primary, "dev": m.get("dev", {}).get(primary), "test": m["test"][primary],
            "test_macro_f1": m["test"].get("macro_f1"), "best_epoch": m["best_epoch"], "epochs_run": len(m["history"])}


def run(data: Path, quick: bool = False, seeds=(0, 1, 2), limit: dict | None = None, epochs: int = 3, log=print) -> dict:
    limit = limit or ({"train": 64, "dev": 32, "test": 32} if quick else {"train": 2000, "dev": 500, "test": 1000})
    dirs = task_dirs(data)
    tasks = {d.name: load_task(d, limit=limit) for d in dirs}
    num_layers = Recycler.load("bundled", layer=0).spec.num_layers
    k = num_layers // 2
    work = Path(tempfile.mkdtemp(prefix="er-fidelity-"))
    res = {"model": "bundled all-MiniLM-L6-v2", "num_layers": num_layers, "k": k, "limit": limit, "epochs": epochs,
           "seeds": list(seeds), "quick": quick, "when": time.strftime("%Y-%m-%d %H:%M")}
    cfg = {m: TrainConfig(method=m, epochs=epochs) for m in METHODS}
    res["defaults"] = {m: {f: getattr(c, f) for f in ("lr", "epochs", "warmup_ratio", "patience", "batch_size")}
                       for m, c in cfg.items()}

    cache = str(work / f"cache-k{k}")
    res["ingest_seconds"] = round(_ingest(tasks, cache, k, "fp16", limit), 2)
    log(f"ingested {len(tasks)} task slices at k={k} in {res['ingest_seconds']} s")

    runs = []
    for name, d in zip(tasks, dirs):
        for seed in seeds:
            for method in METHODS:
                c = TrainConfig(**{**cfg[method].to_dict(), "seed": seed})
                r = {"task": name, "kind": tasks[name].kind, "method": method, "seed": seed,
                     **_train(cache, d, work / f"{name}-{method}-{seed}", c, limit)}
                runs.append(r)
                log(f"{name} {method} seed {seed}: test {r['metric']} {r['test']:.4f} in {r['wall_seconds']} s")
    res["runs"] = runs
    res["paired"] = _paired(runs)

    probe = {}
    for kind in ("classification", "ner"):
        first = next((d for n, d in zip(tasks, dirs) if tasks[n].kind == kind), None)
        if first is None:
            continue
        probe[first.name] = []
        for layer in range(num_layers):
            url = str(work / f"k{layer}-{first.name}")
            secs = _ingest({first.name: tasks[first.name]}, url, layer, "fp16", limit)
            r = _train(url, first, work / f"vs-k{layer}-{first.name}", cfg["reduced"], limit)
            probe[first.name].append({"layer": layer, "ingest_seconds": round(secs, 2), **r})
            log(f"{first.name} k={layer}: test {r['test']:.4f}")
    res["vs_k"] = probe

    first = next((d for n, d in zip(tasks, dirs) if tasks[n].kind == "classification"), None)
    res["codecs"] = {}
    if first is not None:
        for codec in ("fp32", "fp16", "int8"):
            url = str(work / f"{codec}-{first.name}")
            _ingest({first.name: tasks[first.name]}, url, k, codec, limit)
            res["codecs"][codec] = {"task": first.name, **_train(url, first, work / f"codec-{codec}", cfg["reduced"], limit)}
            log(f"{first.name} {codec}: test {res['codecs'][codec]['test']:.4f}")
    res["break_even"] = _break_even(res)
    shutil.rmtree(work, ignore_errors=True)  # caches and models of the runs: the figures are in `res`
    return res


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _paired(runs: list[dict]) -> list[dict]:
    """Per task and method: test metric mean +- std over seeds, and its paired difference to `full` (points)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in runs):
        full = {r["seed"]: r for r in runs if r["task"] == task and r["method"] == "full"}
        for method in METHODS:
            rs = [r for r in runs if r["task"] == task and r["method"] == method]
            mean, std = _mean_std([r["test"] for r in rs])
            diff = [100 * (r["test"] - full[r["seed"]]["test"]) for r in rs if r["seed"] in full]
            dm, ds = _mean_std(diff) if diff else (None, None)
            macro = [r["test_macro_f1"] for r in rs if r["test_macro_f1"] is not None]
            out.append({"task": task, "method": method, "metric": rs[0]["metric"], "mean": mean, "std": std,
                        "diff_points": dm, "diff_std": ds, "macro_f1": statistics.fmean(macro) if macro else None,
                        "wall_seconds": statistics.fmean(r["wall_seconds"] for r in rs),
                        "train_examples_per_second": statistics.fmean(r["train_examples_per_second"] for r in rs)})
    return out


def _break_even(res: dict) -> dict:
    """Cost of N tasks: one ingestion + N reduced runs, against N full runs (mean measured wall times)."""
    walls = {m: statistics.fmean(r["wall_seconds"] for r in res["runs"] if r["method"] == m) for m in ("full", "reduced")}
    per_task_ingest = res["ingest_seconds"] / max(1, len({r["task"] for r in res["runs"]}))
    saving = walls["full"] - walls["reduced"]
    n = None if saving <= 0 else max(1, int(per_task_ingest // saving) + 1)
    return {"ingest_seconds": round(per_task_ingest, 2), "full_seconds": round(walls["full"], 2),
            "reduced_seconds": round(walls["reduced"], 2), "wins_from_n": n}


def report(res: dict, plots: list[str]) -> str:
    lim = ", ".join(f"{k} {v}" for k, v in res["limit"].items())
    d = res["defaults"]
    lines = [f"## Fidelity and cost of recycling (`python -m benchmarks.bench_fidelity`{' --quick' if res['quick'] else ''})", "",
             f"{res['model']}, L={res['num_layers']}, k={res['k']} (L/2), fp16 cache; task slices: {lim}; seeds "
             f"{res['seeds']}; at most {res['epochs']} epochs with early stopping on dev; the shipped defaults "
             f"(lr full {d['full']['lr']}, reduced {d['reduced']['lr']}, lora {d['lora']['lr']}; warmup "
             f"{d['reduced']['warmup_ratio']}, patience {d['reduced']['patience']}). Measured {res['when']} on this machine "
             f"(2 cores, CPU), one process, one run after another; wall time is `finetune` from its call to metrics.json.", "",
             "| task | method | test metric (mean ± std) | vs full, points (paired, mean ± std) | macro-F1 | wall s | train ex/s |",
             "|---|---|---|---|---|---|---|"]
    for p in res["paired"]:
        diff = "" if p["method"] == "full" or p["diff_points"] is None else f"{p['diff_points']:+.2f} ± {p['diff_std']:.2f}"
        macro = "" if p["macro_f1"] is None else f"{p['macro_f1']:.3f}"
        lines.append(f"| {p['task']} | {p['method']} | {p['metric']} {p['mean']:.4f} ± {p['std']:.4f} | {diff} | {macro} | "
                     f"{p['wall_seconds']:.1f} | {p['train_examples_per_second']:.1f} |")
    for task, rows in res["vs_k"].items():
        lines += ["", f"Accuracy vs k, {task} (`reduced`, seed 0): " + ", ".join(f"k={r['layer']}: {r['test']:.4f}" for r in rows)]
    if res["codecs"]:
        c = res["codecs"]
        lines += ["", f"Codec cost, {next(iter(c.values()))['task']} (`reduced`, seed 0): "
                  + ", ".join(f"{name} {r['test']:.4f}" for name, r in c.items())]
    b = res["break_even"]
    lines += ["", f"Break-even: ingesting one task's slice took {b['ingest_seconds']} s; a `reduced` run {b['reduced_seconds']} s, "
              f"a `full` run {b['full_seconds']} s (means of the table's runs). Recycling wins from N = {b['wins_from_n']} "
              f"task(s) on the same texts." if b["wins_from_n"] else
              f"Break-even: a `reduced` run ({b['reduced_seconds']} s) was not faster than a `full` run "
              f"({b['full_seconds']} s) here, so recycling never wins on these slices.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines)


def plot(res: dict, folder: Path) -> list[str]:
    """PNG plots next to the report; none (and a note) without matplotlib (pip install 'er[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return []
    names = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    tasks = list(dict.fromkeys(p["task"] for p in res["paired"]))
    for i, method in enumerate(METHODS):
        ps = [next(p for p in res["paired"] if p["task"] == t and p["method"] == method) for t in tasks]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(tasks))], [p["mean"] for p in ps], 0.27,
               yerr=[p["std"] for p in ps], label=method, capsize=3)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test main metric")
    ax.legend()
    names.append(_save(fig, folder, "fidelity_accuracy.png"))
    if res["vs_k"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for task, rows in res["vs_k"].items():
            ax.plot([r["layer"] for r in rows], [r["test"] for r in rows], marker="o", label=task)
        ax.set_xlabel("k (layers cached)")
        ax.set_ylabel("test main metric (reduced)")
        ax.legend()
        names.append(_save(fig, folder, "fidelity_vs_k.png"))
    b = res["break_even"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ns = list(range(1, 11))
    ax.plot(ns, [b["ingest_seconds"] + n * b["reduced_seconds"] for n in ns], marker="o", label="1 ingestion + N reduced")
    ax.plot(ns, [n * b["full_seconds"] for n in ns], marker="o", label="N full")
    ax.set_xlabel("N tasks on the same texts")
    ax.set_ylabel("wall seconds")
    ax.legend()
    names.append(_save(fig, folder, "fidelity_break_even.png"))
    return names


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=100)
    return name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of task folders")
    ap.add_argument("--quick", action="store_true", help="tiny slices, 2 seeds, 1 epoch")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md")
    args = ap.parse_args(argv)
    res = run(args.data, quick=args.quick, seeds=(0, 1) if args.quick else (0, 1, 2), epochs=1 if args.quick else 3)
    (args.out.parent / "results").mkdir(exist_ok=True)
    (args.out.parent / "results" / "fidelity.json").write_text(json.dumps(res, indent=1))
    write_section("fidelity", report(res, plot(res, args.out.parent)), args.out)


if __name__ == "__main__":
    main()
