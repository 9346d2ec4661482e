"""In-network token merging: ToMe's bipartite soft matching and ALGM's local and global merging.

A merger sits inside one encoder block, between attention and MLP (where both reference
implementations put it). It only decides: which sequence slots merge away (`merged`) and into
which slot each goes (`into`). `apply_merge` then averages features weighted by token size and
the encoder drops the merged slots. Mergers are parameter-free steps (`steps.tome_<block>`, see models/steps.py),
so a forward hook sees every decision while the model stays unaware of being observed.

By default both decide as their public code does (facebookresearch/ToMe `tome/merge.py`,
tue-mps/algm-segmenter `algm/algm/local_merge.py` and `global_merge.py`):
- the A/B split alternates over the whole sequence, prefix tokens included: with a class token
  set A is the class token (which never merges) and the odd patches, set B the even ones;
- after each merge the sequence is reordered as the reference concatenates it: ToMe and ALGM's
  global merging put the unmerged A tokens first (in sequence order when there is a class
  token, by descending similarity otherwise), then set B; ALGM's local merging puts the merged
  windows first (most similar first), then every other token in sequence order. The next
  merging block splits that order into A and B again;
- one count for the whole batch: ToMe's r capped by the smallest image, ALGM's smallest count
  over the batch (and its adaptive threshold from the batch's mean statistics).
Two named settings bring back what tokenscope did before: `order=spatial` (tokens keep raster
order; A is every other patch token, the prefix not counted) and `count=per-image` (each image
decides alone, so its result does not depend on its batch-mates). Prefix tokens (class,
distillation, registers) are always kept at the front and never merge; the reference code
protects the class and distillation tokens the same way and does not know registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from tokenscope.models.methods.base import Plan
from tokenscope.models.sequence import rank_descending
from tokenscope.models.slots import scatter_tokens
from tokenscope.models.steps import Layout, MergeDecision, Step, TokenView, apply_merge  # noqa: F401 (re-exported)

MERGING_KINDS = ("tome", "algm")
ORDERS = ("reference", "spatial")
COUNTS = ("batch", "per-image")


MergeContext = Layout
"""Where each slot's token lies on the patch grid (the name the mergers knew it by)."""


def _nothing_merged(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged, into) of a decision that merges no slot: every slot targets itself."""
    b, n = valid.shape
    return torch.zeros_like(valid), torch.arange(n, device=valid.device).expand(b, n).clone()


def _normalise(metric: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    metric = metric.float() if metric.dtype != torch.float64 else metric
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(valid.unsqueeze(-1), metric, torch.zeros_like(metric))


def counts_after_merging(host_counts: tuple[int, ...] | None, merged: int | None) -> tuple[int, ...] | None:
    """Per image, the real tokens left when every image that holds tokens merges `merged` of them (one count
    for the batch, known on the host); None when the count is not known there."""
    if merged is None or host_counts is None:
        return None
    return tuple(c - (merged if c > 0 else 0) for c in host_counts)


def batch_count(count: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The reference's one count for a batch: the smallest over the images that still hold
    tokens (an image whose tokens all exited does not stop the others merging)."""
    has = live > 0
    smallest = torch.where(has, count, torch.full_like(count, torch.iinfo(count.dtype).max)).min()
    return torch.where(has, smallest.expand_as(count), count)


