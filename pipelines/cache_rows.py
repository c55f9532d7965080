"""Ray Data tasks that read rows from the cache: a plan row names a shard and the rows of it a job needs.

Kept apart from the training and prediction programs so a read task imports the cache code only
(pyarrow, fsspec), never torch or transformers: a fresh Ray worker starts reading in about a second.
"""

from __future__ import annotations

import functools
import json

from er_core.cache import CacheReader
from er_core.manifest import CacheSpec, Manifest, ShardInfo


@functools.lru_cache(maxsize=4)
def _reader(url: str, spec_json: str, storage_options_json: str) -> CacheReader:
    """One reader per Ray worker process and cache: shard footers and connections are reused across tasks."""
    spec = CacheSpec.from_dict(json.loads(spec_json))
    return CacheReader(url, Manifest(spec=spec), json.loads(storage_options_json))


def read_rows(batch: dict, url: str, spec_json: str, storage_options_json: str, columns: list[str]) -> dict:
    """Ray Data UDF: for each plan row (a shard and the rows of it the task needs), those rows and their targets."""
    import pyarrow as pa

    reader = _reader(url, spec_json, storage_options_json)
    parts = []
    for shard, groups, rows, keys, targets in zip(batch["shard"], batch["groups"], batch["rows"], batch["keys"], batch["targets"]):
        t = reader.read_rows(ShardInfo(**json.loads(shard)), groups, rows, columns, list(keys))
        parts.append(t.append_column("target", pa.array(list(targets), pa.list_(pa.int64()))))
    return pa.concat_tables(parts)
