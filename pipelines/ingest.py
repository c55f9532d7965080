"""`er ingest`: stream a corpus through the frozen lower layers into the cache, on Ray Data.

    corpus sources --read_rows (tasks)--> a row per shard's worth of rows {key[], input[], src[], row[]}
        --tokenize_rows (CPU tasks: claim keys, tokenize)--> one PackedRows per shard
        --EmbedStates (actor pool, GPUs or CPUs: lower layers, codec on the device)--> the same, with states
        --write_rows (CPU tasks: one shard file each)--> one ShardInfo row per shard
    On a cluster without GPUs the three middle stages share the same cores, so one TokenizeEmbedWrite actor
    runs them in a single call per shard: no states cross the object store (separate stages ran 0.92x of the
    earlier one-actor code on 2 cores; this runs as fast: REPORT `ingest-cpu`).
    driver: holds the CacheWriter (its lock), registers shards, commits every N shards / T seconds and at the end.

The driver reads the corpus's first shards' worth of rows, so a corpus without text or bad input there fails
before the cache is touched; the read tasks validate the rest as they stream it (no serial pass over the corpus).
Keys are claimed from one small KeyClaims actor seeded with the keys already cached, so a key is
embedded once per cache, whatever the number of actors, duplicates in the corpus, or re-runs.
A killed run leaves the last commit intact; re-running completes it (CacheWriter takes over the
stale lock and removes the dead run's unlisted shards).

--id-field: the user's id is the key, and it is trusted: the first row of an id wins, and a text
changed under an id already cached is not embedded again (use content keys for that).
The pool is sized from the cluster before the cache is touched (pipelines/placement.py); a request
it can never run is refused then. On a multi-node cluster the cache must be s3:// (or a mount every
node sees), since write tasks write shards themselves; local corpus files are read on the driver's node.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa

from er_core import ErError, Recycler, ingest_local
from er_core.store import (CacheSpec, CacheWriter, Manifest, PackedRows, ShardInfo, Written, compact_advised, compact_hint,
                           open_state, packed_table, shard_name, write_shard)
from er_core.corpus import KeyClaims, batch_token, find_sources, read_source, scan
from er_core.embed import CPU_BATCH, Embedder, is_empty, token_budget
from er_core.keys import TokenizerSettings
from er_core.recycle import cache_rows, cache_spec
from er_core.errors import CacheMismatchError, LockLostError
from er_core.host_memory import keep_freed_memory
from er_core.keys import example_key
from er_core.secrets import reject_secrets
from pipelines.configs import AUTOCAST, IngestConfig
from pipelines.placement import Pool, read_args
from pipelines.ray_env import absolute

log = logging.getLogger("er.ingest")

_INFO_FIELDS = [f.name for f in fields(ShardInfo)]
# Tokenize and write tasks reserve no CPU (their work is small beside the lower layers), so they can never keep an
# actor of the pool from its CPU; their number at once is bounded instead.
CPU_STAGE = 0
# The driver reads this many shards' worth of rows before starting (bad input or no text there fails before the
# cache is touched; fewer rows than this size the pool); the read tasks validate the rest as they read it.
PROBE_SHARDS = 8


@dataclass
class Report:
    manifest: Manifest
    summary: dict
    actors: list[dict] = field(default_factory=list)  # per actor: device, assigned Ray resources, and "node" (its id)


# ---------------------------------------------------------------- the two Ray Data stages


def read_rows(batch, sources, text_field, id_field, tokenizer, storage_options, limit, chunk=1024, claims=None):
    """Read stage (one call per source): its non-empty rows with their keys, `chunk` (a shard's worth) to an output
    row, so every later call takes exactly one shard. It validates as it reads (bad input fails here, naming file and
    line); empty rows are counted to `claims` (KeyClaims), once per source."""
    for i in batch["src"]:
        src, out, empty = sources[int(i)], [], 0
        for r in read_source(src, text_field, id_field, storage_options, limit):
            if is_empty(r.inputs):
                empty += 1
                continue
            key = r.ident if id_field else example_key(r.inputs, tokenizer)
            out.append((key, json.dumps(r.inputs, ensure_ascii=False), int(i), r.row))
            if len(out) >= chunk:
                yield _columns(out)
                out = []
        if out:
            yield _columns(out)
        if empty and claims is not None:
            import ray

            ray.get(claims.count_empty.remote(int(i), empty))


def _columns(rows) -> pa.Table:
    """One output row holding a shard's worth of read rows: keys, inputs (JSON), source and row numbers."""
    key, inp, src, row = zip(*rows)
    return pa.table({"key": pa.array([key], pa.list_(pa.string())), "input": pa.array([inp], pa.list_(pa.string())),
                     "src": pa.array([src], pa.list_(pa.int32())), "row": pa.array([row], pa.list_(pa.int64()))})


@functools.lru_cache(maxsize=2)
def _tokenizer(settings: TokenizerSettings, revision: str | None):
    """One tokenizer per worker process, checked against the cache's: keys on every node mean the same tokens."""
    from er_core.keys import tokenizer_fingerprint
    from er_core.models import load_tokenizer

    tok = load_tokenizer(settings.name, revision)
    if tokenizer_fingerprint(tok) != settings.fingerprint:
        raise ErError(f"the tokenizer of {settings.name!r} on this node differs from the cache's (another version or "
                      f"files): install the same model on every node")
    return tok


def tokenize_rows(batch, claims, settings: TokenizerSettings, revision: str | None):
    """CPU stage: claim the batch's keys (each key is embedded once per cache), tokenize the new ones (a row per
    window of a long QA context), and pack them into one row of contiguous buffers."""
    import ray

    if batch.num_rows != 1:
        raise ErError(f"the tokenize stage takes one shard's rows a call, not {batch.num_rows}")
    t0 = time.perf_counter()
    keys, inputs = (np.array(batch.column(c)[0].as_py(), dtype=object) for c in ("key", "input"))
    src, row = (batch.column(c)[0].values.to_numpy() for c in ("src", "row"))
    mask = ray.get(claims.claim.remote(list(keys), batch_token(src, row)))
    t1 = time.perf_counter()
    rows = []
    if mask.any():  # the read stage's keys (content hashes, or --id-field ids)
        rows = cache_rows(_tokenizer(settings, revision), settings, [json.loads(s) for s in inputs[mask]], list(keys[mask]))
    packed = PackedRows.of(rows)
    stages = {"claim": t1 - t0, "tokenize": time.perf_counter() - t1}
    return packed.to_arrow(seen=len(keys), inputs=int(mask.sum()), stages=json.dumps(stages))


class EmbedStates:
    """Actor (a GPU, or a CPU on CPU-only clusters): holds the lower part once; each call embeds packed rows in
    length-sorted passes within the token budget, and the states leave the device in the storage codec, one copy
    per pass."""

    def __init__(self, model, layer, codec, max_length, spec, batch_size=None, max_tokens=None, dtype="fp32", threads=None):
        import ray
        import torch

        keep_freed_memory()  # every shard's buffers reuse the last one's pages
        self.resources = ray.get_runtime_context().get_assigned_resources()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.resources.get("GPU") and self.device == "cpu":
            log.warning("this actor was given a GPU but torch sees no CUDA; computing on CPU"
                        + (f" in fp32 (--dtype {dtype} applies on GPU only)" if dtype != "fp32" else ""))
        if self.device == "cpu" and threads:
            torch.set_num_threads(max(1, min(int(threads), os.cpu_count() or 1)))
        rec = Recycler.load(model, layer, codec, max_length, spec.model_revision)
        spec.check(rec.spec, f"for {model!r} on this worker", check_codec=True)  # same weights on every node
        c = rec.encoder.config
        budget = max_tokens or token_budget(self.device, spec.hidden_size, getattr(c, "intermediate_size", 4 * spec.hidden_size),
                                            getattr(c, "num_attention_heads", 12), spec.tokenizer.max_length)
        autocast = getattr(torch, AUTOCAST[dtype]) if self.device != "cpu" and dtype in AUTOCAST else None
        self.embed = Embedder(rec.lower, rec.pad_id, self.device, autocast, max_tokens=budget,
                              max_batch=batch_size or (CPU_BATCH if self.device == "cpu" else budget))
        del rec  # the lower part only stays (the embedder holds it)
        self.codec = codec
        self.actor = ray.get_runtime_context().get_actor_id()[:8]
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for i in range(batch.num_rows):
            started, t0, cpu = time.time(), time.perf_counter(), time.thread_time()  # wall: from the command's start
            rows = PackedRows.from_arrow(batch, i)
            if len(rows):
                rows = self.embed.pack(rows, self.codec)
            seconds = time.perf_counter() - t0
            # embed_cpu: this thread's CPU seconds (torch on CPU runs here), not inflated by other processes' turns
            stages = {**json.loads(batch.column("stages")[i].as_py()), "embed": seconds, "embed_cpu": time.thread_time() - cpu}
            out.append(rows.to_arrow(seen=batch.column("seen")[i].as_py(), inputs=batch.column("inputs")[i].as_py(),
                                     seconds=seconds, started=started, stages=json.dumps(stages), actor=self.actor,
                                     device=self.device, node=self.node, resources=json.dumps(self.resources, sort_keys=True)))
        return pa.concat_tables(out)


class TokenizeEmbedWrite(EmbedStates):
    """Actor for clusters without GPUs: tokenize_rows, EmbedStates and write_rows in one call per shard."""

    def __init__(self, *, tokenize: dict, write: dict, **embed):
        super().__init__(**embed)
        self.tokenize, self.write = tokenize, write

    def __call__(self, batch):
        return write_rows(super().__call__(tokenize_rows(batch, **self.tokenize)), **self.write)


def write_rows(batch: pa.Table, cache: str, storage_options, run_id: str, codec: str) -> dict:
    """CPU stage: one shard file per packed row (page checksums, row offsets and checksums computed here, off the GPU); its
    ShardInfo and index material go back to the driver, which commits."""
    keep_freed_memory()
    out = []
    for i in range(batch.num_rows):
        t0 = time.perf_counter()
        rows = PackedRows.from_arrow(batch, i)
        info, digests, material = ShardInfo(path="", rows=0, tokens=0, bytes=0, checksum=""), b"", b""
        if len(rows):
            w = write_shard(cache, shard_name(run_id), packed_table(rows, codec), storage_options)
            info, digests, material = w.info, w.digests.tobytes(), w.rows.tobytes()
        row = {k: getattr(info, k) for k in _INFO_FIELDS}
        stages = {**json.loads(batch.column("stages")[i].as_py()), "write": time.perf_counter() - t0}
        row.update(digests=digests, material=material, stages=json.dumps(stages),  # for the index; per-stage seconds
                   **{k: batch.column(k)[i].as_py() for k in ("seen", "seconds", "started", "actor", "device", "node", "resources")},
                   inputs=batch.column("inputs")[i].as_py() if info.path else 0)
        out.append(row)
    return {k: np.array([r[k] for r in out], dtype=object if k in ("digests", "material") else None) for k in out[0]}


# ---------------------------------------------------------------- planning


def _unwrap(e: BaseException) -> BaseException:
    """The ErError (bad input, mismatch) behind a Ray task failure, if any, so the CLI prints it plainly. An actor
    whose constructor raised (e.g. its model differs from the cache's) dies with only the error's text: it is
    rebuilt from that."""
    from ray.exceptions import ActorDiedError

    seen, died = set(), None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ErError):
            return e
        died = died or (e if isinstance(e, ActorDiedError) and "creation task" in str(e) else None)
        e = getattr(e, "cause", None) or e.__cause__
    if died is None:
        return None
    import er_core.errors

    # The exception that ended the constructor is the traceback's last: after any "During handling..." context.
    last = re.split(r"^(?:During handling of the above exception|The above exception was the direct cause).*$",
                    str(died), flags=re.M)[-1]
    found = re.search(r"^er_core\.errors\.(\w+): (.+)", last, flags=re.M | re.S)
    if found is None:
        return None
    kind = getattr(er_core.errors, found.group(1), None)
    return (kind if isinstance(kind, type) and issubclass(kind, ErError) else ErError)(found.group(2).strip())


