"""Ingestion throughput: the Ray Data pipeline vs the plain single-process loop, same corpus, same machine, one run.

    python -m benchmarks.bench_ingest [--quick] [--out benchmarks/ingest.json]
    python -m benchmarks.bench_ingest --against ../er-old [--reps 3]   # `er ingest` here vs another checkout

Corpus: ChemProt + SciCite train texts. Model: the bundled MiniLM cut at layer 3. Both sides are
timed as a user sees one command (model load, reading, embedding, writing, committing), on a Ray
that is already up (its start-up is reported apart). Ray runs in two shapes for this 2-core
machine: one actor with 2 torch threads, and two actors with 1 thread each (the default); the
plain loop runs at its default batch (256) and at the Ray side's (64), runs interleaved. The
ratio is best Ray over best plain. Bytes per token on disk are reported for fp16 and int8.

`--against DIR` times the whole `er ingest` command at its defaults (Ray start included) from this
checkout and from another one (an older commit), runs alternating, and reports the ratio of medians.
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

from er_core.tasks import task_folders

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tasks"
SHAPES = {"1 actor x 2 threads": dict(actors=1, threads=2), "2 actors x 1 thread": dict(actors=2, threads=1)}
# Ray side: the `er ingest` defaults (512-row shards, length-sorted forward passes of 64 texts).
TUNING = dict(shard_rows=512, batch_size=64)
PLAIN_BATCHES = (256, 64)  # ingest_local's default, and the Ray side's forward batch


def _corpus(data_dir: Path, out: Path, per_task: int | None) -> int:
    n = 0
    with open(out, "w") as f:
        for task in [p.name for p in task_folders(data_dir, "classification")]:
            with open(data_dir / task / "train.jsonl") as src:
                for i, line in enumerate(src):
                    if per_task is not None and i >= per_task:
                        break
                    f.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
                    n += 1
    return n


def _plain(corpus: Path, cache: Path, batch_size: int) -> dict:
    from er_core import Recycler, ingest_local
    from er_core.corpus import find_sources, read_source

    t0 = time.perf_counter()
    rec = Recycler.load("bundled", layer=3, codec="fp16")
    inputs = (r.inputs for s in find_sources([str(corpus)]) for r in read_source(s))
    m = ingest_local(inputs, str(cache), rec, batch_size=batch_size, progress=False)
    secs = time.perf_counter() - t0
    return {"batch_size": batch_size, "seconds": round(secs, 1), "tokens": m.totals["tokens"],
            "tokens_per_s": round(m.totals["tokens"] / secs, 1)}


def _ray(corpus: Path, cache: Path, shape: dict) -> dict:
    from pipelines.ingest import run as ingest

    rep = ingest([str(corpus)], str(cache), model="bundled", layer=3, codec="fp16", progress=False, **TUNING, **shape)
    s = rep.summary
    keep = ("seconds", "tokens", "tokens_per_s", "busy_seconds", "first_shard_seconds")
    return {k: s[k] for k in keep}


def _int8_bytes_per_token(fp16_cache: Path, out: Path) -> float:
    # Stored size does not depend on the values (states are stored uncompressed): re-encode the rows, shard by shard.
    from er_core import open_cache
    from er_core.store.writer import encode_table, write_shard

    reader = open_cache(str(fp16_cache))
    size = tokens = 0
    for i, t in enumerate(reader.iter_tables()):
        cols = {c: t.column(c).to_pylist() for c in ("key", "length", "input_ids", "hidden", "scale")}
        hidden = [reader.decode(n, h, s) for n, h, s in zip(cols["length"], cols["hidden"], cols["scale"])]
        info = write_shard(str(out), f"{i}.parquet", encode_table(cols["key"], cols["input_ids"], hidden, [False] * len(hidden), "int8")).info
        size, tokens = size + info.bytes, tokens + info.tokens
    return round(size / tokens, 2)


def _er_ingest(checkout: Path, corpus: Path, cache: Path) -> dict:
    """One `er ingest` at its defaults, run from `checkout`'s code, timed as the user sees it."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    got = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", str(corpus), "--cache", str(cache)],
                         cwd=checkout, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if got.returncode:
        raise RuntimeError(f"er ingest from {checkout} failed: {got.stderr[-2000:]}")
    tokens = json.loads((cache / "manifest.json").read_text())["totals"]["tokens"]
    shutil.rmtree(cache)
    return {"seconds": round(secs, 1), "tokens": tokens, "tokens_per_s": round(tokens / secs, 1)}


