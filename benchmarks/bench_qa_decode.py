"""Extractive-QA span decoding: time per example at 512 and 4096 tokens, the exact O(n) decoder vs all pairs.

    python -m benchmarks.bench_qa_decode [--examples 200] [--report benchmarks/REPORT.md]

Random start/end logits, every token allowed (the worst case), answers of at most 30 tokens. `all pairs` is
the previous decoder (every start with every end, O(n^2) Python steps), timed on fewer examples. Both give the
same spans (tests/test_tasks.py checks that on random logits against a brute-force reference).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from er_core.evaluate import MAX_ANSWER_TOKENS, best_span


def all_pairs(start, end, ok, max_len=MAX_ANSWER_TOKENS):
    best = (-np.inf, -1, -1)
    ctx = np.flatnonzero(ok).tolist()
    for s in ctx:
        for e in ctx:
            if s <= e < s + max_len and start[s] + end[e] > best[0]:
                best = (float(start[s] + end[e]), s, e)
    return best


def per_example_ms(fn, n: int, examples: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    cases = [(rng.standard_normal(n), rng.standard_normal(n), np.ones(n, bool)) for _ in range(examples)]
    t0 = time.perf_counter()
    for c in cases:
        fn(*c)
    return (time.perf_counter() - t0) / examples * 1000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--report", help="markdown report to write the `qa-decode` section into")
    a = ap.parse_args(argv)
    rows = []
    for n in (512, 4096):
        fast = per_example_ms(best_span, n, a.examples)
        slow = per_example_ms(all_pairs, n, max(1, a.examples // (20 if n == 512 else 400)))
        rows.append((n, fast, slow))
        print(f"{n} tokens: {fast:.2f} ms (exact O(n)) vs {slow:.1f} ms (all pairs)", flush=True)
    if a.report:
        from .report import write_section

        lines = ["## QA span decoding (`python -m benchmarks.bench_qa_decode`)", "",
                 f"Per example, random logits, every token a context token, answers up to {MAX_ANSWER_TOKENS} tokens; "
                 f"measured {time.strftime('%Y-%m-%d')} on this machine.", "",
                 "| tokens | exact O(n) decoder (ms) | all pairs, before (ms) | speed-up |", "|---|---|---|---|"]
        lines += [f"| {n} | {f:.2f} | {s:.1f} | {s / f:.0f}x |" for n, f, s in rows]
        write_section("qa-decode", "\n".join(lines) + "\n", a.report)


if __name__ == "__main__":
    main()
