"""The cache manifest: what makes a cache valid, its committed shards and its key index segments.

`manifest.json` is the only file readers trust: a shard or index segment exists for them once it is
listed here with its checksums (whole file for `er cache verify`, footer for partial reads). It is
self-describing (format and er versions recorded), like peft's `adapter_config.json`.

Format versions: 1 had no key index and a whole-file checksum only; 2 had a Parquet key index, read in
4096-entry row groups (so a lookup's bytes grew with the cache); 3 has the bucketed index of index.py.
Readers refuse older versions in one line naming `er cache upgrade URL`, which rewrites a cache in
place in one commit: the shards and the index from version 1, the index only from version 2.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from .errors import CacheCorruptError, CacheFormatError, CacheMismatchError
from .index import SegmentInfo
from .keys import TokenizerSettings

FORMAT_NAME = "er-embedding-cache"
_UPGRADES = {  # older versions: what they lack, and what `er cache upgrade` rewrites
    1: ("no key index", "it rewrites every shard once"),
    2: ("its key index reads grow with the cache", "it rewrites the key index only"),
}
FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"


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
    sha256: str  # whole file, for `er cache verify`
    truncated: int = 0
    footer_sha256: str = ""  # the Parquet footer, checked by every partial read
    group_rows: int = 0  # rows per row group; the index locates rows as (group, row)
    id: int = -1  # assigned at commit; index entries name shards by it


@dataclass
class Manifest:
    spec: CacheSpec
    shards: list[ShardInfo] = field(default_factory=list)
    generation: int = 0
    skipped: dict = field(default_factory=dict)  # counted, documented skips (e.g. empty texts)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    writer: str = ""  # run id of the lock holder that wrote it last; its change fences out an earlier holder
    index: list[SegmentInfo] = field(default_factory=list)  # key index segments (index.py)
    next_id: int = 0  # id of the next shard committed
    format_version: int = FORMAT_VERSION  # as read; only `er cache upgrade` commits a newer one

    @property
    def totals(self) -> dict:
        t = {k: sum(getattr(s, k) for s in self.shards) for k in ("rows", "tokens", "bytes", "truncated")}
        t["shards"] = len(self.shards)
        t["bytes_per_token"] = round(t["bytes"] / t["tokens"], 2) if t["tokens"] else 0.0
        return t

    def to_json(self) -> bytes:
        from . import __version__

        d = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,  # an upgrade's lock stamp keeps the old one until its commit
            "er_version": __version__,
            "generation": self.generation,
            "created": self.created,
            "updated": self.updated,
            "writer": self.writer,
            "spec": self.spec.to_dict(),
            "totals": self.totals,
            "skipped": self.skipped,
            "next_id": self.next_id,
            "shards": [asdict(s) for s in self.shards],
            "index": [asdict(s) for s in self.index],
        }
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, upgrading: bool = False) -> "Manifest":
        """Parse a manifest; version 1 is refused unless `upgrading` (its shards then have no footer or id)."""
        try:
            d = json.loads(data)
        except ValueError as e:
            raise CacheCorruptError(f"manifest {where} is truncated or not valid JSON ({e}); the cache cannot be read") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise CacheCorruptError(f"{where} is not an er cache manifest")
        old = d.get("format_version")
        if old in _UPGRADES and not upgrading:
            url = where.removesuffix("/" + MANIFEST_NAME)
            raise CacheFormatError(f"cache {url} has format version {old} ({_UPGRADES[old][0]}); upgrade it in place "
                                   f"with `er cache upgrade {url}` ({_UPGRADES[old][1]})")
        if old not in (FORMAT_VERSION, *_UPGRADES):
            raise CacheCorruptError(
                f"manifest {where} has format version {d.get('format_version')}, this er reads version {FORMAT_VERSION} and upgrades 1-{FORMAT_VERSION - 1}; "
                f"it was written by a newer er: upgrade er"
            )
        try:
            return cls(
                spec=CacheSpec.from_dict(d["spec"]),
                shards=[ShardInfo(**s) for s in d["shards"]],
                generation=int(d["generation"]),
                skipped=dict(d.get("skipped", {})),
                created=float(d["created"]),
                updated=float(d["updated"]),
                writer=str(d.get("writer", "")),
                index=[SegmentInfo(**x) for x in d["index"]] if d["format_version"] > 1 else [],
                next_id=int(d["next_id"]) if d["format_version"] > 1 else 0,
                format_version=int(d["format_version"]),
            )
        except (KeyError, TypeError) as e:
            raise CacheCorruptError(f"manifest {where} is missing or has a malformed field: {e}") from None
