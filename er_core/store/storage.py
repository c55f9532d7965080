"""Object-storage primitives the cache needs: resolve a URL, compare-and-swap a small file, a writer
lock built on it, and one-line explanations of storage faults.

Works the same on a local path and on `s3://` (s3fs): credentials, endpoint and region come
from the standard AWS environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or
from explicit `storage_options` passed through to fsspec.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field


from ..errors import CacheLockedError, ErError, LockLostError, StorageError

log = logging.getLogger("er.storage")

# S3 requests fail in seconds, not minutes, when nothing answers: botocore's own retries are the
# only ones (bounded, standard mode), and the env variables or CLI flags change them.
S3_CONNECT_TIMEOUT = 3.0  # seconds to open a connection (ER_S3_CONNECT_TIMEOUT, --s3-connect-timeout)
S3_READ_TIMEOUT = 30.0  # seconds to wait for a reply (ER_S3_READ_TIMEOUT, --s3-read-timeout)
S3_RETRIES = 2  # retries after the first attempt (ER_S3_RETRIES, --s3-retries)


@dataclass
class StorageConfig:
    """Where and how S3 is reached; credentials never go here (the standard AWS variables or profile hold them)."""

    endpoint_url: str | None = field(default=None, metadata={"help": "S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)"})
    region: str | None = field(default=None, metadata={"help": "S3 region (default: $AWS_REGION / $AWS_DEFAULT_REGION)"})
    s3_connect_timeout: float | None = field(default=None, metadata={
        "help": f"seconds to open a connection to S3 (default $ER_S3_CONNECT_TIMEOUT, else {S3_CONNECT_TIMEOUT:g})"})
    s3_read_timeout: float | None = field(default=None, metadata={
        "help": f"seconds to wait for an S3 reply (default $ER_S3_READ_TIMEOUT, else {S3_READ_TIMEOUT:g})"})
    s3_retries: int | None = field(default=None, metadata={
        "help": f"retries of a failed S3 request after the first attempt (default $ER_S3_RETRIES, else {S3_RETRIES}); "
                "with the defaults an unreachable endpoint fails within about 15 s"})

    def __post_init__(self):
        for name in ("s3_connect_timeout", "s3_read_timeout"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ErError(f"{name} must be a number of seconds > 0, got {getattr(self, name)}")
        if self.s3_retries is not None and self.s3_retries < 0:
            raise ErError(f"s3_retries must be an integer >= 0, got {self.s3_retries}")

    def options(self) -> dict | None:
        """fsspec/s3fs storage options; None when nothing is set."""
        opts: dict = {}
        if self.endpoint_url:
            opts.setdefault("client_kwargs", {})["endpoint_url"] = self.endpoint_url
        if self.region:
            opts.setdefault("client_kwargs", {})["region_name"] = self.region
        s3 = {"retries": self.s3_retries, "connect_timeout": self.s3_connect_timeout, "read_timeout": self.s3_read_timeout}
        if any(v is not None for v in s3.values()):
            opts["config_kwargs"] = s3_config(**s3)
        return opts or None


def s3_config(retries: int | None = None, connect_timeout: float | None = None, read_timeout: float | None = None) -> dict:
    """botocore `Config` keywords (s3fs `config_kwargs`); unset values come from the ER_S3_* variables, then the defaults."""
    env = os.environ.get
    attempts = 1 + int(retries if retries is not None else env("ER_S3_RETRIES", S3_RETRIES))
    return {
        "connect_timeout": float(connect_timeout or env("ER_S3_CONNECT_TIMEOUT", S3_CONNECT_TIMEOUT)),
        "read_timeout": float(read_timeout or env("ER_S3_READ_TIMEOUT", S3_READ_TIMEOUT)),
        "retries": {"total_max_attempts": attempts, "mode": "standard"},
    }


def url_to_fs(url: str, storage_options: dict | None = None):
    """Return (filesystem, path) for a local path or an fsspec URL."""
    opts = dict(storage_options or {})
    s3 = url.startswith(("s3://", "s3a://"))
    if s3:
        # Fresh dicts every call: botocore rewrites the retries dict it is given.
        cfg, given = s3_config(), opts.get("config_kwargs") or {}
        cfg.update({k: (dict(v) if k == "retries" else v) for k, v in given.items()})
        opts["config_kwargs"] = cfg
        # Other processes (Ray actors, other writers) change a cache under us: never answer from a stale listing.
        opts.setdefault("use_listings_cache", False)
        client = dict(opts.get("client_kwargs") or {})
        if os.environ.get("AWS_ENDPOINT_URL"):
            client.setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
        if client:
            opts["client_kwargs"] = client
    import fsspec  # on use: the CLI builds its flags from this module's StorageConfig

    fs, path = fsspec.core.url_to_fs(url, **opts)
    if s3:
        fs.retries = 1  # s3fs would repeat botocore's whole retry cycle 5 times
    return fs, path.rstrip("/")


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def put_atomic(fs, path: str, data: bytes, cached: bool = True) -> None:
    """Make `data` visible at `path` all at once: rename on local disk, a single PUT on object stores.
    `cached=False` (shards: big, written once, read later by few rows) drops the file's pages from the page cache
    once they are on disk, so the next file's writes reuse them rather than claim fresh ones."""
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            if not cached and hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:  # only a hint: the file is written and synced either way
                    pass
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(fs, path: str) -> bytes:
    return fs.cat_file(path)  # one GET, no size lookup first


