"""The fidelity sections at a glance: per model, task and method, the paired gap to the tuned `full` at the
dev-chosen rate, at the shipped default and at the k's where every seed ran, against the 1-point goal.

    python -m benchmarks.fidelity_summary   # reads results/fidelity-*.json, writes REPORT section fidelity-summary

Only results of the tuned benchmark count (the first, untuned `fidelity` run and --quick runs do not).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from er_core.train_config import WIDE, TrainConfig

from .bench_fidelity import GOAL_POINTS, verdict
from .report import REPORT, write_section

HERE = Path(__file__).resolve().parent


def load(results: Path) -> dict[str, dict]:
    """Section name -> its results, for every tuned, full-scale fidelity run kept in `results`."""
    out = {}
    for path in sorted(results.glob("fidelity*.json")):
        res = json.loads(path.read_text())
        if "tuning" in res and not res.get("quick"):
            out[path.stem] = res
    return out


def summary(sections: dict[str, dict]) -> str:
    lines = ["## Fidelity at a glance (`python -m benchmarks.fidelity_summary`)", "",
             f"Every tuned fidelity section below, one row per recycled method and setting: test metric over the seeds, "
             f"and its paired difference to the `full` of the same task and section, tuned unless the section ran "
             f"`--no-tune` (points; goal: within {GOAL_POINTS:g}). "
             "`tuned`: the method at its dev-chosen lr; `default`: at the shipped default lr, where that differs; "
             "`k=N`: every seed at a k other than the section's. `lora (head R)`: the task head trained at rate R rather "
             f"than at lr (the default on encoders at least {WIDE} wide); `>= N steps`: trained at least N steps, not the "
             "shipped `min_steps` (a section measured before that default moved). The sections say how each was measured.", "",
             "| section | model | task | train / dev / test | k | method | setting | lr | test (mean ± std) "
             "| full (lr) | vs that full (paired) | goal |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in sections.items():
        lim = res["limit"]
        slices = f"{lim['train']} / {lim['dev']} / {lim.get('test', 'all')}"
        full = {p["task"]: p for p in res["paired"] if p["method"] == "full"}
        for p in res["paired"] + res.get("at_k", []):
            if p["method"] == "full" or p["diff_points"] is None:
                continue
            f = full[p["task"]]
            setting = "default" if p["setting"].endswith("default") else "tuned" if p["setting"].startswith("k=") else p["setting"]
            if setting == "tuned" and p["lr"] == res["defaults"][p["method"]]["lr"]:
                setting = "tuned = default"  # the default won on dev: no separate default row
            d = res["defaults"][p["method"]]
            tags = [f"head {d['head_lr']:g}"] if d.get("head_lr") is not None else []
            shipped = TrainConfig(method=p["method"]).min_steps
            if d.get("min_steps", shipped) != shipped:
                tags.append(f">= {d['min_steps']} steps")  # measured before the default moved
            method = p["method"] + (f" ({', '.join(tags)})" if tags else "")
            lines.append(f"| `{name}` | {res['model']} (L={res['num_layers']}) | {p['task']} | {slices} | "
                         f"{p.get('layer', res['k'])} | {method} | {setting} | {p['lr']:g} | "
                         f"{p['metric']} {p['mean']:.4f} ± {p['std']:.4f} | {f['mean']:.4f} ({f['setting']} lr {f['lr']:g}) | "
                         f"{p['diff_points']:+.2f} ± {p['diff_std']:.2f} | {verdict(p['diff_points'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=HERE / "results", help="folder of the fidelity-*.json results")
    ap.add_argument("--out", type=Path, default=REPORT)
    args = ap.parse_args(argv)
    sections = load(args.results)
    if not sections:
        raise SystemExit(f"no tuned fidelity results in {args.results}: run benchmarks.bench_fidelity first")
    write_section("fidelity-summary", summary(sections), args.out)
    print(f"fidelity-summary: {len(sections)} section(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