class _Heartbeat:
    """Refreshes the writer lock while shards are slow to come, so other hosts never see it as stale, and watches
    the Ray nodes the run started with.

    If another writer took the lock, or a node was lost (its actors' work and the blocks in its object store with
    them, which Ray Data's streaming execution can wait on forever), it interrupts the driver (which may be waiting
    on Ray), and the `with` block ends in that error; the writer then commits nothing more, and what it committed
    stays: a re-run computes only what is missing.
    """

    def __init__(self, writer: CacheWriter, every: float = 60.0, watch_nodes: bool = True, node_every: float = 2.0):
        import ray

        self.writer, self.every, self.node_every, self.stop = writer, every, node_every, threading.Event()
        self.lost: ErError | None = None
        self._once = threading.Lock()  # one interrupt, whichever thread sees a loss first
        self.nodes = _alive_nodes() if watch_nodes and ray.is_initialized() else None
        # Two threads: a Ray call that hangs must never stall the lock's heartbeat (the lock would go stale).
        self.threads = [threading.Thread(target=self._beat, daemon=True)]
        if self.nodes:
            self.threads.append(threading.Thread(target=self._watch, daemon=True))

    def _beat(self):
        while not self.stop.wait(self.every):
            try:
                self.writer.lock.heartbeat()
            except LockLostError as e:
                return self._interrupt(e)
            except OSError as e:  # transient storage error: the next beat retries
                log.warning("lock heartbeat failed: %s", e)

    def _watch(self):
        while not self.stop.wait(self.node_every):
            gone = [ip for nid, ip in self.nodes.items() if nid not in _alive_nodes()]
            if gone:
                return self._interrupt(ErError(
                    f"Ray node {', '.join(gone)} was lost mid-ingest; the shards committed so far are kept (generation "
                    f"{self.writer.manifest.generation}): re-run the same command to complete the cache, it computes "
                    f"only what is missing"))

    def _interrupt(self, e: ErError) -> None:
        with self._once:
            if self.lost is not None:  # the other thread interrupted first
                return
            self.lost = e
        # A real SIGINT to the main thread: it wakes a driver blocked in a wait (Ray Data's output queue), which
        # _thread.interrupt_main() would only flag for the next Python bytecode, never reached.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def __enter__(self):
        # The interrupt is a SIGINT: a driver started with SIGINT ignored (`er ingest ... &` from a script or cron,
        # nohup, a Ray job) would never see it and wait on a lost node forever, so the run raises on it meanwhile.
        self._sigint = None
        if threading.current_thread() is threading.main_thread() and not callable(signal.getsignal(signal.SIGINT)):
            self._sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        try:
            self._join()
        finally:
            if self._sigint is not None:
                signal.signal(signal.SIGINT, self._sigint)
        if self.lost is not None:
            raise self.lost

    def _join(self):
        interrupted = None
        for t in self.threads:  # joined even through a SIGINT: a watcher must not call Ray after Ray shuts down
            while True:
                try:
                    t.join(timeout=self.node_every + 10)  # one stuck in a hung Ray call is a daemon: left behind
                    break
                except KeyboardInterrupt as e:  # ours, or the user's, delivered mid-join
                    interrupted = e
        if interrupted is not None and self.lost is None:
            raise interrupted


