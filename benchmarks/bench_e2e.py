"""`er train` end to end: `reduced` (from the cache) vs `full` (from raw text), wall time of the whole command.

    python -m benchmarks.bench_e2e [TASK_DIR] [--limit 800] [--epochs 2] [--repeats 2] [--profile] [--quick] [--work DIR]

What is measured: the wall time of `python -m pipelines.cli train --cache C --task TASK --out OUT
--method reduced|full --workers 1 --epochs E --limit L`, run as a subprocess the way a user runs it
(each run starts its own local Ray), from Popen to exit (by then `OUT/metrics.json` is written): Ray
start-up, model loading, reading and tokenizing the task, locating and reading its cached rows,
TorchTrainer start-up, the training loop, dev evaluation every epoch, the final dev + test
evaluation, checkpoints and saving the model all count. Beside it, the training-loop time
(`train_seconds` in each run's metrics.json). The end-to-end ratio is full wall / reduced wall, the
loop ratio full train_seconds / reduced train_seconds of the same runs (medians over repeats); the
goal is e2e >= 80% of loop, with either cache. `--profile` runs `er train` (pipelines.cli.main)
with timers around its phases in the driver and the Ray Train worker instead, and reports where
the wall time goes.

Size: --limit 800 (the first 800 examples of each split) and 2 epochs. The fixed costs of a run
(imports, Ray start-up, TorchTrainer start-up, exit: about 50 s on this 2-core machine, more when
it is loaded) are the same for both methods, so the e2e ratio tends to the loop ratio only when the
training loop dominates them: at 800 x 2 the `reduced` loop is 2-3x the fixed costs, and a run takes
3-5 minutes (`full` about twice as long). One epoch is a poor choice: the dev + test evaluations
then cost about as much as the training itself.

Two caches of the bundled MiniLM cut at k=3 (fp16), built first (not timed):
  * task-only: `er ingest TASK --cache C1 --model bundled --layer 3` (every split of the task);
  * 30x: a copy of C1 plus 29x as many filler rows, written through `er_core.store.CacheWriter`
    (random keys, 16-64 random token ids, random normal states of width H, fp16; shards of 512 rows
    and a commit every 16 shards, as `er ingest` writes them). The encoder never runs for filler
    rows: training reads only the task's rows, so their values do not matter, only their number and
    bytes. The task's rows stay in their own shards, as after `er ingest TASK` into a big cache.
`full` trains from raw text, so only `reduced` pays for the bigger cache. Runs interleave
(reduced, full, reduced, full, ...), the cache-size blocks one after the other. TASK_DIR defaults
to the first classification task (by name) under ../shared/data/tasks.

Results: benchmarks/results/e2e.json and the `e2e-train` section of benchmarks/REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tasks"
RESULTS = ROOT / "benchmarks" / "results" / "e2e.json"
SECTION = "e2e-train"
GOAL = 0.8  # e2e ratio / loop ratio
FILLER_SHARD_ROWS, FILLER_COMMIT_EVERY = 512, 16


def default_task(data: Path = DATA) -> Path:
    """The first classification task folder (by name) under `data`."""
    from er_core import load_task

    for d in sorted(p for p in Path(data).iterdir() if p.is_dir()):
        try:
            if load_task(d, limit=1).kind == "classification":
                return d
        except Exception:  # noqa: BLE001 - not a task folder
            continue
    raise SystemExit(f"no classification task folder under {data}; pass TASK_DIR")


def _env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}


def _er(args: list[str], log: Path, profile: bool = False) -> float:
    """Run `python -m pipelines.cli ARGS` to completion (or its profiled twin); its wall seconds (Popen to exit)."""
    cmd = [sys.executable, "-c", _PROFILED] if profile else [sys.executable, "-m", "pipelines.cli"]
    env = _env()
    t0 = time.perf_counter()
    env["ER_PROFILE_T0"] = repr(time.time())
    with open(log, "w") as out:
        rc = subprocess.Popen([*cmd, *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env).wait()
    wall = time.perf_counter() - t0
    if rc in (-15, -9, 143, 137):
        raise Interrupted(f"ended by signal (exit status {rc})")
    if rc != 0:
        raise RuntimeError(f"er {' '.join(args)} failed ({rc}):\n" + log.read_text()[-3000:])
    return wall


def add_filler(cache: Path, rows: int, seed: int = 0) -> dict:
    """Add `rows` filler rows to `cache`: random keys, 16-64 random ids, random fp16-range states."""
    from er_core import open_cache
    from er_core.store.writer import CacheWriter

    spec = open_cache(str(cache)).spec
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((4096, spec.hidden_size), dtype=np.float32)  # sliced, not regenerated
    t0, done = time.perf_counter(), 0
    writer = CacheWriter(str(cache), spec, shard_rows=FILLER_SHARD_ROWS)
    try:
        while done < rows:
            n = int(rng.integers(16, 65))
            start = int(rng.integers(0, len(pool) - n))
            writer.add(f"filler-{seed}-{done}-{rng.integers(1 << 62):x}", rng.integers(1000, 30000, n, dtype=np.int32),
                       pool[start:start + n])
            done += 1
            if done % (FILLER_SHARD_ROWS * FILLER_COMMIT_EVERY) == 0:
                writer.commit()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def _cache_stats(cache: Path) -> dict:
    from er_core import open_cache

    m = open_cache(str(cache)).manifest
    return {"rows": m.totals["rows"], "bytes": m.totals["bytes"], "shards": m.totals["shards"], "index_segments": len(m.index)}


def build_caches(task: Path, work: Path, factor: int = 30) -> dict:
    """C1 (the task only, via `er ingest`) and C30 (C1 + (factor-1) x its rows of filler); reused if `work` holds them."""
    c1, big = work / "cache-task", work / f"cache-{factor}x"
    info_file = work / "caches.json"
    if info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("task") == str(task) and info.get("factor") == factor:
            return info
    for c in (c1, big):
        shutil.rmtree(c, ignore_errors=True)
    ingest_s = _er(["ingest", str(task), "--cache", str(c1), "--model", "bundled", "--layer", "3"], work / "ingest.log")
    shutil.copytree(c1, big)
    base = _cache_stats(c1)
    filler = add_filler(big, base["rows"] * (factor - 1))
    info = {"task": str(task), "factor": factor, "ingest_seconds": round(ingest_s, 1), "filler": filler,
            "caches": {"task-only": {"path": str(c1), **base}, f"{factor}x": {"path": str(big), **_cache_stats(big)}}}
    info_file.write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------- phases of one run (--profile)
# A profiled run is `er train` (pipelines.cli.main) with timers around its phases, in the driver and, through a
# wrapper of the training function, in the Ray Train worker. Those timers print `PROFILE name|start|end` lines
# (seconds since Popen); `phases` turns them into a breakdown of the wall time.

_T0 = 0.0
_PROFILED = "import sys; from benchmarks import bench_e2e; sys.exit(bench_e2e._profiled_main(sys.argv[1:]))"


def _mark(name: str, a: float, b: float, t0: float) -> None:
    print(f"PROFILE {name}|{a - t0:.3f}|{b - t0:.3f}", flush=True)


def _timed(obj, attr: str, name: str, t0: float) -> None:
    f = getattr(obj, attr)

    def timed(*a, **k):
        s = time.time()
        try:
            return f(*a, **k)
        finally:
            _mark(name, s, time.time(), t0)

    setattr(obj, attr, timed)


def _profiled_loop(config: dict) -> None:
    """The Ray Train worker's function, timed (pickled by value: this module is __main__ in a profiled run)."""
    import ray.train

    import er_core.evaluate
    import er_core.train
    import pipelines.train_ray

    ft = sys.modules["er_core.finetuning"]
    for obj, attr in ((ft, "load_checked_encoder"), (er_core.train, "build_model"), (er_core.train, "fit"),
                      (er_core.evaluate, "evaluate"), (er_core.train, "save_state"), (ft, "run_metrics"),
                      (ft, "save_artifact"), (ray.train, "report")):
        _timed(obj, attr, f"worker {attr}", _T0)
    s = time.time()
    pipelines.train_ray.train_loop_per_worker(config)
    _mark("worker loop", s, time.time(), _T0)


