"""A task's cost vs the cache's size: the bytes and time one training needs before its first step, at 10k, 50k and 200k cached examples.

    python -m benchmarks.bench_scale [--quick] [--repeats 2] [--out JSON] [--report MD]
    python -m benchmarks.bench_scale --simulate [--sizes 100000,1000000,10000000] [--no-s3]   (benchmarks/scale_sim.py)

Caches: the real key scheme, spec and codec (bundled MiniLM cut at k=3, fp16, H=384), written through
CacheWriter in 4096-row shards, committed every 16 shards like `er ingest`; random states stand in for
the encoder's. Each cache holds two synthetic classification tasks of 2,000 train + 200 dev + 200 test
short texts (real token ids, so training's key and length checks pass) among 16-token filler rows:
- `runs`: the task in runs of 64 rows (one row group each), the runs spread evenly over the whole
  cache, so they land in many shards (38 runs: every shard up to 50k, 38 of 49 at 200k), as a task
  ingested in batches among other corpora would;
- `scattered`: the task's rows spread evenly one by one, about one per row group (the adversarial case
  for reads of whole row groups; the store reads each row's own bytes, so it is no longer one).
Backends: local disk and S3 (SeaweedFS from tests/s3_server.py; the local cache is uploaded, its commit log last).

Each training (`pipelines.train_ray.train_on_ray`: 1 worker, `reduced`, 3 epochs) starts on a fresh
local Ray that is already up when the clock starts, so no run reuses another's warm readers; with
--repeats N each setting is trained N times, interleaved, and the fastest is reported (the machine is
shared). Bytes are counted in every process (driver, Ray Data tasks, Train workers) by
benchmarks/io_count.py, and only reads of the cache count: commit log, index and shards apart. Time to
first step is the worker's `first_step_at` minus the call. Acceptance: first-step bytes at most 2x the
task's own states at every size, nothing read after the first step (each row read once a run), and
first-step time growing at most 1.5x from the smallest cache to the largest; times are shown beside
the last run of the format-3 code (benchmarks/results/scale-format3.json).

Results: benchmarks/results/scale.json (--simulate: scale-simulate.json), and the `scale` section of
benchmarks/REPORT.md with its plot benchmarks/scale.png (both parts, whichever ran last). `--quick`
(caches of 2k, 5k, 10k rows, a 400-example task, one training each) is a smoke run and writes neither
unless --out / --report are given.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np

from . import io_count

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
SIM_RESULTS = ROOT / "benchmarks" / "results" / "scale-simulate.json"
BEFORE = ROOT / "benchmarks" / "results" / "scale-format3.json"  # the last run of the code before the store (format 3)
SIZES, QUICK_SIZES = (10_000, 50_000, 200_000), (2_000, 5_000, 10_000)
TASK, QUICK_TASK = {"train": 2000, "dev": 200, "test": 200}, {"train": 300, "dev": 50, "test": 50}
SHARD_ROWS, QUICK_SHARD_ROWS = 4096, 1024
COMMIT_EVERY = 16  # shards per commit, as `er ingest` does: a big cache has several index segments
FILLER_TOKENS = 16
LAYOUTS = ("runs", "scattered")
BACKENDS = ("local", "s3")
GOAL = 1.5  # first-step time, largest cache over smallest
OWN_GOAL = 2.0  # first-step bytes over the task's own states
WORDS = ("the of and to in is was with for on by that as at from this are it an or not protein gene disease cell "
         "patients drug binds cancer mutation results study method show effect level expression human receptor "
         "treatment increased reduced model data signal").split()


# ---------------------------------------------------------------- the synthetic cache


def write_task(folder: Path, sizes: dict, seed: int) -> Path:
    """A two-class JSONL task of short unique texts (the label word is in the text)."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for split, count in sizes.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(count):
                label = ("alpha", "beta")[i % 2]
                words = [rnd.choice(WORDS) for _ in range(rnd.randint(6, 9))]
                words.insert(rnd.randint(0, len(words)), label)
                n += 1
                f.write(json.dumps({"text": f"{' '.join(words)} t{seed} n{n}", "label": label}) + "\n")
    return folder


