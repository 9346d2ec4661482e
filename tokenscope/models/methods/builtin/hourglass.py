"""`hourglass`: token clustering after one block, reconstruction before the decoder (Liang et al.,
Expediting Large-Scale Vision Transformer for Dense Prediction without Fine-tuning, NeurIPS 2022).

As the reference's `TokenClusteringBlock` and `TokenReconstructionBlock` (Expedit): after block
`at`, the patch tokens are clustered into a fixed `h' x w'` grid of centres. The centres start as
the adaptive average pool of the token grid; a few iterations of local soft k-means follow (each
patch weighs only the centres within `window` of its starting cell, by softmax of minus `temp`
times the squared distance; a centre is the affinity-weighted mean of the patches). The centres
are the tokens of every later block. Before the decoder, every patch's features are rebuilt from
the final centres with the weights of its `k` nearest centres at clustering time
(exp(-temp x squared distance), the top k kept, L2-normalised), so the decoder sees the full grid.

How tokenscope accounts for it (every patch has one fate): the clustering is soft, so each patch
is counted as merged into the centre nearest it after the iterations (the reference's hard
labels); each centre is carried by one patch of its starting cell (the one nearest the centre),
which stays a token, and its features are the centre's, not a mean of what merged into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.errors import ConfigError
from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting
from tokenscope.models.steps import MergeDecision, ReconstructionView, Step, TokenView

FAR = 1e16
"""What the reference adds to the distance of a centre outside a patch's window (weight 0)."""


def side_share(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else "must be a share of the grid's side in (0, 1]"


def positive(value: int) -> str | None:
    return None if 1 <= value <= 10_000 else "must be a positive whole number"


def odd_window(value: int) -> str | None:
    return None if value >= 1 and value % 2 == 1 else "must be an odd number of cells (e.g. 5)"


def default_block(depth: int) -> int:
    """Block 10 of 24 (ViT-L), 5 of 12 (ViT-B): the same share of the depth for others."""
    return max(1, min(depth - 1, round(depth * 10 / 24)))


@dataclass
class ClusterRestore:
    """What the reconstruction needs from the clustering: the patches' features and the centres then."""

    patch_ids: torch.Tensor
    """(B, L) the trace token of every patch, raster order."""
    centre_ids: torch.Tensor
    """(B, L') the trace token carrying each centre."""
    features: torch.Tensor
    """(B, L, D) the patches' features when they were clustered."""
    centres: torch.Tensor
    """(B, L', D) the centres right after clustering."""
    k: int
    temp: float


def wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 under autocast is too coarse for distances); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def cluster_grid(gh: int, gw: int, side: float) -> tuple[int, int]:
    return max(1, min(gh, round(gh * side))), max(1, min(gw, round(gw * side)))


