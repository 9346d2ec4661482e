"""`pitome`: energy-protected token merging (Tran et al., "Accelerating Transformers with Spectrum-Preserving
Token Merging", NeurIPS 2024).

In every block, between attention and MLP, each image token gets an energy: the mean over the image's
tokens of ELU(cos(k_i, k_j) - margin), on the attention keys averaged over heads. High energy means many
close neighbours, so a redundant token. The 2r most energetic tokens are merge candidates: taken in
energy order they alternate between set A and set B, and every A token merges (size-weighted) into
its most similar B token; every other token is protected. The margin falls with depth as the public
code sets it (0.9 - 0.8 * l / L for block l of L, counted from 0), and r is the share `1 - ratio` of
the block's tokens, as the reference's `ratio` (the kept share per block). Afterwards the sequence is
the protected tokens in energy order, then set B, as the reference concatenates them; with
proportional attention on, as the reference's default.

Differences from hchautran/PiToMe `algo/pitome/merge.py`: an image decides over its own real tokens
(padding slots in a batch of different token counts have no energy and take no part), and with
`count=batch` (the default) one r for the batch, the smallest over its images, as ToMe's reference
does; the reference runs one image size per batch, where both agree.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting, on_off
from tokenscope.models.methods.merging import batch_count, counts_after_merging
from tokenscope.models.sequence import rank_descending
from tokenscope.models.steps import MergeDecision, Step, TokenView

COUNTS = ("batch", "per-image")
BAND_ELEMENTS = 1 << 21
"""Similarities computed at once on the CPU when the energy is summed (8 MB of float32): a band of rows."""


def _rows(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """values[b, ids[b, i]] for (B, N, D) values and (B, K) ids: (B, K, D)."""
    return values.gather(1, ids.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def keep_ratio(value: float) -> str | None:
    return None if 0.5 <= value <= 1.0 else "must be the share of tokens a block keeps, from 0.5 to 1"


def reference_margin(block: int, depth: int) -> float:
    """The public code's margin for 1-based `block` of `depth`: 0.9 - 0.8 * (block - 1) / depth."""
    return 0.9 - 0.8 * (block - 1) / depth


