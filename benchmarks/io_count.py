"""Count the bytes every process reads from storage: local files through fsspec, and S3 GETs through s3fs.

    os.environ[io_count.ENV] = "/tmp/reads"
    os.environ["PYTHONPATH"] = f"{io_count.PROBE}:{REPO}"   # before ray.init: every Ray process inherits both
    io_count.install()                                      # this process (the driver)
    ...
    reads = io_count.load("/tmp/reads")                     # [Read(pid, t, kind, nbytes, path), ...]

Every Python process started with benchmarks/io_probe on PYTHONPATH installs the counter at start-up
(its sitecustomize.py), so the driver, Ray Data tasks and Train workers all count. (A job-level Ray
`worker_process_setup_hook` would do too, but any job runtime_env makes Ray start new workers instead of
its prestarted ones, which delayed the first read tasks by 20-60 s on this machine.) Installing costs
nothing up front: each hook is applied when its module is first imported. Each process appends one
line per read to `$ER_IO_COUNT_DIR/reads-<pid>.log`. The hooks sit at the lowest level er's reads go through:
- local disk: `LocalFileOpener.read` (and readline, readlines, _fetch_range), which fsspec's `cat_file`,
  `cat_ranges` and `open` all use, and er_core.store.storage's `_local_read` (read_versioned: the manifest and
  lock compare-and-swap of writers);
- S3: `S3FileSystem._call_s3`, counting the `ContentLength` of every `get_object` reply (cat_file,
  cat_ranges, open, and er's versioned reads alike); other requests are logged with 0 bytes, so the
  number of requests can be counted too.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "ER_IO_COUNT_DIR"
PROBE = str(Path(__file__).resolve().parent / "io_probe")  # holds the sitecustomize.py that calls install()
_lock = threading.Lock()
_state: dict = {}


@dataclass(frozen=True)
class Read:
    pid: int
    t: float  # unix time the read completed (S3: when the reply's headers arrived)
    kind: str  # "local", or "s3.<request>" ("s3.get_object" carries the bytes)
    nbytes: int
    path: str  # local: absolute path; S3: bucket/key


def _log(kind: str, nbytes: int, path: str) -> None:
    line = f"{os.getpid()} {time.time():.6f} {kind} {nbytes} {path}\n"
    with _lock:
        f = _state.get("file")
        if f is None or _state.get("pid") != os.getpid():  # a forked child gets its own file
            f = _state["file"] = open(Path(os.environ[ENV]) / f"reads-{os.getpid()}.log", "a", buffering=1)
            _state["pid"] = os.getpid()
        f.write(line)


def install() -> None:
    """Hook the read paths of this process (once); a no-op unless $ER_IO_COUNT_DIR is set."""
    if not os.environ.get(ENV) or _state.get("installed"):
        return
    _state["installed"] = True
    patches = {"fsspec.implementations.local": _hook_local, "er_core.store.storage": _hook_er, "s3fs.core": _hook_s3}
    for name, patch in list(patches.items()):
        if name in sys.modules:  # imported already (the driver): patch now
            patch(sys.modules[name])
            del patches[name]
    if patches:
        sys.meta_path.insert(0, _AfterImport(patches))


class _AfterImport:
    """A meta path finder that patches a module right after its first import, so processes that never import it pay nothing."""

    def __init__(self, patches: dict):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        patch = self.patches.pop(name, None)
        if patch is None:
            return None
        for finder in sys.meta_path:  # the spec the other finders would give
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module  # this loader instance serves this module only
        return spec


def _hook_local(local) -> None:
    opener = local.LocalFileOpener

    def counted(name):
        orig = getattr(opener, name)

        def read(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            n = sum(map(len, out)) if name == "readlines" else len(out)
            _log("local", n, str(self.path))
            return out

        setattr(opener, name, read)

    for name in ("read", "readline", "readlines", "_fetch_range"):
        counted(name)


def _hook_er(storage) -> None:
    orig = storage._local_read

    def local_read(path):  # read_versioned on local disk opens the file itself (builtin open)
        data, tag = orig(path)
        if data is not None:
            _log("local", len(data), str(path))
        return data, tag

    storage._local_read = local_read


def _hook_s3(core) -> None:
    orig = core.S3FileSystem._call_s3

    async def call_s3(self, method, *args, **kwargs):
        out = await orig(self, method, *args, **kwargs)
        name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
        n = int(out.get("ContentLength", 0) or 0) if name == "get_object" and isinstance(out, dict) else 0
        _log(f"s3.{name}", n, f"{kwargs.get('Bucket', '')}/{kwargs.get('Key', '')}")
        return out

    core.S3FileSystem._call_s3 = call_s3


def load(folder) -> list[Read]:
    """Every read logged under `folder`, in time order."""
    out = []
    for f in Path(folder).glob("reads-*.log"):
        for line in f.read_text().splitlines():
            pid, t, kind, n, path = line.split(" ", 4)
            out.append(Read(int(pid), float(t), kind, int(n), path))
    return sorted(out, key=lambda r: r.t)
