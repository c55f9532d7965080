"""`er predict`: batch inference for one or more trained tasks over a corpus, streamed through Ray Data.

    corpus files -> rows (id, key, inputs) -> cache hits read and decoded (CPU tasks) -> predictor actors
    -> one output file, written as rows arrive

The driver never holds the corpus: read tasks stream each source in chunks; CPU tasks locate each
batch's keys through the cache's key index, read only the row groups holding the hits (er_core's
CacheReader, every page checksummed) and decode them, in parallel; the predictor actors run the
misses through the shared lower layers and every task's upper layers + head on all of them. Output rows stream into the file (written to a hidden
sibling, renamed when complete). With --record, the misses' inputs stream into a temporary file and
are ingested afterwards. Actors take a GPU each when the cluster has GPUs.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np

from er_core import ErError, open_cache
from er_core.store import CacheReader, Manifest, is_local, url_to_fs
from er_core.corpus import find_sources, read_source
from er_core.embed import is_empty
from er_core.keys import example_key
from er_core.outputs import claim_file, commit_file, temp_sibling
from er_core.secrets import reject_secrets
from er_core.tasks import Example


BATCH = 256  # examples per read, decode and predict call


def read_examples(batch, sources, text_field, settings, storage_options, chunk=1024):
    """Read stage (one call per source): its non-empty rows as (id, key, inputs), in chunks."""
    for i in batch["src"]:
        src, out = sources[int(i)], []
        for r in read_source(src, text_field, None, storage_options):
            if is_empty(r.inputs):
                continue
            out.append((r.ident if r.ident is not None else src.where(r.row), example_key(r.inputs, settings),
                        json.dumps(r.inputs, ensure_ascii=False)))
            if len(out) >= chunk:
                yield _columns(out)
                out = []
        if out:
            yield _columns(out)


def _columns(rows) -> dict:
    ids, keys, inputs = zip(*rows)
    return {"id": np.array(ids, dtype=object), "key": np.array(keys, dtype=object), "input": np.array(inputs, dtype=object)}


@functools.lru_cache(maxsize=4)
def _reader(url: str, manifest_json: str, storage_options_json: str) -> CacheReader:
    """One reader per worker process and version: index buckets and connections are reused across batches. The
    version's state is its spec and index segments (~200 bytes each), never a shard list."""
    return CacheReader(url, Manifest.from_dict(json.loads(manifest_json), url), json.loads(storage_options_json))


