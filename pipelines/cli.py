"""The `er` command line. Each subcommand is a thin front for one program in pipelines/."""

from __future__ import annotations

import argparse
import json
import os
import sys

from er_core import DEFAULT_CODEC, DEFAULT_MODEL, ErError
from er_core.codecs import CODECS

EPILOG = """examples:
  er demo ../shared/data/tasks/chemprot                       # ingest a task folder, train from the cache, print metrics
  er ingest corpus.jsonl --cache s3://bucket/cache --layer 0.5  # stream a corpus through layers 0..k-1
  er train --cache ./cache --task data/chemprot --method lora --out runs/chemprot
  er sweep sweep.yaml                                          # many tasks x methods, concurrently
  er predict --cache ./cache --model-dir runs/chemprot --corpus new.jsonl --out preds.jsonl
  er cache info ./cache"""


def _storage_args(p):
    p.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--region", help="S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION)")


def storage_options(args) -> dict | None:
    """fsspec/s3fs options from flags; credentials stay in the standard AWS variables or profile."""
    opts: dict = {}
    if getattr(args, "endpoint_url", None):
        opts.setdefault("client_kwargs", {})["endpoint_url"] = args.endpoint_url
    if getattr(args, "region", None):
        opts.setdefault("client_kwargs", {})["region_name"] = args.region
    return opts or None


def _ray_args(p):
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (default: start a local Ray)")


def _train_args(p):
    p.add_argument("--method", choices=["reduced", "lora", "full"], default="reduced",
                   help="reduced: fine-tune layers k..L from the cache; lora: LoRA adapters on layers k..L from the cache; "
                        "full: the whole model from raw text (baseline)")
    p.add_argument("--epochs", type=int, default=3, help="maximum epochs (early stopping on dev)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-5; 5e-4 for lora)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step per worker")
    p.add_argument("--patience", type=int, default=2, help="epochs without dev improvement before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--limit", type=int, help="use only the first N examples of each split (quick runs)")


