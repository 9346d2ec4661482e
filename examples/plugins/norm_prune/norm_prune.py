"""`norm_prune`: after one block, the `frac` of tokens with the lowest feature norm leave.

A worked example of a tokenscope method plug-in (docs/methods-api.md walks through it). The rule
is a researcher's own, not a published method: tokens whose features are smallest after block
`block` are taken to carry least, so they stop there; the decoder predicts them from the features
they had then. Install it with `pip install examples/plugins/norm_prune`, or name the file
directly: `tokenscope run IMG --method examples/plugins/norm_prune/norm_prune.py:frac=0.3`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tokenscope.methods import Method, ModelFacts, Plan, PruneDecision, Reference, Setting, Step, TokenView


def fraction(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else "must be a fraction in [0, 1)"


class LowNormPrune(nn.Module):
    """Decides which tokens leave after `block`: the floor(frac x n) with the smallest L2 norm."""

    def __init__(self, block: int, frac: float) -> None:
        super().__init__()
        self.block, self.frac = block, frac

    def forward(self, view: TokenView) -> PruneDecision:
        norms = view.x.float().norm(dim=-1)
        norms = torch.where(view.valid, norms, torch.full_like(norms, float("inf")))
        drop = torch.floor(view.valid.sum(dim=1).to(torch.float64) * self.frac).long()
        order = torch.argsort(norms, dim=1, stable=True)  # smallest first
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order))
        pruned = view.valid & (rank < drop[:, None])
        return PruneDecision(self.block, "norm_prune", view.token_ids, view.valid, pruned)


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    block = values["block"] if values["block"] is not None else max(1, facts.depth // 3)
    if not 1 <= block < facts.depth:
        raise ValueError(f"block {block} must be in 1..{facts.depth - 1} for {facts.name}")
    step = Step(block, "after", LowNormPrune(block, float(values["frac"])), f"norm_prune_{block}", does="prune")
    return Plan(policy="none", exits=False, steps=(step,),
                record={"pruning": {"kind": "norm_prune", "frac": float(values["frac"]), "block": block}})


METHOD = Method(
    name="norm_prune", kind="prune", plan=plan,
    settings=(Setting("frac", float, 0.2, "share of the tokens that leave", fraction),
              Setting("block", int, None, "the block after which they leave (default: a third of the depth)")),
    summary="after one block, the tokens with the lowest feature norm leave (an example plug-in)",
    ladder=("norm_prune:frac=0.1", "norm_prune:frac=0.2", "norm_prune:frac=0.4"),
    reference=Reference(paper="an example rule, not a published method",
                        differences="none: this file is the reference"),
)