def _alive_nodes() -> dict[str, str]:
    """Node id -> IP of the Ray nodes alive now."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}


# ---------------------------------------------------------------- driver




def run(corpus: list[str], cache: str, config: IngestConfig | None = None, **kw) -> Report:
    """Add every example of `corpus` not yet cached to the cache at `cache`; return the manifest and a summary."""
    cfg = config or IngestConfig(**kw)
    reject_secrets(cfg.storage_options)  # they travel in Ray task and actor arguments
    cache = absolute(cache)  # Ray workers write the shards from their own folder
    t0, wall0 = time.perf_counter(), time.time()
    sources = find_sources(corpus, cfg.storage_options)
    state = open_state(cache, cfg.storage_options)  # the one open: the writer reads only the commits after it
    cfg = cfg.against(state.spec if state else None)
    # An existing cache was built at a model revision (or none): keep it.
    revision = cfg.model_revision or (state.spec.model_revision if state else None)
    if cfg.local:  # one pass; ingest_local refuses an empty corpus itself
        return _run_local(sources, cache, Recycler.load(cfg.model, cfg.layer, cfg.codec, cfg.max_length, revision), cfg, t0,
                          state)
    # The corpus's first rows are read here: bad input among them, or a corpus with no text at all (read whole then),
    # fails before the cache is touched (no folder, lock or manifest). The rest is validated as the read tasks read
    # it, in parallel: bad input there fails the run in one line naming file and line, after which the shards it
    # committed stay valid and a re-run continues from them.
    stats = scan(sources, cfg.text_field, cfg.id_field, cfg.storage_options, cfg.limit, enough=PROBE_SHARDS * cfg.shard_rows)
    if not stats.usable:
        raise ErError(f"nothing to ingest into {cache}: " + (f"all {stats.rows} rows of the corpus have an empty "
                      f"{cfg.text_field!r}" if stats.rows else "the corpus has no rows") + "; nothing was written")
    # The driver plans and checks with the spec alone (remembered per model folder: er_core.model_specs); each actor
    # loads the weights and checks them against it. A mismatch is checked once more with a freshly computed spec.
    spec = cache_spec(cfg.model, cfg.layer, cfg.codec, cfg.max_length, revision)
    # Blocks of shard_rows rows, cut per source: the most actor calls the pipeline can make.
    pool = _plan(cache, cfg, blocks=-(-stats.usable // cfg.shard_rows) + len(sources) - 1 if stats.complete else None)
    try:
        writer = CacheWriter(cache, spec, cfg.storage_options, known=state)  # fails fast if another run holds the lock
    except CacheMismatchError:
        fresh = _refreshed(spec, cfg, revision)
        if fresh is None:
            raise
        spec, writer = fresh, CacheWriter(cache, fresh, cfg.storage_options, known=state)
    try:
        with _Heartbeat(writer):
            totals, actors = _run_ray(sources, writer, spec, cfg, pool, total=stats.usable if stats.complete else None)
        if totals["empty"]:
            writer.count_skipped("empty_text", totals["empty"])
        manifest = writer.close()
    except BaseException as e:
        writer.abort()
        cause = _unwrap(e)
        if isinstance(cause, CacheMismatchError) and _refreshed(spec, cfg, revision) is not None:
            raise CacheMismatchError(f"{cause}. er's remembered spec of {cfg.model!r} (~/.cache/er/specs) was out of "
                                     f"date and is now refreshed: run the command again") from None
        if cause is not None and cause is not e:
            raise cause from None
        raise
    if totals["claimed"] != totals["inputs"]:
        raise ErError(f"{totals['claimed'] - totals['inputs']} claimed examples were not written (a worker failed and its "
                      f"retry was batched differently); the cache is valid but incomplete: re-run the same command")
    summary = _summary(totals, totals["empty"], time.perf_counter() - t0, manifest, cache)
    if totals["first_embed"] is not None:  # from the command's start to the first text reaching the lower layers
        summary["first_embed_seconds"] = round(totals["first_embed"] - wall0, 2)
    summary["stage_seconds"] = {k: round(v, 2) for k, v in sorted(totals["stages"].items())}
    return Report(manifest, summary, actors)


def _refreshed(spec: CacheSpec, cfg: IngestConfig, revision: str | None) -> CacheSpec | None:
    """The model's spec computed afresh from its weights (and remembered), if it differs from `spec`; else None."""
    fresh = cache_spec(cfg.model, cfg.layer, cfg.codec, cfg.max_length, revision, fresh=True)
    return fresh if fresh != spec else None


