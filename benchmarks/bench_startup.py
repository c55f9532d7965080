"""Start-up cost: `import er_core`, `er --help`, and a worker's start (imports + the bundled MiniLM at k=3, split for
ingest or built as a `reduced` training model).

    python -m benchmarks.bench_startup [--against ../er-old] [--reps 7] [--report]

Each probe is a fresh Python process, timed wall to wall, as a user or a Ray worker pays it; with `--against DIR`
the same probes run from that checkout too (an older commit, same venv), alternating, and the table gives both
medians. A worker probe also counts the modules it loaded and says whether peft came with them (a `reduced` worker
never uses it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROBES = {
    "import er_core": "import er_core",
    "er --help": "import sys; sys.argv = ['er', '--help']\nfrom pipelines.cli import main\ntry: main()\nexcept SystemExit: pass",
    "ingest worker: MiniLM split at 3": "from er_core.recycle import Recycler; Recycler.load('bundled', layer=3)",
    # What the driver of `er ingest` needs before its pipeline starts: the code, and the cache spec of the model
    # (remembered per model folder since er_core.model_specs; an older checkout loads the model for it).
    "ingest driver: code + spec of MiniLM at 3": (
        "import pipelines.ingest\nfrom er_core.recycle import Recycler\n"
        "try:\n    from er_core.recycle import cache_spec\n"
        "except ImportError:\n    cache_spec = lambda *a: Recycler.load(*a).spec\ncache_spec('bundled', 3)"),
    "ingest read task: its code": "import pipelines.ingest",
    "train worker: reduced MiniLM from 3": (
        "import pipelines.train_ray\nfrom er_core import TrainConfig\nfrom er_core.models import load_encoder\n"
        "from er_core.train import build_model\nbuild_model(load_encoder()[0], 3, 'classification', 2, TrainConfig(method='reduced'))"),
}
REPORT_LINE = ("import json, sys; print(json.dumps({'modules': len(sys.modules), 'peft': 'peft' in sys.modules, "
               "'deberta': any('deberta' in m for m in sys.modules), 'torch': 'torch' in sys.modules}))")


def _run(checkout: Path, code: str) -> tuple[float, dict]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # this checkout's er_core and pipelines, whatever is installed
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT_LINE}"], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"probe failed in {checkout}: {out.stderr.strip().splitlines()[-1:]}")
    return secs, json.loads(out.stdout.strip().splitlines()[-1])


def measure(checkouts: dict[str, Path], reps: int) -> dict:
    """{probe: {side: {"s": [...], "median": s, "modules": n, "peft": bool, "deberta": bool}}}, sides alternating."""
    res: dict = {p: {side: {"s": []} for side in checkouts} for p in PROBES}
    for _ in range(reps):
        for probe, code in PROBES.items():
            for side, path in checkouts.items():
                secs, info = _run(path, code)
                res[probe][side]["s"].append(round(secs, 3))
                res[probe][side].update(info)
    for sides in res.values():
        for r in sides.values():
            r["median"] = statistics.median(r["s"])
    return res


def markdown(res: dict, against: str | None, reps: int) -> str:
    sides = list(next(iter(res.values())))
    head = "| probe | " + " | ".join(f"{s}: median s (modules)" for s in sides) + " |"
    rows = [head, "|---" * (len(sides) + 1) + "|"]
    for probe, by in res.items():
        cells = [f"{by[s]['median']:.2f} ({by[s]['modules']}{', torch' if by[s].get('torch') else ''}"
                 f"{', peft' if by[s]['peft'] else ''}{', DeBERTa' if by[s]['deberta'] else ''})" for s in sides]
        rows.append(f"| {probe} | " + " | ".join(cells) + " |")
    when = time.strftime("%Y-%m-%d")
    intro = (f"## Start-up (`python -m benchmarks.bench_startup{' --against DIR' if against else ''}`)\n\n"
             f"Fresh Python processes, wall to wall, median of {reps}, on {os.cpu_count()} cores, measured {when}"
             + (f"; \"before\" is a checkout of {against}, run alternately with \"now\" from the same venv" if against else "")
             + ". Modules: `len(sys.modules)` at the end of the probe; torch/peft/DeBERTa: whether the probe loaded them. "
             "A worker pays for torch and transformers either way, so its start barely moves; what it no longer loads "
             "is the code of model families it does not run. The ingest driver's spec comes from ~/.cache/er/specs after its "
             "first run (the median hides that one).\n")
    return intro + "\n" + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another checkout of er (an older commit) to time beside this one")
    ap.add_argument("--label", help="how the report names the other checkout (default: its git commit)")
    ap.add_argument("--reps", type=int, default=7, help="runs of each probe per side (default 7)")
    ap.add_argument("--report", action="store_true", help="write the table into benchmarks/REPORT.md (section startup)")
    args = ap.parse_args(argv)
    checkouts = {"now": HERE}
    label = None
    if args.against:
        checkouts["before"] = args.against.resolve()
        label = args.label or subprocess.run(["git", "-C", str(args.against), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip() or str(args.against)
    res = measure(checkouts, args.reps)
    text = markdown(res, label, args.reps)
    print(text)
    out = HERE / "benchmarks" / "results" / "startup.json"
    out.write_text(json.dumps({"against": label, "reps": args.reps, "results": res}, indent=1) + "\n")
    if args.report:
        from .report import write_section

        write_section("startup", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
