"""What a cache is at one version: its spec, counters and key index segments (`Manifest`), and the legacy manifest.

Since format 4 a cache's versions are a log (log.py): each commit names only what it adds or removes, and
a `Manifest` is the state after one of them. It holds no list of shards: those live in the index segments
that point into them (index.py), so opening a cache reads about 200 bytes an index segment (a few KB once
compacted) however many shards it has. `ShardInfo` is what
each segment records of its shards (checksums for `er cache verify`, sizes, counts).

Formats 1-3 kept one `manifest.json` listing every shard, rewritten whole by each commit. Readers refuse
them in one line naming `er cache upgrade URL`, which rewrites such a cache in place in one commit.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from ..errors import CacheCorruptError, CacheFormatError, CacheMismatchError
from .index import SegmentInfo
from ..keys import TokenizerSettings

FORMAT_NAME = "er-embedding-cache"
_UPGRADES = {  # older versions: what they lack; `er cache upgrade` rewrites every shard once
    1: "no key index",
    2: "its key index reads grow with the cache",
    3: "a manifest rewritten whole by every commit, and reads of whole row groups",
}
FORMAT_VERSION = 4
MANIFEST_NAME = "manifest.json"  # formats 1-3 only
COUNTS = ("rows", "tokens", "bytes", "truncated", "shards")


@dataclass(frozen=True)
class CacheSpec:
    """Everything a cached state depends on. Two specs with no `diff` produce identical rows."""

    model_name: str
    model_type: str
    lower_fingerprint: str
    layer: int
    num_layers: int
    hidden_size: int
    tokenizer: TokenizerSettings
    codec: str = "fp16"
    model_revision: str | None = None  # the Hub commit or tag the model was loaded at (--model-revision); reused later

    def diff(self, other: "CacheSpec", check_codec: bool = True) -> list[str]:
        """Human-readable differences that make `other` unusable against this cache."""
        out = []
        if self.model_revision and other.model_revision and self.model_revision != other.model_revision:
            out.append(f"model revision: cache was built with {self.model_name!r} at revision {self.model_revision!r}, "
                       f"requested revision {other.model_revision!r}")
        if self.layer != other.layer:
            out.append(f"layer k: cache has {self.layer}, requested {other.layer}")
        if self.lower_fingerprint != other.lower_fingerprint:
            out.append(
                f"model: cache was built with {self.model_name!r} (lower fingerprint {self.lower_fingerprint[:12]}), "
                f"requested {other.model_name!r} (fingerprint {other.lower_fingerprint[:12]})"
            )
        if self.tokenizer.fingerprint != other.tokenizer.fingerprint:
            out.append(f"tokenizer: cache used {self.tokenizer.name!r}, requested {other.tokenizer.name!r} (vocabulary or settings differ)")
        if self.tokenizer.max_length != other.tokenizer.max_length:
            out.append(f"max_length: cache has {self.tokenizer.max_length}, requested {other.tokenizer.max_length}")
        if check_codec and self.codec != other.codec:
            out.append(f"codec: cache has {self.codec!r}, requested {other.codec!r}")
        return out

    def check(self, other: "CacheSpec", where: str, check_codec: bool = False) -> None:
        problems = self.diff(other, check_codec=check_codec)
        if problems:
            raise CacheMismatchError(f"cache {where} does not match: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSpec":
        d = dict(d)
        d["tokenizer"] = TokenizerSettings(**d["tokenizer"])
        return cls(**d)


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the cache root
    rows: int
    tokens: int
    bytes: int
    checksum: str  # whole file, for `er cache verify`: "crc32:<hex>" (sha256 ran at 0.25 GB/s a core here, crc32 at 1.9)
    truncated: int = 0
    footer_sha256: str = ""  # the Parquet footer, checked by every partial read
    group_rows: int = 0  # rows per row group; the index locates rows as (group, row)
    id: int = -1  # assigned at commit; index entries name shards by it


@dataclass
class Manifest:
    """A cache at one version of its log: what a reader needs, and nothing that grows with the shard count."""

    spec: CacheSpec
    generation: int = 0  # the log version; 0 before the first commit
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    skipped: dict = field(default_factory=dict)  # counted, documented skips (e.g. empty texts)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    writer: str = ""  # run id of the writer of the last commit
    index: list[SegmentInfo] = field(default_factory=list)  # key index segments (index.py)
    next_id: int = 0  # id of the next shard committed
    removed: dict = field(default_factory=dict)  # path -> when a commit removed it; deleted after the retention
    format_version: int = FORMAT_VERSION

    @property
    def totals(self) -> dict:
        t = {k: int(self.counts.get(k, 0)) for k in COUNTS}
        t["bytes_per_token"] = round(t["bytes"] / t["tokens"], 2) if t["tokens"] else 0.0
        return t

    def to_dict(self) -> dict:
        from .. import __version__

        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "er_version": __version__,
                "generation": self.generation, "created": self.created, "updated": self.updated, "writer": self.writer,
                "spec": self.spec.to_dict(), "counts": self.counts, "skipped": self.skipped, "next_id": self.next_id,
                "index": [asdict(s) for s in self.index], "removed": self.removed}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Manifest":
        check_format(d, where)
        try:
            return cls(spec=CacheSpec.from_dict(d["spec"]), generation=int(d["generation"]), counts=dict(d["counts"]),
                       skipped=dict(d.get("skipped", {})), created=float(d["created"]), updated=float(d["updated"]),
                       writer=str(d.get("writer", "")), index=[SegmentInfo(**x) for x in d["index"]],
                       next_id=int(d["next_id"]), removed=dict(d.get("removed", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise CacheCorruptError(f"{where} is missing or has a malformed field: {e}") from None


def check_format(d, where: str) -> None:
    """Refuse what is not an er cache record of this format, in one line."""
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise CacheCorruptError(f"{where} is not an er cache record")
    if d.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptError(f"{where} has format version {d.get('format_version')}, this er reads version "
                                f"{FORMAT_VERSION}; it was written by a newer er: upgrade er")


@dataclass
class LegacyManifest:
    """A format 1-3 `manifest.json`: read only to upgrade it."""

    spec: CacheSpec
    shards: list[dict]  # path, rows, sha256 (whole file), ...
    index: list[dict]
    skipped: dict
    format_version: int

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "LegacyManifest":
        try:
            d = json.loads(data)
        except ValueError as e:
            raise CacheCorruptError(f"manifest {where} is truncated or not valid JSON ({e}); the cache cannot be read") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME or d.get("format_version") not in _UPGRADES:
            raise CacheCorruptError(f"{where} is not an er cache manifest of format 1-{FORMAT_VERSION - 1}")
        try:
            return cls(spec=CacheSpec.from_dict(d["spec"]), shards=[dict(s) for s in d["shards"]],
                       index=list(d.get("index", [])), skipped=dict(d.get("skipped", {})),
                       format_version=int(d["format_version"]))
        except (KeyError, TypeError) as e:
            raise CacheCorruptError(f"manifest {where} is missing or has a malformed field: {e}") from None


def legacy_error(url: str, version) -> CacheFormatError:
    return CacheFormatError(f"cache {url} has format version {version} ({_UPGRADES.get(version, 'an older layout')}); "
                            f"upgrade it in place with `er cache upgrade {url}` (it rewrites every shard once)")