def ingest(corpus, cache, **kw) -> Manifest:
    """Programmatic entry point: like `er ingest`, returns the committed manifest."""
    return run(corpus, cache, **kw).manifest


def _plan(cache: str, cfg: IngestConfig, blocks: int | None = None) -> Pool:
    """Join or start Ray and size the pool from its nodes; what they can never run is refused here, before the
    cache is touched."""
    from pipelines.placement import Cluster, check_shared, plan_pool
    from pipelines.ray_env import ensure_ray

    ensure_ray(cfg.address, num_cpus=cfg.actors + 1 if cfg.actors else None)  # a local Ray er starts fits --actors
    cluster = Cluster.current(local=(cfg.address or os.environ.get("RAY_ADDRESS") or "local") == "local")
    check_shared(cache, cluster, "cache")
    pool = plan_pool(cluster, cfg.actors, cfg.threads, blocks)
    log.info("actor pool: %s; cluster: %s", pool, cluster.describe())
    return pool


def _run_ray(sources, writer, spec: CacheSpec, cfg: IngestConfig, pool: Pool, total: int):
    import ray

    if not cfg.progress:  # er draws its own bar; Ray Data's are on only with --verbose (ray_env)
        ray.data.DataContext.get_current().enable_progress_bars = False

    # Claims ask the index about each batch's keys: neither the cached keys nor any state is ever read whole.
    reader = writer.reader()
    claims = ray.remote(KeyClaims).options(num_cpus=0).remote(index=reader.index)  # asks the index per batch: no state read
    try:
        return _stream(_pipeline(sources, writer, spec, cfg, pool, claims), writer, cfg, claims, total)
    finally:
        ray.kill(claims)