def task_rows(rec, folder: Path) -> list[tuple[str, np.ndarray]]:
    """(key, token ids) of every example of the task, exactly as training computes them."""
    from er_core import load_task
    from er_core.tasks import example_input

    task = load_task(folder)
    inputs = [example_input(e) for split in ("train", "dev", "test") for e in task.splits[split]]
    return [(rec.key(i), t.input_ids) for i, t in zip(inputs, rec.tokenize(inputs))]


def placement(n: int, n_runs: int, n_scattered: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the `runs` task (whole row groups, spread evenly) and the `scattered` one (one by one)."""
    from er_core.store.writer import GROUP_ROWS

    groups, need = n // GROUP_ROWS, math.ceil(n_runs / GROUP_ROWS)
    assert groups >= need, f"a cache of {n} rows cannot hold a task of {n_runs} rows in whole row groups"
    starts = np.arange(need) * groups // need * GROUP_ROWS
    runs = (starts[:, None] + np.arange(GROUP_ROWS)).ravel()[:n_runs]
    free = np.setdiff1d(np.arange(n), runs)
    scattered = free[np.linspace(0, len(free) - 1, n_scattered).round().astype(np.int64)]
    return runs, scattered


def build_cache(url: str, rec, n: int, rows_at: dict, shard_rows: int, seed: int) -> dict:
    """Write `n` rows (the tasks' rows at their positions, random filler elsewhere) through CacheWriter."""
    from er_core.store.writer import CacheWriter, encode_table, write_shard

    rng = np.random.default_rng(seed)
    t0, pending = time.perf_counter(), 0
    with CacheWriter(url, rec.spec, shard_rows=shard_rows) as w:
        for s0 in range(0, n, shard_rows):
            keys, ids = [], []
            for p in range(s0, min(n, s0 + shard_rows)):
                k, i = rows_at.get(p) or (rng.bytes(16).hex(), np.r_[101, rng.integers(1000, 30000, FILLER_TOKENS - 2), 102])
                keys.append(k)
                ids.append(i)
            lengths = np.array([len(i) for i in ids])
            # Bulk random states, cut into per-row views: the codec (fp16) encodes them as it would real ones.
            flat = rng.standard_normal((int(lengths.sum()), rec.spec.hidden_size), dtype=np.float32)
            hidden = np.split(flat, np.cumsum(lengths)[:-1])
            table = encode_table(keys, ids, hidden, [False] * len(keys), rec.spec.codec)
            w.add_shard(write_shard(url, w.next_shard_name(), table))
            pending += 1
            if pending == COMMIT_EVERY:
                w.commit()
                pending = 0
    m = w.manifest
    return {"rows": m.totals["rows"], "shards": m.totals["shards"], "index_segments": len(m.index),
            "bytes": m.totals["bytes"], "index_bytes": sum(s.bytes for s in m.index),
            "seconds": round(time.perf_counter() - t0, 1)}


def upload(fs, local: Path, remote: str) -> float:
    """Copy a local cache to S3 as a writer would publish it: shards and index first, then the commit log in
    version order (a checkpoint before its `_last_checkpoint` pointer), so no version names a missing file."""
    t0 = time.perf_counter()
    files = [p for p in local.rglob("*") if p.is_file() and p.name != "_writer.lock" and ".tmp-" not in p.name]
    for p in sorted(files, key=upload_order(local)):
        fs.put_file(str(p), f"{remote}/{p.relative_to(local).as_posix()}")
    return round(time.perf_counter() - t0, 1)


def upload_order(local: Path):
    """Sort key: data files, then `_log/` by version (zero-padded names sort so), `_last_checkpoint` last."""
    def key(p: Path):
        log = p.relative_to(local).parts[0] == "_log"
        return log, p.name == "_last_checkpoint", p.name
    return key


# ---------------------------------------------------------------- one measured training


def fresh_ray(tmp: Path, object_store: int = 2_000_000_000, cpus: int = 8):
    """A local Ray (its processes count their reads: they inherit PYTHONPATH and $ER_IO_COUNT_DIR); returns its stop function."""
    import ray

    from pipelines import ray_sessions

    root = str(tmp / "ray")
    rec = ray_sessions.record(root)
    before = set(glob.glob(f"{root}/session_2*"))
    try:
        # 8 logical CPUs like er's own local Ray: the Train worker holds one, Ray Data reads on the others.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=root,
                 object_store_memory=object_store)
    except Exception:  # e.g. its node timed out starting on a loaded machine: leave nothing of it running
        ray.shutdown()
        for session in set(glob.glob(f"{root}/session_2*")) - before:
            ray_sessions.finish(session, rec)
        raise
    session = ray._private.worker._global_node.get_session_dir_path()
    ray_sessions.record(root, session)
    signal.signal(signal.SIGTERM, _sigterm)  # ray.init installed its own handler, which skips the clean-up

    @ray.remote(num_cpus=1)
    def ready():
        time.sleep(1)

    ray.get([ready.remote() for _ in range(cpus)])  # Ray's prestarted workers are up before the clock starts

    def stop():
        ray.shutdown()
        ray_sessions.finish(session, rec)  # whatever of this session outlived the shutdown

    return stop


class Terminated(Exception):
    """A SIGTERM: on this shared machine, other jobs' clean-ups have ended this driver's Ray processes and the
    driver itself. It fails the current training (tried again, `measure`); once attempts run out the run
    stops, cleaning up (SeaweedFS, Ray, caches), and `--resume` continues it. Ctrl-C stops it at once."""


def _sigterm(signum, frame):
    raise Terminated("SIGTERM")


def measure(cache_url: str, prefix: str, task_dir: Path, work: Path, logs: Path, settle: float, attempts: int = 3) -> dict:
    """`measure_once`, tried again when Ray fails to start or to train on this shared machine (the attempt is recorded)."""
    for attempt in range(1, attempts + 1):
        try:
            return {**measure_once(cache_url, prefix, task_dir, work, logs, settle), "attempt": attempt}
        except Exception as e:  # noqa: BLE001 - the last attempt raises
            if attempt == attempts:
                raise
            print(f"attempt {attempt} failed ({type(e).__name__}: {str(e)[:300]}); trying again", flush=True)
            try:
                time.sleep(10)
            except Terminated:
                pass


def measure_once(cache_url: str, prefix: str, task_dir: Path, work: Path, logs: Path, settle: float) -> dict:
    """Train once on a fresh Ray; the cache reads before the first step, in epochs 2-3, and the times."""
    from er_core import TrainConfig
    from pipelines.train_ray import train_on_ray

    stop = fresh_ray(work)
    try:
        time.sleep(settle)  # let the new Ray's start-up work finish before the clock starts
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        m = train_on_ray(cache_url, str(task_dir), str(out), TrainConfig(method="reduced", epochs=3, patience=3),
                         workers=1, cpus_per_worker=1.0)
        t1 = time.time()
    finally:
        stop()
    reads = [r for r in io_count.load(logs) if t0 <= r.t <= t1 and r.path.startswith(prefix)]
    first, ends = m["first_step_at"], [h["ended_at"] for h in m["history"]]
    assert len(ends) == 3, m["history"]

    def part(r):
        rel = r.path[len(prefix):]
        return "log" if rel.startswith("_log/") else rel.split("/", 1)[0] if rel.startswith(("index/", "shards/")) else "other"

    before = [r for r in reads if r.t < first]
    by_part = {p: sum(r.nbytes for r in before if part(r) == p) for p in ("log", "index", "shards", "other")}
    return {
        "time_to_first_step_s": round(first - t0, 2),
        "reads_done_s": round(max((r.t for r in before), default=t0) - t0, 2),  # last cache read before the first step
        "read_span_s": round(max((r.t for r in before), default=t0) - min((r.t for r in before), default=t0), 2),
        "first_step_bytes": sum(by_part.values()),
        "first_step_bytes_by_part": by_part,
        # local: read calls; S3: requests of any kind (GET, HEAD, LIST)
        "first_step_requests": len(before),
        "epoch1_after_first_step_bytes": sum(r.nbytes for r in reads if first <= r.t <= ends[0]),
        "epochs_2_3_bytes": sum(r.nbytes for r in reads if ends[0] < r.t <= ends[2]),
        "after_first_step_bytes": sum(r.nbytes for r in reads if r.t >= first),  # to the end of train_on_ray
        "run_seconds": round(t1 - t0, 1),
        "test": m.get("test"),
    }


# ---------------------------------------------------------------- the whole benchmark


def run(quick: bool = False, out_json=None, report=None, settle: float = 2.0, repeats: int | None = None,
        resume: bool = False) -> dict:
    import s3fs

    from er_core import Recycler
    from tests.s3_server import SeaweedS3

    sizes, task_sizes = (QUICK_SIZES, QUICK_TASK) if quick else (SIZES, TASK)
    shard_rows = QUICK_SHARD_ROWS if quick else SHARD_ROWS
    repeats = repeats or (1 if quick else 2)
    results = {"quick": quick, "sizes": list(sizes), "task": task_sizes, "shard_rows": shard_rows, "repeats": repeats,
               "builds": {}, "measurements": []}
    partial = Path(f"{out_json}.partial") if out_json else None  # the sizes done so far, for --resume
    if resume and partial and partial.exists():
        kept = json.loads(partial.read_text())
        if all(kept.get(k) == v for k, v in results.items() if k not in ("builds", "measurements")):
            results = kept
    signal.signal(signal.SIGTERM, _sigterm)
    reap_stale()
    work = Path(tempfile.mkdtemp(prefix="er-scale-", dir="/tmp"))  # short: Ray puts unix sockets under it
    (work / "driver.pid").write_text(str(os.getpid()))
    logs = work / "reads"
    logs.mkdir()
    os.environ[io_count.ENV] = str(logs)  # before any Ray starts: its workers inherit it
    # Every Ray process then counts its reads from start-up (io_probe/sitecustomize.py imports benchmarks from the repo).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [io_count.PROBE, str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        os.environ.pop(name, None)
    io_count.install()
    server = SeaweedS3(work / "seaweedfs").start()
    try:
        os.environ.update(server.env())  # er, s3fs and every Ray worker reach the server through these
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options())
        rec = Recycler.load("bundled", layer=3, codec="fp16", max_length=128)
        tasks = {layout: write_task(work / f"task-{layout}", task_sizes, seed=i) for i, layout in enumerate(LAYOUTS)}
        rows = {layout: task_rows(rec, folder) for layout, folder in tasks.items()}
        results["task_state_bytes"] = {layout: int(sum(len(i) for _, i in r) * rec.spec.hidden_size * 2) for layout, r in rows.items()}
        for n in sizes:
            todo = [(rep, backend, layout) for rep in range(repeats) for backend in BACKENDS for layout in LAYOUTS
                    if not any(m["size"] == n and (m["rep"], m["backend"], m["layout"]) == (rep, backend, layout)
                               for m in results["measurements"])]
            if not todo:
                continue  # measured by the run this one resumes
            local = work / f"cache-{n}"
            pos = dict(zip(LAYOUTS, placement(n, len(rows["runs"]), len(rows["scattered"]))))
            rows_at = {int(p): row for layout in LAYOUTS for p, row in zip(pos[layout], rows[layout])}
            build = build_cache(str(local), rec, n, rows_at, shard_rows, seed=n)  # the same cache every time
            remote = f"{server.bucket}/cache-{n}"
            build["upload_seconds"] = upload(fs, local, remote)
            results["builds"][str(n)] = build  # str: the keys of the JSON
            print(f"cache {n}: {build}", flush=True)
            # Repeats interleaved, so a burst of load from elsewhere hits one repeat, not one setting.
            for rep, backend, layout in todo:
                url, prefix = (str(local), f"{local}/") if backend == "local" else (f"s3://{remote}", f"{remote}/")
                m = {"size": n, "rep": rep, "backend": backend, "layout": layout,
                     **measure(url, prefix, tasks[layout], work, logs, settle)}
                results["measurements"].append(m)
                print(json.dumps({k: v for k, v in m.items() if k != "test"}), flush=True)
                if partial:
                    partial.parent.mkdir(parents=True, exist_ok=True)
                    partial.write_text(json.dumps(results, indent=1))
            shutil.rmtree(local)  # disk is limited: one cache at a time
            fs.rm(remote, recursive=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["runs"] = [{"backend": backend, "size": n, "layout": layout,
                        **best_of([m for m in results["measurements"] if (m["size"], m["backend"], m["layout"]) == (n, backend, layout)])}
                       for n in sizes for backend in BACKENDS for layout in LAYOUTS]
    results["growth"] = growth(results)
    results["measured"] = time.strftime("%Y-%m-%d %H:%M")
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(results, indent=1))
        partial.unlink(missing_ok=True)
    if report:
        write_report(results, Path(report), json.loads(SIM_RESULTS.read_text()) if SIM_RESULTS.exists() else None)
    return results


