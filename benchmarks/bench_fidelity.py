"""Fidelity and cost of recycling, side by side in one run: does `reduced`/`lora` at k = L/2 match a tuned `full`?

Bundled MiniLM (L=6) by default, or --model (e.g. the 12-layer MPNet). Every task folder of --data (or --tasks),
sliced by --train/--dev/--test (test: the whole split by default):

1. one ingestion of every task's slice at k (default L/2, fp16), timed;
2. tuning, on dev only: per task and method, every learning rate of GRIDS (seed 0), each trained to convergence
   (at most CONVERGE epochs, early stopping on dev; a run that ends at the cap with dev still rising runs again with
   EXTEND times the cap, and the one better on dev counts); the dev-best rate then runs seeds 1 and 2 too (--no-tune: the
   shipped default rate only, for every method, `full` included);
3. accuracy table: task x method at its dev-chosen rate, test metric over 3 seeds and the paired difference to
   `full` (same seed, same data order) as mean +- std, in points of the task's main metric; where the dev-chosen
   rate of `reduced`/`lora` is not the shipped default, the default runs the 3 seeds too (the shipped-defaults rows);
4. accuracy vs k: the first classification and the first NER task, `reduced` and `lora` at their chosen rates at
   every k = 0..L-1 (seed 0; --vs-k: these k only), each from a cache of its slice at that k; at the k's of
   --seeds-at-k (where the curve says parity lies), the lr tuned again on dev at that k (seed 0, GRIDS), then every
   seed at it, paired to the tuned `full` as in the table, and the shipped default rate's seeds too where the rate
   chosen at that k is not it;
5. codec cost: the first classification task, `reduced` from fp32, fp16 and int8 caches;
6. break-even: one ingestion plus N `reduced` runs against N `full` runs, from the measured times.

    python -m benchmarks.bench_fidelity --data ../shared/data/tasks [--quick] [--device cuda]
    python -m benchmarks.bench_fidelity --data ../shared/data/tasks --model mpnet --tasks sci-cite ncbi-disease \
        --section fidelity-mpnet --no-extras

Every run is kept in results/fidelity-runs.jsonl as it ends, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from er_core import Recycler, TrainConfig, finetune, ingest_local, load_task
from er_core.metrics import majority_baseline, nothing_learned, primary_metric
from er_core.models import MPNET
from er_core.tasks import example_input, task_folders
from er_core.train_config import DEFAULT_LR, WIDE_LR, default_lr

from .report import write_section

METHODS = ("full", "reduced", "lora")
GOAL_POINTS = 1.0  # recycling's goal: within this many points of full fine-tuning
HERE = Path(__file__).resolve().parent
MODELS = {"bundled": "bundled", "mpnet": MPNET}
# Learning rates tuned on dev per task and method; each holds the method's shipped default (checked at start).
GRIDS = {"full": (2e-5, 5e-5, 1e-4), "reduced": (1e-4, 3e-4, 1e-3), "lora": (3e-4, 1e-3, 3e-3)}
CONVERGE = {"epochs": 10, "patience": 3}  # to convergence: early stopping on dev ends a run, rarely the cap
EXTEND = 2  # a run still improving at its cap runs again with this many times the cap (once)
QUICK_LIMIT = {"train": 64, "dev": 32, "test": 32}
FULL_LIMIT = {"train": 2000, "dev": 500}  # test: the whole split


class RunLog:
    """Finished measurements, one JSON line each, keyed by everything that determines them (task, method, seed,
    layer, codec, the whole TrainConfig as `keyed` gives it, slices, model): a rerun keeps what is done, since the
    full table takes hours on 2 cores, and any change of settings or shipped defaults that changes a run misses the
    key and measures anew."""

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


def _ingest(tasks: dict, url: str, model: str, layer: int, codec: str, device: str) -> float:
    t0 = time.perf_counter()
    rec = Recycler.load(model, layer=layer, codec=codec)
    inputs = [example_input(e) for t in tasks.values() for exs in t.splits.values() for e in exs]
    ingest_local(inputs, url, rec, progress=False, device=device)
    return time.perf_counter() - t0


def _train(cache: str, task_dir: Path, out: Path, cfg: TrainConfig, limit: dict, device: str) -> dict:
    t0 = time.perf_counter()
    m = finetune(cache, str(task_dir), str(out), cfg, limit=limit, log=lambda row: None, progress=False, device=device)
    primary = primary_metric(m["kind"])
    return {"wall_seconds": round(time.perf_counter() - t0, 2), "train_examples_per_second": m["train_examples_per_second"],
            "metric": primary, "dev": m.get("dev", {}).get(primary), "test": m["test"][primary],
            "test_macro_f1": m["test"].get("macro_f1"), "best_epoch": m["best_epoch"], "epochs_run": len(m["history"])}


def run(data: Path, quick: bool = False, seeds=(0, 1, 2), limit: dict | None = None, log=print, runs: Path | None = None,
        model: str = "bundled", k: int | None = None, only: list[str] | None = None, extras: bool = True,
        device: str = "cpu", seeds_at_k: tuple[int, ...] = (), epochs: int | None = None, tune: bool = True,
        vs_k: tuple[int, ...] | None = None) -> dict:
    """runs: the RunLog file (None: measure everything now). only: task folder names to run (default all).
    seeds_at_k: layers at which the accuracy-vs-k probe runs every seed, not only the first. epochs: the cap instead
    of CONVERGE's (every run's key holds it, so runs at another cap are measured anew). vs_k: the layers of the
    accuracy-vs-k probe (default every k: L runs per method, hours for a 12-layer model on CPU)."""
    for method, grid in GRIDS.items():
        for lr in {DEFAULT_LR[method], WIDE_LR.get(method, DEFAULT_LR[method])} - set(grid):
            raise SystemExit(f"GRIDS[{method!r}] lacks the shipped default lr {lr:g}: add it")
    limit = limit or (QUICK_LIMIT if quick else FULL_LIMIT)
    dirs = [d for d in task_folders(data) if not only or d.name in only]
    if only and len(dirs) != len(only):
        raise SystemExit(f"--tasks: {sorted(set(only) - {d.name for d in dirs})} not found in {data}")
    tasks = {d.name: load_task(d, limit=limit) for d in dirs}
    path = MODELS.get(model, model)
    spec = Recycler.load(path, layer=0).spec
    num_layers, default = spec.num_layers, {m: default_lr(m, spec.hidden_size) for m in METHODS}  # the rate a user gets
    k = num_layers // 2 if k is None else k
    vs_k = list(range(num_layers)) if vs_k is None else sorted(set(vs_k))
    if not set(vs_k) <= set(range(num_layers)):
        raise SystemExit(f"--vs-k: {sorted(set(vs_k) - set(range(num_layers)))} not a layer of this model (0..{num_layers - 1})")
    grids = {m: (default[m],) for m in METHODS} if quick or not tune else GRIDS
    converge = {"epochs": 1, "patience": 1} if quick else {**CONVERGE, **({"epochs": epochs} if epochs else {})}
    work = Path(tempfile.mkdtemp(prefix="er-fidelity-"))
    done = RunLog(runs)
    res = {"model": model, "tasks": list(tasks), "num_layers": num_layers, "k": k, "limit": limit, "seeds": list(seeds), "quick": quick,
           "device": device, "grids": {m: list(g) for m, g in grids.items()}, "converge": converge, "extend": EXTEND,
           "tuned": tune, "kinds": {n: t.kind for n, t in tasks.items()},
           # what a run that learned nothing scores on dev (finetune's own check): flagged in the report
           "majority_dev": {n: majority_baseline([e.label for e in t.splits["train"]], [e.label for e in t.splits["dev"]])
                            for n, t in tasks.items() if t.kind == "classification" and t.splits.get("dev")}}
    shipped = {m: TrainConfig(method=m).for_encoder(spec.hidden_size) for m in METHODS}
    res["defaults"] = {m: {f: v for f, v in c.to_dict().items() if f not in ("method", "seed", "peft_config")}
                       for m, c in shipped.items()}
    base = {"model": model, "limit": limit}
    caches: dict = {}

    def cache(layer: int, codec: str, names: tuple) -> str:
        """A cache of these tasks' slices, ingested on first need; its ingestion time measured once."""
        url = str(work / f"k{layer}-{codec}-{'-'.join(names)}")
        if url not in caches:
            secs = _ingest({n: tasks[n] for n in names}, url, path, layer, codec, device)
            caches[url] = done.measure({**base, "what": "ingest", "layer": layer, "codec": codec, "tasks": list(names)},
                                       lambda: {"seconds": round(secs, 2)})["seconds"]
        return url

    def train(what: str, name: str, d: Path, c: TrainConfig, layer: int, codec: str, names: tuple) -> dict:
        key = {**base, "what": what, "task": name, "layer": layer, "codec": codec,
               "config": keyed(c, len(tasks[name].splits["train"]))}
        if quick:
            key["quick"] = True

        def measure():  # a cache is ingested only for a run still to do: a finished table reruns in seconds
            url = cache(layer, codec, names) if c.method != "full" else cache(k, "fp16", names)  # full reads text
            r = _train(url, d, work / f"{what}-{name}-{c.method}-{c.lr:g}-{c.seed}-k{layer}-{codec}-e{c.epochs}", c, limit, device)
            log(f"{what} {name} {c.method} lr {c.lr:g} seed {c.seed} k={layer} {codec}: dev {r['dev']} test {r['test']:.4f} "
                f"({r['epochs_run']} epochs, best {r['best_epoch']}) in {r['wall_seconds']} s")
            return r

        r = done.measure(key, measure)
        # still rising at the cap: give it room (unless --min-steps already ran it past the longer cap). The longer cap
        # is a longer schedule too (the lr decays over the whole run), not the same run continued: dev picks the cap.
        if not quick and c.epochs == converge["epochs"] and _capped(r) and r["epochs_run"] < c.epochs * EXTEND:
            longer = train(what, name, d, replace(c, epochs=c.epochs * EXTEND), layer, codec, names)
            if r["dev"] is None or longer["dev"] is None or longer["dev"] > r["dev"]:  # no dev slice: the longer, as before
                return {**longer, "extended_from": c.epochs}
            return {**r, "longer_dev": longer["dev"], "longer_when": longer["when"]}
        return r

    def config(method: str, lr: float, seed: int) -> TrainConfig:
        return TrainConfig(method=method, lr=lr, seed=seed, **converge).for_encoder(spec.hidden_size)  # head: by width

    def tuned(what: str, name: str, d: Path, method: str, layer: int, names: tuple) -> tuple[float, dict, list[dict]]:
        """Every lr of the grid at seed 0: the dev-best lr (the test figures are not looked at), the runs by lr,
        and the rows that say so."""
        by_lr = {lr: train(what, name, d, config(method, lr, seeds[0]), layer, "fp16", names) for lr in grids[method]}
        best = max(by_lr, key=lambda lr: by_lr[lr]["dev"])
        return best, by_lr, [{"task": name, "method": method, "lr": lr, "seed": seeds[0], "chosen": lr == best, **r}
                             for lr, r in by_lr.items()]

    all_names = tuple(tasks)
    table, tuning, chosen = [], [], {}
    for name, d in zip(tasks, dirs):
        for method in METHODS:
            best, by_lr, rows = tuned("table", name, d, method, k, all_names)
            chosen[name, method] = best
            tuning += rows
            settings = [("tuned" if tune else "default", best)]
            if tune and method != "full" and default[method] != best:  # full's baseline is tuned; a default that
                settings.append(("default", default[method]))  # won on dev is the tuned row itself
            for which, lr in settings:
                for seed in seeds:
                    r = by_lr[lr] if seed == seeds[0] else train("table", name, d, config(method, lr, seed), k, "fp16", all_names)
                    table.append({"task": name, "kind": tasks[name].kind, "method": method, "setting": which, "lr": lr,
                                  "seed": seed, **r})
    res["tuning"], res["runs"] = tuning, table
    ingest_key = {**base, "what": "ingest", "layer": k, "codec": "fp16", "tasks": list(all_names)}
    res["ingest_seconds"] = done.measure(ingest_key, lambda: {"seconds": round(_ingest(tasks, str(work / "timed"), path, k,
                                                                                        "fp16", device), 2)})["seconds"]
    log(f"ingesting {len(tasks)} task slices at k={k}: {res['ingest_seconds']} s")
    res["paired"] = _paired(table, "tuned") + _paired(table, "default")

    probe, at_k = {}, []
    firsts = [next((d for n, d in zip(tasks, dirs) if tasks[n].kind == kind), None) for kind in ("classification", "ner")]
    for first in (f for f in firsts if f is not None and extras):
        probe[first.name] = {}
        for method in ("reduced", "lora"):
            lr = chosen[first.name, method]
            probe[first.name][method] = [{"layer": layer, "lr": lr, **train("vs_k", first.name, first, config(method, lr, seeds[0]),
                                                                   layer, "fp16", (first.name,))}
                                         for layer in vs_k]
        full = [r for r in table if r["task"] == first.name and r["method"] == "full"]
        for layer in seeds_at_k:
            # tuned at this k as at the section's (dev, seed 0, the same grid): fewer frozen layers may want another
            # rate; then every seed at it, and at the shipped default where it differs: the rate a user gets
            at = {}
            for m in ("reduced", "lora"):
                at[m], _, rows = tuned("vs_k", first.name, first, m, layer, (first.name,))
                res.setdefault("at_k_tuning", []).extend({**r, "layer": layer} for r in rows)
            runs_at = [(m, f"k={layer}", at[m]) for m in ("reduced", "lora")]
            runs_at += [(m, f"k={layer} default", default[m]) for m in ("reduced", "lora") if tune and default[m] != at[m]]
            rows = [{"task": first.name, "method": method, "setting": setting, "layer": layer, "lr": lr, "seed": seed,
                     **train("vs_k", first.name, first, config(method, lr, seed), layer, "fp16", (first.name,))}
                    for method, setting, lr in runs_at for seed in seeds]
            at_k += [{**p, "layer": layer} for s in (f"k={layer}", f"k={layer} default") for p in _paired(full + rows, s)]
            res.setdefault("at_k_runs", []).extend(rows)
    res["vs_k"], res["at_k"] = probe, at_k
    res["vs_k_layers"] = None if len(vs_k) == num_layers else vs_k  # every k: the default, not named in the report

    res["codecs"] = {}
    if firsts[0] is not None and extras:
        first, lr = firsts[0], chosen[firsts[0].name, "reduced"]
        for codec in ("fp32", "fp16", "int8"):
            res["codecs"][codec] = {"task": first.name, **train("codec", first.name, first, config("reduced", lr, seeds[0]),
                                                                k, codec, (first.name,))}
    res["break_even"] = _break_even(res)
    res["when"] = _span(res)
    shutil.rmtree(work, ignore_errors=True)  # caches and models of the runs: the figures are in `res`
    return res