def _pipeline(sources, writer, spec: CacheSpec, cfg: IngestConfig, pool: Pool, claims):
    """sources -> rows (read tasks) -> claimed, tokenized, packed (CPU tasks) -> states (actor pool of GPUs)
    -> shard files (CPU tasks) -> ShardInfo rows; without GPUs, the middle three in one actor pool. The streaming
    executor paces the stages (backpressure), so each holds a bounded number of batches."""
    import ray

    from pipelines.ray_env import worker_env

    env = worker_env()
    ds = ray.data.from_items([{"src": i} for i in range(len(sources))], override_num_blocks=len(sources))
    # Every stage outputs one row per shard; a block of its own each (a row is never cut), so each call takes one
    # shard as soon as it is read. At Ray Data's default (128 MiB blocks) the first shard waited for the read of up
    # to 128 MiB of corpus; a repartition behind the read cut the rows back to shards, but stalled the read when the
    # blocks were smaller (REPORT `ingest-cpu-side`).
    ds.context.target_max_block_size = 1
    rows = ds.map_batches(
        read_rows, batch_size=1, compute=ray.data.TaskPoolStrategy(size=min(len(sources), 4)), runtime_env=env,
        **read_args(sources), fn_kwargs=dict(
            sources=sources, text_field=cfg.text_field, id_field=cfg.id_field, tokenizer=spec.tokenizer,
            storage_options=cfg.storage_options, limit=cfg.limit, chunk=cfg.shard_rows, claims=claims))
    tokenize = dict(claims=claims, settings=spec.tokenizer, revision=spec.model_revision)
    embed = dict(model=cfg.model, layer=cfg.layer, codec=cfg.codec, max_length=cfg.max_length, spec=spec,
                 batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, dtype=cfg.dtype, threads=pool.threads)
    write = dict(cache=writer.url, storage_options=cfg.storage_options, run_id=writer.run_id, codec=spec.codec)
    actors = dict(compute=ray.data.ActorPoolStrategy(size=pool.size), num_gpus=pool.num_gpus, num_cpus=pool.num_cpus,
                  runtime_env=env)
    if not pool.num_gpus:
        return rows.map_batches(TokenizeEmbedWrite, batch_size=1, batch_format="pyarrow", **actors,
                                fn_constructor_kwargs=dict(tokenize=tokenize, write=write, **embed))
    stage = dict(num_cpus=CPU_STAGE, compute=ray.data.TaskPoolStrategy(size=max(2, pool.size)), runtime_env=env)
    packed = rows.map_batches(tokenize_rows, batch_size=1, batch_format="pyarrow", **stage, fn_kwargs=tokenize)
    states = packed.map_batches(EmbedStates, batch_size=1, batch_format="pyarrow", **actors, fn_constructor_kwargs=embed)
    return states.map_batches(write_rows, batch_size=1, batch_format="pyarrow", **stage, fn_kwargs=write)


