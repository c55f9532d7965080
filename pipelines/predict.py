"""`er predict`: batch inference for one or more trained tasks over a corpus, on Ray Data.

Cache hits: the driver keeps the hit keys, a Ray Data stage reads each cache shard once (checksum
verified) and keeps those rows, and a pool of predictor actors runs every task's upper layers +
head on each state. Cache misses go through the shared lower part first in the same actors, and
with --record are added to the cache afterwards. Output: one row per example, keyed by id and key.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from er_core import ErError, open_cache
from er_core.cache import CacheReader
from er_core.manifest import Manifest
from er_core.outputs import claim_file, commit_file, temp_sibling
from er_core.secrets import reject_secrets
from er_core.tasks import Example

_EX_FIELDS = ("id", "text", "text_pair", "words")


def _ex_to_json(ex: Example) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k in _EX_FIELDS if (v := getattr(ex, k)) is not None}


def _ex_from_json(d: dict) -> Example:
    return Example(**{k: (tuple(v) if k == "words" else v) for k, v in d.items()})


class ReadHits:
    """Ray Data UDF: one cache shard in, the rows wanted by the corpus out (with their examples)."""

    def __init__(self, url, manifest_json, wanted: dict, storage_options=None):
        self.reader = CacheReader(url, Manifest.from_json(manifest_json, url), storage_options)
        self.shards = {s.path: s for s in self.reader.manifest.shards}
        self.wanted = wanted  # key -> json list of examples with that key

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.compute as pc

        parts = []
        for path in batch["path"]:
            t = self.reader.read_shard(self.shards[path], ["key", "length", "hidden", "scale"])
            parts.append(t.filter(pc.is_in(t.column("key"), pa.array(list(self.wanted), pa.string()))))
        t = pa.concat_tables(parts)
        return t.append_column("examples", pa.array([self.wanted[k] for k in t.column("key").to_pylist()], pa.string()))


class Predictor:
    """Ray Data actor: loads every trained task once; predicts for cached states or raw examples."""

    def __init__(self, model_dirs, manifest_json, url):
        from er_core.predict import MultiTaskPredictor

        self.manifest = Manifest.from_json(manifest_json, url)
        self.p = MultiTaskPredictor(list(model_dirs), self.manifest.spec)
        from er_core.codecs import get_codec

        self.codec = get_codec(self.manifest.spec.codec)

    def __call__(self, batch: dict) -> dict:
        examples, hidden, keys, cached = [], [], [], []
        for i in range(len(batch["examples"])):
            exs = [_ex_from_json(d) for d in json.loads(batch["examples"][i])]
            h = None
            if "hidden" in batch:
                L = int(batch["length"][i])
                h = self.codec.decode(batch["hidden"][i], batch["scale"][i], (L, self.manifest.spec.hidden_size))
            for ex in exs:
                examples.append(ex)
                hidden.append(h)
                keys.append(batch["key"][i])
                cached.append(h is not None)
        preds = self.p.predict(examples, hidden)
        return {
            "id": np.asarray([ex.id for ex in examples], dtype=object),
            "key": np.asarray(keys, dtype=object),
            "cached": np.asarray(cached),
            "predictions": np.asarray([json.dumps(p) for p in preds], dtype=object),
        }


def corpus_examples(paths: list[str], text_field: str = "text") -> list[Example]:
    """Examples to predict: task folders give their splits' examples; files go through the corpus reader."""
    from er_core.tasks import load_task

    out: list[Example] = []
    for p in paths:
        if Path(p).is_dir() and any(Path(p).glob("train*")):
            task = load_task(p)
            for exs in task.splits.values():
                out.extend(Example(id=e.id, text=e.text, text_pair=e.text_pair, words=e.words) for e in exs)
        else:
            from er_core.corpus import read_corpus

            for rec in read_corpus([p], text_field=text_field):
                out.append(Example(id=rec.id, **{k: (tuple(v) if k == "words" else v) for k, v in rec.inputs.items()}))
    return out