class EnergyMerger(nn.Module):
    """One block's PiToMe decision (see the module docstring)."""

    def __init__(self, block: int, ratio: float, margin: float, alpha: float = 1.0, count: str = "batch") -> None:
        super().__init__()
        self.block, self.ratio, self.margin, self.alpha, self.count = block, float(ratio), float(margin), alpha, count

    def forward(self, view: TokenView) -> MergeDecision:
        valid = view.valid
        b, n = valid.shape
        keys = view.mean_keys.float() if view.mean_keys.dtype != torch.float64 else view.mean_keys
        unit = F.normalize(keys, dim=-1) * valid.unsqueeze(-1)
        live = valid.sum(dim=1)
        padded = view.host_counts is None or any(c != n for c in view.host_counts)
        energy = self._energy(unit, valid, padded) / live.clamp_min(1).unsqueeze(-1).to(unit.dtype)
        energy = torch.where(valid, energy, torch.full_like(energy, float("-inf")))
        host = self._host_r(view)
        if host is not None:  # one r for the batch, from counts the host holds: no read from the device
            r = torch.where(live > 0, torch.full_like(live, host), torch.zeros_like(live))
        else:
            tokens = live.to(torch.float64)
            r = torch.floor(tokens - tokens * self.ratio).long()  # the reference's floor(T - T * ratio)
            r = torch.minimum(r, live // 2)
            if self.count == "batch":
                r = batch_count(r, live)
        rank = rank_descending(energy)  # 0 = the most energetic (most redundant) token
        candidate = valid & (rank < 2 * r[:, None])
        in_a = candidate & (rank % 2 == 0)
        in_b = candidate & (rank % 2 == 1)
        # every A token's most similar B token: A and B alternate through the first 2r tokens in energy order,
        # so their similarities are one (r x r) product per image, as the reference takes sim[a][:, b]
        by_rank = torch.argsort(rank, dim=1)  # the token at each rank
        width = host if host is not None else n // 2  # an upper bound of r the host knows
        a_ids, b_ids = by_rank[:, 0:2 * width:2], by_rank[:, 1:2 * width:2]
        pick = _rows(unit, a_ids) @ _rows(unit, b_ids).transpose(-1, -2)
        pick = pick.masked_fill(~in_b.gather(1, b_ids).unsqueeze(1), float("-inf"))
        own = torch.arange(n, device=valid.device).expand(b, n)
        into = own.scatter(1, a_ids, b_ids.gather(1, pick.argmax(dim=-1))) if width > 0 else own.clone()
        merged = in_a
        into = torch.where(merged, into, own)
        order = torch.where(in_b, n + rank, rank)  # protected by energy, then B (the reference's concatenation)
        d = keys.shape[-1]
        flops = 2 * live * live * d + 2 * r * r * d  # the similarity matrix, then A against B
        after = counts_after_merging(view.host_counts, host)
        return MergeDecision(self.block, "pitome", view.token_ids, valid, merged, into, flops, order, after)

    def _energy(self, unit: torch.Tensor, valid: torch.Tensor, padded: bool) -> torch.Tensor:
        """(B, N) each token's sum of ELU(cos - margin) over its image's tokens, a band of rows at a time:
        the (B, N, N) similarities of a 1024 px image are 8 x 64 MB at batch 8, and written out whole,
        then masked and transformed, they cost more in fresh memory than their product costs to compute.
        Each band stays small enough to be reused from cache, and is transformed in place; the values are
        the whole matrix's. Padding slots (`padded`, known from the host's counts) are masked out."""
        b, n, _ = unit.shape
        band = max(1, (BAND_ELEMENTS if unit.device.type == "cpu" else 64 * BAND_ELEMENTS) // max(b * n, 1))
        energy = unit.new_empty((b, n))
        for start in range(0, n, band):
            rows = slice(start, start + band)
            sim = unit[:, rows] @ unit.transpose(-1, -2)  # (B, band, N) cosine
            spread = F.elu(sim.sub_(self.margin), alpha=self.alpha, inplace=True)
            if padded:
                spread.masked_fill_(~(valid[:, rows].unsqueeze(-1) & valid.unsqueeze(1)), 0.0)
            energy[:, rows] = spread.sum(-1)
        return energy

    def _host_r(self, view: TokenView) -> int | None:
        """The batch's r from the host's token counts (count=batch), else None."""
        if self.count != "batch" or view.host_counts is None:
            return None
        rs = [min(math.floor(t - t * self.ratio), t // 2) for t in view.host_counts if t > 0]
        return min(rs) if rs else 0


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    steps = tuple(Step(k, "inside", EnergyMerger(k, values["ratio"], reference_margin(k, facts.depth),
                                                 count=values["count"]), f"pitome_{k}")
                  for k in range(1, facts.depth + 1))
    record = {"merging": {"kind": "pitome", "ratio": float(values["ratio"]), "prop_attn": bool(values["prop"]),
                          "count": values["count"], "order": "reference", "margin": "0.9 - 0.8 * l / L"}}
    return Plan(policy="none", exits=False, steps=steps, size_weighted=bool(values["prop"]), record=record)


METHOD = Method(
    name="pitome", kind="merge", plan=plan,
    settings=(Setting("ratio", float, 0.95, "share of its tokens each block keeps (1 - ratio of them merge)", keep_ratio),
              Setting("prop", on_off, True, "size-weighted (proportional) attention after merging"),
              Setting("count", str.lower, "batch", "one r for the batch (as ToMe's reference) or `per-image`",
                      choices=COUNTS)),
    summary="PiToMe: in every block the most redundant tokens (highest energy) merge ToMe-style, the rest are protected",
    ladder=("pitome:ratio=0.975", "pitome:ratio=0.95", "pitome:ratio=0.925"),
    search=tuple(f"pitome:ratio={r}" for r in (0.99, 0.975, 0.95, 0.925, 0.9)),
    reference=Reference(paper="Tran et al., Accelerating Transformers with Spectrum-Preserving Token Merging, NeurIPS 2024",
                        repository="hchautran/PiToMe", files=("algo/pitome/merge.py", "algo/pitome/patch/timm.py"),
                        differences="decided per image over its real tokens (padding takes no part); one r per batch "
                                    "by default"),
)
