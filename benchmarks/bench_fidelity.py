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
from er_core.tasks import example_input, task_folders

from .report import write_section

METHODS = ("full", "reduced", "lora")
GOAL_POINTS = 1.0  # recycling's goal: within this many points of full fine-tuning
HERE = Path(__file__).resolve().parent
QUICK_LIMIT = {"train": 64, "dev": 32, "test": 32}
FULL_LIMIT = {"train": 500, "dev": 300, "test": 400}  # sized for 2 cores: about 1.5 h for the whole run


class RunLog:
    """Finished measurements, one JSON line each, keyed by everything that determines them (task, method, seed,
    layer, codec, the whole TrainConfig, slices, model): a rerun keeps what is done, since the full table takes
    hours on 2 cores, and any change of settings or shipped defaults misses the key and measures anew."""

    def __init__(self, path: Path | None):
        self.path, self.done = path, {}
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.done[json.dumps(row["key"], sort_keys=True)] = row["result"]

    def measure(self, key: dict, fn, log=print) -> dict:
        k = json.dumps(key, sort_keys=True)
        if k in self.done:
            return self.done[k]
        result = {**fn(), "when": time.strftime("%Y-%m-%d %H:%M")}
        self.done[k] = result
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "result": result}) + "\n")
        return result


def _ingest(tasks: dict, url: str, layer: int, codec: str) -> float:
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


def run(data: Path, quick: bool = False, seeds=(0, 1, 2), limit: dict | None = None, epochs: int | None = None,
        log=print, runs: Path | None = None) -> dict:
    """epochs None: the shipped default of each method. runs: the RunLog file (None: measure everything now)."""
    limit = limit or (QUICK_LIMIT if quick else FULL_LIMIT)
    dirs = task_folders(data)
    tasks = {d.name: load_task(d, limit=limit) for d in dirs}
    num_layers = Recycler.load("bundled", layer=0).spec.num_layers
    k = num_layers // 2
    work = Path(tempfile.mkdtemp(prefix="er-fidelity-"))
    done = RunLog(runs)
    res = {"model": "bundled all-MiniLM-L6-v2", "num_layers": num_layers, "k": k, "limit": limit,
           "seeds": list(seeds), "quick": quick, "when": time.strftime("%Y-%m-%d %H:%M")}
    cfg = {m: TrainConfig(method=m, **({} if epochs is None else {"epochs": epochs})) for m in METHODS}
    res["defaults"] = {m: {f: getattr(c, f) for f in ("lr", "epochs", "warmup_ratio", "patience", "batch_size")}
                       for m, c in cfg.items()}
    base = {"model": res["model"], "limit": limit}
    caches: dict = {}

    def cache(layer: int, codec: str, names: tuple) -> str:
        """A cache of these tasks' slices, ingested on first need; its ingestion time measured once."""
        url = str(work / f"k{layer}-{codec}-{'-'.join(names)}")
        if url not in caches:
            secs = _ingest({n: tasks[n] for n in names}, url, layer, codec)
            caches[url] = done.measure({**base, "what": "ingest", "layer": layer, "codec": codec, "tasks": list(names)},
                                       lambda: {"seconds": round(secs, 2)})["seconds"]
        return url

    def train(what: str, name: str, d: Path, c: TrainConfig, layer: int, codec: str, names: tuple) -> dict:
        key = {**base, "what": what, "task": name, "layer": layer, "codec": codec, "config": c.to_dict()}
        url = cache(layer, codec, names) if c.method != "full" else cache(k, "fp16", names)  # full reads text
        return done.measure(key, lambda: _train(url, d, work / f"{what}-{name}-{c.method}-{c.seed}-k{layer}-{codec}", c, limit))

    all_names = tuple(tasks)
    ingest_key = {**base, "what": "ingest", "layer": k, "codec": "fp16", "tasks": list(all_names)}
    table = []
    for name, d in zip(tasks, dirs):
        for seed in seeds:
            for method in METHODS:
                c = TrainConfig(**{**cfg[method].to_dict(), "seed": seed})
                r = {"task": name, "kind": tasks[name].kind, "method": method, "seed": seed,
                     **train("table", name, d, c, k, "fp16", all_names)}
                table.append(r)
                log(f"{name} {method} seed {seed}: test {r['metric']} {r['test']:.4f} in {r['wall_seconds']} s")
    res["runs"] = table
    # measured when the table's first run made the cache; ingested here only if no run needed it
    res["ingest_seconds"] = done.measure(ingest_key, lambda: {"seconds": round(_ingest(tasks, str(work / "timed"), k, "fp16"), 2)})["seconds"]
    log(f"ingesting {len(tasks)} task slices at k={k}: {res['ingest_seconds']} s")
    res["paired"] = _paired(table)

    probe = {}
    for kind in ("classification", "ner"):
        first = next((d for n, d in zip(tasks, dirs) if tasks[n].kind == kind), None)
        if first is None:
            continue
        probe[first.name] = []
        for layer in range(num_layers):
            r = train("vs_k", first.name, first, cfg["reduced"], layer, "fp16", (first.name,))
            probe[first.name].append({"layer": layer, **r})
            log(f"{first.name} k={layer}: test {r['test']:.4f}")
    res["vs_k"] = probe

    first = next((d for n, d in zip(tasks, dirs) if tasks[n].kind == "classification"), None)
    res["codecs"] = {}
    if first is not None:
        for codec in ("fp32", "fp16", "int8"):
            res["codecs"][codec] = {"task": first.name, **train("codec", first.name, first, cfg["reduced"], k, codec, (first.name,))}
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