def predict(cache_url: str, model_dirs: list[str], corpus: list[str], out: str, text_field="text", record=False,
            address=None, storage_options=None, actors: int = 1, overwrite: bool = False) -> dict:
    import ray.data

    from er_core.artifacts import check_cache, read_meta
    from er_core.keys import example_key
    from er_core.tasks import example_input
    from pipelines.ray_env import absolute, ensure_ray

    reject_secrets(storage_options)  # they travel in actor arguments
    cache_url, model_dirs = absolute(cache_url), [absolute(str(d)) for d in model_dirs]
    claim_file(out, overwrite, _is_predictions)  # before any work: never replace what er did not write
    reader = open_cache(cache_url, storage_options=storage_options)
    spec = reader.spec
    for d in model_dirs:  # refuse before any work starts
        check_cache(read_meta(d), spec, d)
    examples = corpus_examples(corpus, text_field)
    if not examples:
        raise ErError(f"no examples found in {corpus}")
    by_key: dict[str, list[dict]] = {}
    for ex in examples:
        by_key.setdefault(example_key(example_input(ex), spec.tokenizer), []).append(_ex_to_json(ex))
    cached = set(reader.keys())
    hits = {k: json.dumps(v) for k, v in by_key.items() if k in cached}
    misses = [{"key": k, "examples": json.dumps(v)} for k, v in by_key.items() if k not in cached]
    ensure_ray(address)
    mj = reader.manifest.to_json()
    predictor = dict(fn_constructor_kwargs={"model_dirs": model_dirs, "manifest_json": mj, "url": cache_url},
                     compute=ray.data.ActorPoolStrategy(size=actors), batch_size=64)
    parts = []
    if hits:
        shards = ray.data.from_items([{"path": s.path} for s in reader.manifest.shards])
        rows = shards.map_batches(ReadHits, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
                                  fn_constructor_kwargs={"url": cache_url, "manifest_json": mj, "wanted": hits,
                                                         "storage_options": storage_options})
        parts.append(rows.map_batches(Predictor, **predictor))
    if misses:
        parts.append(ray.data.from_items(misses).map_batches(Predictor, **predictor))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    n = _write(ds, out)
    if record and misses:  # misses are few next to the corpus: the plain loop records them
        from er_core import Recycler, ingest_local

        rec = Recycler.load(spec.model_name, spec.layer, spec.codec, spec.tokenizer.max_length)
        ingest_local((example_input(_ex_from_json(json.loads(m["examples"])[0])) for m in misses), cache_url, rec,
                     storage_options=storage_options, progress=False)
    return {"examples": n, "cache_hits": sum(len(v) for k, v in by_key.items() if k in cached),
            "cache_misses": sum(len(v) for k, v in by_key.items() if k not in cached), "out": out}


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


def _write(ds, out: str) -> int:
    """Stream results into one JSONL or Parquet file, written to a hidden sibling and renamed when complete."""
    tmp = temp_sibling(out)
    n = 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            writer = None
            for b in ds.iter_batches(batch_size=1024, batch_format="pyarrow"):
                t = pa.table({"id": b["id"].cast(pa.string()), "key": b["key"].cast(pa.string()), "cached": b["cached"],
                              "predictions": b["predictions"].cast(pa.string())})
                t = t.replace_schema_metadata({PARQUET_TAG: b"1"})
                writer = writer or pq.ParquetWriter(tmp, t.schema)
                writer.write_table(t)
                n += t.num_rows
            if writer:
                writer.close()
        else:
            with open(tmp, "w") as f:
                for row in ds.iter_rows():
                    f.write(json.dumps({"id": row["id"], "key": row["key"], "cached": bool(row["cached"]),
                                        **json.loads(row["predictions"])}) + "\n")
                    n += 1
        commit_file(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return n


def main(args) -> int:
    from pipelines.cli import storage_options

    s = predict(args.cache, args.model_dir, args.corpus, args.out, text_field=args.text_field, record=args.record,
                address=args.address, storage_options=storage_options(args), overwrite=args.overwrite)
    print(f"predicted {s['examples']} examples ({s['cache_hits']} from the cache, {s['cache_misses']} through the lower "
          f"layers) -> {s['out']}")
    return 0