def _stream(shards, writer: CacheWriter, cfg: IngestConfig, claims, total: int):
    """Consume the shard rows as they come (tiny, never all in memory): register each, commit on the cadence."""
    import ray

    from pipelines.ray_env import streamed

    totals = dict(rows=0, inputs=0, tokens=0, bytes=0, truncated=0, seen=0, shards=0, busy=0.0, first=None,
                  first_embed=None, stages=Counter())
    actors, start = {}, time.monotonic()
    # An interrupted run stops Ray Data's executor and its threads on leaving `streamed`.
    with _progress(total, cfg.progress) as bar, streamed(shards.iter_rows()) as rows:
        _consume(rows, writer, cfg, totals, actors, start, bar)
        if bar is not None and bar.total is None:  # a corpus bigger than the first check: its size is known now
            bar.total = bar.n
            bar.refresh()
    done, empty = ray.get([claims.stats.remote(), claims.empty_rows.remote()])
    totals.update(claimed=done["claimed"], empty=empty)
    return totals, sorted(actors.values(), key=lambda a: a["actor"])


@contextlib.contextmanager
def _progress(total: int, show: bool):
    """er's bar: examples read and tokens/s; the commit lines print above it (logging through tqdm)."""
    if not show:
        yield None
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    from pipelines.bars import bar

    with logging_redirect_tqdm(), bar(total=total, desc="ingest", unit="ex") as b:
        yield b


