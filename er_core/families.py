"""How each encoder family is split: one row per `config.model_type`, no per-family branches elsewhere.

A row says where the embeddings and the layer list live, which keywords the embeddings take, what the
model applies between embeddings and layer 0, how the layers' mask (and other shared inputs) is made,
what runs after layer 0, and which Linear names LoRA targets by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder

from er_core.errors import UnsupportedModelError


def _bidirectional_inputs(config, shared, hidden, attention_mask) -> dict:
    # transformers' own helper, so the mask is in the format the configured attention
    # implementation expects: additive float for eager, bool (or None if no padding) for sdpa.
    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    return {"attention_mask": mask}


class DebertaRel(nn.Module):
    """The parts of a DeBERTa-v2 encoder every layer reads: the 0/1 pair mask and the relative positions.

    Holds (shares) the encoder's `rel_embeddings` and, when `norm_rel_ebd` has "layer_norm", its
    `LayerNorm`; the methods are the encoder's own, so results match the unsplit model exactly.
    """

    get_attention_mask = DebertaV2Encoder.get_attention_mask
    get_rel_pos = DebertaV2Encoder.get_rel_pos
    get_rel_embedding = DebertaV2Encoder.get_rel_embedding

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.relative_attention = encoder.relative_attention
        self.norm_rel_ebd = encoder.norm_rel_ebd
        if self.relative_attention:
            self.max_relative_positions = encoder.max_relative_positions
            self.position_buckets = encoder.position_buckets
            self.rel_embeddings = encoder.rel_embeddings
        if "layer_norm" in self.norm_rel_ebd:
            self.LayerNorm = encoder.LayerNorm

    def layer_inputs(self, hidden, attention_mask) -> dict:
        return {
            "attention_mask": self.get_attention_mask(attention_mask),
            "relative_pos": self.get_rel_pos(hidden),
            "rel_embeddings": self.get_rel_embedding(),
        }


def _deberta_inputs(config, shared, hidden, attention_mask) -> dict:
    return shared.layer_inputs(hidden, attention_mask)


def _deberta_shared(model: nn.Module) -> DebertaRel:
    return DebertaRel(model.encoder)


# Functions in rows are module-level (no lambdas) so split parts stay picklable for Ray.
@dataclass(frozen=True)
class Family:
    embeddings: str  # attribute path of the embeddings module
    layers: str  # attribute path of the nn.ModuleList of layers
    embed_kwargs: tuple[str, ...]  # what the embeddings are called with, of input_ids/token_type_ids/mask
    lora_targets: tuple[str, ...]  # Linear names peft's LoRA targets by default
    layer_inputs: Callable = _bidirectional_inputs  # (config, shared, hidden, mask2d) -> layer kwargs
    post_embed: tuple[str, ...] = ()  # model-level modules applied to the embeddings' output, if present
    shared: Callable[[nn.Module], nn.Module] | None = None  # model -> module every layer reads
    after_layer0: str | None = None  # module run as m(embeddings_out, layer0_out, mask2d), if not None
    num_layers_attr: str = "num_hidden_layers"
    hidden_size_attr: str = "hidden_size"


_BERT_LIKE = Family(
    embeddings="embeddings",
    layers="encoder.layer",
    embed_kwargs=("input_ids", "token_type_ids"),
    lora_targets=("query", "value"),
)

FAMILIES: dict[str, Family] = {
    "bert": _BERT_LIKE,  # also MiniLM checkpoints
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    # ELECTRA projects embeddings up when embedding_size != hidden_size.
    "electra": Family(
        embeddings="embeddings",
        layers="encoder.layer",
        embed_kwargs=("input_ids", "token_type_ids"),
        lora_targets=("query", "value"),
        post_embed=("embeddings_project",),
    ),
    # DistilBERT has no token types.
    "distilbert": Family(
        embeddings="embeddings",
        layers="transformer.layer",
        embed_kwargs=("input_ids",),
        lora_targets=("q_lin", "v_lin"),
        num_layers_attr="n_layers",
        hidden_size_attr="dim",
    ),
    # DeBERTa-v2 and -v3: embeddings zero padded positions, layers take relative positions,
    # and an optional conv mixes the embeddings into layer 0's output.
    "deberta-v2": Family(
        embeddings="embeddings",
        layers="encoder.layer",
        embed_kwargs=("input_ids", "token_type_ids", "mask"),
        lora_targets=("query_proj", "value_proj"),
        layer_inputs=_deberta_inputs,
        shared=_deberta_shared,
        after_layer0="encoder.conv",
    ),
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_for(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no split recipe; supported model types are "
            f"{', '.join(supported_model_types())}. Use one of those or add a row to er_core/families.py."
        )
    return FAMILIES[model_type]


def lora_target_modules(model_type: str) -> list[str]:
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no LoRA targets; supported model types are "
            f"{', '.join(supported_model_types())}."
        )
    return list(FAMILIES[model_type].lora_targets)


def num_layers(config) -> int:
    return int(getattr(config, family_for(config).num_layers_attr))


def hidden_size(config) -> int:
    return int(getattr(config, family_for(config).hidden_size_attr))


def get_path(obj, path: str):
    """`get_path(model, "encoder.layer")`; None if any step is missing or None."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj
