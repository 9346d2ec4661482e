"""Early-exit gates: an auxiliary head after an encoder block decides which tokens stop there.

A gate classifies every remaining token (LayerNorm + Linear, as in DToP); tokens whose top-1
probability reaches the threshold exit: their prediction becomes final and the encoder drops
them from the sequence. The gate only decides; removing tokens is the encoder's job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class GateDecision:
    """What one gate saw and decided, for the tokens that reached it.

    All tensors are (B, N[, C]) over the sequence slots that entered the gate; `token_ids` says
    which partition token sits in each slot (-1 for padding), `exits` which ones leave here.
    """

    after_block: int
    logits: torch.Tensor
    confidence: torch.Tensor
    predicted: torch.Tensor
    exits: torch.Tensor
    token_ids: torch.Tensor


class ExitGate(nn.Module):
    """Auxiliary segmentation head placed after `after_block` encoder blocks."""

    def __init__(self, dim: int, num_classes: int, after_block: int, threshold: float = 0.95) -> None:
        super().__init__()
        self.after_block = after_block
        self.threshold = threshold
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, valid: torch.Tensor, allow_exit: bool = True) -> GateDecision:
        logits = self.classify(x)
        conf, pred = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        exits = valid & (conf >= self.threshold) if allow_exit else torch.zeros_like(valid)
        return GateDecision(self.after_block, logits, conf, pred, exits, token_ids)