def _profiled_main(argv: list[str]) -> int:
    global _T0
    _T0 = float(os.environ["ER_PROFILE_T0"])
    import ray.cloudpickle
    import ray.data
    import ray.train.torch

    import pipelines.cli
    import pipelines.ray_env
    import pipelines.train_ray as tr

    for obj, attr in ((pipelines.ray_env, "ensure_ray"), (pipelines.ray_env, "_shutdown"), (tr, "setup_data"),
                      (tr, "train_dataset"), (ray.data.Dataset, "materialize"), (ray.train.torch.TorchTrainer, "fit")):
        _timed(obj, attr, attr, _T0)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker gets the timed loop without this module
    tr.train_loop_per_worker = _profiled_loop
    s = time.time()
    rc = pipelines.cli.main(argv)
    _mark("main", s, time.time(), _T0)
    return rc


def phases(log: str, wall: float, train_seconds: float) -> dict:
    """Where the wall time of a profiled run went, in seconds (the phases add up to the wall time)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for line in dict.fromkeys(x.split("PROFILE ", 1)[1] for x in log.splitlines() if "PROFILE " in x):  # workers echo twice
        name, a, b = line.rsplit("|", 2)
        spans.setdefault(name, []).append((float(a), float(b)))

    def one(name, i=0):
        return spans[name][i]

    fit = one("worker fit")
    in_fit = [s for s in spans.get("worker evaluate", []) if fit[0] <= s[0] <= fit[1]]
    ckpt = [s for n in ("worker save_state", "worker report") for s in spans.get(n, []) if fit[0] <= s[0] <= fit[1]]
    dur = lambda ss: sum(b - a for a, b in ss)  # noqa: E731
    ray0, ray1 = one("ensure_ray")
    mat = spans.get("materialize", [(ray1, ray1)])[0]  # full: from_items, materialized in the driver at once
    out = {
        "start-up to Ray init (python, imports, session reap, output claim)": ray0,
        "Ray start-up": ray1 - ray0,
        "task + cache in the driver (model load, tokenize, locate)": mat[0] - ray1,
        "materialize train rows (Ray Data)": mat[1] - mat[0],
        "TorchTrainer start-up + worker model load": fit[0] - mat[1],
        "training loop (fit less the below)": dur([fit]) - dur(in_fit) - dur(ckpt),
        "dev evaluation each epoch": dur(in_fit),
        "epoch checkpoints": dur(ckpt),
        "final dev + test evaluation": dur(spans["worker run_metrics"]),
        "save model, end Ray Train, move output": one("main")[1] - spans["worker run_metrics"][0][1],
        "exit (ray.shutdown)": wall - one("main")[1],
    }
    out = {k: round(v, 1) for k, v in out.items()}
    out["train_seconds (metrics.json)"] = train_seconds
    return out


class Interrupted(RuntimeError):
    """A run ended by a signal from outside, or one whose Ray Train worker was restarted: not a valid measurement."""


def train_run(cache: str, task: Path, method: str, out: Path, epochs: int, limit: int, log: Path, profile: bool = False,
              tries: int = 3) -> dict:
    """One timed `er train`. A run killed from outside (SIGTERM/SIGKILL) or whose worker Ray Train had to restart is
    discarded and run again (at most `tries` times in all); how many were discarded is recorded."""
    args = ["train", "--cache", cache, "--task", str(task), "--out", str(out), "--method", method, "--workers", "1",
            "--epochs", str(epochs), "--limit", str(limit)]
    for attempt in range(tries):
        shutil.rmtree(out, ignore_errors=True)
        started = time.time()
        try:
            try:
                wall = _er(args, log, profile)
            except RuntimeError:
                if any(t >= started for t in _SIGTERMS):  # the same stray signal hit this benchmark too
                    raise Interrupted("failed after a SIGTERM from outside") from None
                raise
            m = json.loads((out / "metrics.json").read_text())
            if m.get("resumed"):
                raise Interrupted(f"its Ray Train worker was restarted from a checkpoint: {m['resumed']}")
            break
        except Interrupted as e:
            print(f"discarded a {method} run ({e}); running it again", file=sys.stderr, flush=True)
            log.rename(log.with_suffix(f".discarded-{attempt}.log"))
    else:
        raise RuntimeError(f"{tries} {method} runs in a row were interrupted from outside; see {log.parent}")
    r = {"wall_seconds": round(wall, 1), "train_seconds": m["train_seconds"], "epochs_run": len(m["history"]), "discarded": attempt,
         "train_examples_per_second": m["train_examples_per_second"], "first_step_at": m.get("first_step_at")}
    r["outside_loop_seconds"] = round(wall - m["train_seconds"], 1)
    if profile:
        r["phases"] = phases(log.read_text(), wall, m["train_seconds"])
    shutil.rmtree(out, ignore_errors=True)
    return r


def run(task: Path | None = None, limit: int = 800, epochs: int = 2, repeats: int = 2, factor: int = 30, quick: bool = False,
        work: Path | None = None, out_json: Path | None = RESULTS, report: Path | None = None, profile: bool = False) -> dict:
    task = Path(task or default_task()).resolve()
    keep = work is not None
    work = Path(work or tempfile.mkdtemp(prefix="er-bench-e2e-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = build_caches(task, work, factor)
        runs: dict[str, dict[str, list[dict]]] = {}
        done_file = work / "runs.jsonl"  # finished runs: a re-run with the same --work and settings continues after them
        done = {}
        if keep and done_file.exists():
            done = {d["id"]: d["result"] for d in map(json.loads, done_file.read_text().splitlines())}
        for name, c in info["caches"].items():
            runs[name] = {"reduced": [], "full": []}
            for r in range(repeats):
                for method in ("reduced", "full"):
                    rid = json.dumps([name, method, r, limit, epochs, profile])
                    res = done.get(rid)
                    if res is None:
                        res = train_run(c["path"], task, method, work / "out", epochs, limit,
                                        work / f"train-{name}-{method}-{r}.log", profile)
                        res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
                        with open(done_file, "a") as f:
                            f.write(json.dumps({"id": rid, "result": res}) + "\n")
                    runs[name][method].append(res)
                    print(f"{name} {method} #{r + 1}: {res}", file=sys.stderr, flush=True)
        summary = {}
        for name, by in runs.items():
            med = {m: {k: statistics.median(x[k] for x in rs) for k in ("wall_seconds", "train_seconds")} for m, rs in by.items()}
            e2e = med["full"]["wall_seconds"] / med["reduced"]["wall_seconds"]
            loop = med["full"]["train_seconds"] / med["reduced"]["train_seconds"]
            summary[name] = {"median": med, "e2e_ratio": round(e2e, 3), "loop_ratio": round(loop, 3),
                             "e2e_over_loop": round(e2e / loop, 3), "met": e2e / loop >= GOAL}
            if profile:
                summary[name]["median_phases"] = {m: {ph: round(statistics.median(x["phases"][ph] for x in rs), 1)
                                                      for ph in rs[0]["phases"]} for m, rs in by.items()}
        names = list(summary)
        result = {
            "what": "`er train` wall time (command start to exit, metrics.json written), reduced vs full",
            "quick": quick,
            "machine_cores": os.cpu_count(),
            "task": task.name,
            "model": "bundled MiniLM (all-MiniLM-L6-v2), k=3, fp16 cache",
            "settings": {"limit": limit, "epochs": epochs, "workers": 1, "repeats": repeats},
            "caches": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in info["caches"].items()},
            "cache_build": {k: info[k] for k in ("ingest_seconds", "ingest_note", "filler") if k in info},
            "runs": runs,
            "summary": summary,
            "profiled": profile,
            # the cost of the bigger cache to the same reduced run
            "reduced_wall_bigger_cache": round(summary[names[1]]["median"]["reduced"]["wall_seconds"]
                                               / summary[names[0]]["median"]["reduced"]["wall_seconds"], 3),
            "goal": f"e2e ratio >= {GOAL:.0%} of the loop ratio, with either cache",
            "met": all(s["met"] for s in summary.values()),
            "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    if report:
        from .report import write_section

        write_section(SECTION, markdown(result), report=report)
    return result


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"## `er train` end to end: reduced vs full ({r['task']}, limit {s['limit']}, {s['epochs']} epochs, 1 worker)",
        "",
        f"Wall time of the whole `er train` command (Popen to exit: Ray start-up, model and data loading, training, "
        f"evaluation, saving) beside the training loop alone (`train_seconds`); {r['model']}; median of {s['repeats']} "
        f"interleaved runs. `python -m benchmarks.bench_e2e`{' --quick' if r['quick'] else ''}, {r['measured']}, "
        f"{r['machine_cores']} cores.",
        "",
        "| cache | rows / GB | reduced wall s | full wall s | **e2e ratio** | reduced loop s | full loop s | loop ratio | e2e / loop (goal >= 80%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in r["summary"].items():
        c, m = r["caches"][name], x["median"]
        lines.append(f"| {name} | {c['rows']:,} / {c['bytes'] / 1e9:.1f} | {m['reduced']['wall_seconds']:.1f} | "
                     f"{m['full']['wall_seconds']:.1f} | **{x['e2e_ratio']:.2f}x** | {m['reduced']['train_seconds']:.1f} | "
                     f"{m['full']['train_seconds']:.1f} | {x['loop_ratio']:.2f}x | {x['e2e_over_loop']:.0%} "
                     f"{'(met)' if x['met'] else '(NOT met)'} |")
    lines += ["", f"The same `reduced` run with the bigger cache takes {r['reduced_wall_bigger_cache']:.2f}x the wall time "
              f"of the task-only cache. Every run: `benchmarks/results/e2e.json`.", ""]
    if r.get("profiled"):
        cols = [(name, m) for name, x in r["summary"].items() for m in x["median_phases"]]
        ph = lambda n, m: r["summary"][n]["median_phases"][m]  # noqa: E731
        lines += ["Where the wall time goes (median per phase over the runs above, seconds; each run carried timers "
                  "around its phases, `--profile`):", "",
                  "| phase | " + " | ".join(f"{m}, {name}" for name, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for p in ph(*cols[0]):
            lines.append(f"| {p} | " + " | ".join(f"{ph(n, m)[p]:.1f}" for n, m in cols) + " |")
        lines.append("| **wall (median)** | " + " | ".join(f"**{r['summary'][n]['median'][m]['wall_seconds']:.1f}**"
                                                          for n, m in cols) + " |")
        lines.append("")
    return "\n".join(lines)


_SIGTERMS: list[float] = []  # when this benchmark received a SIGTERM (logged and ignored, see _log_sigterm)


def _log_sigterm(work: Path):
    """A long benchmark on a shared machine: a stray SIGTERM is logged (with what ran at that moment) and ignored;
    the run it hit is discarded and repeated (train_run). Ctrl-C (SIGINT) still stops the benchmark."""
    import signal

    def handler(signum, frame):
        _SIGTERMS.append(time.time())
        snap = subprocess.run(["ps", "-eo", "pid,ppid,etime,args"], capture_output=True, text=True).stdout
        f = work / f"sigterm-{time.strftime('%H%M%S')}.txt"
        f.write_text(snap)
        print(f"SIGTERM received at {time.strftime('%H:%M:%S')} and ignored; processes then: {f}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", nargs="?", help="classification task folder (default: the first under ../shared/data/tasks)")
    ap.add_argument("--limit", type=int, default=800, help="first N examples of each split")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per method and cache")
    ap.add_argument("--factor", type=int, default=30, help="the bigger cache holds this many times the task's rows")
    ap.add_argument("--quick", action="store_true", help="smoke run: limit 64, 1 epoch, 1 run each, a 3x cache, no report")
    ap.add_argument("--profile", action="store_true",
                    help="time every run phase by phase: `er train` (pipelines.cli.main) with timers around its phases")
    ap.add_argument("--work", help="keep caches, logs and finished runs here: a later run with the same task and settings "
                    "reuses the caches and continues after the runs already finished")
    ap.add_argument("--out", help=f"results JSON (default {RESULTS.relative_to(ROOT)}; none with --quick)")
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "REPORT.md"), help="markdown report for the section ('' for none)")
    a = ap.parse_args(argv)
    q = a.quick
    if a.work:
        Path(a.work).mkdir(parents=True, exist_ok=True)
        _log_sigterm(Path(a.work).resolve())
    res = run(Path(a.task) if a.task else None, limit=64 if q else a.limit, epochs=1 if q else a.epochs,
              repeats=1 if q else a.repeats, factor=3 if q else a.factor, quick=q, work=Path(a.work) if a.work else None,
              out_json=Path(a.out) if a.out else (None if q else RESULTS), report=Path(a.report) if a.report and not q else None, profile=a.profile)
    print(json.dumps(res, indent=1))
    for name, x in res["summary"].items():
        print(f"{name}: e2e {x['e2e_ratio']:.2f}x, loop {x['loop_ratio']:.2f}x, e2e/loop {x['e2e_over_loop']:.0%} "
              f"({'met' if x['met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
