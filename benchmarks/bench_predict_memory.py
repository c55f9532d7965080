"""Driver memory of `er predict` in corpus size: peak RSS of the `er predict` process over N and 10N examples.

    python -m benchmarks.bench_predict_memory [--quick] [--n 2000] [--factor 10] [--repeats 2]

Setup (in a temporary folder, deleted afterwards): 10N short synthetic English texts; a cache
(bundled MiniLM cut at k=3, fp16) holding every other one of them, so half of each corpus is a
cache hit and half goes through the lower layers; one classification model trained from that cache
on a small synthetic task (`reduced`, 1 epoch, in this process). The corpora are the first N texts
and all 10N, as JSONL.

Measured: `python -m pipelines.cli predict --cache C --model-dir M --corpus FILE --out OUT.jsonl`
run as a subprocess, as a user runs it (each run starts its own local Ray). Only the driver
process is measured, never the Ray processes (raylet, GCS, workers, actors): its kernel high-water
mark `VmHWM` is read from /proc/PID/status every 50 ms (the kernel keeps the exact peak, so
sampling cannot miss it; the last read before exit is kept), together with the largest anonymous,
file-backed and shared-memory parts seen. `getrusage(RUSAGE_CHILDREN)` and `/usr/bin/time -v` are
not used: they report the largest process in the driver's reaped tree, which can be a Ray process.
Sizes run interleaved (N, 10N, N, 10N, ...); the figure per size is the median over repeats.

Goal: peak driver RSS over 10N examples < 1.2 x that over N. Results: benchmarks/results/predict_memory.json
and the `predict-memory` section of benchmarks/REPORT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "predict_memory.json"
SECTION = "predict-memory"
GOAL = 1.2

_WORDS = ("the protein binds a receptor in cells while this study shows that our model of the enzyme activity "
          "increases when patients receive treatment with low doses and high levels of expression were found in "
          "mice after inhibition of the pathway we report new results on citation intent for scientific papers "
          "using data from previous work methods results background significant effect gene mutation tumour growth "
          "inhibitor agonist antagonist substrate product regulation signal transduction kinase phosphatase").split()
_LABELS = {"kinase": "signal", "tumour": "disease", "citation": "paper"}


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct short texts (8-24 words, about 10-30 tokens)."""
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        t = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 24)))
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _label(text: str) -> str:
    return next((lab for w, lab in _LABELS.items() if w in text.split()), "other")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _setup(work: Path, n: int, factor: int) -> dict:
    """Corpora, cache (every other corpus text + the task) and one trained model."""
    from er_core import Recycler, TrainConfig, finetune, ingest_local

    texts = synthetic_texts(n * factor, seed=1)
    task_texts = synthetic_texts(n * factor + 768, seed=2)[n * factor:]  # not in the corpus
    task = work / "task"
    task.mkdir()
    for split, part in (("train", task_texts[:512]), ("dev", task_texts[512:640]), ("test", task_texts[640:768])):
        _write_jsonl(task / f"{split}.jsonl", [{"text": t, "label": _label(t)} for t in part])
    corpora = {}
    for name, size in (("N", n), (f"{factor}N", n * factor)):
        corpora[name] = work / f"corpus-{size}.jsonl"
        _write_jsonl(corpora[name], [{"id": f"ex{i}", "text": t} for i, t in enumerate(texts[:size])])
    cache = work / "cache"
    t0 = time.perf_counter()
    rec = Recycler.load("bundled", layer=3, codec="fp16")
    ingest_local(({"text": t} for t in texts[::2] + task_texts), str(cache), rec, progress=False)
    ingest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = work / "model"
    finetune(str(cache), str(task), str(model), TrainConfig(method="reduced", epochs=1), log=lambda row: None, progress=False)
    return {"cache": cache, "model": model, "corpora": corpora, "setup_seconds": {"ingest": round(ingest_s, 1),
                                                                                   "train": round(time.perf_counter() - t0, 1)}}


def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of a live process, in KiB ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[k] = int(v.split()[0])
    return out


def run_measured(cmd: list[str], log: Path, interval: float = 0.05, env: dict | None = None) -> dict:
    """Run `cmd`; its own peak RSS (not its children's) and the largest parts seen, in MiB, and wall seconds."""
    peak: dict[str, int] = {}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        while p.poll() is None:
            s = _status(p.pid)
            if s.get("VmHWM"):  # a zombie shows no memory lines: keep what was read while it lived
                for k, v in s.items():
                    peak[k] = max(peak.get(k, 0), v)
            time.sleep(interval)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n" + log.read_text()[-3000:])
    mib = {k: round(v / 1024, 1) for k, v in peak.items()}
    return {"peak_rss_mib": mib.get("VmHWM"), "max_rss_sampled_mib": mib.get("VmRSS"), "max_anon_mib": mib.get("RssAnon"),
            "max_file_mib": mib.get("RssFile"), "max_shmem_mib": mib.get("RssShmem"), "wall_seconds": round(wall, 1)}


