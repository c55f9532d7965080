"""Cut an encoder at layer k: lower = embeddings + layers 0..k-1, upper = layers k..L-1.

Both parts hold the model's own modules (shared, not copied), so `upper(lower(ids, mask), mask)`
equals the unsplit model's `last_hidden_state`, and LoRA finds the usual Linear names in `upper.layers`.
"""

from __future__ import annotations

import hashlib
import math
import numbers

import torch
from torch import nn

from er_core.errors import ErError
from er_core.families import BY_LAYER_TYPE, FAMILIES, Family, family_for, get_path, num_layers

_FINGERPRINT_VERSION = b"er-lower-v1"


def _run_layers(layers, hidden, layer_kwargs, after_layer0, mask2d):
    first = hidden
    by_type = layer_kwargs.get(BY_LAYER_TYPE)
    for i, layer in enumerate(layers):
        out = layer(hidden, **(by_type[layer.attention_type] if by_type else layer_kwargs))
        hidden = out[0] if isinstance(out, tuple) else out  # DeBERTa layers return (states, attn)
        if i == 0 and after_layer0 is not None:
            hidden = after_layer0(first, hidden, mask2d)
    return hidden


class _Part(nn.Module):
    def __init__(self, model: nn.Module, model_type: str, k: int):
        super().__init__()
        self.config = model.config  # read at call time: the mask format follows its attention implementation
        self.model_type = model_type
        self.k = k

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def _layers_forward(self, hidden, attention_mask):
        if len(self.layers) == 0:
            return hidden
        layer_kwargs = self.family.layer_inputs(self.config, self.shared, hidden, attention_mask)
        return _run_layers(self.layers, hidden, layer_kwargs, self.after_layer0, attention_mask)


class Lower(_Part):
    """`lower(input_ids, attention_mask, token_type_ids=None)` -> hidden states after layer k.

    token_type_ids=None means zeros, as in the model; families without token types (DistilBERT) ignore it.
    """

    def __init__(self, model: nn.Module, model_type: str, k: int):
        super().__init__(model, model_type, k)
        fam = self.family
        self.embeddings = get_path(model, fam.embeddings)
        self.post_embed = tuple(n for n in fam.post_embed if get_path(model, n) is not None)
        for name in self.post_embed:
            setattr(self, name, get_path(model, name))
        self.layers = nn.ModuleList(get_path(model, fam.layers)[:k])
        self.shared = fam.shared(model) if fam.shared is not None and k > 0 else None
        conv = get_path(model, fam.after_layer0) if fam.after_layer0 else None
        self.after_layer0 = conv if k > 0 else None  # it reads the embeddings, so it goes with layer 0

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        given = {"input_ids": input_ids, "token_type_ids": token_type_ids, "mask": attention_mask}
        hidden = self.embeddings(**{name: given[name] for name in self.family.embed_kwargs})
        for name in self.post_embed:
            hidden = getattr(self, name)(hidden)
        return self._layers_forward(hidden, attention_mask)


class Upper(_Part):
    """`upper(hidden_states, attention_mask)` -> the model's last_hidden_state; at k == L only the family's
    `final` module (e.g. ModernBERT's last norm), else the identity."""

    def __init__(self, model: nn.Module, model_type: str, k: int):
        super().__init__(model, model_type, k)
        fam = self.family
        self.layers = nn.ModuleList(get_path(model, fam.layers)[k:])
        self.shared = fam.shared(model) if fam.shared is not None and len(self.layers) else None
        conv = get_path(model, fam.after_layer0) if fam.after_layer0 else None
        self.after_layer0 = conv if k == 0 and len(self.layers) else None
        self.final = get_path(model, fam.final) if fam.final else None
        # Names of parameters the lower also uses (DeBERTa's rel_embeddings and their LayerNorm);
        # freeze these when training, or the cached lower states no longer match the weights.
        self.shared_with_lower: tuple[str, ...] = ()

    def forward(self, hidden_states, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        hidden = self._layers_forward(hidden_states, attention_mask)
        return self.final(hidden) if self.final is not None else hidden


def resolve_layer(k, num_layers: int) -> int:
    """An int 0..L, a fraction of depth in (0, 1] (-> round(L * k)), or either as a string ("3", "0.5").

    "1" means layer 1 and "1.0" means the whole depth. Rounding is Python's round (half to even).
    """
    value = k
    hint = f"give an int 0..{num_layers} or a fraction of depth in (0, 1] such as 0.5"
    if isinstance(k, str):
        text = k.strip()
        try:
            k = int(text)
        except ValueError:
            try:
                k = float(text)
            except ValueError:
                raise ErError(f"layer {value!r} is not a number; {hint}.") from None
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ErError(f"layer {value!r} is not a number; {hint}.")
    if isinstance(k, numbers.Integral):
        if 0 <= k <= num_layers:
            return int(k)
        raise ErError(
            f"layer {value!r} is out of range: this encoder has {num_layers} layers, so the valid range is "
            f"0..{num_layers} (0 = embeddings only, {num_layers} = whole encoder), or a fraction in (0, 1]."
        )
    if math.isfinite(k) and 0 < k <= 1:
        return round(num_layers * k)
    raise ErError(f"layer fraction {value!r} is not in (0, 1]; {hint}.")


def split_encoder(model: nn.Module, k) -> tuple[Lower, Upper]:
    """Split a Hugging Face encoder (`AutoModel`, or a task model via its base model) at layer k."""
    model = getattr(model, "base_model", model)
    family_for(model.config)  # raises UnsupportedModelError naming the supported types
    model_type = model.config.model_type
    depth = num_layers(model.config)
    k = resolve_layer(k, depth)
    lower, upper = Lower(model, model_type, k), Upper(model, model_type, k)
    in_lower = {id(p) for p in lower.parameters()}
    upper.shared_with_lower = tuple(n for n, p in upper.named_parameters() if id(p) in in_lower)
    return lower, upper


def lower_fingerprint(lower: nn.Module) -> str:
    """sha256 over the lower part's weights: name, shape, dtype and bytes of each, in sorted order."""
    digest = hashlib.sha256(_FINGERPRINT_VERSION + b"\0")
    for name, tensor in sorted(lower.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
