"""Trained artefacts in standard formats, self-describing like peft's adapter folders.

    er_model.json            method, task (kind, labels), base model, layer k, cache fingerprint, train config
    head.safetensors         the task head (reduced, full)
    upper.safetensors        fine-tuned upper layers k..L-1 (reduced)
    encoder.safetensors      the whole fine-tuned encoder (full)
    adapter/                 peft `save_pretrained` output: LoRA weights + head (lora)
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ArtifactMismatchError, ErError
from .store import CacheSpec
from .models import load_encoder

META = "er_model.json"


# Tuners whose adapters are merged into the weights on load (exact, and faster to run). Others run unmerged:
# peft 0.21's unload of IA³ and LoHa fails on the head, which peft keeps whole as a "module to save".
MERGED = ("LORA",)


def _tensors(module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_trained(out_dir: str | Path, model, meta: dict) -> Path:
    """Save `model` (as built by train.build_model) and its metadata; returns the folder."""
    from safetensors.torch import save_file  # torch: here, so a driver reading er_model.json needs none

    from . import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = meta["method"]
    if method == "lora":
        model.save_pretrained(out / "adapter")
    elif method == "reduced":
        save_file(_tensors(model.upper), out / "upper.safetensors")
        save_file(_tensors(model.head), out / "head.safetensors")
    elif method == "full":
        save_file(_tensors(model.encoder), out / "encoder.safetensors")
        save_file(_tensors(model.head), out / "head.safetensors")
    else:
        raise ErError(f"unknown method {method!r}")
    (out / META).write_text(json.dumps({**meta, "er_version": __version__}, indent=1))
    return out


def read_meta(model_dir: str | Path, storage_options: dict | None = None) -> dict:
    """er_model.json of a complete trained model (a local folder or a URL such as s3://...)."""
    from .outputs import require_complete_output
    from .store import read_bytes, url_to_fs

    require_complete_output(str(model_dir), storage_options=storage_options)
    fs, path = url_to_fs(str(model_dir), storage_options)
    try:
        return json.loads(read_bytes(fs, f"{path}/{META}"))
    except FileNotFoundError:
        raise ErError(f"{model_dir} is not a trained er model (no {META}); train one with `er train`") from None


def check_cache(meta: dict, spec: CacheSpec, model_dir) -> None:
    """Refuse a cache whose lower part, layer or tokenizer differ from the one trained on."""
    c = meta["cache"]
    diffs = []
    if c["lower_fingerprint"] != spec.lower_fingerprint:
        diffs.append(f"lower fingerprint {c['lower_fingerprint'][:12]} (trained) vs {spec.lower_fingerprint[:12]} (cache)")
    if c["layer"] != spec.layer:
        diffs.append(f"layer k {c['layer']} (trained) vs {spec.layer} (cache)")
    if c["tokenizer_fingerprint"] != spec.tokenizer.fingerprint or c["max_length"] != spec.tokenizer.max_length:
        diffs.append("tokenizer settings differ")
    if diffs:
        raise ArtifactMismatchError(f"model {model_dir} was trained on another cache: " + "; ".join(diffs))


def cache_meta(spec: CacheSpec) -> dict:
    return {
        "lower_fingerprint": spec.lower_fingerprint,
        "layer": spec.layer,
        "tokenizer_fingerprint": spec.tokenizer.fingerprint,
        "max_length": spec.tokenizer.max_length,
        "codec": spec.codec,
    }


def load_trained(model_dir: str | Path, encoder=None):
    """Rebuild a trained model for prediction. Returns (meta, lower, model, tokenizer).

    `model` is a RecycledModel (reduced/lora: fed with layer-k states; `lower` computes them
    for cache misses) or a FullModel (full: fed with token ids; `lower` is None).
    """
    if "://" in str(model_dir) and not str(model_dir).startswith("file://"):
        import shutil
        import tempfile

        from .store import url_to_fs

        read_meta(model_dir)  # refuse an incomplete one before copying it
        fs, path = url_to_fs(str(model_dir))
        tmp = tempfile.mkdtemp(prefix="er-model-")
        try:  # a model is small next to the corpus: copy it here once, load it from disk
            fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
            return load_trained(tmp, encoder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    from safetensors.torch import load_file

    from .heads import FullModel, RecycledModel, make_head
    from .split import split_encoder

    meta = read_meta(model_dir)
    d = Path(model_dir)
    tokenizer = None
    if encoder is None:
        encoder, tokenizer = load_encoder(meta["model"]["name"], meta["model"].get("revision"))
    head = make_head(meta["task"]["kind"], encoder.config.hidden_size, max(len(meta["task"]["labels"]), 1))
    if meta["method"] == "full":
        encoder.load_state_dict(load_file(d / "encoder.safetensors"))
        head.load_state_dict(load_file(d / "head.safetensors"))
        model, lower = FullModel(encoder, head), None
    else:
        lower, upper = split_encoder(encoder, meta["cache"]["layer"])
        model = RecycledModel(upper, head)
        if meta["method"] == "reduced":
            upper.load_state_dict(load_file(d / "upper.safetensors"))
            head.load_state_dict(load_file(d / "head.safetensors"))
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, d / "adapter")
            if model.peft_config["default"].peft_type in MERGED:
                model = model.merge_and_unload()
    from .split import lower_fingerprint

    if lower is not None and lower_fingerprint(lower) != meta["cache"]["lower_fingerprint"]:
        raise ArtifactMismatchError(f"base model {meta['model']['name']!r} does not match the lower part {model_dir} was trained with")
    model.eval()
    return meta, lower, model, tokenizer
