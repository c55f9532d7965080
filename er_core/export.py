"""`er export`: a trained model as one standard Hugging Face model folder, usable without er.

    DIR/config.json, model.safetensors, tokenizer files   the whole encoder (lower and trained upper layers joined;
                                                           LoRA merged), loadable with `AutoModel.from_pretrained(DIR)`
    DIR/head.safetensors                                   the task head's weights
    DIR/er_head.json                                       kind, labels and how to apply the head (below)

The head on the encoder's `last_hidden_state` h (B, T, H), as er computes it:
    classification  logits = relu(h[:, 0] @ dense.weight.T + dense.bias) @ out.weight.T + out.bias   (B, labels)
    ner             logits = h @ out.weight.T + out.bias                                             (B, T, labels)
    qa              logits = h @ out.weight.T + out.bias; [..., 0] start, [..., 1] end               (B, T, 2)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .artifacts import load_trained, read_meta
from .errors import ErError
from .models import load_encoder

HOW = {
    "classification": "logits = relu(h[:, 0] @ dense.weight.T + dense.bias) @ out.weight.T + out.bias",
    "ner": "logits = h @ out.weight.T + out.bias  (one row per token; a word's tag is its first sub-token's)",
    "qa": "logits = h @ out.weight.T + out.bias  ([..., 0] start, [..., 1] end, over context tokens)",
}


def export_model(model_dir: str, to: str) -> dict:
    """Write the trained model at `model_dir` (reduced, LoRA or full) to the folder `to`; return what was written."""
    meta = read_meta(model_dir)
    out = Path(to)
    if out.exists() and any(out.iterdir()):
        raise ErError(f"{to} exists and is not empty; export into a new folder")
    encoder, tokenizer = load_encoder(meta["model"]["name"], meta["model"].get("revision"))
    _, _, model, _ = load_trained(model_dir, encoder)  # loads the trained weights into `encoder` itself (shared modules)
    if not hasattr(model, "head"):
        tuner = meta["train_config"].get("peft_config", {}).get("peft_type", "?")
        raise ErError(f"{model_dir} holds {tuner} adapters, which peft cannot merge into the weights here; use it with "
                      f"`er predict`, or load {model_dir}/adapter with PeftModel.from_pretrained")
    out.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, out / "head.safetensors")
    kind = meta["task"]["kind"]
    (out / "er_head.json").write_text(json.dumps({"kind": kind, "labels": meta["task"]["labels"], "apply": HOW[kind],
                                                  "from": str(model_dir), "method": meta["method"]}, indent=1))
    return {"to": str(out), "kind": kind, "method": meta["method"], "files": sorted(p.name for p in out.iterdir())}
