"""The `er` command line. Each subcommand is a thin front for one program in pipelines/."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields

from er_core import ErError
from er_core.store import StorageConfig
from er_core.train_config import TrainConfig
from pipelines.configs import (INGEST_FLAGLESS, SERVE_FLAGLESS, SWEEP_FLAGS, IngestConfig, ServeConfig, Sweep, TrainRun,
                               add_flags, field_docs, storage_options)

EPILOG = """examples:
  er demo ../shared/data/tasks/chemprot                       # ingest a task folder, train from the cache, print metrics
  er ingest corpus.jsonl --cache s3://bucket/cache --layer 0.5  # stream a corpus through layers 0..k-1
  er train --cache ./cache --task data/chemprot --method lora --out runs/chemprot
  er sweep sweep.yaml                                          # many tasks x methods, concurrently
  er advise --cache ./cache --task data/chemprot               # which k to cache at: short probes per k
  er predict --cache ./cache --model-dir runs/chemprot --corpus new.jsonl --out preds.jsonl
  er serve --cache ./cache --model-dir runs/chemprot runs/ner   # online: POST http://127.0.0.1:8000/er/predict
  er cache info ./cache"""


def _count(v: str) -> int:
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {v}")
    return int(v)


def _storage_args(p):
    add_flags(p, StorageConfig, metavars={"s3_connect_timeout": "SECONDS", "s3_read_timeout": "SECONDS", "s3_retries": "N"})


def _ray_args(p):
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (default: start a local Ray)")


def _train_args(p):
    """Every TrainRun and TrainConfig field as a flag, and --config/--print-config over them."""
    add_flags(p, TrainRun)
    add_flags(p, TrainConfig, metavars={"peft_config": "FILE"})
    p.add_argument("--config", metavar="FILE", help="a YAML/JSON file of these settings by field name (e.g. method: lora, "
                   "lr: 1.0e-3, cache: ./cache); flags given override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")


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
    add_flags(p, IngestConfig, skip=INGEST_FLAGLESS, metavars={"model_revision": "REV"})
    _ray_args(p)
    _storage_args(p)

    p = sub.add_parser("train", help="train one task on the upper layers from the cache (Ray Train)",
                       description="Train one task from the cache. A checkpoint is kept under OUT/checkpoints after "
                       "every epoch: a failed worker restarts from it, and --resume OUT continues a run whose driver died.")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier er train output in --out (only er's own files)")
    p.add_argument("--resume", metavar="OUT", help="continue the interrupted run in OUT from its last epoch checkpoint "
                   "(its cache, task and settings come from OUT)")
    _train_args(p)
    _ray_args(p)
    _storage_args(p)

    p = sub.add_parser("sweep", help="run many tasks x methods x hyper-parameters concurrently from one cache",
                       epilog="keys of a sweep file:\n" + field_docs(Sweep) + "\n\ntraining fields a sweep file sets in "
                       "defaults, grid and search (those of er train; the methods key lists the methods):\n"
                       + field_docs(TrainConfig, skip=("method",)), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML/TOML file (see examples/sweep.yaml)")
    add_flags(p, Sweep, skip=tuple(f.name for f in fields(Sweep) if f.name not in SWEEP_FLAGS), metavars={"max_concurrent": "N"},
              default_from="the sweep file")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier er sweep output in the sweep's output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished trials are kept, "
                   "unfinished ones continue from their last epoch (the sweep file must be unchanged)")
    _ray_args(p)

    p = sub.add_parser("predict", help="batch inference with trained tasks; cached examples run the upper layers only")
    p.add_argument("--cache", required=True, help="cache URL")
    p.add_argument("--model-dir", required=True, nargs="+", help="one or more trained model folders (from er train)")
    p.add_argument("--corpus", required=True, nargs="+", help="corpus files or task folder to predict on")
    p.add_argument("--out", required=True, help="output .parquet or .jsonl, one row per example; must not exist")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier er predict output at --out")
    p.add_argument("--text-field", default="text")
    p.add_argument("--record", action="store_true", help="add cache misses to the cache")
    p.add_argument("--actors", type=int, default=1, help="predictor actors (a GPU each when the cluster has GPUs)")
    _ray_args(p)
    _storage_args(p)

    p = sub.add_parser("bench", help="measure recycling speed-ups side by side and write a report")
    p.add_argument("--out", default="benchmarks/REPORT.md", help="report file (markdown; a .json is written beside it)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--data", default=None, help="task data folder (default ../shared/data/tasks)")

    p = sub.add_parser("serve", help="serve trained tasks online (Ray Serve): cached documents run the upper layers only",
                       description="Deploy the models on Ray Serve over the cache: POST ROUTE_PREFIX/predict with "
                       '{"documents": [{"text": ...} | {"words": [...]} | {"question": ..., "context": ...} | {"id": ...}]} '
                       "answers each document from every model that takes its form. A cached document's states are read "
                       "once for all models and run only their upper layers; a miss runs the lower layers too, is answered "
                       "the same, and is written to the miss log, which `er ingest MISS_LOG --cache CACHE` turns into hits. "
                       "Without --token-env it listens on 127.0.0.1 only.")
    p.add_argument("--cache", default=argparse.SUPPRESS, help="cache URL the models were trained from")
    p.add_argument("--model-dir", nargs="+", default=argparse.SUPPRESS, help="trained model folders (er train), served together")
    add_flags(p, ServeConfig, skip=SERVE_FLAGLESS + ("model_dir",), metavars={"token_env": "NAME"})
    p.add_argument("--config", metavar="FILE", help="a YAML/JSON file of these settings by field name; flags given override it")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
    p.add_argument("--print-serve-config", action="store_true", help="print a `serve deploy` config (a RayService's "
                   "serveConfigV2) of this application and exit")
    p.add_argument("--detach", action="store_true", help="return once deployed, leaving it running on the cluster (--address)")
    _ray_args(p)
    _storage_args(p)

    p = sub.add_parser("advise", help="probe several k on a task and recommend the layer to cache a corpus at",
                       description="Trains one short probe per k (a train slice, dev only, never test), each from a cache "
                       "at that layer: the given cache for its own k (the task's missing examples are added to it), probe "
                       "caches of the task's slice under OUT/caches for the others (a cache holds one layer). Prints dev "
                       "metric and cost per k, recommends the largest k (fewest layers trained per task) within "
                       "--tolerance points of the best, and writes OUT/advice.json. With several --task folders: each is probed, and the "
                       "advice is the shallowest k any of them needs (one cache serves them all), with what one cache per k "
                       "would cost instead; token tasks (NER) often need a shallower k than classification.")
    p.add_argument("--cache", required=True, help="a cache of the model to advise on (its k is probed too)")
    p.add_argument("--task", required=True, nargs="+", help="task folder(s) to probe with (their train and dev splits)")
    p.add_argument("--layers", type=int, nargs="+", help="k values to probe (default 0, L/4, L/2, 3L/4 and the cache's k)")
    p.add_argument("--method", choices=["reduced", "lora"], default="reduced", help="what later tasks will train")
    p.add_argument("--budget", type=_count, default=1000, help="train examples per probe (default 1000)")
    p.add_argument("--dev", type=_count, default=500, help="dev examples per probe (default 500)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per probe (default 2)")
    p.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1.0, help="points of dev metric a cheaper k may lose (default 1)")
    p.add_argument("--out", default="er-advice", help="a new or empty folder: advice.json and the probe caches")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier er advise output at --out")

    p = sub.add_parser("cache", help="inspect, verify, repair, compact or upgrade a cache")
    p.add_argument("action", choices=["info", "verify", "repair", "compact", "upgrade"], help="info: print the cache's spec, version and counts; verify: "
                   "check every shard and index segment; repair: drop bad or missing shards from the cache (one "
                   "commit, under the writer lock), delete their files, and say how many examples a re-ingest of the "
                   "corpus will recompute; compact: merge small shards (incremental runs leave many) and the index "
                   "segments into fewer, in one commit, while readers keep reading; upgrade: rewrite a cache of an "
                   "older format in place (one commit)")
    p.add_argument("url", help="cache URL")
    p.add_argument("--repair", action="store_true", help="with verify: repair what it finds")
    p.add_argument("--shard-rows", type=int, default=None, help="with compact: rows per merged shard; shards under half "
                   "of it are merged (default: the largest shard's rows)")
    p.add_argument("--retain", type=float, default=None, help="with compact: seconds the merged-away files stay for "
                   "readers of older versions, before a later writer deletes them (default $ER_RETAIN, else 86400)")
    p.add_argument("--index-only", action="store_true", help="with compact: merge the index segments only, reading "
                   "no states (for a big cache whose segments pile up: `er cache info` says when)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _storage_args(p)

    p = sub.add_parser("export", help="write a trained model as one standard Hugging Face model folder (no er needed)",
                       description="Join the lower and the trained upper layers (LoRA merged) into one encoder, saved with "
                       "save_pretrained, plus the task head: load it with AutoModel.from_pretrained(DIR) and apply "
                       "head.safetensors as DIR/er_head.json says.")
    p.add_argument("model_dir", help="a trained model folder (`er train --out`)")
    p.add_argument("--to", required=True, help="a new folder for the export")

    p = sub.add_parser("demo", help="ingest a task folder, train on it from the cache, print metrics and speed")
    p.add_argument("task", nargs="?", default=None, help="task folder (default ../shared/data/tasks/chemprot)")
    p.add_argument("--workdir", default=".er-demo", help="where the cache and the model go: a new or empty folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier er demo in --workdir (only er's own files)")
    p.add_argument("--layer", default="0.5")
    p.add_argument("--limit", type=int, default=2000, help="examples per split (default 2000; 0 = all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--local", action="store_true", help="no Ray: plain loops in this process")
    _ray_args(p)

    sub.add_parser("cleanup", help="stop Ray processes left behind by er runs that were killed",
                   description="Stop the processes of every local Ray session that er started and whose er process is "
                   "gone (e.g. after kill -9). Sessions are looked up under $RAY_TMPDIR/ray/er-sessions (default "
                   "/tmp/ray/er-sessions); sessions of a running er, or not started by er, are never touched. "
                   "Every er command does this on start; this command does only that.")
    # Accepted before or after the subcommand; SUPPRESS keeps a subcommand from resetting the global value.
    ap.add_argument("--verbose", action="store_true", help="Ray's own logs and worker output on the console too (otherwise "
                    "in Ray's log files), and the traceback of an error (also ER_DEBUG=1)")
    for p in sub.choices.values():
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="Ray's own logs and worker output on the console too, and the traceback of an error")
    return ap


def cmd_cache(args) -> int:
    from er_core import open_cache

    if args.action == "repair" or (args.action == "verify" and args.repair):
        return _repair(args)
    if args.action == "upgrade":
        return _upgrade(args)
    if args.action == "compact":
        return _compact(args)
    reader = open_cache(args.url, storage_options=storage_options(args))
    m = reader.manifest
    if args.action == "info":
        from er_core.store import compact_advised, compact_hint

        info = {"url": args.url, "generation": m.generation, "spec": m.spec.to_dict(), "totals": m.totals, "skipped": m.skipped,
                "index_segments": len(m.index), "compact_advised": compact_advised(len(m.index))}
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
            print(f"index       {len(m.index)} segment(s){compact_hint(args.url, len(m.index))}")
        return 0
    problems = reader.verify()
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(f"{m.totals['shards']} shards checked, {len(problems)} problem(s)")
    if problems:
        print(f"repair with: er cache repair {args.url}", file=sys.stderr)
    return 1 if problems else 0


def _repair(args) -> int:
    from er_core.store import repair_cache

    rep = repair_cache(args.url, storage_options=storage_options(args))
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    for d in rep["dropped"]:
        print(f"dropped {d['path']} ({d['rows']} examples): {d['problem']}", file=sys.stderr)
    print(f"{rep['shards_checked']} shards checked, {len(rep['dropped'])} dropped (generation {rep['generation']}); "
          f"{rep['rows_to_reingest']} examples must be re-ingested")
    if rep["dropped"]:
        print(f"re-ingest them with: er ingest CORPUS... --cache {args.url} (the same corpus; only those are computed)")
    return 0


def _compact(args) -> int:
    from er_core.store import compact_cache

    def progress(done, total):
        print(f"\rmerged {done}/{total} small shards", end="" if done < total else "\n", file=sys.stderr, flush=True)

    retain = {} if args.retain is None else {"retain": args.retain}
    rep = compact_cache(args.url, storage_options=storage_options(args), shard_rows=args.shard_rows,
                        progress=None if args.json else progress, index_only=args.index_only, **retain)
    if args.json:
        print(json.dumps(rep, indent=1))
    elif rep["compacted"]:
        print(f"compacted {args.url} (generation {rep['generation']}): {rep['shards_before']} shards -> {rep['shards_after']} "
              f"({rep['merged']} small ones merged into {rep['written']}), {rep['segments']} index segment(s); merged-away "
              f"files are deleted by a later writer after {rep['retained_seconds']:g} s")
    else:
        print(f"{args.url}: nothing to compact ({rep['shards']} shards, {rep['segments']} index segment(s))")
    return 0


def _upgrade(args) -> int:
    from er_core.store import upgrade_cache

    def progress(done, total):
        print(f"\rrewrote {done}/{total} shards", end="" if done < total else "\n", file=sys.stderr, flush=True)

    rep = upgrade_cache(args.url, storage_options=storage_options(args), progress=None if args.json else progress)
    if args.json:
        print(json.dumps(rep, indent=1))
    elif rep["upgraded"]:
        print(f"upgraded {args.url} from format version {rep['from_version']} to {rep['format_version']}: "
              f"{rep['shards']} shards, {rep['rows']} examples")
    else:
        print(f"{args.url} already has format version {rep['format_version']}; nothing to do")
    return 0


def _storage_url(args) -> str | None:
    """The URL a storage error most likely concerns: the command's S3 URL if any, else its cache."""
    urls = [getattr(args, "cache", None), getattr(args, "url", None), *(getattr(args, "corpus", None) or [])]
    urls = [u for u in urls if isinstance(u, str)]
    return next((u for u in urls if "://" in u), urls[0] if urls else None)