# ---------------------------------------------------------------- compare-and-swap


class PreconditionFailed(Exception):
    """A conditional write found another version than the one expected."""


def read_versioned(fs, path: str) -> tuple[bytes | None, str | None]:
    """(content, version tag) of `path`, or (None, None) if it does not exist."""
    if is_local(fs):
        return _local_read(path)
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get():
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        return await resp["Body"].read(), resp["ETag"]

    try:
        return sync(fs.loop, get)
    except FileNotFoundError:
        return None, None


def put_if(fs, path: str, data: bytes, expect: str | None) -> str:
    """Write `data` at `path` only if its current version is `expect` (None: only if absent); return the new version.

    S3: `If-Match` / `If-None-Match: *` on one PUT (S3's ETag is the content's MD5, so callers put a
    nonce in what they write). Disk: read-compare-replace under a short flock on a sibling file.
    Raises PreconditionFailed when the version differs.
    """
    if is_local(fs):
        return _local_put_if(path, data, expect)
    bucket, key, _ = fs.split_path(path)
    cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
    try:
        resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond)
    except OSError as e:
        if not _precondition(e):
            raise
        now, etag = read_versioned(fs, path)
        if now == data:  # our own PUT, applied, then retried after a lost reply
            return etag
        raise PreconditionFailed(path) from None
    fs.invalidate_cache(path)
    return resp["ETag"]


def _precondition(e: BaseException) -> bool:
    resp = getattr(e.__cause__, "response", None) or {}
    return resp.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") or (
        resp.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412)
    )


def _local_read(path: str) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as f:
            data = f.read()
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        return None, None
    return data, _local_tag(st, data)


def _local_tag(st, data: bytes) -> str:
    # The inode changes on every replace; mtime, size and a content hash guard against inode reuse.
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}-{hashlib.sha256(data).hexdigest()[:16]}"


def _local_put_if(path: str, data: bytes, expect: str | None) -> str:
    guard = os.path.join(os.path.dirname(path), ".er-cas")
    with open(guard, "ab") as g:
        fcntl.flock(g, fcntl.LOCK_EX)  # released when g closes
        if _local_read(path)[1] != expect:
            raise PreconditionFailed(path)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            tag = _local_tag(os.fstat(f.fileno()), data)
        os.replace(tmp, path)
        return tag


# ---------------------------------------------------------------- the writer lock