def _consume(rows, writer: CacheWriter, cfg: IngestConfig, totals: dict, actors: dict, start: float, bar=None) -> None:
    pending, last = 0, start
    for r in rows:
        if bar is not None:
            bar.update(int(r["seen"]))
        totals["seen"] += int(r["seen"])
        totals["inputs"] += int(r["inputs"])  # fewer than rows when long QA contexts are read in windows
        totals["busy"] += float(r["seconds"])
        totals["first"] = totals["first"] or time.monotonic() - start
        first = float(r["started"])  # when an embed call began (wall clock, any node)
        totals["first_embed"] = first if totals["first_embed"] is None else min(totals["first_embed"], first)
        totals["stages"].update(json.loads(r["stages"]))
        t_driver = time.perf_counter()
        actors.setdefault(r["actor"], {"actor": r["actor"], "device": r["device"], "node": r["node"],
                                       "resources": json.loads(r["resources"])})
        if r["path"]:
            info = ShardInfo(**{k: _py(r[k]) for k in _INFO_FIELDS})
            writer.add_shard(Written.from_buffers(info, r["digests"], r["material"]))
            for k in ("rows", "tokens", "bytes", "truncated"):
                totals[k] += getattr(info, k)
            totals["shards"] += 1
            pending += 1
            if bar is not None:
                rate = totals["tokens"] / max(time.monotonic() - start, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)  # shown at the bar's next redraw
        if pending and (pending >= cfg.commit_every or time.monotonic() - last >= cfg.commit_seconds):
            m = writer.commit()
            log.info("committed generation %d: %d shards, %d rows", m.generation, m.totals["shards"], m.totals["rows"])
            pending, last = 0, time.monotonic()
        totals["stages"]["driver"] += time.perf_counter() - t_driver  # register and commit: the serial part


def _py(v):
    return v.item() if hasattr(v, "item") else v


class _IdKeyed(Recycler):
    """--id-field in the plain loop: the user's id (carried in the input dict) is the key."""

    def key(self, inputs: dict) -> str:
        return inputs["_id"]


