"""In-network token merging: ToMe's bipartite soft matching and ALGM's local and global merging.

A merger sits inside one encoder block, between attention and MLP (where both reference
implementations put it). It only decides: which sequence slots merge away (`merged`) and into
which slot each goes (`into`). `apply_merge` then averages features weighted by token size and
the encoder drops the merged slots. Mergers are parameter-free named modules (`mergers.<block>`),
so a forward hook sees every decision while the model stays unaware of being observed.

Differences from the reference code, on purpose: token counts are decided per image (ToMe and
ALGM take one count for the whole batch, so an image's result would depend on its batch-mates);
merged tokens keep their spatial order in the sequence instead of moving to the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tokenscope.models.slots import scatter_tokens

MERGING_KINDS = ("tome", "algm")


@dataclass
class MergeDecision:
    """What one merger decided for the slots that reached it (all (B, N), N = sequence slots).

    `token_ids` names the trace token in each slot (-1 = padding); a slot with `merged` set is
    averaged into slot `into` (which is never itself merged in the same step).
    """

    block: int
    kind: str
    token_ids: torch.Tensor
    valid: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor
    matching_flops: torch.Tensor
    """(B,) FLOPs of the similarity products this decision took, per image (2 per multiply-add)."""


@dataclass
class MergeContext:
    """Where each slot's token lies on the patch grid, for mergers that only join neighbours."""

    grid_ids: torch.Tensor
    """(B, gh, gw) trace token of every patch (the policy's partition)."""
    single: torch.Tensor
    """(B, T) whether a trace token covers exactly one patch."""
    owner: torch.Tensor
    """(B, T + 1) the trace token that currently stands for each one (itself unless merged)."""
    initial: torch.Tensor
    """(B,) tokens each image entered the encoder with (for ToMe's r given as a fraction)."""