def write_report(results: dict, report: Path, sim: dict | None = None) -> None:
    """The `scale` section: the trainings' tables and plot, then the simulated big caches' (if measured)."""
    from . import scale_sim
    from .report import write_section

    png = report.with_name("scale.png")
    plot(results, png)
    text = section(results, png.name)
    if sim:
        text += "\n" + "\n".join(scale_sim.section(sim)) + "\n"
    write_section("scale", text, report)


def reap_stale(parent: str = "/tmp", prefix: str = "er-scale-") -> None:
    """What runs of this benchmark killed before their clean-up (SIGKILL) left: their Ray, SeaweedFS and caches."""
    import psutil

    from pipelines.ray_sessions import session_processes

    for work in Path(parent).glob(f"{prefix}*"):
        try:
            if psutil.pid_exists(int((work / "driver.pid").read_text())):
                continue  # a run in progress
        except (OSError, ValueError):
            continue  # not a work folder of this benchmark
        procs = [p for d in glob.glob(f"{work}/ray/session_2*") for p in session_processes(d)]
        procs += [p for p in psutil.process_iter(["cmdline"]) if any(str(work) in a for a in p.info["cmdline"] or ())]  # weed
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(work, ignore_errors=True)


def best_of(reps: list[dict]) -> dict:
    """The fastest repeat (this machine is shared: the slower ones met others' load); bytes: the most any repeat read."""
    best = dict(min(reps, key=lambda r: r["time_to_first_step_s"]))
    best["time_to_first_step_all_s"] = [r["time_to_first_step_s"] for r in reps]
    best["first_step_bytes_all"] = sorted({r["first_step_bytes"] for r in reps})  # one value: reads are deterministic
    for k in ("epoch1_after_first_step_bytes", "epochs_2_3_bytes", "after_first_step_bytes"):
        best[k] = max(r[k] for r in reps)
    return best


