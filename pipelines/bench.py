"""`er bench`: run the benchmarks side by side and write their figures to a report.

Every figure is measured in one run on this machine: Ray ingestion vs a plain loop, recycled
training/inference vs the full model beside its ideal, and the fidelity of recycling (accuracy of
full, reduced and lora over seeds, accuracy vs k, codecs, break-even), with PNG plots when
matplotlib is installed (`pip install -e '.[bench]'`). `--quick`: tiny slices, minutes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _report(results: dict) -> str:
    lines = ["## `er bench`: speed ratios side by side", "", f"Measured {time.strftime('%Y-%m-%d %H:%M')} by `er bench`"
             f"{' --quick' if results.get('quick') else ''}; every ratio is taken side by side in one run.", ""]
    ing = results.get("ingest")
    if ing:
        lines += ["### Ingestion (Ray Data pipeline vs plain single-process loop)", "", "```json", json.dumps(ing, indent=1), "```", ""]
    tr = results.get("train")
    if tr:
        ideal = tr["ideal_ratio"]
        lines += [
            f"### Training and inference ({tr['model']}, L={tr['layers']}, k={tr['k']}, task {tr['task']}, batch {tr['batch_size']})",
            "",
            "| what | examples/s | ratio vs full | ideal L/(L-k) | share of ideal |",
            "|---|---|---|---|---|",
            f"| train full (raw text) | {tr['train_examples_per_s']['full']} | 1.00 | | |",
            f"| train reduced (cache) | {tr['train_examples_per_s']['reduced']} | {tr['train_ratio']['reduced']:.2f} | {ideal:.2f} | {tr['train_ratio_of_ideal']['reduced']:.0%} |",
            f"| train lora (cache) | {tr['train_examples_per_s']['lora']} | {tr['train_ratio']['lora']:.2f} | {ideal:.2f} | {tr['train_ratio_of_ideal']['lora']:.0%} |",
            f"| inference full | {tr['infer_examples_per_s']['full']} | 1.00 | | |",
            f"| inference cache hit | {tr['infer_examples_per_s']['cache_hit']} | {tr['infer_ratio']:.2f} | {ideal:.2f} | {tr['infer_ratio_of_ideal']:.0%} |",
            "",
        ]
    return "\n".join(lines)


def main(args) -> int:
    from er_bench import bench_fidelity, bench_ingest, bench_train
    from er_bench.report import write_section

    data = Path(args.data) if args.data else bench_train.DATA
    if not data.is_dir():
        from er_core import ErError

        raise ErError(f"task data folder {data} not found; pass --data DIR (the folder holding the task folders)")
    results: dict = {"quick": bool(args.quick)}
    results["ingest"] = bench_ingest.run(data, None, quick=args.quick)
    results["train"] = bench_train.run(data, quick=args.quick)
    out = Path(args.out)
    runs = out.parent / "results" / ("fidelity-runs-quick.jsonl" if args.quick else "fidelity-runs.jsonl")
    results["fidelity"] = bench_fidelity.run(data, quick=args.quick, seeds=(0, 1) if args.quick else (0, 1, 2),
                                             runs=None if args.quick else runs, seeds_at_k=(1,) if args.quick else ())
    plots = bench_train.plot(results["train"], out.parent)
    write_section("er-bench", _report(results) + "".join(f"\n![{p}]({p})\n" for p in plots), out)  # other sections stay
    write_section("fidelity", bench_fidelity.report(results["fidelity"], bench_fidelity.plot(results["fidelity"], out.parent)), out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(_report(results))
    print(f"wrote the er-bench section of {out}, and {out.with_suffix('.json')}")
    return 0
