"""How each encoder family is split: one row per `config.model_type`, no per-family branches elsewhere.

A row says where the embeddings and the layer list live, which keywords the embeddings take, what the
model applies between embeddings and layer 0, how the layers' mask (and other shared inputs) is made,
what runs after layer 0, and which Linear names LoRA targets by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from er_core.errors import UnsupportedModelError

# transformers' family modules are imported inside the functions that use them: a worker splitting a BERT model
# never loads DeBERTa's or MPNet's modelling code.


def _bidirectional_inputs(config, shared, hidden, attention_mask) -> dict:
    # transformers' own helper, so the mask is in the format the configured attention
    # implementation expects: additive float for eager, bool (or None if no padding) for sdpa.
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
    return {"attention_mask": mask}


class DebertaRel(nn.Module):
    """The parts of a DeBERTa-v2 encoder every layer reads: the 0/1 pair mask and the relative positions.

    Holds (shares) the encoder's `rel_embeddings` and, when `norm_rel_ebd` has "layer_norm", its
    `LayerNorm`; the methods are the encoder's own, called on this module, so results match the unsplit model exactly.
    """

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
        from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder as E

        return {
            "attention_mask": E.get_attention_mask(self, attention_mask),
            "relative_pos": E.get_rel_pos(self, hidden),
            "rel_embeddings": E.get_rel_embedding(self),
        }


def _deberta_inputs(config, shared, hidden, attention_mask) -> dict:
    return shared.layer_inputs(hidden, attention_mask)


def _deberta_shared(model: nn.Module) -> DebertaRel:
    return DebertaRel(model.encoder)


class MPNetRel(nn.Module):
    """MPNet's relative-position bias, which every layer reads: the encoder's own table and method."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.relative_attention_bias = encoder.relative_attention_bias

    @staticmethod
    def relative_position_bucket(*args, **kw):
        from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

        return MPNetEncoder.relative_position_bucket(*args, **kw)

    def compute_position_bias(self, hidden):
        from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

        return MPNetEncoder.compute_position_bias(self, hidden)


def _mpnet_inputs(config, shared, hidden, attention_mask) -> dict:
    return {**_bidirectional_inputs(config, shared, hidden, attention_mask), "position_bias": shared.compute_position_bias(hidden)}


def _mpnet_shared(model: nn.Module) -> MPNetRel:
    return MPNetRel(model.encoder)