def against(other: Path, data_dir=DATA, reps: int = 3, quick: bool = False) -> dict:
    here, other = Path(__file__).resolve().parents[1], Path(other).resolve()
    sides = {"this": here, "other": other}
    work = Path(tempfile.mkdtemp(prefix="er-bench-ingest-"))
    try:
        corpus = work / "corpus.jsonl"
        n = _corpus(Path(data_dir), corpus, 1000 if quick else None)
        runs = {side: [] for side in sides}
        for rep in range(reps):  # alternating, so load from elsewhere hits both sides alike
            for side in (("this", "other") if rep % 2 == 0 else ("other", "this")):
                runs[side].append(_er_ingest(sides[side], corpus, work / "cache"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {side: statistics.median(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
    return {"corpus": f"ChemProt + SciCite train texts ({n} examples)", "command": "er ingest CORPUS --cache DIR (defaults)",
            "machine_cores": os.cpu_count(), "this": str(here), "other": str(other), "runs": runs,
            "median_tokens_per_s": med, "ratio_this_vs_other": round(med["this"] / med["other"], 3)}


def run(data_dir=DATA, out_json=None, quick: bool = False) -> dict:
    import ray

    from pipelines.ray_env import ensure_ray

    data_dir = Path(data_dir)
    work = Path(tempfile.mkdtemp(prefix="er-bench-ingest-"))
    started = False
    try:
        corpus = work / "corpus.jsonl"
        n = _corpus(data_dir, corpus, 1000 if quick else None)
        t0 = time.perf_counter()
        started = not ray.is_initialized()
        ensure_ray()
        ray_init = time.perf_counter() - t0
        # Interleaved, so load from other processes on the machine hits both sides alike.
        plain = [_plain(corpus, work / "plain-a", PLAIN_BATCHES[0])]
        ray_runs = {name: _ray(corpus, work / f"ray-{i}", shape) for i, (name, shape) in enumerate(SHAPES.items())}
        plain.append(_plain(corpus, work / "plain-b", PLAIN_BATCHES[1]))
        plain_tps = max(p["tokens_per_s"] for p in plain)
        best = max(ray_runs, key=lambda k: ray_runs[k]["tokens_per_s"])
        from er_core import open_cache

        result = {
            "corpus": f"ChemProt + SciCite train texts ({n} examples)",
            "model": "bundled MiniLM (all-MiniLM-L6-v2), k=3",
            "machine_cores": __import__("os").cpu_count(),
            "ray_init_seconds": round(ray_init, 1),
            "plain_loop": plain,
            "ray": ray_runs,
            "ray_tuning": TUNING,
            "best_ray_shape": best,
            # against the better of the plain runs, so the ratio is conservative
            "throughput_ratio_ray_vs_plain": round(ray_runs[best]["tokens_per_s"] / plain_tps, 3),
            "goal": ">= 0.9",
            "bytes_per_token": {
                "fp16": open_cache(str(work / "plain-a")).manifest.totals["bytes_per_token"],
                "int8": _int8_bytes_per_token(work / "plain-a", work / "int8"),
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if started and ray.is_initialized():
            ray.shutdown()
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1000 examples per task")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="benchmarks/ingest.json")
    ap.add_argument("--against", type=Path, help="another checkout (e.g. a worktree of an older commit): time `er ingest` "
                    "from both instead")
    ap.add_argument("--reps", type=int, default=3, help="runs per side with --against")
    a = ap.parse_args()
    if a.against:
        res = against(a.against, a.data, a.reps, a.quick)
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
    else:
        res = run(Path(a.data), a.out, quick=a.quick)
        print(json.dumps(res, indent=1))
        print(f"Ray vs plain loop: {res['throughput_ratio_ray_vs_plain']:.2f}x tokens/s ({res['best_ray_shape']}); "
              f"bytes/token fp16 {res['bytes_per_token']['fp16']}, int8 {res['bytes_per_token']['int8']}")
