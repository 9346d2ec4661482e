"""Early-exit gates: an auxiliary head after an encoder block decides which tokens stop there.

A gate classifies every remaining token (LayerNorm + Linear, as in DToP); tokens whose top-1
probability reaches the threshold exit: their prediction becomes final and the encoder drops
them from the sequence. The gate only decides; removing tokens is the encoder's job.

DToP's context rule (`keep_per_class` K > 0): of the tokens that qualify, the K most confident of
each predicted class are held back in the sequence, so later blocks keep examples of every class
as context; only the rest exit.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tokenscope.models.steps import ExitDecision

GateDecision = ExitDecision
"""A gate decides what any exit step decides (models/steps.py): one type, one path in the encoder."""


def hold_back_per_class(candidates: torch.Tensor, confidence: torch.Tensor, predicted: torch.Tensor,
                        k: int) -> torch.Tensor:
    """(B, N) bool: among `candidates`, the `k` most confident of each predicted class, per image.

    One sort per image by (class, -confidence), no host synchronisation: within a class the
    candidates come first, most confident first, and a token's rank is its distance from the
    first slot of its class.
    """
    if k <= 0:
        return torch.zeros_like(candidates)
    score = torch.where(candidates, confidence.float().clamp(0, 1), torch.full_like(confidence, -1.0, dtype=torch.float))
    key = predicted.to(torch.float64) * 4.0 - score.to(torch.float64)  # classes apart, best first within one
    order = torch.argsort(key, dim=1, stable=True)
    cls_sorted = predicted.gather(1, order)
    pos = torch.arange(order.shape[1], device=order.device).expand_as(order)
    starts = torch.ones_like(cls_sorted, dtype=torch.bool)
    starts[:, 1:] = cls_sorted[:, 1:] != cls_sorted[:, :-1]
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
    held_sorted = candidates.gather(1, order) & ((pos - first) < k)
    return torch.zeros_like(candidates).scatter(1, order, held_sorted)


class ExitGate(nn.Module):
    """Auxiliary segmentation head placed after `after_block` encoder blocks."""

    def __init__(self, dim: int, num_classes: int, after_block: int, threshold: float = 0.95,
                 keep_per_class: int = 0) -> None:
        super().__init__()
        self.after_block = after_block
        self.threshold = threshold
        self.keep_per_class = keep_per_class
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, valid: torch.Tensor, allow_exit: bool = True,
                threshold: float | None = None, keep_per_class: int | None = None) -> ExitDecision:
        """`threshold` and `keep_per_class` are the operating point's (the gate's own when None): values
        passed in, never set on the gate."""
        logits = self.classify(x)
        conf, pred = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        limit = self.threshold if threshold is None else float(threshold)
        candidates = valid & (conf >= limit) if allow_exit else torch.zeros_like(valid)
        held = hold_back_per_class(candidates, conf, pred, self.keep_per_class if keep_per_class is None
                                   else int(keep_per_class))
        return ExitDecision(self.after_block, "gate", token_ids, valid, candidates & ~held, logits, held)
