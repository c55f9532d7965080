"""The cache spec a model folder defines, remembered per state of its files.

A driver that only plans and checks (`er ingest`, `er train` on Ray) needs the spec of its model, not the model:
loading it imports the model's code and reads its weights, 3-4 s of every command. The workers load the weights
anyway, and check them against the spec (lower_fingerprint), so a wrong entry here can fail a run, never write
states of another model.

Only local folders are remembered (the bundled copy, a path): the key is every file's path, size and mtime, and the
arguments. A Hub id is computed each time. Entries live in ~/.cache/er/specs (ER_SPECS to move them; a folder that
cannot be written just means no memo).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Callable

from .manifest import CacheSpec


def specs_home() -> Path:
    return Path(os.environ.get("ER_SPECS") or Path.home() / ".cache" / "er" / "specs")


def _folder_state(folder: str) -> list:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            st = os.stat(path)
            files.append([os.path.relpath(path, folder), st.st_size, st.st_mtime_ns])
    return files


def remembered(folder: str | None, args: dict, compute: Callable[[], CacheSpec],
               aliases: Callable[[CacheSpec], list[dict]] = lambda spec: []) -> CacheSpec:
    """`compute()`, or its result for the same `args` and the same files of `folder` (None: not a local folder).
    `aliases(spec)`: other arguments that give the same spec (e.g. the defaults resolved), remembered with it."""
    if folder is None or not os.path.isdir(folder):
        return compute()
    files = _folder_state(folder)

    def entry(a: dict) -> Path:
        state = {"folder": os.path.realpath(folder), "files": files, "args": a}
        return specs_home() / (hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest() + ".json")

    try:
        return CacheSpec.from_dict(json.loads(entry(args).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        pass
    spec = compute()
    for a in [args, *aliases(spec)]:
        path = entry(a)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")  # unique on a home shared between hosts
            tmp.write_text(json.dumps(spec.to_dict()))
            os.replace(tmp, path)  # readers see a whole entry or none
        except OSError:
            pass
    return spec
