"""Task heads on top of the final hidden states, and the models that put encoder parts and a head together."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

IGNORE = -100  # label of positions that carry no loss (padding, non-first sub-tokens)


class SequenceClassificationHead(nn.Module):
    """The paper's head: first token -> Linear(H, 256) -> Linear(256, C), with a ReLU between."""

    def __init__(self, hidden_size: int, num_labels: int, inner: int = 256, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, inner)
        self.out = nn.Linear(inner, num_labels)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.dense(self.dropout(h[:, 0]))))

    @staticmethod
    def loss(logits, batch):
        return F.cross_entropy(logits, batch["labels"])


class TokenClassificationHead(nn.Module):
    """One label per token; only the first sub-token of each word carries the word's label."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, h, attention_mask):
        return self.out(self.dropout(h))

    @staticmethod
    def loss(logits, batch):
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)


class SpanQAHead(nn.Module):
    """Start and end logits per token for extractive QA; padding is masked out."""

    def __init__(self, hidden_size: int, num_labels: int = 2):
        super().__init__()
        self.out = nn.Linear(hidden_size, 2)

    def forward(self, h, attention_mask):
        logits = self.out(h).masked_fill(attention_mask[..., None] == 0, -1e4)
        return logits  # (B, T, 2): [..., 0] start, [..., 1] end

    @staticmethod
    def loss(logits, batch):
        return (F.cross_entropy(logits[..., 0], batch["start_positions"]) + F.cross_entropy(logits[..., 1], batch["end_positions"])) / 2


HEADS = {"classification": SequenceClassificationHead, "ner": TokenClassificationHead, "qa": SpanQAHead}


def make_head(kind: str, hidden_size: int, num_labels: int) -> nn.Module:
    return HEADS[kind](hidden_size, num_labels)


class RecycledModel(nn.Module):
    """Upper layers + head, fed with cached layer-k states (methods `reduced` and `lora`)."""

    def __init__(self, upper: nn.Module, head: nn.Module):
        super().__init__()
        self.upper, self.head = upper, head

    def forward(self, hidden_states, attention_mask):
        return self.head(self.upper(hidden_states, attention_mask), attention_mask)


class FullModel(nn.Module):
    """The whole encoder + head, fed with token ids (the `full` baseline, and cache misses)."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # pairs; absent = the model's zeros
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(h, attention_mask)
