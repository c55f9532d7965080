"""The dev-set sweeps behind the per-method defaults, as a REPORT.md section: dev metric per task x method x lr.

    python -m benchmarks.sweep_report .er-sweep/defaults-dev .er-sweep/defaults-dev-lora \
        --rows benchmarks/results/defaults-dev-*.json --expected 22

Reads every complete trial folder of the given sweep outputs (so a sweep still running, or
interrupted and not yet resumed, reports what it has finished). Dev only: the sweeps read no test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from er_core.metrics import primary_metric
from er_core.outputs import read_status

from .report import REPORT, write_section


def trials(outputs: list[Path]) -> list[dict]:
    rows = []
    for out in outputs:
        for d in sorted(p for p in Path(out).iterdir() if p.is_dir() and p.name != "tune"):
            if (read_status(str(d)) or {}).get("status") != "complete":
                continue
            m = json.loads((d / "metrics.json").read_text())
            cfg = json.loads((d / "er_model.json").read_text())["train_config"]
            primary = primary_metric(m["kind"])
            rows.append({"task": m["task"], "method": m["method"], "lr": cfg["lr"], "metric": primary,
                         "dev": m["dev"][primary], "best_epoch": m["best_epoch"], "epochs_run": len(m["history"]),
                         "per_epoch": [round(h.get(f"dev_{primary}", float("nan")), 4) for h in m["history"]],
                         "train_seconds": m["train_seconds"]})
    return rows


def choose(rows: list[dict]) -> dict:
    """Per method: the lr with the best mean dev over tasks, among the lrs every task of that method ran."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        tasks = {r["task"] for r in mine}
        by_lr = {lr: [r["dev"] for r in mine if r["lr"] == lr] for lr in {r["lr"] for r in mine}}
        common = {lr: sum(d) / len(d) for lr, d in by_lr.items() if len(d) == len(tasks)}
        if common:
            best = max(common, key=common.get)
            out[method] = {"lr": best, "mean_dev": round(common[best], 4), "tasks": sorted(tasks),
                           "mean_dev_by_lr": {f"{lr:g}": round(v, 4) for lr, v in sorted(common.items())}}
    return out


def section(rows: list[dict], outputs: list[Path], expected: int | None = None) -> str:
    lines = ["## Dev-set sweeps for the defaults (`er sweep benchmarks/sweeps/defaults-dev*.yaml`)", "",
             "Bundled MiniLM at k=3 (L/2), fp16 cache of the three task folders; per task 1000 train / 300 dev examples "
             "(test not read), at most 4 epochs with early stopping (patience 2), batch 16, warmup 6%, seed 0; one trial at a "
             "time on this machine (2 cores). Dev metric of the best epoch; per-epoch dev in brackets. `train s` is as measured, "
             "with other work sharing the machine at times: not a speed figure.", "",
             "| task | method | lr | dev | best epoch / run | dev per epoch | train s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["method"], r["lr"])):
        lines.append(f"| {r['task']} | {r['method']} | {r['lr']:g} | {r['metric']} {r['dev']:.4f} | {r['best_epoch']} / "
                     f"{r['epochs_run']} | {r['per_epoch']} | {r['train_seconds']:.0f} |")
    chosen = choose(rows)
    if chosen:
        lines += ["", "Mean dev over the tasks, per method and lr (lrs that every task of the method ran):", "",
                  "| method | tasks | mean dev by lr | best lr |", "|---|---|---|---|"]
        for method, c in chosen.items():
            lines.append(f"| {method} | {len(c['tasks'])} | {', '.join(f'{lr}: {v:.4f}' for lr, v in c['mean_dev_by_lr'].items())}"
                         f" | {c['lr']:g} |")
    if expected is not None and len(rows) < expected:
        lines += ["", f"**Incomplete:** {len(rows)} of {expected} trials have finished (`er sweep FILE --resume` continues "
                  f"an interrupted sweep in the same output folder)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outputs", type=Path, nargs="*", help="sweep output folders")
    ap.add_argument("--note", default="", help="a closing paragraph: what was chosen from these figures")
    ap.add_argument("--rows", type=Path, nargs="*", default=[], help="JSON files of trials measured earlier ({rows: [...]})")
    ap.add_argument("--expected", type=int, help="trials the sweeps hold in all (marks the section incomplete)")
    ap.add_argument("--out", type=Path, default=REPORT)
    args = ap.parse_args(argv)
    rows = [r for f in args.rows for r in json.loads(f.read_text())["rows"]] + trials(args.outputs)
    text = section(rows, args.outputs, args.expected) + (f"\n\n{args.note}" if args.note else "")
    write_section("defaults-dev", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
