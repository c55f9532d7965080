"""Whole-cache operations, each one commit under the writer lock: repair, upgrade from formats 1-3, compaction."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import CacheCorruptError, ErError
from . import log as commit_log
from .index import key_digests, shard_entries
from .manifest import FORMAT_VERSION, MANIFEST_NAME, ShardInfo
from .reader import open_cache
from .storage import read_bytes, url_to_fs
from .writer import RETAIN, SCHEMA, CacheWriter, Written, row_material, write_shard


def _entries_from_files(reader, shards: list[ShardInfo]) -> list[pa.Table]:
    """Index entries rebuilt from the shards' own bytes (when the index itself is damaged)."""
    out = []
    for s in shards:
        data = read_bytes(reader.fs, f"{reader.root}/{s.path}")
        table = pq.read_table(pa.BufferReader(data))
        out.append(shard_entries(key_digests(table.column("key").to_pylist()), s.id, s.path, row_material(data, table)))
    return out


def _kept_entries(reader, shards: list[ShardInfo]) -> list[pa.Table]:
    t = reader.index.entries()
    return [t.filter(pc.is_in(t.column("shard"), value_set=pa.array([s.id for s in shards], pa.int32())))]


def repair_cache(url: str, storage_options: dict | None = None) -> dict:
    """Drop bad or missing shards in one commit, under the writer lock, and delete their files.

    The key index is rebuilt in the same commit (from the shards, with the shard list replayed from the log, if
    the index is damaged itself). Returns what was dropped and how many examples (rows) they held: a re-ingest
    of the same corpus recomputes exactly those, since their keys are no longer in the cache.
    """
    spec = open_cache(url, storage_options=storage_options).spec
    writer = CacheWriter(url, spec, storage_options)
    try:
        reader = writer.reader()
        index_bad = reader.index_problems()
        shards = ([ShardInfo(**s) for s in commit_log.all_shards(writer.fs, writer.root, url)] if index_bad
                  else reader.shards())
        bad = [(s, p) for s in shards if (p := reader.check(s))]
        if bad or index_bad:
            gone = {s.path for s, _ in bad}
            keep = [s for s in shards if s.path not in gone]
            entries = _entries_from_files(reader, keep) if index_bad else _kept_entries(reader, keep)
            writer.replace_all("repair", entries, keep, [s for s, _ in bad])
            for p in gone:
                try:
                    writer.fs.rm_file(f"{writer.root}/{p}")
                except FileNotFoundError:
                    pass
    finally:
        writer.abort()
    return {"url": url, "shards_checked": len(shards), "dropped": [{"path": s.path, "rows": s.rows, "problem": p} for s, p in bad],
            "index_rebuilt": index_bad, "rows_to_reingest": sum(s.rows for s, _ in bad), "generation": writer.manifest.generation}


def upgrade_cache(url: str, storage_options: dict | None = None, progress=None) -> dict:
    """Rewrite a format 1-3 cache as format 4, in place and in one commit, under the writer lock.

    Each shard is read whole once, checked against its sha256, and written again so that its rows are
    addressable (one page per column chunk, offsets in the index); the log replaces `manifest.json`. Old files
    are deleted after the commit. Keys, states and spec are unchanged, so trained models and tasks keep working.
    """
    fs, root = url_to_fs(url, storage_options)
    if commit_log.read_state(fs, root, url, upgrading=True) is not None:
        return {"url": url, "upgraded": False, "format_version": FORMAT_VERSION}
    old = commit_log.read_legacy(fs, root, url)
    if old is None:
        raise ErError(f"no er cache at {url} (no commit log, no {MANIFEST_NAME})")
    writer = CacheWriter(url, old.spec, storage_options, upgrading=True)
    try:
        for i, s in enumerate(old.shards):
            raw = read_bytes(fs, f"{root}/{s['path']}")
            if hashlib.sha256(raw).hexdigest() != s["sha256"]:
                raise CacheCorruptError(f"{s['path']} of {url} fails its checksum; nothing was upgraded "
                                        f"(re-ingest into a new cache, or repair it with the er that wrote it)")
            table = pq.read_table(pa.BufferReader(raw)).select(SCHEMA.names).cast(SCHEMA)
            writer.add_shard(write_shard(url, writer.next_shard_name(), table, storage_options))
            if progress:
                progress(i + 1, len(old.shards))
        for reason, n in old.skipped.items():
            writer.count_skipped(reason, n)
        writer.commit()
        for p in [s["path"] for s in old.shards] + [x["path"] for x in old.index] + [MANIFEST_NAME]:
            try:
                fs.rm_file(f"{root}/{p}")
            except FileNotFoundError:
                pass
    finally:
        writer.abort()
    return {"url": url, "upgraded": True, "format_version": FORMAT_VERSION, "from_version": old.format_version,
            "shards": len(old.shards), "rows": sum(s["rows"] for s in old.shards)}


def compact_cache(url: str, storage_options: dict | None = None, shard_rows: int | None = None, retain: float = RETAIN,
                  progress=None, index_only: bool = False) -> dict:
    """Merge small shards (under half of `shard_rows`, default the largest shard's) into full ones and every index
    segment into one, in one commit; `index_only`: the segments alone, reading no states (what lookups and key
    claims of a big cache need, at the index's cost rather than the small shards'). The merged files stay `retain`
    seconds for readers of older versions; a later writer (any ingest, repair or compaction) deletes them after
    that. A kill before the commit loses nothing: the next writer removes what it wrote."""
    spec = open_cache(url, storage_options=storage_options).spec
    writer = CacheWriter(url, spec, storage_options, retain=retain)
    try:
        reader = writer.reader()
        shards = reader.shards()
        target = shard_rows or max((s.rows for s in shards), default=0)
        small = [] if index_only else [s for s in shards if s.rows < target / 2]
        if len(small) < 2 and len(writer.manifest.index) <= 1:
            return {"url": url, "compacted": False, "shards": len(shards), "segments": len(writer.manifest.index),
                    "generation": writer.manifest.generation}
        if len(small) < 2:
            small = []
        keep = [s for s in shards if s not in small]
        entries = _kept_entries(reader, keep) if keep else []
        new: list[ShardInfo] = []
        buf, rows, next_id = [], 0, writer.manifest.next_id

        def write(tables):
            w: Written = write_shard(url, writer.next_shard_name(), pa.concat_tables(tables), storage_options)
            info = ShardInfo(**{**w.info.__dict__, "id": next_id + len(new)})
            entries.append(shard_entries(w.digests, info.id, info.path, w.rows))
            new.append(info)

        for i, s in enumerate(small):
            buf.append(reader.read_shard(s))
            rows += s.rows
            while rows >= target:
                t = pa.concat_tables(buf)
                write([t.slice(0, target)])
                buf, rows = ([t.slice(target)] if t.num_rows > target else []), t.num_rows - target
            writer.lock.heartbeat()
            if progress:
                progress(i + 1, len(small))
        if rows:
            write(buf)
        m = writer.replace_all("compact", entries, keep + new, small, next_id=next_id + len(new))
    finally:
        writer.abort()
    return {"url": url, "compacted": True, "shards_before": len(shards), "shards_after": len(keep) + len(new),
            "merged": len(small), "written": len(new), "segments": len(m.index), "generation": m.generation,
            "retained_seconds": retain}
