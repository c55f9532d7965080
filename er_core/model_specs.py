"""The cache spec a model folder defines, remembered per state of its files.

A driver that only plans and checks (`er ingest`, `er train` on Ray) needs the spec of its model, not the model:
loading it imports the model's code and reads its weights, 3-4 s of every command. The workers load the weights
anyway, and check them against the spec (lower_fingerprint), so a wrong entry here can fail a run, never write
states of another model; the caller then refreshes it (`fresh=True`).

Only local folders are remembered (the bundled copy, a path); a Hub id is computed each time. The key is every
file's path, size, mtime, ctime and inode, the arguments, and the versions of the code that computes a spec
(er, transformers, tokenizers, torch). Entries live in ~/.cache/er/specs (ER_SPECS to move them; deleting the
folder only costs one model load; one that cannot be written just means no memo).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from importlib import metadata
from pathlib import Path
from typing import Callable

from .store import CacheSpec

MEMO_VERSION = 1  # bump when what a spec holds, or how it is computed, changes


def specs_home() -> Path:
    return Path(os.environ.get("ER_SPECS") or Path.home() / ".cache" / "er" / "specs")


def _versions() -> dict:
    from . import __version__

    out = {"er": __version__, "memo": MEMO_VERSION}
    for dist in ("transformers", "tokenizers", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _folder_state(folder: str) -> list:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
                files.append([os.path.relpath(path, folder), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
            except OSError:  # a dangling link, a file gone since the listing: part of the state, as missing
                files.append([os.path.relpath(path, folder), None])
    return files


def remembered(folder: str | None, args: dict, compute: Callable[[], CacheSpec],
               aliases: Callable[[CacheSpec], list[dict]] = lambda spec: [], fresh: bool = False) -> CacheSpec:
    """`compute()`, or its result for the same `args` and the same files of `folder` (None: not a local folder).
    `aliases(spec)`: other arguments that give the same spec (e.g. the defaults resolved), remembered with it.
    `fresh`: compute, and replace what was remembered."""
    if folder is None or not os.path.isdir(folder):
        return compute()
    real, versions = os.path.realpath(folder), _versions()

    def entry(files: list, a: dict) -> Path:
        state = {"folder": real, "files": files, "args": a, "versions": versions}
        return specs_home() / (hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest() + ".json")

    before = _folder_state(folder)
    if not fresh:
        try:
            return CacheSpec.from_dict(json.loads(entry(before, args).read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            pass
    spec = compute()
    if _folder_state(folder) != before:  # rewritten while it loaded: which state the spec belongs to is unknown
        return spec
    for a in [args, *aliases(spec)]:
        try:
            path = entry(before, a)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")  # unique on a home shared between hosts
            tmp.write_text(json.dumps(spec.to_dict()))
            os.replace(tmp, path)  # readers see a whole entry or none
        except (OSError, TypeError, ValueError):
            pass
    return spec
