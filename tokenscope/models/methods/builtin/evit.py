"""`evit`: keep the tokens the class token attends to most (Liang et al., EViT, ICLR 2022).

As youweiliang/evit's `evit.py`: inside each of its blocks (between attention and MLP) the
class token's attention to every other token, averaged over heads, ranks the tokens; the
ceil(rate x n) most attended stay (in descending attention, as the reference's sorted top-k
leaves them) and the others leave the sequence. With `fuse=on` the inattentive ones are fused
into one extra token, their sum weighted by that attention, which takes part in the later blocks.
Reference blocks: 4, 7 and 10 of 12 (its `drop_loc` 3, 6, 9 counted from 0), a quarter of the
depth apart for other depths; keep rate 0.7.

Differences, for segmentation (documented in docs/methods.md):
- pruned tokens are not lost: the decoder predicts them from the features they had when pruned
  (DToP's reassembly), so every patch still gets a label;
- a fused token is an extra token, never an image token: later stages rank the image tokens only,
  so an earlier fused token stays (the reference may fuse it again), and it is not counted among
  a block's tokens in traces or FLOPs (one token per stage).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from tokenscope.errors import ConfigError
from tokenscope.models.attention import query_attention
from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting, on_off
from tokenscope.models.sequence import rank_descending
from tokenscope.models.steps import PruneDecision, Step, TokenView


def keep_rate(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be a keep rate in (0, 1]"


def block_list(text: str) -> tuple[int, ...]:
    """`4-7-10` -> (4, 7, 10): the 1-based blocks EViT prunes in."""
    blocks = tuple(int(b) for b in text.replace("/", "-").split("-") if b.strip())
    if not blocks:
        raise ValueError(text)
    return blocks



def reference_blocks(depth: int) -> tuple[int, ...]:
    """EViT's drop_loc (3, 6, 9 of 12, from 0), a quarter of the depth apart, as 1-based blocks."""
    return tuple(sorted({min(depth, round(depth * j / 4) + 1) for j in (1, 2, 3)}))


class AttentiveTokens(nn.Module):
    """One EViT stage: keep the ceil(rate x n) tokens the class token attends to most."""

    def __init__(self, block: int, rate: float, fuse: bool) -> None:
        super().__init__()
        self.block, self.rate, self.fuse = block, float(rate), bool(fuse)

    def forward(self, view: TokenView) -> PruneDecision:
        assert view.queries is not None and view.keys is not None, "EViT acts inside a block"
        p = view.prefix.shape[1]
        assert view.class_index is not None, "EViT ranks by the class token's attention"
        cls_attn = query_attention(view.queries, view.keys, view.attn_mask, view.scale,
                                   view.class_index).mean(dim=1)[:, p:]
        valid = view.valid
        live = valid.sum(dim=1)
        left = torch.ceil(live.to(torch.float64) * self.rate).long()
        rank = rank_descending(torch.where(valid, cls_attn, torch.full_like(cls_attn, float("-inf"))))
        kept = valid & (rank < left[:, None])
        pruned = valid & ~kept
        fused = None
        stay = None if view.host_counts is None else tuple(math.ceil(c * self.rate) if c > 0 else 0
                                                           for c in view.host_counts)  # = `left`, from the host
        any_pruned = bool(pruned.any()) if stay is None else any(s < c for s, c in zip(stay, view.host_counts or ()))
        if self.fuse and any_pruned:
            weight = torch.where(pruned, cls_attn, torch.zeros_like(cls_attn)).to(view.x.dtype)
            fused = (view.x * weight.unsqueeze(-1)).sum(dim=1, keepdim=True)
        heads, n, dh = view.keys.shape[1], view.keys.shape[2], view.keys.shape[3]
        flops = torch.full_like(live, 2 * heads * n * dh)
        return PruneDecision(self.block, "evit", view.token_ids, valid, pruned, fused, order=rank,
                             scoring_flops=flops, counts_after=stay)


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    if not facts.class_token:
        raise ConfigError(f"evit ranks tokens by the class token's attention; {facts.name} has no class token")
    blocks = values["blocks"] or reference_blocks(facts.depth)
    bad = [b for b in blocks if not 1 <= b <= facts.depth]
    if bad:
        raise ConfigError(f"evit: blocks {bad} are outside 1..{facts.depth} for {facts.name}")
    rate, fuse = float(values["rate"]), bool(values["fuse"])
    steps = tuple(Step(k, "inside", AttentiveTokens(k, rate, fuse), f"evit_{k}", does="prune") for k in sorted(set(blocks)))
    record = {"kind": "evit", "rate": rate, "fuse": fuse, "blocks": sorted(set(blocks))}
    return Plan(policy="none", exits=False, steps=steps, record={"pruning": record})


METHOD = Method(
    name="evit", kind="prune", plan=plan,
    settings=(Setting("rate", float, 0.7, "keep rate: the share of tokens that stays at each of its blocks",
                      keep_rate),
              Setting("blocks", block_list, None, "the 1-based blocks it prunes in, e.g. 4-7-10 (default: the "
                      "reference's, a quarter of the depth apart)", type="list of blocks like 4-7-10"),
              Setting("fuse", on_off, True, "fuse the pruned tokens into one extra token weighted by attention")),
    summary="EViT: at three blocks keep the tokens the class token attends to most, fuse the rest into one",
    ladder=("evit:rate=0.9", "evit:rate=0.7", "evit:rate=0.5"),
    search=tuple(f"evit:rate={r}" for r in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)),
    reference=Reference(paper="Liang et al., Not All Patches Are What You Need: Expediting Vision Transformers via "
                              "Token Reorganizations, ICLR 2022", repository="youweiliang/evit", files=("evit.py",),
                        differences="pruned tokens are reassembled for the decoder with the features they had when "
                                    "pruned (as DToP); an earlier fused token is kept, not re-fused"),
)
