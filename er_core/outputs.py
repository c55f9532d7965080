"""Where commands write their results: never over what er did not write, never complete-looking before it is.

An output folder carries a marker, `.er-output.json`: what kind of run wrote it, its status
(running, complete, failed), the request that started it (for `--resume`) and the entries er put
there. A command writes only into a new or empty folder. An earlier er output is replaced only
with `overwrite` (just the entries its marker lists; anything else there is refused), or continued
with `resume`. Results are staged in a local folder and moved into place (a rename on disk, an
upload on object storage), and the marker's `complete` is written last, so a crash leaves an output
that says it is incomplete.

Single files (`er predict --out FILE`) follow the same rules with `claim_file`/`commit_file`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from .errors import ErError
from .store import is_local, put_atomic, read_bytes, url_to_fs

MARKER = ".er-output.json"
STATUSES = ("running", "complete", "failed")
_LAST = ("metrics.json", "er_model.json")  # moved into place after everything else
# Artefacts of er versions from before the marker, recognised by the files they always hold.
_LEGACY = {"train": {"er_model.json", "metrics.json", "upper.safetensors", "head.safetensors",
                     "encoder.safetensors", "adapter"}}


class OutputExistsError(ErError):
    """An output location holds something er must not replace."""


@dataclass
class OutputDir:
    url: str
    kind: str
    marker: dict = field(default_factory=dict)
    storage_options: dict | None = None

    def __post_init__(self):
        self.fs, self.path = url_to_fs(self.url, self.storage_options)

    # ---------------------------------------------------------------- claiming

    @classmethod
    def claim(cls, url: str, kind: str, *, overwrite: bool = False, resume: bool = False, request: dict | None = None,
              storage_options: dict | None = None, flag: str = "--out") -> "OutputDir":
        """Make `url` this run's output: new, empty, or (with overwrite/resume) an earlier er output of `kind`."""
        if overwrite and resume:
            raise ErError("--overwrite and --resume exclude each other: overwrite starts again, resume continues")
        out = cls(str(url), kind, storage_options=storage_options)
        entries = out._entries()
        if entries is None:  # absent
            if resume:
                raise OutputExistsError(f"cannot resume: {url} does not exist")
            out.fs.makedirs(out.path, exist_ok=True)
            return out._start(request)
        found = out._read_marker(entries)
        if not entries:
            if resume:
                raise OutputExistsError(f"cannot resume: {url} is empty, no earlier run to continue")
            return out._start(request)
        if found is None:
            raise OutputExistsError(
                f"{flag} {url} exists and holds files er did not write ({_names(entries)}); "
                f"er writes only into a new or empty folder, so choose another one")
        if found.get("kind") != kind:
            raise OutputExistsError(f"{flag} {url} holds an er {found.get('kind')} output, not a {kind} output; choose another folder")
        foreign = sorted(set(entries) - set(found["entries"]) - {MARKER})
        if resume:
            if found["status"] == "complete":
                raise OutputExistsError(f"{url} holds a complete {kind} run; nothing to resume")
            out.marker = found
            out._save(status="running")
            return out
        if not overwrite:
            hint = " or --resume to continue it" if found["status"] != "complete" and "request" in found else ""
            raise OutputExistsError(
                f"{flag} {url} holds an earlier er {kind} output ({found['status']}); "
                f"pass --overwrite to replace it{hint}, or choose another folder")
        if foreign:
            raise OutputExistsError(
                f"{flag} {url} holds an earlier er {kind} output but also files er did not write ({_names(foreign)}); "
                f"--overwrite replaces only er's own files, so move those away or choose another folder")
        for name in found["entries"]:
            if name in entries:
                out.fs.rm(f"{out.path}/{name}", recursive=True)
        return out._start(request)

    def _entries(self) -> list[str] | None:
        """Names directly under the folder; None if it does not exist. A file there is an error."""
        if not self.fs.exists(self.path):
            return None
        if not self.fs.isdir(self.path):
            raise OutputExistsError(f"{self.url} is a file; an output folder is needed here")
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)
                      if p.rstrip("/") != self.path)

    def _read_marker(self, entries: list[str]) -> dict | None:
        if MARKER in entries:
            try:
                m = json.loads(read_bytes(self.fs, f"{self.path}/{MARKER}"))
            except ValueError:
                raise OutputExistsError(f"{self.url}/{MARKER} is unreadable; remove the folder by hand if it is yours") from None
            m.setdefault("entries", [])
            return m
        legacy = _LEGACY.get(self.kind, set())
        if "er_model.json" in entries:  # an artefact written before markers existed
            return {"kind": self.kind, "status": "complete", "entries": sorted(legacy & set(entries))}
        return None

    def _start(self, request: dict | None) -> "OutputDir":
        from . import __version__

        self.marker = {"kind": self.kind, "status": "running", "er_version": __version__, "created": time.time(),
                       "entries": [], **({"request": request} if request is not None else {})}
        self._save()
        return self

    def _save(self, **changes) -> None:
        self.marker.update(changes, updated=time.time())
        put_atomic(self.fs, f"{self.path}/{MARKER}", json.dumps(self.marker, indent=1, default=str).encode())

    # ---------------------------------------------------------------- writing

    @property
    def status(self) -> str:
        return self.marker.get("status", "running")

    @property
    def request(self) -> dict:
        return dict(self.marker.get("request") or {})

    def add(self, *names: str) -> None:
        """Record entries er is about to write (first, so --overwrite can remove them later)."""
        if set(names) - set(self.marker["entries"]):
            self._save(entries=sorted({*self.marker["entries"], *names}))

    def child(self, name: str) -> str:
        """URL of an entry er is about to write, recorded."""
        self.add(name)
        return f"{self.url.rstrip('/')}/{name}"

    def local_path(self, name: str) -> str:
        """A local path for an entry (e.g. Ray Train's storage); only for outputs on local disk."""
        if not is_local(self.fs):
            raise ErError(f"{self.url} is not on local disk")
        return os.path.abspath(self.child(name))

    def stage(self) -> str:
        """A fresh local folder to build the results in; `finish` moves its entries into place."""
        if is_local(self.fs):  # same filesystem, so the moves are renames
            staged = tempfile.mkdtemp(prefix=".staging-", dir=self.path)
            self.add(os.path.basename(staged))
            return staged
        return tempfile.mkdtemp(prefix="er-staging-")

    def finish(self, staged: str | None = None, **extra) -> None:
        """Move the staged entries into place, then mark the output complete (last)."""
        if staged is not None:
            # Metadata last, so even a reader that ignores the marker never sees it before the weights.
            names = sorted(os.listdir(staged), key=lambda n: (n in _LAST, _LAST.index(n) if n in _LAST else 0, n))
            self._save(entries=sorted({*self.marker["entries"], *names}))
            for name in names:
                src, dst = os.path.join(staged, name), f"{self.path}/{name}"
                if is_local(self.fs):
                    if os.path.isdir(dst) and not os.path.islink(dst):
                        shutil.rmtree(dst)  # an entry er recorded above, e.g. from an earlier attempt
                    os.replace(src, dst)
                else:
                    self.fs.put(src, dst, recursive=os.path.isdir(src))
            shutil.rmtree(staged, ignore_errors=True)
            self.marker["entries"] = [e for e in self.marker["entries"] if e != os.path.basename(staged)]
        self._save(status="complete", **extra)

    def fail(self, error: str) -> None:
        self._save(status="failed", error=error[:2000])

    def remove(self, name: str) -> None:
        """Remove an entry er wrote (e.g. checkpoints once the run is complete)."""
        path = f"{self.path}/{name}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self._save(entries=[e for e in self.marker["entries"] if e != name])