def _nothing_merged(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged, into) of a decision that merges no slot: every slot targets itself."""
    b, n = valid.shape
    return torch.zeros_like(valid), torch.arange(n, device=valid.device).expand(b, n).clone()


def _normalise(metric: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(valid.unsqueeze(-1), metric, torch.zeros_like(metric))


class BipartiteMerger(nn.Module):
    """Bipartite soft matching: even slots (A) propose their most similar odd slot (B).

    `r` fixed (ToMe): the r best-matched A tokens merge, at most half the live tokens; r below 1
    is a fraction of the tokens the image entered the encoder with, so images of every size lose
    the same share per block. `r = None`
    (ALGM's global merging): those whose best similarity reaches `threshold`, or, when that is
    None, ALGM's adaptive rule: mean + std / block over the image's A tokens. `metric`: `keys`
    (ToMe: attention keys averaged over heads) or `x` (ALGM: the tokens after attention).
    """

    def __init__(self, block: int, kind: str, r: float | None, metric: str, threshold: float | None = None) -> None:
        super().__init__()
        self.block, self.kind, self.r, self.metric, self.threshold = block, kind, r, metric, threshold

    def forward(self, x: torch.Tensor, keys: torch.Tensor, token_ids: torch.Tensor, valid: torch.Tensor,
                ctx: MergeContext) -> MergeDecision:
        metric = _normalise(keys if self.metric == "keys" else x, valid)
        a, bb = metric[:, ::2], metric[:, 1::2]
        va, vb = valid[:, ::2], valid[:, 1::2]
        scores = a @ bb.transpose(-1, -2)
        scores = scores.masked_fill(~vb[:, None, :], float("-inf")).masked_fill(~va[:, :, None], float("-inf"))
        merged, into = _nothing_merged(valid)
        flops = 2 * va.sum(1) * vb.sum(1) * metric.shape[-1]
        if bb.shape[1] == 0:
            return MergeDecision(self.block, self.kind, token_ids, valid, merged, into, flops)
        node_max, node_idx = scores.max(dim=-1)
        order = torch.argsort(node_max, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=x.device).expand_as(order))
        live = valid.sum(dim=1)
        if self.r is not None:
            wanted = (torch.round(ctx.initial.float() * self.r).long() if 0 < self.r < 1
                      else torch.full_like(live, int(self.r)))
            count = torch.minimum(live // 2, wanted)
        elif self.threshold is not None:
            count = torch.clamp((node_max >= self.threshold).sum(1), max=live // 2)
        else:
            finite = torch.isfinite(node_max)
            vals = torch.where(finite, node_max, torch.zeros_like(node_max))
            m = finite.sum(1).clamp_min(1)
            mean = vals.sum(1) / m
            var = (torch.where(finite, (vals - mean[:, None]) ** 2, torch.zeros_like(vals)).sum(1) / (m - 1).clamp_min(1))
            threshold = mean + var.sqrt() / self.block
            count = torch.clamp(((node_max >= threshold[:, None]) & finite).sum(1), max=live // 2)
        chosen = (rank < count[:, None]) & va & torch.isfinite(node_max)
        merged[:, ::2] = chosen
        into[:, ::2] = torch.where(chosen, 2 * node_idx + 1, into[:, ::2])
        return MergeDecision(self.block, self.kind, token_ids, valid, merged, into, flops)


class LocalWindowMerger(nn.Module):
    """ALGM's local merging: each 2x2 window of single-patch tokens whose mean pairwise cosine
    similarity (tokens after attention) reaches `threshold` becomes one token.

    Windows holding a supertoken, an exited token or an already merged one are left alone, so
    the rule composes with dCTS partitions and exits.
    """

    def __init__(self, block: int, threshold: float) -> None:
        super().__init__()
        self.block, self.kind, self.threshold = block, "algm", float(threshold)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, token_ids: torch.Tensor, valid: torch.Tensor,
                ctx: MergeContext) -> MergeDecision:
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
        chosen = ok & (similarity >= self.threshold)
        src = slots[..., :3].reshape(b, -1)  # three slots of each window merge into the fourth
        dst = slots[..., 3:].expand(-1, -1, 3).reshape(b, -1)
        take = chosen[..., None].expand(-1, -1, 3).reshape(b, -1)
        merged_ext = torch.cat([merged, merged.new_zeros((b, 1))], dim=1)  # + a spare slot, see scatter_tokens
        into_ext = torch.cat([into, into.new_zeros((b, 1))], dim=1)
        scatter_tokens(merged_ext, take, src, take)
        scatter_tokens(into_ext, dst, src, take)
        merged, into = merged_ext[:, :n], into_ext[:, :n]
        flops = torch.full((b,), 2 * 16 * d * win.shape[1], dtype=torch.long, device=x.device)
        return MergeDecision(self.block, self.kind, token_ids, valid, merged, into, flops)


def apply_merge(x: torch.Tensor, sizes: torch.Tensor, owner: torch.Tensor, dec: MergeDecision
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size-weighted average of every merged slot into its target; new sizes and owner map.

    Slots untouched by a merge keep their features bit for bit. `owner` (B, T + 1) maps every
    trace token to the token now standing for it; a merged token's followers move with it.
    """
    b, n, d = x.shape
    target = torch.where(dec.merged, dec.into, torch.arange(n, device=x.device).expand(b, n))
    w = sizes.to(torch.float32).unsqueeze(-1)
    acc = torch.zeros((b, n, d), dtype=torch.float32, device=x.device).scatter_add_(
        1, target.unsqueeze(-1).expand(-1, -1, d), x.float() * w)
    size_acc = torch.zeros_like(sizes, dtype=torch.float32).scatter_add_(1, target, sizes.float())
    hit = torch.zeros((b, n + 1), dtype=torch.bool, device=x.device)  # + a spare slot
    scatter_tokens(hit, dec.merged, dec.into, dec.merged)
    is_target = hit[:, :n] & ~dec.merged
    averaged = (acc / size_acc.clamp_min(1e-6).unsqueeze(-1)).to(x.dtype)
    x = torch.where(is_target.unsqueeze(-1), averaged, x)
    sizes = torch.where(is_target, size_acc.to(sizes.dtype), sizes)
    t = owner.shape[1] - 1
    remap = torch.arange(t + 1, device=x.device).expand(b, t + 1).clone()  # slot t is the spare
    scatter_tokens(remap, dec.token_ids.gather(1, dec.into), dec.token_ids, dec.merged)
    remap[:, t] = t
    return x, sizes, remap.gather(1, owner)


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

    def mergers(self) -> dict[int, nn.Module]:
        if self.kind == "tome":
            return {k: BipartiteMerger(k, "tome", self.r, "keys") for k in self.blocks}
        first, *rest = self.blocks
        out: dict[int, nn.Module] = {first: LocalWindowMerger(first, self.threshold)}
        out.update({k: BipartiteMerger(k, "algm", None, "x", self.global_threshold) for k in rest})
        return out


def algm_blocks(depth: int) -> tuple[int, int]:
    """ALGM's public settings: local merging in block 1, global in block 5 (12-block ViTs) or 7
    (24-block ViT-L); other depths scale the middle block and stay inside the encoder."""
    middle = 5 if depth <= 12 else 7 if depth <= 24 else round(7 * depth / 24)
    return 1, max(2, min(middle, depth))