class WriterLock:
    """At most one writer per cache. The lock file names its holder and carries a heartbeat.

    Every change is a compare-and-swap on the version last seen, so of several takers exactly one
    wins, and a holder whose lock was taken finds out at its next heartbeat. A lock may be taken
    when released, when its holder's process is gone (same host), or when its heartbeat is older
    than `ttl` seconds (a crashed writer elsewhere).
    """

    def __init__(self, fs, root: str, ttl: float = 600.0):
        self.fs, self.path, self.ttl = fs, f"{root}/_writer.lock", ttl
        self.info = {"run_id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}
        self.etag: str | None = None  # the version we wrote last; None while not held
        self.replaced: dict | None = None  # the record we took the lock from
        self._n = 0
        self._mutex = threading.Lock()  # a heartbeat thread and the writer beat on the same version
        self.beat_at = 0.0  # monotonic time of the last write of the lock

    @property
    def held(self) -> bool:
        return self.etag is not None

    def _record(self, **extra) -> bytes:
        self._n += 1  # with run id and time, makes every version's bytes (and so its S3 ETag) unique
        return json.dumps({**self.info, "heartbeat": time.time(), "n": self._n, **extra}).encode()

    def ended(self, other: dict) -> bool:
        """The holder of `other` will write nothing more: released, or its process is gone on this host."""
        if not other or other.get("released"):
            return True
        if other.get("host") == self.info["host"]:
            try:
                os.kill(int(other["pid"]), 0)
            except (ProcessLookupError, ValueError, KeyError, TypeError):
                return True
            except PermissionError:
                pass
        return False

    def free(self, other: dict | None) -> bool:
        if other is None or self.ended(other):
            return True
        if other.get("host") == self.info["host"]:
            return False  # its process lives
        return time.time() - float(other.get("heartbeat", 0)) > self.ttl

    def _read(self) -> tuple[dict | None, str | None]:
        data, etag = read_versioned(self.fs, self.path)
        if data is None:
            return None, None
        try:
            return json.loads(data), etag
        except ValueError:
            return {}, etag  # unreadable: treat as stale

    def _busy(self, other: dict) -> CacheLockedError:
        return CacheLockedError(
            f"cache is being written by run {other.get('run_id')} (host {other.get('host')}, pid {other.get('pid')}); "
            f"wait for it to finish, or delete {self.path} if that writer is dead"
        )

    def acquire(self) -> None:
        if is_local(self.fs):  # (on S3 that would create a missing bucket)
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        other, etag = self._read()
        if not self.free(other):
            raise self._busy(other)
        try:  # replaces exactly the version judged free (or creates it if absent): one taker wins
            self.etag = put_if(self.fs, self.path, self._record(), etag)
            self.beat_at = time.monotonic()
        except PreconditionFailed:
            winner, _ = self._read()
            raise self._busy(winner or {}) from None
        self.replaced = other

    def heartbeat(self) -> None:
        """Refresh the lock; LockLostError if another writer took it (then this writer must stop)."""
        with self._mutex:
            if self.etag is None:
                raise LockLostError(f"writer lock {self.path} is not held by this writer (run {self.info['run_id']})")
            try:
                self.etag = put_if(self.fs, self.path, self._record(), self.etag)
                self.beat_at = time.monotonic()
                return
            except PreconditionFailed:
                self.etag = None
        other, _ = self._read()
        raise LockLostError(
            f"writer lock {self.path} was taken by run {(other or {}).get('run_id')} "
            f"(host {(other or {}).get('host')}) while run {self.info['run_id']} held it: this run stops; "
            f"what it committed before stays, nothing more is committed"
        )

    def release(self) -> None:
        """Mark the lock released, if it is still ours; never touches another writer's lock."""
        with self._mutex:
            etag, self.etag = self.etag, None
            if etag is None:
                return
            try:
                put_if(self.fs, self.path, self._record(released=True), etag)
            except PreconditionFailed:
                pass  # taken by another writer meanwhile: theirs now
            except OSError as e:  # the lock goes stale by itself (process gone, or ttl)
                log.warning("could not release %s: %s", self.path, e)


def read_lock(fs, root: str) -> dict | None:
    """The record of the writer holding the cache at `root`, or None when it is free (absent or released)."""
    data, _ = read_versioned(fs, f"{root}/_writer.lock")
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return None if not record or record.get("released") else record


# ---------------------------------------------------------------- storage faults in one line


def explain_storage_error(exc: BaseException, url: str | None = None, storage_options: dict | None = None) -> StorageError | None:
    """A StorageError with a one-line message naming the URL, the endpoint and what to check, or None if `exc`
    (or anything it wraps, e.g. a Ray task error) is not a storage fault."""
    for e in _chain(exc):
        msg = _explain(e, url or "", storage_options or {})
        if msg:
            return StorageError(msg)
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # Ray's task errors carry the worker's exception here
        if isinstance(cause, BaseException):
            exc = cause
            continue
        yield exc
        exc = exc.__cause__ or exc.__context__


def _endpoint(opts: dict) -> str:
    ep = (opts.get("client_kwargs") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    return ep or "AWS S3 (default endpoint)"


def _explain(e: BaseException, url: str, opts: dict) -> str | None:
    from botocore import exceptions as bx

    remote, where = "://" in url, url or "storage"
    ep = _endpoint(opts)
    checks = "check --endpoint-url / AWS_ENDPOINT_URL and that the server is up and reachable"
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return (f"no S3 credentials for {where} (endpoint {ep}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or AWS_PROFILE, or give this machine an instance role")
    if isinstance(e, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        cfg = {**s3_config(), **(opts.get("config_kwargs") or {})}
        return (f"S3 endpoint {ep} did not answer for {where} (timed out, {cfg['connect_timeout']:g} s to connect, "
                f"{cfg['read_timeout']:g} s to reply, with retries): {checks}; "
                f"--s3-connect-timeout, --s3-read-timeout and --s3-retries change how long er waits")
    if isinstance(e, (bx.EndpointConnectionError, bx.ConnectionClosedError)):
        return f"cannot connect to the S3 endpoint {ep} for {where} ({e}): {checks}"
    code = ((getattr(e, "response", None) or getattr(e.__cause__, "response", None) or {}).get("Error") or {}).get("Code")
    if code == "NoSuchBucket":
        return f"the bucket of {where} does not exist at {ep}: create it, or fix the URL or the endpoint"
    if remote and (isinstance(e, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
        return (f"access to {where} denied by {ep} ({e}): check the credentials (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and that they may read and write this bucket and prefix")
    if remote and code:
        return f"S3 at {ep} refused a request for {where} ({code}: {e}): check the endpoint, the bucket name and the credentials"
    if remote:
        return None
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        blocker = _file_on_path(getattr(e, "filename", None) or url)
        if blocker:
            return f"{where}: {blocker} is a file, not a folder; a cache is a folder (new, or made by `er ingest`)"
    if isinstance(e, PermissionError):
        return f"no permission to use {getattr(e, 'filename', None) or where}: check the folder's owner and mode"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device holding {where}"
    return None


def _file_on_path(path: str | None) -> str | None:
    """The first part of `path` that exists and is not a folder."""
    if not path:
        return None
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        p = os.sep.join(parts[:i])
        if os.path.exists(p) and not os.path.isdir(p):
            return p
    return None