def _run_local(sources, cache, rec, cfg: IngestConfig, t0: float, state) -> Report:
    before = state.totals if state else dict.fromkeys(("rows", "tokens", "bytes", "truncated", "shards"), 0)
    if cfg.id_field:
        rec = _IdKeyed(**{f.name: getattr(rec, f.name) for f in fields(rec)})
    counts = {"seen": 0, "empty": 0}

    def inputs():
        for src in sources:
            for r in read_source(src, cfg.text_field, cfg.id_field, cfg.storage_options, cfg.limit):
                counts["empty" if is_empty(r.inputs) else "seen"] += 1
                yield r.inputs if cfg.id_field is None else {**r.inputs, "_id": r.ident}

    claims: dict = {}
    manifest = ingest_local(inputs(), cache, rec, cfg.storage_options, progress=cfg.progress, stats=claims, known=state)
    totals = {k: manifest.totals[k] - before[k] for k in ("rows", "tokens", "bytes", "truncated", "shards")}
    totals.update(seen=counts["seen"], claimed=claims.get("claimed", totals["rows"]))
    summary = _summary(totals, counts["empty"], time.perf_counter() - t0, manifest, cache)
    return Report(manifest, summary, [{"actor": "local", "device": "cpu", "resources": {}}])


# ---------------------------------------------------------------- summary


def _summary(t, empty, seconds, manifest, cache) -> dict:
    return {
        "examples": t["claimed"],
        "rows": t["rows"],  # more than examples when QA contexts are read in windows
        "tokens": t["tokens"],
        "truncated": t["truncated"],
        "skipped_empty": empty,
        "skipped_cached_or_duplicate": t["seen"] - t["claimed"],
        "shards": t["shards"],
        "bytes": t["bytes"],
        "bytes_per_token": round(t["bytes"] / t["tokens"], 2) if t["tokens"] else 0.0,
        "seconds": round(seconds, 2),
        # actor-seconds inside calls, and the wait for the first shard (worker start, model load)
        "busy_seconds": round(t.get("busy", seconds), 2),
        "first_shard_seconds": round(t.get("first") or 0.0, 2),
        "tokens_per_s": round(t["tokens"] / seconds, 1) if seconds else 0.0,
        "examples_per_s": round(t["claimed"] / seconds, 2) if seconds else 0.0,
        "cache": cache,
        "generation": manifest.generation,
        "cache_rows": manifest.totals["rows"],
        "index_segments": len(manifest.index),
        "compact_advised": compact_advised(len(manifest.index)),
    }


def print_summary(rep: Report) -> None:
    s = rep.summary
    devices = Counter((a["device"], json.dumps(a["resources"], sort_keys=True)) for a in rep.actors)
    windows = f", {s['rows']} rows with the windows of long QA contexts" if s["rows"] != s["examples"] else ""
    print(f"examples written  {s['examples']}  ({s['skipped_cached_or_duplicate']} already cached or duplicate, "
          f"{s['skipped_empty']} empty skipped{windows})")
    print(f"tokens            {s['tokens']}  ({s['truncated']} examples truncated)")
    print(f"bytes written     {s['bytes']}  ({s['bytes_per_token']} bytes/token, {s['shards']} shards)")
    print(f"throughput        {s['tokens_per_s']} tokens/s, {s['examples_per_s']} examples/s  ({s['seconds']} s)")
    print("actors            " + ", ".join(f"{n} on {d} {r}" for (d, r), n in devices.items()))
    nodes = Counter(a["node"][:8] for a in rep.actors if a.get("node"))
    if nodes:
        print(f"nodes             {len(nodes)}  (" + ", ".join(f"{k}: {n} actors" for k, n in sorted(nodes.items())) + ")")
    print(f"cache             {s['cache']}  (generation {s['generation']}, {s['cache_rows']} rows, "
          f"{s['index_segments']} index segments{compact_hint(s['cache'], s['index_segments'])})")


def main(args) -> int:
    from pipelines.configs import given, storage_options

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("er").setLevel(logging.INFO)  # er's own progress; libraries (botocore, ...) stay quiet
    cfg = IngestConfig(storage_options=storage_options(args), **given(IngestConfig, args))  # --address among them
    print_summary(run(args.corpus, args.cache, cfg))
    return 0
