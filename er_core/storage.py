"""Object-storage primitives the cache needs: resolve a URL, commit a small file atomically, and a writer lock.

Works the same on a local path and on `s3://` (s3fs): credentials, endpoint and region come
from the standard AWS environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or
from explicit `storage_options` passed through to fsspec.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import fsspec

from .errors import CacheLockedError

# s3fs retries transient errors itself; these make it a little more patient.
_S3_DEFAULTS = {"config_kwargs": {"retries": {"max_attempts": 8, "mode": "adaptive"}}}


def url_to_fs(url: str, storage_options: dict | None = None):
    """Return (filesystem, path) for a local path or an fsspec URL."""
    opts = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        for k, v in _S3_DEFAULTS.items():
            opts.setdefault(k, v)
        if os.environ.get("AWS_ENDPOINT_URL") and "endpoint_url" not in opts.get("client_kwargs", {}):
            opts.setdefault("client_kwargs", {})["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path.rstrip("/")


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def put_atomic(fs, path: str, data: bytes) -> None:
    """Make `data` visible at `path` all at once: rename on local disk, a single PUT on object stores."""
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(fs, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


class WriterLock:
    """At most one writer per cache. The lock file names its holder and carries a heartbeat.

    A lock is stale, and may be taken over, when its holder's process is gone (same host)
    or its heartbeat is older than `ttl` seconds (a crashed writer elsewhere).
    """

    def __init__(self, fs, root: str, ttl: float = 600.0):
        self.fs, self.path, self.ttl = fs, f"{root}/_writer.lock", ttl
        self.info = {"run_id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(read_bytes(self.fs, self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: treat as stale

    def _stale(self, other: dict) -> bool:
        if not other:
            return True
        if other.get("host") == socket.gethostname():
            try:
                os.kill(int(other["pid"]), 0)
            except (ProcessLookupError, ValueError, KeyError):
                return True
            except PermissionError:
                return False
            return False
        return time.time() - float(other.get("heartbeat", 0)) > self.ttl

    def _create(self) -> bool:
        """Create the lock only if absent: O_EXCL on disk, `If-None-Match: *` on S3. False if it exists."""
        data = json.dumps({**self.info, "heartbeat": time.time()}).encode()
        try:
            if is_local(self.fs):
                with open(self.path, "xb") as f:
                    f.write(data)
            else:
                self.fs.pipe_file(self.path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as e:  # s3fs reports a failed precondition as a plain OSError
            if "pre-condition" in str(e) or "precondition" in str(e).lower():
                return False
            raise

    def acquire(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if not self._create():
            other = self._read()
            if other is not None and not self._stale(other):
                raise CacheLockedError(
                    f"cache is being written by run {other.get('run_id')} (host {other.get('host')}, pid {other.get('pid')}); "
                    f"wait for it to finish, or delete {self.path} if that writer is dead"
                )
            # Stale: remove it and race for a fresh one; of several takers only one create succeeds.
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
            if not self._create():
                raise CacheLockedError(f"another writer took the stale lock {self.path} at the same moment; try again")
        self.held = True

    def heartbeat(self) -> None:
        put_atomic(self.fs, self.path, json.dumps({**self.info, "heartbeat": time.time()}).encode())

    def release(self) -> None:
        if self.held and (self._read() or {}).get("run_id") == self.info["run_id"]:
            self.fs.rm_file(self.path)
        self.held = False
