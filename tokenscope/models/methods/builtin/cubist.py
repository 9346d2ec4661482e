"""`cubist`: grid-preserving token merging, rows then columns (CubistMerge, arXiv 2509.21764).

After each merging block the tokens still form a grid: after one block every row loses the same
number of tokens, each merged into a horizontal neighbour, after the next every column of the
narrower grid loses the same number, each merged into a vertical neighbour, and so on, rows and
columns in turn (one pass per block, so a token's merges keep the order of the blocks). So every image of a size keeps one shape
(h' x w'), the sequence stays in raster order of that grid, and what needs a grid downstream
(window attention, rotary positions, a mask head's upscaler) still has one.

Within one row (or column) the rule is ToMe's bipartite matching restricted to neighbours: the
tokens at even places are the candidates, each scores its more similar neighbour (cosine of the
block's output features; neighbours sit at odd places, so no chain forms), and the `r` best
candidates merge, size-weighted, with proportional attention after (as ToMe's).

No public code was found to follow, so this is tokenscope's reading of the method's description;
the docstring is the reference, and the test re-implements this rule row by row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.errors import ConfigError
from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting, on_off
from tokenscope.models.steps import MergeDecision, Step, TokenView


def side_rate(value: float) -> str | None:
    return None if 0.0 <= value < 0.5 else "must be a share of a side in [0, 0.5) (at most every other token merges)"


def merged_per_line(length: int, rate: float) -> int:
    """Tokens one row (or column) of `length` loses: round(length x rate), at most its candidates."""
    return min(round(length * rate), (length + 1) // 2 if length > 1 else 0)


def grid_before(gh: int, gw: int, rate: float, passes: int) -> tuple[int, int]:
    """The grid after `passes` passes (rows, columns, rows, ...) starting from gh x gw."""
    h, w = gh, gw
    for i in range(passes):
        if i % 2 == 0:
            w -= merged_per_line(w, rate)
        else:
            h -= merged_per_line(h, rate)
    return h, w


class NeighbourMerge(nn.Module):
    """One pass: every row (`along="rows"`) or column loses the same number of tokens to a neighbour."""

    def __init__(self, block: int, rate: float, along: str, passes_before: int) -> None:
        super().__init__()
        self.block, self.rate, self.along, self.passes_before = block, rate, along, passes_before

    def forward(self, view: TokenView) -> MergeDecision:
        b, n, d = view.x.shape
        gh, gw = view.layout.grid_ids.shape[1:]
        h, w = grid_before(int(gh), int(gw), self.rate, self.passes_before)
        if n != h * w or (view.host_counts is not None and any(c != h * w for c in view.host_counts)):
            raise ConfigError(f"cubist keeps the tokens a {h}x{w} grid here, but block {self.block} has "
                              f"{list(view.host_counts or [n])} tokens: run it alone, on the plain grid")
        feats = F.normalize(view.x.float(), dim=-1).view(b, h, w, d)
        if self.along == "columns":
            feats = feats.transpose(1, 2)  # columns as lines
        lines, length = feats.shape[1], feats.shape[2]
        r = merged_per_line(length, self.rate)
        slot = torch.arange(n, device=view.x.device).view(h, w)
        slot = slot if self.along == "rows" else slot.T  # (lines, length) slot of each place
        merged = torch.zeros((b, n), dtype=torch.bool, device=view.x.device)
        into = torch.zeros((b, n), dtype=torch.long, device=view.x.device)
        if r > 0:
            sim = (feats[:, :, :-1] * feats[:, :, 1:]).sum(-1)  # (B, lines, length - 1): place j with j + 1
            cand = torch.arange(0, length, 2, device=view.x.device)  # even places
            none = torch.full((b, lines, 1), -float("inf"), device=view.x.device)
            padded = torch.cat([none, sim, none], dim=2)  # padded[:, :, j] = sim of (j - 1, j)
            left, right = padded[:, :, cand], padded[:, :, cand + 1]
            score = torch.maximum(left, right)
            partner = torch.where(right >= left, cand + 1, cand - 1)  # (B, lines, A)
            best = torch.argsort(score, dim=2, descending=True, stable=True)[:, :, :r]  # the r best candidates
            src_place = cand[best]  # (B, lines, r)
            dst_place = partner.gather(2, best)
            line = torch.arange(lines, device=view.x.device).view(1, lines, 1)
            src_slot, dst_slot = slot[line, src_place].reshape(b, -1), slot[line, dst_place].reshape(b, -1)
            merged.scatter_(1, src_slot, True)
            into.scatter_(1, src_slot, dst_slot)
        kept = ~merged.view(b, *slot.shape) if self.along == "rows" else ~merged.view(b, h, w).transpose(1, 2)
        rank = kept.long().cumsum(dim=2) - 1  # new place along the line
        new_length = length - r
        if self.along == "rows":
            key = torch.arange(h, device=view.x.device).view(1, h, 1) * new_length + rank  # (B, h, w)
        else:
            key = (rank * w + torch.arange(w, device=view.x.device).view(1, w, 1)).transpose(1, 2)  # (B, h, w)
        order = key.reshape(b, n)
        flops = torch.full((b,), 2 * lines * (length - 1) * d + 3 * n * d, dtype=torch.long, device=view.x.device)
        counts = None if view.host_counts is None else tuple(c - lines * r for c in view.host_counts)
        return MergeDecision(self.block, "cubist", view.token_ids, view.valid, merged & view.valid, into, flops,
                             order=order, counts_after=counts)


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    start = values["start"]
    if not 1 <= start <= facts.depth:
        raise ConfigError(f"method cubist: start={start} must be a block in 1..{facts.depth} of {facts.name}")
    rate = float(values["rate"])
    steps: list[Step] = []
    for i, k in enumerate(range(start, facts.depth + 1)):
        along = "rows" if i % 2 == 0 else "columns"
        steps.append(Step(k, "after", NeighbourMerge(k, rate, along, i), f"cubist_{along}_{k}"))
    record = {"merging": {"kind": "cubist", "rate": rate, "start": start, "prop_attn": bool(values["prop"]),
                          "order": "grid", "count": "batch"}}
    return Plan(policy="none", steps=tuple(steps), size_weighted=bool(values["prop"]), record=record)


METHOD = Method(
    name="cubist", kind="merge", plan=plan,
    settings=(Setting("rate", float, 0.05, "share of each row (after one block) or column (after the next) merged "
                      "(0.05: about 5% of the tokens per block)", side_rate),
              Setting("start", int, 1, "the first block that merges (every later one does too)"),
              Setting("prop", on_off, True, "size-weighted (proportional) attention after merging")),
    summary="CubistMerge: after each block every row (then, next block, every column) merges its most similar "
            "neighbours; the tokens stay a grid",
    ladder=("cubist:rate=0.03", "cubist:rate=0.05", "cubist:rate=0.08"),
    search=tuple(f"cubist:rate={r}" for r in (0.01, 0.02, 0.03, 0.05, 0.08)),
    reference=Reference(paper="CubistMerge: Spatial-Preserving Token Merging for Diverse ViT Backbones, arXiv 2509.21764",
                        differences="no public code was found: neighbours are matched ToMe-style (even places merge "
                                    "into their more similar odd neighbour) by cosine of the block's output "
                                    "features, rows and columns in turn, one pass after every block from `start`"),
)