def _batch_mean(values: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Mean over the images that have a value, broadcast back to every image."""
    total = torch.where(has, values, torch.zeros_like(values)).sum()
    return (total / has.sum().clamp_min(1)).expand_as(values)


class BipartiteMerger(nn.Module):
    """Bipartite soft matching: every A token proposes its most similar B token.

    `r` fixed (ToMe): the r best-matched A tokens merge, at most half the live tokens; r below 1
    is a fraction of the tokens the image entered the encoder with. `r = None` (ALGM's global
    merging): those whose best similarity reaches `threshold`, or, when that is None, ALGM's
    adaptive rule: mean + std / block of the A tokens' best similarities (the block counted
    from 1). `metric`: `keys` (ToMe: attention keys averaged over heads) or `x` (ALGM: the
    tokens after attention). `order` and `count`: see the module docstring.
    """

    def __init__(self, block: int, kind: str, r: float | None, metric: str, threshold: float | None = None,
                 order: str = "reference", count: str = "batch") -> None:
        super().__init__()
        self.block, self.kind, self.r, self.metric, self.threshold = block, kind, r, metric, threshold
        self.order, self.count = order, count

    def forward(self, view: TokenView) -> MergeDecision:
        x, token_ids, valid, ctx = view.x, view.token_ids, view.valid, view.layout
        metric = _normalise(view.mean_keys if self.metric == "keys" else x, valid)
        b, n, _ = metric.shape
        first_a = ctx.num_prefix % 2 if self.order == "reference" else 0  # the sequence alternates A, B from position 0
        a_slots = torch.arange(first_a, n, 2, device=x.device)
        b_slots = torch.arange(1 - first_a, n, 2, device=x.device)
        va, vb = valid[:, a_slots], valid[:, b_slots]
        merged, into = _nothing_merged(valid)
        flops = 2 * va.sum(1) * vb.sum(1) * metric.shape[-1]
        if a_slots.numel() == 0 or b_slots.numel() == 0:
            return MergeDecision(self.block, self.kind, token_ids, valid, merged, into, flops)
        scores = metric[:, a_slots] @ metric[:, b_slots].transpose(-1, -2)
        scores = scores.masked_fill(~vb[:, None, :], float("-inf")).masked_fill(~va[:, :, None], float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        finite = torch.isfinite(node_max)
        rank = rank_descending(node_max)
        host = self._host_count(view)
        if host is None:
            count = self._count(node_max, finite, valid.sum(dim=1), ctx)
        else:  # one count for the batch, known on the host: no read from the device
            count = torch.where(valid.any(dim=1), torch.full_like(valid[:, 0], host, dtype=torch.long),
                                torch.zeros_like(valid[:, 0], dtype=torch.long))
        chosen = (rank < count[:, None]) & finite
        merged[:, a_slots] = chosen
        into[:, a_slots] = torch.where(chosen, b_slots[node_idx], into[:, a_slots])
        order = None
        if self.order == "reference":  # unmerged A (by index with a class token, else best-matched first), then B
            order = torch.empty_like(into)
            order[:, a_slots] = a_slots.expand(b, -1) if ctx.class_token else rank
            order[:, b_slots] = n + b_slots
            order = torch.where(count[:, None] > 0, order, _nothing_merged(valid)[1])  # nothing merged: nothing moves
        after = counts_after_merging(view.host_counts, host)
        return MergeDecision(self.block, self.kind, token_ids, valid, merged, into, flops, order, after)

    def _host_count(self, view: TokenView) -> int | None:
        """The batch's one merge count when it follows from numbers the host holds (a fixed r, one count for
        the batch): the smallest over the images that hold tokens of min(tokens // 2, wanted), wanted being
        r, or r times the tokens the image entered with (rounded half to even in float32, as the device
        computes it). None when the count depends on the tokens' values (a threshold)."""
        if self.r is None or self.count != "batch" or view.host_counts is None or view.host_initial is None:
            return None
        counts = []
        for live, initial in zip(view.host_counts, view.host_initial):
            if live <= 0:
                continue
            wanted = (int(np.round(np.float32(initial) * np.float32(self.r))) if 0 < self.r < 1 else int(self.r))
            counts.append(min(live // 2, wanted))
        return min(counts) if counts else 0

    def _count(self, node_max: torch.Tensor, finite: torch.Tensor, live: torch.Tensor, ctx: MergeContext
               ) -> torch.Tensor:
        """(B,) how many A tokens merge in each image."""
        if self.r is not None:
            wanted = (torch.round(ctx.initial.float() * self.r).long() if 0 < self.r < 1
                      else torch.full_like(live, int(self.r)))
            count = torch.minimum(live // 2, wanted)
        else:
            threshold = (self._adaptive_threshold(node_max, finite, ctx) if self.threshold is None
                         else node_max.new_full((node_max.shape[0],), float(self.threshold)))
            count = ((node_max >= threshold[:, None]) & finite).sum(1)
        return batch_count(count, live) if self.count == "batch" else count

    def _adaptive_threshold(self, node_max: torch.Tensor, finite: torch.Tensor, ctx: MergeContext) -> torch.Tensor:
        """ALGM's: mean + (unbiased) std / block of the best similarities. The reference leaves the
        sequence's first A token out of both (the class token; a patch when there is no prefix),
        and with one count per batch averages the images' means and stds."""
        stats = finite.clone()
        if self.order == "reference" and ctx.num_prefix == 0:
            stats[:, 0] = False
        vals = torch.where(stats, node_max, torch.zeros_like(node_max))
        m = stats.sum(1)
        mean = vals.sum(1) / m.clamp_min(1)
        var = torch.where(stats, (vals - mean[:, None]) ** 2, torch.zeros_like(vals)).sum(1) / (m - 1).clamp_min(1)
        std = var.sqrt()
        if self.count == "batch":
            mean, std = _batch_mean(mean, m > 0), _batch_mean(std, m > 0)
        return mean + std / self.block


class LocalWindowMerger(nn.Module):
    """ALGM's local merging: each 2x2 window of single-patch tokens whose mean pairwise cosine
    similarity (tokens after attention) reaches `threshold` becomes one token.

    Windows holding a supertoken, an exited token or an already merged one are left alone, so
    the rule composes with dCTS partitions and exits. With one count per batch (the reference),
    every image merges its most similar windows, as many as the image with fewest qualifying.
    """

    def __init__(self, block: int, threshold: float, order: str = "reference", count: str = "batch") -> None:
        super().__init__()
        self.block, self.kind, self.threshold = block, "algm", float(threshold)
        self.order, self.count = order, count

    def forward(self, view: TokenView) -> MergeDecision:
        x, token_ids, valid, ctx = view.x, view.token_ids, view.valid, view.layout
        b, n, d = x.shape
        merged, into = _nothing_merged(valid)
        gh, gw = ctx.grid_ids.shape[1] // 2 * 2, ctx.grid_ids.shape[2] // 2 * 2
        if gh == 0 or gw == 0:
            return MergeDecision(self.block, self.kind, token_ids, valid, merged, into, x.new_zeros(b, dtype=torch.long))
        t = ctx.owner.shape[1] - 1
        slot_of = torch.full((b, t + 1), -1, dtype=torch.long, device=x.device)  # slot t is the spare
        scatter_tokens(slot_of, torch.arange(n, device=x.device).expand(b, n), token_ids, valid)
        slot_of[:, t] = -1
        win = ctx.grid_ids[:, :gh, :gw].reshape(b, gh // 2, 2, gw // 2, 2).permute(0, 1, 3, 2, 4).reshape(b, -1, 4)
        flat = win.reshape(b, -1)
        slots = slot_of.gather(1, flat).reshape(win.shape)
        ok = (slots >= 0).all(-1)
        ok &= ctx.single.gather(1, flat).reshape(win.shape).all(-1)
        ok &= (ctx.owner.gather(1, flat).reshape(win.shape) == win).all(-1)
        feats = _normalise(x, valid).gather(1, slots.clamp_min(0).reshape(b, -1, 1).expand(-1, -1, d)).reshape(b, -1, 4, d)
        gram = feats @ feats.transpose(-1, -2)
        similarity = (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / 12.0
        passing = ok & (similarity >= self.threshold)
        count = passing.sum(1)
        if self.count == "batch":
            count = batch_count(count, valid.sum(1))
        rank = rank_descending(torch.where(passing, similarity, torch.full_like(similarity, float("-inf"))))
        chosen = passing & (rank < count[:, None])
        src = slots[..., :3].reshape(b, -1)  # three slots of each window merge into the fourth
        dst = slots[..., 3:].expand(-1, -1, 3).reshape(b, -1)
        take = chosen[..., None].expand(-1, -1, 3).reshape(b, -1)
        merged_ext = torch.cat([merged, merged.new_zeros((b, 1))], dim=1)  # + a spare slot, see scatter_tokens
        into_ext = torch.cat([into, into.new_zeros((b, 1))], dim=1)
        scatter_tokens(merged_ext, take, src, take)
        scatter_tokens(into_ext, dst, src, take)
        merged, into = merged_ext[:, :n], into_ext[:, :n]
        order = None
        if self.order == "reference":  # merged windows first, most similar first, then the rest in sequence order
            order = torch.cat([n + torch.arange(n, device=x.device).expand(b, n), into.new_zeros((b, 1))], dim=1)
            scatter_tokens(order, rank, slots[..., 3], chosen)
            order = order[:, :n]
        flops = torch.full((b,), 2 * 16 * d * win.shape[1], dtype=torch.long, device=x.device)
        return MergeDecision(self.block, self.kind, token_ids, valid, merged, into, flops, order)


@dataclass(frozen=True)
class MergingSpec:
    """Which in-network merging a model runs: kind, its settings and the blocks it acts in."""

    kind: str
    blocks: tuple[int, ...]
    r: float = 0
    """ToMe: tokens merged per block, or below 1 a fraction of the image's tokens."""
    threshold: float = 0.88
    """ALGM's local threshold: mean pairwise cosine similarity of a 2x2 window."""
    global_threshold: float | None = None
    """ALGM's global merging: a fixed similarity threshold, or None for its adaptive rule."""
    prop_attn: bool = True
    order: str = "reference"
    """`reference`: the sequence order the reference code leaves after each merge; `spatial`:
    tokens keep raster order and A is every other patch token (see the module docstring)."""
    count: str = "batch"
    """`batch`: one count for the whole batch, as the reference; `per-image`: each image alone."""

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"merge order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.count not in COUNTS:
            raise ValueError(f"merge count must be one of {', '.join(COUNTS)}, got {self.count!r}")

    def mergers(self) -> dict[int, nn.Module]:
        rules = {"order": self.order, "count": self.count}
        if self.kind == "tome":
            return {k: BipartiteMerger(k, "tome", self.r, "keys", **rules) for k in self.blocks}
        first, *rest = self.blocks
        out: dict[int, nn.Module] = {first: LocalWindowMerger(first, self.threshold, **rules)}
        out.update({k: BipartiteMerger(k, "algm", None, "x", self.global_threshold, **rules) for k in rest})
        return out


    def steps(self) -> tuple[Step, ...]:
        """The mergers as steps inside their blocks, for a method's plan."""
        return tuple(Step(k, "inside", m, f"{self.kind}_{k}") for k, m in sorted(self.mergers().items()))

    def plan(self) -> Plan:
        """The plan of a merging method on the plain grid: these mergers, their attention rule, their record."""
        return Plan(policy="none", exits=False, steps=self.steps(), size_weighted=self.prop_attn,
                    record={"merging": self.record()})

    def record(self) -> dict[str, object]:
        """The settings as a trace records them (`meta.merging`)."""
        return {"kind": self.kind, "blocks": list(self.blocks), "r": self.r, "threshold": self.threshold,
                "global_threshold": self.global_threshold, "prop_attn": self.prop_attn, "order": self.order,
                "count": self.count}


def merge_rules(record: dict[str, object] | None) -> str:
    """How a merging run decided, for tables: `order=reference count=batch`; empty without merging."""
    if not record:
        return ""
    return " ".join(f"{key}={record[key]}" for key in ("order", "count") if key in record)  # a plug-in may record neither


def algm_blocks(depth: int) -> tuple[int, int]:
    """ALGM's public settings: local merging in block 1, global in block 5 (12-block ViTs) or 7
    (24-block ViT-L); other depths scale the middle block and stay inside the encoder."""
    middle = 5 if depth <= 12 else 7 if depth <= 24 else round(7 * depth / 24)
    return 1, max(2, min(middle, depth))