def starting_cells(gh: int, gw: int, ch: int, cw: int, device: torch.device) -> torch.Tensor:
    """(L,) the centre each patch starts in: the centre grid scaled up by nearest neighbour."""
    cells = torch.arange(ch * cw, device=device, dtype=torch.float32).view(1, 1, ch, cw)
    return F.interpolate(cells, size=(gh, gw), mode="nearest").view(-1).long()


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, M, N) squared Euclidean distances between rows of a (B, M, D) and b (B, N, D)."""
    return (a * a).sum(-1).unsqueeze(2) + (b * b).sum(-1).unsqueeze(1) - 2 * torch.bmm(a, b.transpose(1, 2))


class TokenClustering(nn.Module):
    """After `block`: the patch tokens become an h' x w' grid of centres (soft local k-means)."""

    def __init__(self, block: int, side: float, iters: int, temp: float, window: int, k: int) -> None:
        super().__init__()
        self.block, self.side, self.iters, self.temp, self.radius, self.k = block, side, iters, temp, window // 2, k

    def forward(self, view: TokenView) -> MergeDecision:
        grid_ids = view.layout.grid_ids
        b, gh, gw = grid_ids.shape
        n, d = view.x.shape[1], view.x.shape[2]
        count = gh * gw
        whole = view.host_counts is None or all(c == count for c in view.host_counts)
        if not whole or n < count:  # a partition of supertokens, or tokens already gone, has fewer
            raise ConfigError("hourglass clusters the whole patch grid: run it alone (it enters on the plain grid), "
                              "before anything else merged or left")
        device = view.x.device
        patch_ids = grid_ids.reshape(b, count)
        slot_of_token = torch.zeros((b, int(view.layout.owner.shape[1])), dtype=torch.long, device=device)
        slot_of_token.scatter_(1, view.token_ids.clamp_min(0), torch.arange(n, device=device).expand(b, n))
        patch_slot = slot_of_token.gather(1, patch_ids)  # (B, L)
        feats = wide(view.x).gather(1, patch_slot.unsqueeze(-1).expand(-1, -1, d))  # (B, L, D)

        ch, cw = cluster_grid(gh, gw, self.side)
        m = ch * cw
        centres = F.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(b, d, gh, gw), (ch, cw)).flatten(2).transpose(1, 2)
        start = starting_cells(gh, gw, ch, cw, device)
        cell = torch.arange(m, device=device)
        near = ((start[None] % cw - cell[:, None] % cw).abs() <= self.radius) & \
               ((start[None] // cw - cell[:, None] // cw).abs() <= self.radius)  # (L', L)
        far = (~near).float() * FAR
        for _ in range(self.iters):
            affinity = torch.softmax(-(squared_distance(centres, feats) + far) * self.temp, dim=1)  # over centres
            centres = torch.bmm(affinity, feats) / affinity.sum(2, keepdim=True).clamp_min(1e-16)
        dist = squared_distance(centres, feats)  # (B, L', L)
        nearest = dist.argmin(dim=1)  # (B, L): the reference's hard labels
        own_cell = torch.where(start[None] == cell[:, None], dist, torch.full_like(dist, float("inf")))
        carrier = own_cell.argmin(dim=2)  # (B, L'): the patch of each centre's starting cell nearest to it
        carried = torch.zeros((b, count), dtype=torch.bool, device=device).scatter_(1, carrier, True)
        into_patch = carrier.gather(1, nearest)  # (B, L): the carrier of each patch's nearest centre

        merged = torch.zeros((b, n), dtype=torch.bool, device=device).scatter_(1, patch_slot, ~carried)
        into = torch.zeros((b, n), dtype=torch.long, device=device).scatter_(1, patch_slot, patch_slot.gather(1, into_patch))
        centre_slot = patch_slot.gather(1, carrier)  # (B, L')
        values = torch.zeros((b, n, d), dtype=view.x.dtype, device=device)
        values.scatter_(1, centre_slot.unsqueeze(-1).expand(-1, -1, d), centres.to(view.x.dtype))
        order = torch.full((b, n), m, dtype=torch.long, device=device).scatter_(1, centre_slot, cell.expand(b, m))
        # per image: the iterations' distances and weighted means, the hard labels, and the reconstruction's
        # distances and weighted sum (declared here, where the sizes are known)
        flops = torch.full((b,), (4 * self.iters + 6) * count * m * d, dtype=torch.long, device=device)
        restore = ClusterRestore(patch_ids, patch_ids.gather(1, carrier), feats, centres, self.k, self.temp)
        counts = None if view.host_counts is None else tuple(m for _ in view.host_counts)
        return MergeDecision(self.block, "hourglass", view.token_ids, view.valid, merged & view.valid, into, flops,
                             order=order, counts_after=counts, values=values, restore=restore)


class TokenReconstruction(nn.Module):
    """Every patch's features from the final centres: its k nearest centres at clustering time, weighted."""

    def forward(self, view: ReconstructionView) -> torch.Tensor:
        out = view.tokens
        for _, restore in view.restores:
            if not isinstance(restore, ClusterRestore):
                continue
            d = out.shape[-1]
            final = wide(out).gather(1, restore.centre_ids.unsqueeze(-1).expand(-1, -1, d))  # (B, L', D)
            weight = torch.exp(-restore.temp * squared_distance(restore.features, restore.centres).clamp_min(0))
            k = min(restore.k, weight.shape[-1])
            kth = weight.topk(k, dim=2).values.amin(dim=2, keepdim=True)
            weight = F.normalize(torch.where(weight >= kth, weight, torch.zeros_like(weight)), dim=2)
            rebuilt = torch.bmm(weight, final).to(out.dtype)  # (B, L, D)
            out = out.scatter(1, restore.patch_ids.unsqueeze(-1).expand(-1, -1, d), rebuilt)
        return out


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    at = values["at"] if values["at"] is not None else default_block(facts.depth)
    if not 1 <= at < facts.depth:
        raise ConfigError(f"method hourglass: at={at} must be a block in 1..{facts.depth - 1} of {facts.name}")
    step = TokenClustering(at, float(values["side"]), int(values["iters"]), float(values["temp"]),
                           int(values["window"]), int(values["k"]))
    record = {"merging": {"kind": "hourglass", "at": at, "side": float(values["side"]), "iters": int(values["iters"]),
                          "temp": float(values["temp"]), "window": int(values["window"]), "k": int(values["k"]),
                          "reconstruction": "top-k"}}
    return Plan(policy="none", steps=(Step(at, "after", step, f"hourglass_{at}"),),
                reconstruction=TokenReconstruction(), record=record)


METHOD = Method(
    name="hourglass", kind="merge", plan=plan,
    settings=(Setting("side", float, 0.7, "the centre grid's side as a share of the token grid's (0.7: 40x40 -> 28x28)",
                      side_share),
              Setting("at", int, None, "the block after which tokens are clustered (default: 10 of 24, 5 of 12)"),
              Setting("iters", int, 5, "soft k-means iterations", positive),
              Setting("temp", float, 0.01, "temperature: weight exp(-temp x squared distance)"),
              Setting("window", int, 5, "centres a patch may join: within this many cells of its own", odd_window),
              Setting("k", int, 20, "centres each patch is rebuilt from before the decoder", positive)),
    summary="Expedit's Hourglass: tokens clustered into a fixed grid after one block, rebuilt for the decoder",
    ladder=("hourglass:side=0.8", "hourglass:side=0.7", "hourglass:side=0.5"),
    search=tuple(f"hourglass:side={s}" for s in (0.9, 0.8, 0.7, 0.6, 0.5)),
    reference=Reference(paper="Liang et al., Expediting Large-Scale Vision Transformer for Dense Prediction without "
                              "Fine-tuning, NeurIPS 2022", repository="Expedit (Weicong Liang et al.)",
                        files=("ops/cluster.py (TokenClusteringBlock)", "ops/reconstruction.py (TokenReconstructionBlock)"),
                        differences="the centre grid is a share of the token grid (one setting for every image size); "
                                    "the reconstruction runs on the encoder's output before the decoder; the default "
                                    "block and share are chosen to land near the published 659 -> 444 GFLOPs of "
                                    "Segmenter ViT-L 640, not read from the reference's Segmenter configuration"),
)