def _span(res: dict) -> str:
    whens = sorted(r["when"] for r in res["runs"] + [r for rs in res["vs_k"].values() for r in rs] + list(res["codecs"].values()))
    return whens[0] if whens[0] == whens[-1] else f"from {whens[0]} to {whens[-1]}"


def report(res: dict, plots: list[str]) -> str:
    lim = ", ".join(f"{k} {v}" for k, v in res["limit"].items())
    d = res["defaults"]
    lines = [f"## Fidelity and cost of recycling (`python -m benchmarks.bench_fidelity`{' --quick' if res['quick'] else ''})", "",
             f"{res['model']}, L={res['num_layers']}, k={res['k']} (L/2), fp16 cache; task slices: {lim}; seeds "
             f"{res['seeds']}; at most {d['reduced']['epochs']} epochs with early stopping on dev; the shipped defaults "
             f"(lr full {d['full']['lr']}, reduced {d['reduced']['lr']}, lora {d['lora']['lr']}; batch {d['reduced']['batch_size']}, "
             f"warmup {d['reduced']['warmup_ratio']}, patience {d['reduced']['patience']}). Measured {_span(res)} on this machine "
             f"(2 cores, CPU), one process, one run after another (a rerun keeps the runs already in "
             f"`results/fidelity-runs.jsonl`); wall time is `finetune` from its call to metrics.json.", "",
             "| task | method | test metric (mean ± std) | vs full, points (paired, mean ± std) | macro-F1 | wall s | train ex/s |",
             "|---|---|---|---|---|---|---|"]
    for p in res["paired"]:
        diff = "" if p["method"] == "full" or p["diff_points"] is None else f"{p['diff_points']:+.2f} ± {p['diff_std']:.2f}"
        macro = "" if p["macro_f1"] is None else f"{p['macro_f1']:.3f}"
        lines.append(f"| {p['task']} | {p['method']} | {p['metric']} {p['mean']:.4f} ± {p['std']:.4f} | {diff} | {macro} | "
                     f"{p['wall_seconds']:.1f} | {p['train_examples_per_second']:.1f} |")
    lines += ["", f"Goal: `reduced` and `lora` within {GOAL_POINTS} point of `full` (paired mean): " + "; ".join(
        f"{p['task']} {p['method']} {p['diff_points']:+.2f}: "
        + ("met" if p["diff_points"] >= -GOAL_POINTS else f"missed by {-GOAL_POINTS - p['diff_points']:.2f}")
        for p in res["paired"] if p["method"] != "full" and p["diff_points"] is not None) + "."]
    for task, rows in res["vs_k"].items():
        lines += ["", f"Accuracy vs k, {task} (`reduced`, seed 0): " + ", ".join(f"k={r['layer']}: {r['test']:.4f}" for r in rows)]
    if res["codecs"]:
        c = res["codecs"]
        lines += ["", f"Codec cost, {next(iter(c.values()))['task']} (`reduced`, seed 0): "
                  + ", ".join(f"{name} {r['test']:.4f}" for name, r in c.items())]
    ideal = _ideal(res)
    lines += ["", f"Training speed vs `full` (mean examples/s of the table's runs; ideal L/(L-k) = {ideal:.2f}): " + "; ".join(
        f"{t}: reduced {s['reduced']:.2f}x ({100 * s['reduced'] / ideal:.0f}% of ideal), lora {s['lora']:.2f}x "
        f"({100 * s['lora'] / ideal:.0f}%)" for t, s in _speedups(res).items())]
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
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sp = _speedups(res)
    for i, method in enumerate(("reduced", "lora")):
        ax.bar([j + 0.4 * (i - 0.5) for j in range(len(tasks))], [sp[t][method] for t in tasks], 0.4, label=f"{method} / full")
    ax.axhline(_ideal(res), color="k", linestyle="--", label=f"ideal L/(L-k) = {_ideal(res):.2f}")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("training examples/s vs full")
    ax.legend()
    names.append(_save(fig, folder, "fidelity_speed.png"))
    return names


def _ideal(res: dict) -> float:
    return res["num_layers"] / (res["num_layers"] - res["k"])


def _speedups(res: dict) -> dict:
    """Per task: mean training examples/s of each method over that of `full` (the table's runs, side by side)."""
    by = {(p["task"], p["method"]): p["train_examples_per_second"] for p in res["paired"]}
    return {t: {m: by[t, m] / by[t, "full"] for m in METHODS} for t in dict.fromkeys(p["task"] for p in res["paired"])}


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=100)
    return name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of task folders")
    ap.add_argument("--quick", action="store_true", help="tiny slices, 2 seeds, 1 epoch")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md")
    ap.add_argument("--fresh", action="store_true", help="measure everything again, ignoring results/fidelity-runs.jsonl")
    args = ap.parse_args(argv)
    runs = args.out.parent / "results" / ("fidelity-runs-quick.jsonl" if args.quick else "fidelity-runs.jsonl")
    if args.fresh:
        runs.unlink(missing_ok=True)
    res = run(args.data, quick=args.quick, seeds=(0, 1) if args.quick else (0, 1, 2), epochs=1 if args.quick else None,
              runs=runs)
    (args.out.parent / "results").mkdir(exist_ok=True)
    (args.out.parent / "results" / "fidelity.json").write_text(json.dumps(res, indent=1))
    write_section("fidelity", report(res, plot(res, args.out.parent)), args.out)


if __name__ == "__main__":
    main()