def read_hits(batch, url: str, manifest_json: str, storage_options_json: str):
    """CPU stage: the batch's cache hits read (only their row groups, checksummed) and decoded to float32, so the
    predictor actor (a GPU) only computes. A miss gets no states: the actor runs it through the lower layers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reader = _reader(url, manifest_json, storage_options_json)
    keys = pa.array(list(batch["key"]), pa.string())
    got = reader.read_located(reader.locate(keys.to_pylist()), ["length", "hidden", "scale"])
    at = pc.index_in(keys, value_set=got.column("key")).to_pylist()  # None: a miss
    states = np.full(len(keys), None, dtype=object)
    lengths, hidden, scale = (got.column(c).to_pylist() for c in ("length", "hidden", "scale"))
    for i, j in enumerate(at):
        if j is not None:
            states[i] = reader.decode(lengths[j], hidden[j], scale[j]).tobytes()
    return {**{k: batch[k] for k in ("id", "key", "input")}, "states": states}


class Predictor:
    """Ray Data actor (a GPU when the cluster has them): loads every trained task once; predicts a batch from its
    decoded cached states, or from text through the lower layers on a miss."""

    def __init__(self, model_dirs, spec_json, record=False):
        import torch

        from er_core.store import CacheSpec
        from er_core.predict import MultiTaskPredictor

        spec = CacheSpec.from_dict(json.loads(spec_json))
        self.hidden_size = spec.hidden_size
        self.p = MultiTaskPredictor(list(model_dirs), spec, device="cuda" if torch.cuda.is_available() else "cpu")
        self.record = record

    def __call__(self, batch: dict) -> dict:
        examples, hidden = [], []
        for ident, inputs, states in zip(batch["id"], batch["input"], batch["states"]):
            d = json.loads(inputs)
            if "text_pair" in d:  # the input's own truncation (its key's), which QA inputs leave implicit
                d["truncation"] = d.get("truncation", "only_second")
            examples.append(Example(id=ident, **{k: (tuple(v) if k == "words" else v) for k, v in d.items()}))
            # a miss: None, or whatever an all-miss column became in Ray's conversion (a null column: NaN)
            hit = isinstance(states, (bytes, np.bytes_))
            hidden.append(np.frombuffer(states, np.float32).reshape(-1, self.hidden_size) if hit else None)
        cached = np.array([h is not None for h in hidden])
        preds = self.p.predict(examples, hidden)
        return {"id": batch["id"], "key": batch["key"], "cached": cached,
                "predictions": np.asarray([json.dumps(p) for p in preds], dtype=object),
                # what --record needs of a miss; nothing for a hit
                "input": np.where(cached, "", batch["input"]) if self.record else np.full(len(cached), "", dtype=object)}


def predict(cache_url: str, model_dirs: list[str], corpus: list[str], out: str, text_field="text", record=False,
            address=None, storage_options=None, actors: int = 1, overwrite: bool = False) -> dict:
    import ray.data

    from er_core.artifacts import check_cache, read_meta
    from pipelines.placement import Cluster, check_shared, read_args
    from pipelines.ray_env import absolute, ensure_ray, worker_env

    reject_secrets(storage_options)  # they travel in actor arguments
    cache_url, model_dirs = absolute(cache_url), [absolute(str(d)) for d in model_dirs]
    claim_file(out, overwrite, _is_predictions, storage_options)  # before any work: never replace what er did not write
    reader = open_cache(cache_url, storage_options=storage_options)  # opened once; read tasks get this version's state
    spec = reader.spec
    for d in model_dirs:  # refuse before any work starts
        check_cache(read_meta(d), spec, d)
    sources = find_sources(corpus, storage_options)
    ensure_ray(address)
    cluster = Cluster.current(local=(address or "local") == "local")
    check_shared(cache_url, cluster, "cache")
    env = worker_env()
    rows = ray.data.from_items([{"src": i} for i in range(len(sources))], override_num_blocks=len(sources)).map_batches(
        read_examples, batch_size=1, compute=ray.data.TaskPoolStrategy(size=min(len(sources), 4)), runtime_env=env,
        **read_args(sources), fn_kwargs={"sources": sources, "text_field": text_field, "settings": spec.tokenizer,
                                          "storage_options": storage_options})
    if any(read_meta(d)["method"] != "full" for d in model_dirs):  # `full` models read nothing
        rows = rows.map_batches(read_hits, batch_size=BATCH, num_cpus=0.5, runtime_env=env, fn_kwargs={
            "url": cache_url, "manifest_json": json.dumps(reader.manifest.to_dict()), "storage_options_json": json.dumps(storage_options)})
    else:
        rows = rows.map_batches(_no_states, batch_size=BATCH)
    preds = rows.map_batches(
        Predictor, batch_size=BATCH, compute=ray.data.ActorPoolStrategy(size=actors), runtime_env=env,
        num_gpus=1 if cluster.total("gpus") else 0,
        fn_constructor_kwargs={"model_dirs": model_dirs, "spec_json": json.dumps(spec.to_dict()), "record": record})
    with tempfile.TemporaryDirectory(prefix="er-predict-") as tmp:
        misses_file = Path(tmp, "misses.jsonl") if record else None
        stats = _write(preds, out, misses_file, storage_options)
        if not stats["examples"]:
            raise ErError(f"no examples found in {', '.join(corpus)} (empty texts are skipped); nothing was written")
        if record and stats["cache_misses"]:
            from er_core import Recycler, ingest_local

            rec = Recycler.load(spec.model_name, spec.layer, spec.codec, spec.tokenizer.max_length, spec.model_revision)
            with open(misses_file) as f:
                ingest_local((json.loads(line) for line in f), cache_url, rec, storage_options=storage_options, progress=False)
    return {**stats, "out": out}


def _no_states(batch: dict) -> dict:
    return {**batch, "states": np.full(len(batch["key"]), None, dtype=object)}


PARQUET_TAG = b"er.predictions"


def _is_predictions(f) -> bool:
    """Recognise a file an earlier `er predict` wrote (the only kind --overwrite may replace)."""
    head = f.read(4)
    f.seek(0)
    if head == b"PAR1":
        import pyarrow.parquet as pq

        try:
            return PARQUET_TAG in (pq.read_schema(f).metadata or {})
        except Exception:  # not readable as Parquet: not ours
            return False
    try:
        first = json.loads(f.readline())
    except ValueError:
        return False
    return isinstance(first, dict) and {"id", "key", "cached"} <= set(first)


def _write(ds, out: str, misses_file: Path | None = None, storage_options=None) -> dict:
    """Stream results into one JSONL or Parquet file, published whole when complete: written to a hidden sibling and
    renamed on disk, or to a local temporary file and uploaded in one PUT to object storage.

    Nothing is published when there are no rows. With `misses_file`, the inputs of cache misses go there.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.bars import bar
    from pipelines.ray_env import streamed

    fs, path = url_to_fs(out, storage_options)
    local = is_local(fs)
    tmp = temp_sibling(path) if local else tempfile.mkstemp(prefix="er-predict-", suffix=Path(path).suffix)[1]
    stats = {"examples": 0, "cache_hits": 0, "cache_misses": 0}
    if local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    misses = open(misses_file, "w") if misses_file else None
    writer = None
    try:
        with open(tmp, "wb") as f, streamed(ds.iter_batches(batch_size=1024, batch_format="pyarrow")) as batches, \
                bar(desc="predict", unit="ex") as progress:  # er's bar; Ray Data's only with --verbose
            for b in batches:
                hit = b["cached"].to_numpy(zero_copy_only=False)
                progress.update(len(hit))
                stats["examples"] += len(hit)
                stats["cache_hits"] += int(hit.sum())
                if misses:
                    misses.writelines(s + "\n" for s in b["input"].to_pylist() if s)
                if out.endswith(".parquet"):
                    t = pa.table({"id": b["id"].cast(pa.string()), "key": b["key"].cast(pa.string()), "cached": b["cached"],
                                  "predictions": b["predictions"].cast(pa.string())}).replace_schema_metadata({PARQUET_TAG: b"1"})
                    writer = writer or pq.ParquetWriter(f, t.schema)
                    writer.write_table(t)
                    continue
                for i, key, c, p in zip(*(b[n].to_pylist() for n in ("id", "key", "cached", "predictions"))):
                    f.write((json.dumps({"id": i, "key": key, "cached": bool(c), **json.loads(p)}) + "\n").encode())
            if writer:
                writer.close()
        stats["cache_misses"] = stats["examples"] - stats["cache_hits"]
        if stats["examples"] and local:
            commit_file(tmp, path)
        elif stats["examples"]:
            fs.put_file(tmp, path)
    finally:
        if misses:
            misses.close()
        Path(tmp).unlink(missing_ok=True)
    return stats


def main(args) -> int:
    from pipelines.configs import storage_options

    s = predict(args.cache, args.model_dir, args.corpus, args.out, text_field=args.text_field, record=args.record,
                address=args.address, storage_options=storage_options(args), actors=args.actors, overwrite=args.overwrite)
    print(f"predicted {s['examples']} examples ({s['cache_hits']} from the cache, {s['cache_misses']} through the lower "
          f"layers) -> {s['out']}")
    return 0