def read_status(url: str, storage_options: dict | None = None) -> dict | None:
    """The marker of an output folder, or None if it has none (e.g. written by an older er)."""
    fs, path = url_to_fs(str(url), storage_options)
    try:
        return json.loads(read_bytes(fs, f"{path}/{MARKER}"))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"status": "unreadable"}


def require_complete_output(url: str, what: str = "trained model", storage_options: dict | None = None) -> None:
    m = read_status(url, storage_options)
    if m is not None and m.get("status") != "complete":
        hint = f"; continue it with `er train --resume {url}`" if m.get("kind") == "train" else ""
        raise ErError(f"{url} is not a complete {what}: its run is {m.get('status')} (interrupted, failed or still "
                      f"running){hint}")


# ---------------------------------------------------------------- single files


def claim_file(url: str, overwrite: bool, is_ours, storage_options: dict | None = None, flag: str = "--out") -> None:
    """Refuse to replace an existing file unless `overwrite` and `is_ours(open_file)` says er wrote it."""
    fs, path = url_to_fs(str(url), storage_options)
    if not fs.exists(path):
        return
    if fs.isdir(path):
        raise OutputExistsError(f"{flag} {url} is a folder; give a file name")
    if not overwrite:
        raise OutputExistsError(f"{flag} {url} already exists; pass --overwrite to replace it (only an earlier er output "
                                f"is replaced), or choose another name")
    with fs.open(path, "rb") as f:
        ours = is_ours(f)
    if not ours:
        raise OutputExistsError(f"{flag} {url} exists and was not written by er; --overwrite replaces only er's own "
                                f"outputs, so choose another name")


def temp_sibling(url: str) -> str:
    """Where to write a file before it appears at `url` (a hidden sibling, unique per run)."""
    head, _, name = str(url).rstrip("/").rpartition("/")
    return f"{head + '/' if head else ''}.{name}.tmp-{uuid.uuid4().hex[:12]}"


def commit_file(tmp: str, url: str, storage_options: dict | None = None) -> None:
    """Make the finished `tmp` visible at `url` at once (a rename on disk; a copy then delete on object storage)."""
    fs, path = url_to_fs(str(url), storage_options)
    _, tmp_path = url_to_fs(str(tmp), storage_options)
    if is_local(fs):
        os.replace(tmp_path, path)
    else:
        fs.mv(tmp_path, path)


def _names(entries, n: int = 5) -> str:
    entries = list(entries)
    return ", ".join(entries[:n]) + (f" and {len(entries) - n} more" if len(entries) > n else "")
