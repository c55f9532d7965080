"""`er advise`: probe several k on one or more tasks and recommend where to cache a corpus (er_core.advise)."""

from __future__ import annotations

import json

from er_core.advise import AdviseConfig, advise_tasks, format_advice
from er_core.outputs import OutputDir
from er_core.store import put_atomic


def main(args) -> int:
    cfg = AdviseConfig(layers=args.layers, method=args.method, budget=args.budget, dev=args.dev, epochs=args.epochs,
                       lr=args.lr, seed=args.seed, tolerance=args.tolerance)
    out = OutputDir.claim(args.out, "advise", overwrite=args.overwrite, storage_options=None)
    out.add("caches", "advice.json")
    print(f"== er advise: probes of {cfg.budget} train / {cfg.dev} dev examples, {cfg.epochs} epochs, {cfg.method}; "
          f"probe caches under {out.url}/caches")
    try:
        result = advise_tasks(args.cache, args.task, cfg, out.url)
        put_atomic(out.fs, f"{out.path}/advice.json", json.dumps(result, indent=1).encode())
    except BaseException as e:
        out.fail(f"{type(e).__name__}: {e}")
        raise
    out.finish()
    print(format_advice(result))
    print(f"wrote {out.url}/advice.json")
    return 0