def growth(results: dict) -> dict:
    """Per backend and layout, the acceptance: first-step bytes at most OWN_GOAL x the task's own states at every
    size, nothing read after the first step (each row read once a run), first-step time growing at most GOAL x
    from the smallest cache to the largest; and the time beside the format-3 run (BEFORE) at the same setting."""
    out = {}
    lo, hi = min(results["sizes"]), max(results["sizes"])
    before = {(r["backend"], r["layout"], r["size"]): r for r in json.loads(BEFORE.read_text())["runs"]} if BEFORE.exists() else {}
    for backend in BACKENDS:
        for layout in LAYOUTS:
            rs = {r["size"]: r for r in results["runs"] if r["backend"] == backend and r["layout"] == layout}
            if lo not in rs or hi not in rs:
                continue
            own = results["task_state_bytes"][layout]
            x_own = max(r["first_step_bytes"] / own for r in rs.values())
            t = rs[hi]["time_to_first_step_s"] / rs[lo]["time_to_first_step_s"]
            later = max(r["after_first_step_bytes"] for r in rs.values())
            old = {n: before[(backend, layout, n)]["time_to_first_step_s"] for n in rs if (backend, layout, n) in before}
            out[f"{backend}/{layout}"] = {
                "bytes_x": round(rs[hi]["first_step_bytes"] / rs[lo]["first_step_bytes"], 2), "time_x": round(t, 2),
                "max_bytes_over_own": round(x_own, 3), "after_first_step_bytes_max": later,
                "vs_format3_time": {str(n): round(rs[n]["time_to_first_step_s"] / o, 2) for n, o in old.items()},
                "goal_met": x_own <= OWN_GOAL and t <= GOAL and later == 0}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    for backend, color in zip(BACKENDS, ("tab:blue", "tab:orange")):
        for layout, style in zip(LAYOUTS, ("-o", "--s")):
            rs = sorted((r for r in results["runs"] if r["backend"] == backend and r["layout"] == layout), key=lambda r: r["size"])
            x = [r["size"] for r in rs]
            ax_b.plot(x, [r["first_step_bytes"] / 1e6 for r in rs], style, color=color, label=f"{backend}, {layout}")
            ax_t.plot(x, [r["time_to_first_step_s"] for r in rs], style, color=color, label=f"{backend}, {layout}")
    for ax, title in ((ax_b, "cache bytes read before the first step (MB)"), (ax_t, "time to the first step (s)")):
        ax.set_xscale("log")
        ax.set_xticks(results["sizes"], [f"{n // 1000}k" for n in results["sizes"]])
        ax.minorticks_off()
        ax.set_xlabel("cached examples")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    own = results["task_state_bytes"]["runs"] / 1e6
    ax_b.axhline(own, color="gray", lw=0.8, ls=":", label="the task's own states")
    ax_b.axhline(OWN_GOAL * own, color="gray", lw=0.8, ls="--", label=f"goal: {OWN_GOAL:g}x its own states")
    ax_b.set_ylim(bottom=0)
    ax_t.set_ylim(bottom=0)
    ax_b.legend(fontsize=8)
    t = results["task"]
    fig.suptitle(f"One task ({t['train']} train + {t['dev']} dev + {t['test']} test examples) vs cache size", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(results: dict, png: str) -> str:
    t, mb = results["task"], lambda b: f"{b / 1e6:.1f}"
    before = {(r["backend"], r["layout"], r["size"]): r for r in json.loads(BEFORE.read_text())["runs"]} if BEFORE.exists() else {}
    lines = [
        "## Task cost vs cache size (`python -m benchmarks.bench_scale`" + (" --quick" if results["quick"] else "") + ")",
        "",
        f"Measured {results['measured']} on this machine ({os.cpu_count()} cores, shared with other jobs while it ran). One task "
        f"of {t['train']} train + {t['dev']} dev + {t['test']} test examples trained (`reduced`, 1 Ray Train worker, 3 epochs) "
        f"from synthetic caches of {', '.join(f'{n // 1000}k' for n in results['sizes'])} examples (bundled MiniLM k=3, fp16, "
        f"H=384, 16-token filler rows, {results['shard_rows']}-row shards, committed every {COMMIT_EVERY} shards), on local "
        f"disk and on S3 (SeaweedFS on 127.0.0.1). Layout `runs`: the task in runs of 64 rows spread over the cache; "
        f"`scattered`: its rows one by one, spread evenly. The task's own states are {mb(results['task_state_bytes']['runs'])} MB. "
        f"Bytes are the cache's (commit log + index + shards), counted in every process; time starts at `train_on_ray` on an "
        f"already running local Ray (fresh for every training); times are the fastest of {results['repeats']} training(s) "
        f"(all in the JSON). *Format 3*: the time to the first step of the last run before the store (row-group reads, "
        f"manifest.json; benchmarks/results/scale-format3.json), same setting. *Reads done*: when the last cache read before "
        f"the first step ended.",
        "",
        f"![first-step bytes and time vs cache size]({png})",
        "",
        "| backend | layout | cache | shards | bytes to first step (MB) | / own states | log / index / shards (MB) | reads | "
        "time to first step (s) | format 3 (s) | reads done (s) | bytes after the first step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results["runs"], key=lambda r: (r["backend"], r["layout"], r["size"])):
        p, old = r["first_step_bytes_by_part"], before.get((r["backend"], r["layout"], r["size"]))
        lines.append(f"| {r['backend']} | {r['layout']} | {r['size'] // 1000}k | {results['builds'][str(r['size'])]['shards']} | "
                     f"{mb(r['first_step_bytes'])} | {r['first_step_bytes'] / results['task_state_bytes'][r['layout']]:.2f}x | "
                     f"{mb(p['log'])} / {mb(p['index'])} / {mb(p['shards'])} | {r['first_step_requests']} | "
                     f"{r['time_to_first_step_s']} | {old['time_to_first_step_s'] if old else '-'} | {r['reads_done_s']} | "
                     f"{r['after_first_step_bytes']} |")
    lo, hi = min(results["sizes"]) // 1000, max(results["sizes"]) // 1000
    lines += ["", f"Acceptance: first-step bytes at most {OWN_GOAL:g}x the task's own states at every size, nothing read after "
              f"the first step (each row read once a run), first-step time growing at most {GOAL}x from {lo}k to {hi}k:", "",
              "| backend / layout | max bytes / own states | bytes after the first step | bytes growth | time growth | "
              "time vs format 3 (per size) | verdict |", "|---|---|---|---|---|---|---|"]
    for k, g in results["growth"].items():
        vs = ", ".join(f"{int(n) // 1000}k {x}x" for n, x in g["vs_format3_time"].items()) or "-"
        lines.append(f"| {k} | {g['max_bytes_over_own']}x | {g['after_first_step_bytes_max']} | {g['bytes_x']}x | "
                     f"{g['time_x']}x | {vs} | {'met' if g['goal_met'] else 'NOT met'} |")
    return "\n".join(lines + [""] + notes(results)) + "\n"


def notes(results: dict) -> list[str]:
    """What the table says, computed from it."""
    runs, mb = results["runs"], lambda b: f"{b / 1e6:.1f} MB"
    lo, hi = min(results["sizes"]), max(results["sizes"])
    at = {(r["backend"], r["layout"], r["size"]): r for r in runs}
    task = results["task_state_bytes"]
    out = [f"- After the first step no training read anything from the cache: {max(r['after_first_step_bytes'] for r in runs)} "
           f"bytes at most over every run (epochs 1-3 and the final evaluation): the task's rows are read once a run."]
    data = lambda r: {k: r["first_step_bytes_by_part"][k] for k in ("index", "shards")}  # a log's size varies by its times
    same = all(data(at[("local", lay, n)]) == data(at[("s3", lay, n)])
               for lay in LAYOUTS for n in results["sizes"] if ("s3", lay, n) in at and ("local", lay, n) in at)
    if same:
        out.append("- Local disk and S3 read exactly the same index and shard bytes (the same ranged reads), counted at two "
                   "different levels (file reads, GET replies).")
    for layout in LAYOUTS:
        r0, r1 = at.get(("local", layout, lo)), at.get(("local", layout, hi))
        if r0 and r1:
            p0, p1 = r0["first_step_bytes_by_part"], r1["first_step_bytes_by_part"]
            out.append(f"- `{layout}`: shard bytes {mb(p0['shards'])} at {lo // 1000}k and {mb(p1['shards'])} at {hi // 1000}k "
                       f"for {mb(task[layout])} of the task's own states (each row's own state bytes, neighbours within 4 KB "
                       f"fetched in one request); index {mb(p0['index'])} and {mb(p1['index'])} (the buckets of the "
                       f"task's keys in each segment), log {p0['log'] / 1e3:.1f} and {p1['log'] / 1e3:.1f} KB.")
    big = at.get(("local", "runs", hi))
    if big:
        keys = sum(results["task"].values())
        segs = results["builds"][str(hi)]["index_segments"]
        out.append(f"- Index bytes: {big['first_step_bytes_by_part']['index'] / keys / 1e3:.2f} KB a task key at {hi // 1000}k "
                   f"({segs} segments). In each segment a lookup reads either the buckets of its keys (16 entries of 60 bytes "
                   f"on average, about 1 KB a key) or, where that is fewer bytes, the segment's Bloom filter (1.25 bytes an "
                   f"entry) and then the buckets of the keys it may hold; beside these short texts' "
                   f"{task['runs'] / keys / 1e3:.1f} KB of states a key, that bounds first-step bytes near "
                   f"{(task['runs'] + big['first_step_bytes_by_part']['index']) / task['runs']:.2f}x their own states.")
    done = max(r["reads_done_s"] for r in runs)
    first = min(r["time_to_first_step_s"] for r in runs)
    out.append(f"- Time to the first step is mostly fixed start-up: every cache read was over within {done:.0f} s of the "
               f"call, and the first step came no sooner than {first:.0f} s (Ray Train's worker, torch and the model "
               f"loading there, on 2 cores shared with other jobs), whatever the cache size.")
    return out


def simulate(a) -> None:
    """`--simulate`: run benchmarks/scale_sim.py, then rewrite the report's `scale` section with both parts."""
    from . import scale_sim

    sizes = tuple(int(x) for x in a.sizes.split(",")) if a.sizes else scale_sim.SIM_SIZES
    res = scale_sim.run(sizes, a.out or SIM_RESULTS, s3=not a.no_s3)
    print(json.dumps(res["verdicts"], indent=1))
    if RESULTS.exists() and (a.report or not a.out):
        write_report(json.loads(RESULTS.read_text()), Path(a.report or ROOT / "benchmarks" / "REPORT.md"), res)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke run: caches of {', '.join(map(str, QUICK_SIZES))} rows, a smaller task")
    ap.add_argument("--out", help=f"results JSON (default {RESULTS.relative_to(ROOT)}; none with --quick)")
    ap.add_argument("--report", help="markdown report: its section `scale`, and scale.png beside it "
                                     "(default benchmarks/REPORT.md; none with --quick)")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait after each Ray start before the clock starts")
    ap.add_argument("--repeats", type=int, help="trainings per setting, the fastest reported (default 2; 1 with --quick)")
    ap.add_argument("--resume", action="store_true", help="skip the cache sizes an interrupted run finished (OUT.partial)")
    ap.add_argument("--simulate", action="store_true", help="the metadata-faithful simulation of big caches (benchmarks/scale_sim.py)")
    ap.add_argument("--sizes", help="--simulate: cache sizes in rows, comma-separated (default 100000,1000000,10000000)")
    ap.add_argument("--no-s3", action="store_true", help="--simulate: local disk only")
    a = ap.parse_args()
    if a.simulate:
        simulate(a)
        raise SystemExit(0)
    res = run(a.quick, a.out or (None if a.quick else RESULTS), a.report or (None if a.quick else ROOT / "benchmarks" / "REPORT.md"),
              a.settle, a.repeats, a.resume)
    print(json.dumps(res["growth"], indent=1))