def _er_error(e: BaseException | None) -> ErError | None:
    """The ErError behind `e`, also when it comes wrapped in a Ray task error."""
    for _ in range(20):
        if e is None or isinstance(e, ErError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _verbose(args) -> bool:
    return getattr(args, "verbose", False) or os.environ.get("ER_DEBUG", "") not in ("", "0")


def _fail(args, e: Exception) -> int:
    """Every failure ends in one `er` line; the traceback only with --verbose or ER_DEBUG=1."""
    import traceback

    from er_core.store import explain_storage_error

    if _verbose(args):
        traceback.print_exception(e)
    err = _er_error(e) or explain_storage_error(e, _storage_url(args), storage_options(args))
    if err is not None:
        print(f"er {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    first = (str(e).strip().splitlines() or [""])[0]
    print(f"er {args.cmd}: error: {type(e).__name__}: {first} (run with --verbose for the traceback)", file=sys.stderr)
    return 1


def cmd_cleanup(args) -> int:
    from pipelines.ray_sessions import reap

    cleaned = reap()
    for s in cleaned:
        print(f"stopped {s['processes']} process(es) of {s['session_dir'] or 'a Ray starting up'} (er pid {s['pid']}, gone)")
    print(f"{len(cleaned)} leftover Ray session(s) cleaned")
    return 0


def cmd_export(args) -> int:
    from er_core.export import export_model

    rep = export_model(args.model_dir, args.to)
    print(f"exported {rep['method']} {rep['kind']} model {args.model_dir} to {rep['to']}: AutoModel.from_pretrained"
          f"({rep['to']!r}) plus head.safetensors, applied as er_head.json says")
    return 0


def main(argv=None) -> int:
    from pipelines import ray_env, ray_sessions

    args = build_parser().parse_args(argv)
    ray_env.set_verbose(_verbose(args))
    ray_sessions.exit_on_sigterm()  # so a SIGTERM still releases locks and stops the Ray this run starts
    try:
        if args.cmd == "cleanup":
            return cmd_cleanup(args)
        ray_sessions.reap()  # Ray processes left by an er that was killed
        if args.cmd == "cache":
            return cmd_cache(args)
        if args.cmd == "export":
            return cmd_export(args)
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
        elif args.cmd == "advise":
            from pipelines.advise import main as run
        elif args.cmd == "serve":
            from pipelines.serve import main as run
        else:
            from pipelines.demo import main as run
        return run(args) or 0
    except Exception as e:  # noqa: BLE001 - explained in one line by _fail
        return _fail(args, e)
    except KeyboardInterrupt:
        print(f"er {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