def keyed(c: TrainConfig, train_examples: int) -> dict:
    """The config as the run log keys it. A min_steps that adds no epoch (the cap already runs that many steps)
    leaves the run as it was, so it keys as 0: a new default misses only the runs it lengthens."""
    d = c.to_dict()
    if c.max_epochs(-(-train_examples // c.batch_size)) == c.epochs:
        d["min_steps"] = 0
    return d


def _capped(r: dict) -> bool:
    """The run's best dev epoch was its last: the cap ended it, not early stopping, so it may not have converged."""
    return r["best_epoch"] == r["epochs_run"]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _paired(runs: list[dict], setting: str) -> list[dict]:
    """Per task and method at `setting` (tuned, or the shipped default): test metric mean +- std over seeds, and its
    paired difference to the tuned `full` (points)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in runs):
        full = {r["seed"]: r for r in runs if r["task"] == task and r["method"] == "full"}
        for method in METHODS:
            rs = [r for r in runs if r["task"] == task and r["method"] == method and r["setting"] == setting]
            if not rs:
                continue
            mean, std = _mean_std([r["test"] for r in rs])
            diff = [100 * (r["test"] - full[r["seed"]]["test"]) for r in rs if r["seed"] in full]
            dm, ds = _mean_std(diff) if diff else (None, None)
            macro = [r["test_macro_f1"] for r in rs if r["test_macro_f1"] is not None]
            out.append({"task": task, "method": method, "setting": setting, "lr": rs[0]["lr"], "metric": rs[0]["metric"],
                        "mean": mean, "std": std, "diff_points": dm, "diff_std": ds,
                        "macro_f1": statistics.fmean(macro) if macro else None,
                        "epochs": [f"{r['best_epoch']}/{r['epochs_run']}" for r in rs],
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
    probes = [r for by in res["vs_k"].values() for rs in by.values() for r in rs]
    every = (res["runs"] + res["tuning"] + probes + res.get("at_k_runs", []) + res.get("at_k_tuning", [])
             + list(res["codecs"].values()))
    whens = sorted([r["when"] for r in every] + [r["longer_when"] for r in every if "longer_when" in r])
    return whens[0] if whens[0] == whens[-1] else f"from {whens[0]} to {whens[-1]}"


def _dev_by_lr(rows: list[dict], at_k: bool = False) -> str:
    """`task method: lr dev, lr dev*, ...` per task and method (and layer, at_k), the chosen rate starred."""
    def group(r):
        return (f"k={r['layer']} " if at_k else "") + f"{r['task']} {r['method']}"

    return "; ".join(f"{g}: " + ", ".join(f"{r['lr']:g} {r['dev']:.4f}{'*' if r['chosen'] else ''}" for r in rows if group(r) == g)
                     for g in dict.fromkeys(map(group, rows)))


def verdict(diff: float) -> str:
    """A paired gap to `full`, in points, against the goal."""
    return "met" if diff >= -GOAL_POINTS else f"missed by {-GOAL_POINTS - diff:.2f}"


def _goal(p: dict) -> str:
    return f"{p['task']} {p['method']} {p['diff_points']:+.2f}: " + verdict(p["diff_points"])


def _head(cfg: dict) -> str:
    return "" if cfg.get("head_lr") is None else f", head at {cfg['head_lr']:g}"


def report(res: dict, plots: list[str], section: str = "fidelity") -> str:
    lim = ", ".join(f"{k} {v}" for k, v in res["limit"].items()) + ("" if "test" in res["limit"] else ", test all")
    d = res["defaults"]
    lora = d["lora"]
    own = section != "fidelity" and "tasks" in res  # a section of its own: say which tasks, and how to remake it
    title = "Fidelity and cost of recycling" + (f": {', '.join(res['tasks'])} ({res['model']})" if own else "")
    args = ((" --quick" if res["quick"] else "") + ("" if res["model"] == "bundled" else f" --model {res['model']}")
            + (f" --tasks {' '.join(res['tasks'])}" if own else "")
            + ("" if res["quick"] else "".join(f" --{s} {n}" for s, n in res["limit"].items() if FULL_LIMIT.get(s) != n))
            + ("" if res["vs_k"] or res["quick"] else " --no-extras")
            + "".join(f" --seeds-at-k {k}" for k in dict.fromkeys(p["layer"] for p in res.get("at_k", [])))
            + (f" --vs-k {' '.join(map(str, res['vs_k_layers']))}" if res.get("vs_k_layers") is not None else "")
            + ("" if res["converge"]["epochs"] == CONVERGE["epochs"] or res["quick"] else f" --epochs {res['converge']['epochs']}")
            + ("" if res.get("tuned", True) else " --no-tune") + (f" --section {section}" if own else ""))
    # results from before EXTEND carry no "extended_from" anywhere and were not extended: say so only where it applied
    extend_note = "" if res["quick"] or "extend" not in res else \
        f", or {res['extend']}x that for a run still improving at the cap"
    kept, base = _main_setting(res), "the tuned `full`" if res.get("tuned", True) else "`full` at its default"
    vs = "vs tuned full" if kept == "tuned" else "vs full at its default"  # the column heading
    how = ((f"Tuned on dev (seed {res['seeds'][0]}) over lr " + "; ".join(f"{m} {', '.join(f'{x:g}' for x in g)}"
                                                                       for m, g in res["grids"].items())
            + "; the other seeds then ran at the dev-chosen rate") if kept == "tuned"
           else "Not tuned (--no-tune): every method at its shipped default lr")
    lines = [f"## {title} (`python -m benchmarks.bench_fidelity{args}`)", "",
             f"{res['model']}, L={res['num_layers']}, k={res['k']}, fp16 cache; task slices: {lim}; seeds {res['seeds']}; "
             f"every run at most {res['converge']['epochs']} epochs with early stopping on dev (patience "
             f"{res['converge']['patience']}){extend_note}. {how}. Shipped defaults: lr full {d['full']['lr']:g}, reduced "
             f"{d['reduced']['lr']:g}, lora {lora['lr']:g} (LoRA {lora['lora_modules']}, r{lora['lora_r']}/{lora['lora_alpha']}, "
             f"at least {lora['min_steps']} steps{_head(lora)}); batch {d['reduced']['batch_size']}, warmup {d['reduced']['warmup_ratio']}. "
             f"Measured {res['when']} on {res['device']}, one process, one run after another (a rerun keeps the runs already in "
             f"`results/fidelity-runs.jsonl`); wall time is `finetune` from its call to metrics.json.", "",
             f"| task | method | setting | lr | test metric (mean ± std) | {vs}, points (paired, mean ± std) | macro-F1 "
             "| best epoch / run | wall s | train ex/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["paired"]:
        diff = "" if p["method"] == "full" or p["diff_points"] is None else f"{p['diff_points']:+.2f} ± {p['diff_std']:.2f}"
        macro = "" if p["macro_f1"] is None else f"{p['macro_f1']:.3f}"
        lines.append(f"| {p['task']} | {p['method']} | {p['setting']} | {p['lr']:g} | {p['metric']} {p['mean']:.4f} ± "
                     f"{p['std']:.4f} | {diff} | {macro} | {', '.join(p['epochs'])} | {p['wall_seconds']:.1f} | "
                     f"{p['train_examples_per_second']:.1f} |")
    for setting in ("tuned", "default"):
        ps = [p for p in res["paired"] if p["setting"] == setting and p["method"] != "full" and p["diff_points"] is not None]
        if ps:
            lines += ["", f"Goal, {setting}: `reduced` and `lora` within {GOAL_POINTS} point of {base} (paired mean): "
                      + "; ".join(_goal(p) for p in ps) + "."]
    lines += ["", "Dev by lr (seed 0; * chosen): " + _dev_by_lr(res["tuning"])]
    probes = [{**r, "task": t, "method": m, "seed": res["seeds"][0]} for t, by in res["vs_k"].items()
              for m, rows in by.items() for r in rows]

    def named(r):
        return f"{r['task']} {r['method']} lr {r['lr']:g} seed {r['seed']}" + (f" k={r['layer']}" if "layer" in r else "")

    cap = res["converge"]["epochs"]
    every = res["runs"] + probes + res.get("at_k_runs", []) + res["tuning"] + res.get("at_k_tuning", [])
    # a probe's first seed is also an at-k run, and a tuning run also a table run: each named once
    extended = list(dict.fromkeys(named(r) for r in every if "extended_from" in r))
    shorter = list(dict.fromkeys(f"{named(r)} (dev {r['dev']:.4f}, at {cap * res['extend']}: {r['longer_dev']:.4f})"
                                 for r in every if "longer_dev" in r))
    capped = list(dict.fromkeys(named(r) for r in every if _capped(r) and "longer_dev" not in r))
    if extended or shorter:
        lines += ["", f"Ended at the {cap}-epoch cap with dev still rising, so run again with at most {cap * res['extend']} epochs "
                      "(a longer schedule, since the lr decays over the whole run); the longer run is reported only where it "
                      "did better on dev, each seed's run on its own."
                  + (f" The longer: {'; '.join(extended)}." if extended else "")
                  + (f" The {cap}-epoch one, not worse on dev: {'; '.join(shorter)}." if shorter else "")]
    if capped:
        lines += ["", f"Still improving at the last epoch run (not converged): {'; '.join(capped)}."]
    kinds, majority = res.get("kinds", {}), res.get("majority_dev", {})
    nothing = list(dict.fromkeys(f"{named(r)} (dev {r['dev']:.4f})" for r in every if r["dev"] is not None and r["task"] in kinds
                                 and nothing_learned(kinds[r["task"]], {r["metric"]: r["dev"]}, majority.get(r["task"]))))
    if nothing:
        lines += ["", "**Learned nothing** (dev no better than always predicting the most frequent label, or an F1 of 0): "
                  f"{'; '.join(nothing)}. Such a run measures a failure to train, not the method: its rate (or its "
                  "schedule) does not suit this task and encoder."]
    for task, by in res["vs_k"].items():
        for method, rows in by.items():
            lines += ["", f"Accuracy vs k, {task} (`{method}` at lr {rows[0]['lr']:g}, seed {res['seeds'][0]}): "
                      + ", ".join(f"k={r['layer']}: {r['test']:.4f}" for r in rows)]
    if res.get("at_k"):
        lines += ["", "At the k's where the curve puts parity, every seed (a cache of the task's slice at k; paired by seed "
                  f"to {base} rows of the table, which read text, so k does not enter them):", "",
                  f"| task | k | method | setting | lr | test metric (mean ± std) | {vs}, points (paired, mean ± std) "
                  "| best epoch / run |", "|---|---|---|---|---|---|---|---|"]
        for p in res["at_k"]:
            setting = "default" if p["setting"].endswith("default") else f"{kept} at k={p['layer']}"
            lines.append(f"| {p['task']} | {p['layer']} | {p['method']} | {setting} | {p['lr']:g} | {p['metric']} {p['mean']:.4f} ± "
                         f"{p['std']:.4f} | {p['diff_points']:+.2f} ± {p['diff_std']:.2f} | {', '.join(p['epochs'])} |")
        if res.get("at_k_tuning") and kept == "tuned":
            lines += ["", "Dev by lr at those k's (seed 0; * chosen): " + _dev_by_lr(res["at_k_tuning"], at_k=True)]
        lines += ["", f"Goal at those k's: within {GOAL_POINTS} point of {base}: "
                  + "; ".join(f"k={p['layer']}{' (default lr)' if p['setting'].endswith('default') else ''} " + _goal(p)
                             for p in res["at_k"]) + "."]
    if res["codecs"]:
        c = res["codecs"]
        lines += ["", f"Codec cost, {next(iter(c.values()))['task']} (`reduced`, seed {res['seeds'][0]}): "
                  + ", ".join(f"{name} {r['test']:.4f}" for name, r in c.items())]
    ideal = _ideal(res)
    lines += ["", f"Training speed vs `full` (mean examples/s of the {kept} rows; ideal L/(L-k) = {ideal:.2f}): " + "; ".join(
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


def plot(res: dict, folder: Path, prefix: str = "fidelity") -> list[str]:
    """PNG plots next to the report; none (and a note) without matplotlib (pip install 'er[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install -e '.[bench]')")
        return []
    names = []
    tuned = [p for p in res["paired"] if p["setting"] == _main_setting(res)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    tasks = list(dict.fromkeys(p["task"] for p in tuned))
    for i, method in enumerate(METHODS):
        ps = [next(p for p in tuned if p["task"] == t and p["method"] == method) for t in tasks]
        ax.bar([j + 0.27 * (i - 1) for j in range(len(tasks))], [p["mean"] for p in ps], 0.27,
               yerr=[p["std"] for p in ps], label=method, capsize=3)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(f"test main metric ({_main_setting(res)})")
    ax.legend()
    names.append(_save(fig, folder, f"{prefix}_accuracy.png"))
    if res["vs_k"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for task, by in res["vs_k"].items():
            for method, rows in by.items():
                ax.plot([r["layer"] for r in rows], [r["test"] for r in rows], marker="o", label=f"{task} {method}")
        ax.set_xlabel("k (layers cached)")
        ax.set_ylabel("test main metric")
        ax.legend()
        names.append(_save(fig, folder, f"{prefix}_vs_k.png"))
    b = res["break_even"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ns = list(range(1, 11))
    ax.plot(ns, [b["ingest_seconds"] + n * b["reduced_seconds"] for n in ns], marker="o", label="1 ingestion + N reduced")
    ax.plot(ns, [n * b["full_seconds"] for n in ns], marker="o", label="N full")
    ax.set_xlabel("N tasks on the same texts")
    ax.set_ylabel("wall seconds")
    ax.legend()
    names.append(_save(fig, folder, f"{prefix}_break_even.png"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sp = _speedups(res)
    for i, method in enumerate(("reduced", "lora")):
        ax.bar([j + 0.4 * (i - 0.5) for j in range(len(tasks))], [sp[t][method] for t in tasks], 0.4, label=f"{method} / full")
    ax.axhline(_ideal(res), color="k", linestyle="--", label=f"ideal L/(L-k) = {_ideal(res):.2f}")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("training examples/s vs full")
    ax.legend()
    names.append(_save(fig, folder, f"{prefix}_speed.png"))
    return names


def _main_setting(res: dict) -> str:
    """The rows every method has: tuned on dev, or (--no-tune) the shipped defaults."""
    return "tuned" if res.get("tuned", True) else "default"


def _ideal(res: dict) -> float:
    return res["num_layers"] / (res["num_layers"] - res["k"])


def _speedups(res: dict) -> dict:
    """Per task: mean training examples/s of each method over that of `full` (the table's main rows, side by side)."""
    by = {(p["task"], p["method"]): p["train_examples_per_second"] for p in res["paired"] if p["setting"] == _main_setting(res)}
    return {t: {m: by[t, m] / by[t, "full"] for m in METHODS} for t in dict.fromkeys(t for t, _ in by)}


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / name, dpi=100)
    return name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of task folders")
    ap.add_argument("--tasks", nargs="+", help="only these task folders of --data (default: all)")
    ap.add_argument("--model", default="bundled", help="bundled (MiniLM, L=6), mpnet (all-mpnet-base-v2, L=12; "
                    "`make models`) or a model path")
    ap.add_argument("--k", type=int, help="layer of the cache (default L/2)")
    ap.add_argument("--train", type=int, default=FULL_LIMIT["train"], help="training examples per task")
    ap.add_argument("--dev", type=int, default=FULL_LIMIT["dev"], help="dev examples per task (tuning, early stopping)")
    ap.add_argument("--test", type=int, help="test examples per task (default: the whole split)")
    ap.add_argument("--no-extras", action="store_true", help="the table only: no accuracy vs k, no codec cost")
    ap.add_argument("--seeds-at-k", type=int, nargs="+", default=[], metavar="K",
                    help="layers at which the lr is tuned again on dev and accuracy vs k runs every seed, paired to "
                         "the tuned full (e.g. where the curve puts parity for NER); for both of its tasks, the first "
                         "classification and first NER")
    ap.add_argument("--vs-k", type=int, nargs="+", metavar="K", help="accuracy vs k at these layers only (default: "
                    "every k, seed 0: L runs per method, hours for a 12-layer model on CPU)")
    ap.add_argument("--epochs", type=int, help=f"epoch cap of every run (default {CONVERGE['epochs']}; early stopping "
                    f"on dev usually ends a run first, and a run still improving at the cap runs again with {EXTEND}x it)")
    ap.add_argument("--no-tune", action="store_true", help="every method at its shipped default lr only, 3 seeds: "
                    "a third of the runs (e.g. for the 12-layer model on CPU); compared with `full` at its default")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    ap.add_argument("--section", default="fidelity", help="REPORT section (and plot file prefix) to write")
    ap.add_argument("--quick", action="store_true", help="tiny slices, 2 seeds, 1 epoch, the default lr only")
    ap.add_argument("--out", type=Path, default=HERE / "REPORT.md")
    ap.add_argument("--fresh", action="store_true", help="measure everything again, ignoring results/fidelity-runs.jsonl")
    args = ap.parse_args(argv)
    if args.seeds_at_k and args.no_extras:
        ap.error("--seeds-at-k runs with accuracy vs k, which --no-extras leaves out")
    if args.vs_k and args.no_extras:
        ap.error("--vs-k is a part of accuracy vs k, which --no-extras leaves out")
    if args.no_tune and args.quick:
        ap.error("--quick runs the default lr only already")
    if args.epochs and args.quick:
        ap.error("--quick runs 1 epoch; --epochs is for the full runs")
    runs = args.out.parent / "results" / ("fidelity-runs-quick.jsonl" if args.quick else "fidelity-runs.jsonl")
    if args.fresh:
        runs.unlink(missing_ok=True)
    limit = None if args.quick else {"train": args.train, "dev": args.dev, **({"test": args.test} if args.test else {})}
    res = run(args.data, quick=args.quick, seeds=(0, 1) if args.quick else (0, 1, 2), limit=limit, runs=runs,
              model=args.model, k=args.k, only=args.tasks, extras=not args.no_extras, device=args.device,
              seeds_at_k=tuple(args.seeds_at_k), epochs=args.epochs, tune=not args.no_tune,
              vs_k=tuple(args.vs_k) if args.vs_k else None)
    (args.out.parent / "results").mkdir(exist_ok=True)
    (args.out.parent / "results" / f"{args.section}.json").write_text(json.dumps(res, indent=1))
    write_section(args.section, report(res, plot(res, args.out.parent, args.section), args.section), args.out)


if __name__ == "__main__":
    main()
