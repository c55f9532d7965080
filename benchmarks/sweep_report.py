"""The dev-set sweeps behind the per-method defaults, as a REPORT.md section: dev metric per task x method x setting.

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
from er_core.tasks import _normalize_limit

from .report import REPORT, write_section


SETTING = ("lr", "head_lr", "min_steps", "epochs", "patience", "batch_size")  # what a defaults trial varies or fixes
LORA_SETTING = ("lora_modules", "lora_r", "lora_alpha", "lora_variant")
# The first sweeps' slice, which their saved rows do not record. A sweep at a larger slice reruns the setting the
# small ones chose with a field or two varied, and its rows decide those fields (choose; tests/test_defaults.py).
BASE_TRAIN = 1000


def setting_of(method: str, cfg: dict) -> dict:
    setting = {k: cfg.get(k) for k in SETTING + (LORA_SETTING if method == "lora" else ())}
    if setting["head_lr"] == setting["lr"]:  # a head at lr trains as one left unset
        setting["head_lr"] = None
    return setting


def label(setting: dict) -> str:
    """A setting in a few words: `lr 0.003, attention r8/16, 4 ep` (head rate and steps where they are set)."""
    parts = [f"lr {setting['lr']:g}"]
    if setting.get("head_lr") is not None:
        parts.append(f"head {setting['head_lr']:g}")
    if "lora_modules" in setting:
        variant = "" if setting["lora_variant"] == "lora" else f" {setting['lora_variant']}"
        parts.append(f"{setting['lora_modules']} r{setting['lora_r']}/{setting['lora_alpha']}{variant}")
    parts.append(f"{setting['epochs']} ep" + (f", >= {setting['min_steps']} steps" if setting.get("min_steps") else ""))
    return ", ".join(parts)


def train_examples(row: dict) -> float:
    """The train examples a trial ran on: None is the whole train set."""
    t = row.get("train_examples", BASE_TRAIN)
    return float("inf") if t is None else t


def _slice(row: dict) -> str:
    """Where a trial left the first sweeps' slice and seed: ` (2000 train, seed 1)`."""
    parts = [] if train_examples(row) == BASE_TRAIN else [f"{'all' if row['train_examples'] is None else row['train_examples']} train"]
    parts += [f"seed {row['seed']}"] if row.get("seed") else []
    return f" ({', '.join(parts)})" if parts else ""


def trials(outputs: list[Path]) -> list[dict]:
    rows = []
    for out in outputs:
        for d in sorted(p for p in Path(out).iterdir() if p.is_dir() and p.name != "tune"):
            status = read_status(str(d)) or {}
            if status.get("status") != "complete":
                continue
            m = json.loads((d / "metrics.json").read_text())
            cfg = json.loads((d / "er_model.json").read_text())["train_config"]
            primary = primary_metric(m["kind"])
            limit = _normalize_limit(status["request"].get("limit")) if "request" in status else BASE_TRAIN
            train = limit if not isinstance(limit, dict) else limit.get("train")  # None: the whole train set
            rows.append({"task": m["task"], "method": m["method"], "lr": cfg["lr"], "metric": primary,
                         "train_examples": train, "seed": cfg["seed"],
                         "dev": m["dev"][primary], "best_epoch": m["best_epoch"], "epochs_run": len(m["history"]),
                         "per_epoch": [round(h.get(f"dev_{primary}", float("nan")), 4) for h in m["history"]],
                         "train_seconds": m["train_seconds"], "setting": setting_of(m["method"], cfg)})
    return rows


def choose(rows: list[dict]) -> dict:
    """Per method: the setting with the best mean dev over tasks (each task's dev a mean over its seeds), among the
    settings every task of that method ran, at the largest slice the method was swept at."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        tasks = {r["task"] for r in mine}
        largest = max(map(train_examples, mine))
        by_task: dict[tuple, list] = {}
        for r in mine:
            if train_examples(r) == largest:
                by_task.setdefault((json.dumps(r["setting"], sort_keys=True), r["task"]), []).append(r["dev"])
        by_setting: dict[str, list] = {}
        for (setting, _), devs in by_task.items():
            by_setting.setdefault(setting, []).append(sum(devs) / len(devs))
        common = {k: sum(d) / len(d) for k, d in by_setting.items() if len(d) == len(tasks)}
        if common:
            best = max(common, key=common.get)
            ranked = {label(json.loads(k)): round(v, 4) for k, v in sorted(common.items(), key=lambda kv: -kv[1])}
            out[method] = {**json.loads(best), "mean_dev": round(common[best], 4), "tasks": sorted(tasks),
                           "train_examples": largest, "mean_dev_by_setting": ranked}
    return out


def section(rows: list[dict], outputs: list[Path], expected: int | None = None) -> str:
    lines = ["## Dev-set sweeps for the defaults (`er sweep benchmarks/sweeps/defaults-dev*.yaml`)", "",
             "Bundled MiniLM at k=3 (L/2), fp16 cache of the three task folders; per task 1000 train / 300 dev examples "
             "(test not read), at most 4 epochs (more where a setting names a minimum of optimizer steps) with early stopping "
             "(patience 2), batch 16, warmup 6%, seed 0, where a row names no other slice or seed (the larger slices' dev: "
             "500); one or two trials at a time on this machine (2 cores). Dev metric of the best epoch; per-epoch dev in brackets. `train s` is as measured, "
             "with other work sharing the machine at times: not a speed figure.", "",
             "| task | method | setting | dev | best epoch / run | dev per epoch | train s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["method"], train_examples(r), label(r["setting"]), r.get("seed") or 0)):
        lines.append(f"| {r['task']} | {r['method']} | {label(r['setting'])}{_slice(r)} | {r['metric']} {r['dev']:.4f} | {r['best_epoch']} / "
                     f"{r['epochs_run']} | {r['per_epoch']} | {r['train_seconds']:.0f} |")
    chosen = choose(rows)
    if chosen:
        lines += ["", "Mean dev over the tasks, per method and setting (settings that every task of the method ran, at the "
                  "largest slice the method was swept at; a task's dev is the mean over its seeds), best first:",
                  "", "| method | tasks | train | mean dev by setting | chosen |", "|---|---|---|---|---|"]
        for method, c in chosen.items():
            train = "all" if c["train_examples"] == float("inf") else c["train_examples"]
            by_setting = "; ".join(f"{k}: {v:.4f}" for k, v in c["mean_dev_by_setting"].items())
            lines.append(f"| {method} | {len(c['tasks'])} | {train} | {by_setting} | {label(c)} |")
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
    ap.add_argument("--save", type=Path, help="also write the trials of the output folders to this JSON ({note, rows})")
    ap.add_argument("--save-note", default="", help="the saved file's note: what ran, when, on what")
    args = ap.parse_args(argv)
    found = trials(args.outputs)
    if args.save:
        args.save.write_text(json.dumps({"note": args.save_note, "rows": found}, indent=1) + "\n")
    rows = [r for f in args.rows for r in json.loads(f.read_text())["rows"]] + found
    text = section(rows, args.outputs, args.expected) + (f"\n\n{args.note}" if args.note else "")
    write_section("defaults-dev", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