def _predict(s: dict, corpus: Path, out: Path, log: Path) -> dict:
    cmd = [sys.executable, "-m", "pipelines.cli", "predict", "--cache", str(s["cache"]), "--model-dir", str(s["model"]),
           "--corpus", str(corpus), "--out", str(out)]
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    r = run_measured(cmd, log, env=env)
    with open(out) as f:
        rows = sum(1 for _ in f)
    r.update(examples=rows, summary=[line for line in log.read_text().splitlines() if line.startswith("predicted ")][-1:])
    out.unlink()
    return r


def run(n: int = 2000, factor: int = 10, repeats: int = 2, quick: bool = False, out_json: Path | None = RESULTS,
        report: Path | None = None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="er-bench-predmem-"))
    try:
        s = _setup(work, n, factor)
        runs: dict[str, list[dict]] = {name: [] for name in s["corpora"]}
        for r in range(repeats):  # interleaved, so background load hits both sizes alike
            for name, corpus in s["corpora"].items():
                runs[name].append(_predict(s, corpus, work / f"out-{name}-{r}.jsonl", work / f"log-{name}-{r}.txt"))
                print(f"{name}: {runs[name][-1]}", file=sys.stderr)
        small, large = runs.values()
        med = {name: statistics.median(x["peak_rss_mib"] for x in rs) for name, rs in runs.items()}
        ratio = med[f"{factor}N"] / med["N"]
        result = {
            "what": "peak RSS of the `er predict` driver process (VmHWM), N vs 10N examples",
            "quick": quick,
            "machine_cores": os.cpu_count(),
            "model": "bundled MiniLM (all-MiniLM-L6-v2), k=3, fp16 cache; 1 reduced classification model",
            "examples": {"N": n, f"{factor}N": n * factor},
            "cache_hit_share": 0.5,
            "setup_seconds": s["setup_seconds"],
            "runs": runs,
            "median_peak_rss_mib": med,
            "growth_ratio": round(ratio, 3),
            "goal": f"< {GOAL}",
            "met": ratio < GOAL,
            "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
        assert all(x["examples"] == n for x in small) and all(x["examples"] == n * factor for x in large)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    if report:
        from .report import write_section

        write_section(SECTION, markdown(result), report=report)
    return result


def markdown(r: dict) -> str:
    (a, ra), (b, rb) = r["runs"].items()
    n, big = r["examples"][a], r["examples"][b]

    def cells(rs, key):
        return " / ".join(f"{x[key]:.0f}" for x in rs)

    lines = [
        f"## `er predict` driver memory: {n:,} vs {big:,} examples",
        "",
        f"Peak RSS (kernel `VmHWM`) of the `er predict` driver process alone (no Ray process), each run a subprocess "
        f"starting its own local Ray; {r['model']}; half of each corpus cached, half through the lower layers; "
        f"{len(ra)} interleaved runs per size, median. `python -m benchmarks.bench_predict_memory`"
        f"{' --quick' if r['quick'] else ''}, {r['measured']}, {r['machine_cores']} cores.",
        "",
        "| corpus | peak RSS MiB (median) | peak RSS per run | largest anon / file / shmem part, MiB | wall s per run |",
        "|---|---|---|---|---|",
    ]
    for name, rs, size in ((a, ra, n), (b, rb, big)):
        parts = " / ".join(f"{max(x[k] or 0 for x in rs):.0f}" for k in ("max_anon_mib", "max_file_mib", "max_shmem_mib"))
        lines.append(f"| {size:,} examples | {r['median_peak_rss_mib'][name]:.0f} | {cells(rs, 'peak_rss_mib')} | {parts} | "
                     f"{cells(rs, 'wall_seconds')} |")
    lines += ["", f"Growth over {big // n}x the examples: **{r['growth_ratio']:.3f}x** (goal {r['goal']}: "
              f"{'met' if r['met'] else 'NOT met'}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: N=200, one run per size, no report section")
    ap.add_argument("--n", type=int, default=2000, help="examples in the small corpus (the large one has --factor times more)")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per size")
    ap.add_argument("--out", help=f"results JSON (default {RESULTS.relative_to(ROOT)}; none with --quick)")
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "REPORT.md"), help="markdown report for the section ('' for none)")
    a = ap.parse_args()
    quick = a.quick
    res = run(n=200 if quick else a.n, factor=a.factor, repeats=1 if quick else a.repeats, quick=quick,
              out_json=Path(a.out) if a.out else (None if quick else RESULTS), report=Path(a.report) if a.report and not quick else None)
    print(json.dumps(res, indent=1))
    print(f"er predict driver peak RSS: {res['median_peak_rss_mib']} MiB -> {res['growth_ratio']:.3f}x "
          f"(goal {res['goal']}: {'met' if res['met'] else 'NOT met'})")