class ModernBertRotary(nn.Module):
    """ModernBERT's rotary embeddings (no weights), read by every layer with its own attention type."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.rotary_emb = model.rotary_emb


def _modernbert_inputs(config, shared, hidden, attention_mask) -> dict:
    # The model's own padded path: a full mask for global layers, a sliding-window one for local layers,
    # and rotary embeddings per layer type, from positions 0..T-1 (rows are right padded, as in the cache).
    from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

    kw = {"config": config, "inputs_embeds": hidden, "attention_mask": attention_mask}
    masks = {"full_attention": create_bidirectional_mask(**kw), "sliding_attention": create_bidirectional_sliding_window_mask(**kw)}
    pos = torch.arange(hidden.shape[1], device=hidden.device)[None]
    return {BY_LAYER_TYPE: {t: {"attention_mask": masks[t], "position_embeddings": shared.rotary_emb(hidden, pos, t)}
                            for t in set(config.layer_types)}}


def _modernbert_shared(model: nn.Module) -> ModernBertRotary:
    return ModernBertRotary(model)


BY_LAYER_TYPE = "by_layer_type"  # layer_inputs key: kwargs per `layer.attention_type` instead of one set for all


# Functions in rows are module-level (no lambdas) so split parts stay picklable for Ray.
@dataclass(frozen=True)
class Family:
    embeddings: str  # attribute path of the embeddings module
    layers: str  # attribute path of the nn.ModuleList of layers
    embed_kwargs: tuple[str, ...]  # what the embeddings are called with, of input_ids/token_type_ids/mask
    lora_targets: tuple[str, ...]  # Linear names peft's LoRA (and LoHa, LoKr, ...) targets by default
    linear_targets: tuple[str, ...] = ()  # every Linear of a layer, attention and FFN (lora_modules "all")
    ia3_targets: tuple[str, ...] = ()  # IA³: keys, values and the FFN's second Linear, as peft's own IA³ tables
    ffn_targets: tuple[str, ...] = ()  # IA³'s feedforward_modules: of ia3_targets, those scaled on their input
    layer_inputs: Callable = _bidirectional_inputs  # (config, shared, hidden, mask2d) -> layer kwargs
    post_embed: tuple[str, ...] = ()  # model-level modules applied to the embeddings' output, if present
    shared: Callable[[nn.Module], nn.Module] | None = None  # model -> module every layer reads
    after_layer0: str | None = None  # module run as m(embeddings_out, layer0_out, mask2d), if not None
    final: str | None = None  # model-level module applied after the last layer (it goes with the upper part)
    num_layers_attr: str = "num_hidden_layers"
    hidden_size_attr: str = "hidden_size"


_BERT_LIKE = Family(
    embeddings="embeddings",
    layers="encoder.layer",
    embed_kwargs=("input_ids", "token_type_ids"),
    lora_targets=("query", "value"),
    linear_targets=("query", "key", "value", "output.dense", "intermediate.dense"),
    ia3_targets=("key", "value", "output.dense"),
    ffn_targets=("output.dense",),
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
        linear_targets=("query", "key", "value", "output.dense", "intermediate.dense"),
        ia3_targets=("key", "value", "output.dense"),
        ffn_targets=("output.dense",),
        post_embed=("embeddings_project",),
    ),
    # DistilBERT has no token types.
    "distilbert": Family(
        embeddings="embeddings",
        layers="transformer.layer",
        embed_kwargs=("input_ids",),
        lora_targets=("q_lin", "v_lin"),
        linear_targets=("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
        ia3_targets=("k_lin", "v_lin", "lin2"),
        ffn_targets=("lin2",),
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
        linear_targets=("query_proj", "key_proj", "value_proj", "output.dense", "intermediate.dense"),
        ia3_targets=("key_proj", "value_proj", "output.dense"),
        ffn_targets=("output.dense",),
        layer_inputs=_deberta_inputs,
        shared=_deberta_shared,
        after_layer0="encoder.conv",
    ),
    # MPNet (all-mpnet-base-v2): no token types; every layer reads one relative-position bias.
    "mpnet": Family(
        embeddings="embeddings",
        layers="encoder.layer",
        embed_kwargs=("input_ids",),
        lora_targets=("q", "v"),
        linear_targets=("q", "k", "v", "o", "output.dense", "intermediate.dense"),
        ia3_targets=("k", "v", "output.dense"),
        ffn_targets=("output.dense",),
        layer_inputs=_mpnet_inputs,
        shared=_mpnet_shared,
    ),
    # ModernBERT: alternating global / sliding-window layers with rotary positions, and a norm after the last layer.
    # Split on transformers' padded path (attention masks, no unpadding), which is what the model itself runs.
    "modernbert": Family(
        embeddings="embeddings",
        layers="layers",
        embed_kwargs=("input_ids",),
        lora_targets=("Wqkv",),
        linear_targets=("Wqkv", "Wo", "Wi"),
        ia3_targets=("Wqkv", "mlp.Wo"),
        ffn_targets=("mlp.Wo",),
        layer_inputs=_modernbert_inputs,
        shared=_modernbert_shared,
        final="final_norm",
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


def family_by_type(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} has no split recipe or adapter targets; supported model types are "
            f"{', '.join(supported_model_types())}."
        )
    return FAMILIES[model_type]


def lora_target_modules(model_type: str) -> list[str]:
    return list(family_by_type(model_type).lora_targets)


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