def train_config(args):
    from er_core import TrainConfig

    return TrainConfig(method=args.method, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       patience=args.patience, seed=args.seed, lora_r=args.lora_r)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="er", description="Embedding recycling on Ray: run an encoder's lower layers once, "
                                 "cache layer-k states, and train many tasks on the upper layers only.",
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="stream a corpus through the frozen lower layers into a cache (Ray Data)",
                       description="Tokenize a corpus, compute layer-k states with a pool of Ray actors, and add the "
                       "examples not yet cached to the cache. Safe to re-run (incremental) and to schedule.")
    p.add_argument("corpus", nargs="+", help="JSONL, Parquet, CSV or text files, folders or globs (local or s3://); "
                   "a task folder ingests its train/dev/test files")
    p.add_argument("--cache", required=True, help="cache URL: a local folder or s3://bucket/prefix")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"HF model id or local folder (default {DEFAULT_MODEL}, bundled)")
    p.add_argument("--layer", default="0.5", help="cut layer k: an int 0..L or a fraction of depth (default 0.5)")
    p.add_argument("--codec", choices=sorted(CODECS), default=DEFAULT_CODEC, help="storage precision of the states")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL/Parquet/CSV corpora")
    p.add_argument("--id-field", help="use this field as the example key instead of a content hash")
    p.add_argument("--max-length", type=int, help="truncate longer texts (counted in the manifest); default: model max")
    p.add_argument("--actors", type=int, help="size of the lower-layer actor pool (default: one per GPU, else one single-threaded actor per core)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (length-sorted)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="mixed precision of the lower layers on GPU")
    p.add_argument("--local", action="store_true", help="plain single-process loop, no Ray")
    p.add_argument("--shard-rows", type=int, default=512,
                   help="rows per actor call and per shard file; the actor embeds them in length-sorted passes of --batch-size texts")
    p.add_argument("--threads", type=int, help="torch threads per CPU actor (default: cores / actors)")
    p.add_argument("--commit-every", type=int, default=16, help="commit the manifest every N shards (and at the end)")
    p.add_argument("--commit-seconds", type=float, default=60.0, help="... or when this many seconds passed since the last commit")
    _ray_args(p)
    _storage_args(p)

    p = sub.add_parser("train", help="train one task on the upper layers from the cache (Ray Train)")
    p.add_argument("--cache", required=True, help="cache URL the task's examples were ingested into")
    p.add_argument("--task", required=True, help="task folder: train/dev/test .jsonl (classification), .conll (NER) or SQuAD .json")
    p.add_argument("--out", required=True, help="output folder: trained weights, er_model.json, metrics.json")
    p.add_argument("--workers", type=int, default=1, help="data-parallel Ray Train workers (0 = in this process, no Ray)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker reserves")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--ingest-missing", action="store_true",
                   help="ingest task examples the cache lacks (with the cache's model and k) instead of failing")
    _train_args(p)
    _ray_args(p)
    _storage_args(p)

    p = sub.add_parser("sweep", help="run many tasks x methods x hyper-parameters concurrently from one cache")
    p.add_argument("sweep", help="sweep YAML/TOML file (see examples/sweep.yaml)")
    p.add_argument("--max-concurrent", type=int, help="override the sweep's concurrency limit")
    _ray_args(p)

    p = sub.add_parser("predict", help="batch inference with trained tasks; cached examples run the upper layers only")
    p.add_argument("--cache", required=True, help="cache URL")
    p.add_argument("--model-dir", required=True, nargs="+", help="one or more trained model folders (from er train)")
    p.add_argument("--corpus", required=True, nargs="+", help="corpus files or task folder to predict on")
    p.add_argument("--out", required=True, help="output .parquet or .jsonl, one row per example")
    p.add_argument("--text-field", default="text")
    p.add_argument("--record", action="store_true", help="add cache misses to the cache")
    _ray_args(p)
    _storage_args(p)

    p = sub.add_parser("bench", help="measure recycling speed-ups side by side and write a report")
    p.add_argument("--out", default="benchmarks/REPORT.md", help="report file (markdown; a .json is written beside it)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--data", default=None, help="task data folder (default ../shared/data/tasks)")

    p = sub.add_parser("cache", help="inspect or verify a cache")
    p.add_argument("action", choices=["info", "verify"], help="info: print the manifest; verify: check every shard")
    p.add_argument("url", help="cache URL")
    p.add_argument("--json", action="store_true", help="print JSON")
    _storage_args(p)

    p = sub.add_parser("demo", help="ingest a task folder, train on it from the cache, print metrics and speed")
    p.add_argument("task", nargs="?", default=None, help="task folder (default ../shared/data/tasks/chemprot)")
    p.add_argument("--workdir", default=".er-demo", help="where the cache and the model go")
    p.add_argument("--layer", default="0.5")
    p.add_argument("--limit", type=int, default=2000, help="examples per split (default 2000; 0 = all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--local", action="store_true", help="no Ray: plain loops in this process")
    _ray_args(p)
    return ap


def cmd_cache(args) -> int:
    from er_core import open_cache

    reader = open_cache(args.url, storage_options=storage_options(args))
    m = reader.manifest
    if args.action == "info":
        info = {"url": args.url, "generation": m.generation, "spec": m.spec.to_dict(), "totals": m.totals, "skipped": m.skipped}
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            s = m.spec
            print(f"cache       {args.url}  (generation {m.generation})")
            print(f"model       {s.model_name}  [{s.model_type}, {s.num_layers} layers, H={s.hidden_size}]")
            print(f"layer k     {s.layer}")
            print(f"codec       {s.codec}")
            print(f"tokenizer   {s.tokenizer.name}  max_length={s.tokenizer.max_length}")
            print(f"fingerprint {s.lower_fingerprint}")
            t = m.totals
            print(f"rows        {t['rows']}   tokens {t['tokens']}   truncated {t['truncated']}   skipped {m.skipped or 0}")
            print(f"bytes       {t['bytes']}  ({t['bytes_per_token']} bytes/token, {t['shards']} shards)")
        return 0
    problems = reader.verify()
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(f"{len(m.shards)} shards checked, {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "cache":
            return cmd_cache(args)
        if args.cmd == "ingest":
            from pipelines.ingest import main as run
        elif args.cmd == "train":
            from pipelines.train import main as run
        elif args.cmd == "sweep":
            from pipelines.sweep import main as run
        elif args.cmd == "predict":
            from pipelines.predict import main as run
        elif args.cmd == "bench":
            from pipelines.bench import main as run
        else:
            from pipelines.demo import main as run
        return run(args) or 0
    except ErError as e:
        print(f"er {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
