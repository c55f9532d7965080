"""The cache store: Parquet shards of layer-k states, a key index that addresses each row's bytes, and a commit log.

    open a version     open_cache(url) -> CacheReader   (reads the last checkpoint and the commits after it)
    locate             reader.locate(keys)               (index buckets of those keys only)
    read               reader.read_located(locs, cols)   (each row's own bytes, crc-checked)
    write, commit      CacheWriter(url, spec) ... .commit() / write_shard
    compact            compact_cache(url)                (small shards and index segments merged, one commit)

Layout under the cache URL (a local folder or `s3://bucket/prefix`):

    _log/<version>.json             one commit each (log.py); checkpoints every 16 versions
    shards/part-<run>-<tag>.parquet one row per example (writer.py)
    index/seg-<run>-<version>.idx   key -> shard file and byte offsets, plus the segment's shard list (index.py)
    _writer.lock                    names the writer holding the cache (storage.py)

Everything here is pyarrow, numpy and fsspec: a Ray Data task that reads the cache imports no torch.
"""

from .codecs import CODECS, DEFAULT_CODEC, get_codec
from .index import compact_advised, compact_hint, key_digests
from .maintenance import compact_cache, repair_cache, upgrade_cache
from .manifest import CacheSpec, Manifest, ShardInfo
from .packed import PackedRows
from .reader import CachedRows, CacheReader, open_cache, open_state
from .storage import StorageConfig, explain_storage_error, is_local, put_atomic, read_bytes, url_to_fs
from .writer import CacheWriter, Written, encode_table, packed_table, shard_name, write_shard

__all__ = ["open_cache", "open_state", "CacheReader", "CachedRows", "CacheWriter", "Written", "write_shard", "shard_name",
           "encode_table", "packed_table", "compact_cache", "repair_cache", "upgrade_cache", "CacheSpec", "Manifest",
           "ShardInfo", "PackedRows", "compact_advised", "compact_hint", "key_digests", "get_codec", "CODECS", "DEFAULT_CODEC", "StorageConfig",
           "explain_storage_error", "is_local", "put_atomic", "read_bytes", "url_to_fs"]
