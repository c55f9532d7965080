"""Tiny random-weight encoders, one per family variant; every split, cache and training test runs over this table."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    AutoModel,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ModernBertConfig,
    MPNetConfig,
    PretrainedConfig,
    RobertaConfig,
    XLMRobertaConfig,
)
from transformers.models.auto.modeling_auto import MODEL_MAPPING

VOCAB, HIDDEN, LAYERS, HEADS, MAX_POS = 100, 32, 4, 4, 64

# A large init range: with the default 0.02, attention is near uniform and a wrong mask barely shows.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=2 * HIDDEN,
    max_position_embeddings=MAX_POS,
    initializer_range=0.2,
)

# DeBERTa-v2 knobs shared by both variants: bucketed relative positions with a normed table.
_DEBERTA = dict(_COMMON, relative_attention=True, position_buckets=16, max_relative_positions=-1,
                norm_rel_ebd="layer_norm", share_att_key=True)

TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "bert": lambda: BertConfig(**_COMMON),
    "roberta": lambda: RobertaConfig(**_COMMON, pad_token_id=1),
    "xlm-roberta": lambda: XLMRobertaConfig(**_COMMON, pad_token_id=1),
    "electra": lambda: ElectraConfig(**_COMMON, embedding_size=HIDDEN),
    # embedding_size != hidden_size adds `embeddings_project`, which belongs to the lower part.
    "electra-proj": lambda: ElectraConfig(**_COMMON, embedding_size=16),
    "distilbert": lambda: DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=2 * HIDDEN,
        max_position_embeddings=MAX_POS, initializer_range=0.2,
    ),
    # DeBERTa-v2 style: the conv after layer 0 and absolute positions in the input.
    "deberta-v2": lambda: DebertaV2Config(**_DEBERTA, pos_att_type=["p2c", "c2p"], conv_kernel_size=3,
                                          conv_act="gelu", position_biased_input=True),
    # DeBERTa-v3 style: relative positions only, no conv.
    "deberta-v3": lambda: DebertaV2Config(**_DEBERTA, pos_att_type=["p2c", "c2p"], position_biased_input=False),
    "mpnet": lambda: MPNetConfig(**_COMMON, pad_token_id=1),
    # Global attention every 2nd layer, a 4-token window elsewhere: the padded batches (up to 9 tokens) feel both.
    "modernbert": lambda: ModernBertConfig(**{**_COMMON, "initializer_range": 0.2}, global_attn_every_n_layers=2,
                                           local_attention=4, pad_token_id=0),
}


def make_tiny(name: str, seed: int = 0, attn_implementation: str | None = None, **config) -> torch.nn.Module:
    """A fresh `AutoModel` for `TINY_CONFIGS[name]` (with `config`'s fields changed), in eval mode; the same seed gives
    the same weights."""
    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    cfg = TINY_CONFIGS[name]()
    for field, value in config.items():
        setattr(cfg, field, value)
    return AutoModel.from_config(cfg, **kwargs).eval()


def attn_implementations(name: str) -> list[str]:
    """The CPU attention implementations the family's model class accepts."""
    model_class = MODEL_MAPPING[type(TINY_CONFIGS[name]())]
    return ["eager", "sdpa"] if getattr(model_class, "_supports_sdpa", False) else ["eager"]


def padded_batch(config: PretrainedConfig, lengths=(9, 5, 1), seed: int = 0):
    """`(input_ids, attention_mask)` with right padding; ids avoid the low special ids."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(3, config.vocab_size, (len(lengths), seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    return ids.masked_fill(mask == 0, pad), mask
