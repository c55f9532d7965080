"""Ray Data tasks that read rows from the cache: a plan row holds the located index entries of the rows a job needs.

Kept apart from the training and prediction programs so a read task imports the cache code only
(pyarrow, fsspec), never torch or transformers: a fresh Ray worker starts reading in about a second.
The task gets the entries the driver located (shard file, byte offsets, crc): it opens nothing of the cache.
"""

from __future__ import annotations

import functools
import json

import pyarrow as pa

from er_core.store import CacheReader, CacheSpec, Manifest


@functools.lru_cache(maxsize=4)
def _reader(url: str, spec_json: str, storage_options_json: str) -> CacheReader:
    """One reader per Ray worker process and cache: connections are reused across tasks."""
    spec = CacheSpec.from_dict(json.loads(spec_json))
    return CacheReader(url, Manifest(spec=spec), json.loads(storage_options_json))


def plan_bytes(locs: pa.Table) -> bytes:
    """Located entries as one plan cell (Arrow IPC)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, locs.schema) as w:
        w.write_table(locs)
    return sink.getvalue().to_pybytes()


def read_rows(batch: dict, url: str, spec_json: str, storage_options_json: str, columns: list[str]) -> dict:
    """Ray Data UDF: for each plan row (located entries and their targets), those rows and their targets."""
    reader = _reader(url, spec_json, storage_options_json)
    parts = []
    for locs, targets in zip(batch["locs"], batch["targets"]):
        t = reader.read_located(pa.ipc.open_stream(locs).read_all(), columns)
        parts.append(t.append_column("target", pa.array(list(targets), pa.list_(pa.int64()))))
    return pa.concat_tables(parts)
