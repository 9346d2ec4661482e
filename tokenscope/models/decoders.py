"""Segmentation decoders: map the encoder's final tokens to class logits."""

from __future__ import annotations

import torch
import torch.nn as nn


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear map per token (the norm is the encoder's)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(tokens)
