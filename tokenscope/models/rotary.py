"""Rotary positions (DINOv3's RoPE) for tokens that are not one patch each.

A ViT with rotary positions has no position table to average: each token's queries and keys are
rotated by angles computed from its position on the patch grid. tokenscope gives every token a
position and lets timm's own rotary module turn positions into angles:

- a patch is at its centre, exactly where timm places it (0.5-centred, normalised per axis to [-1, 1]);
- a supertoken is at the centre of the square it covers, the mean of its patches' positions;
- a token made by merging is at the size-weighted mean position of what it merged;
- a token that is pruned or exits leaves with its own.

Positions are kept per trace token (B, T + 1, 2; the spare slot as in models/slots.py), so the
encoder's compaction, which moves slots, never has to carry them: each block reads its slots'
positions by their token ids.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.models.partition import Partition
from tokenscope.models.slots import scatter_tokens
from tokenscope.models.superpatch import level_cells


def rotary_module(vit: nn.Module) -> nn.Module | None:
    """The backbone's rotary module when tokenscope can place tokens for it (timm's DINOv3 RoPE), else None."""
    rope = getattr(vit, "rope", None)
    if rope is None or not hasattr(rope, "_get_pos_embed_from_coords") or not hasattr(rope, "normalize_coords"):
        return None
    return rope


def patch_positions(rope: nn.Module, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(gh, gw, 2) every patch's position as timm's DINOv3 rotary module builds it for a grid."""
    from timm.layers.pos_embed_sincos import _build_grid

    coords = _build_grid(list(grid), grid_type="centered", grid_offset=float(getattr(rope, "grid_offset", 0.0)),
                         grid_indexing=str(getattr(rope, "grid_indexing", "ij")),
                         normalize_coords=str(rope.normalize_coords), ndim=2)
    return coords.to(device)


def token_positions(partitions: Sequence[Partition], grid_positions: torch.Tensor) -> torch.Tensor:
    """(B, T + 1, 2) each token's position: the mean of the positions of the patches it covers (a
    supertoken's centre; a 1x1 token's own patch, exactly), pooled as its embedding is; the spare slot at 0."""
    device = grid_positions.device
    t_max = max(p.num_tokens for p in partitions)
    out = torch.zeros((len(partitions), t_max + 1, 2), dtype=torch.float32, device=device)
    grid = grid_positions.permute(2, 0, 1).unsqueeze(0).float()  # (1, 2, gh, gw)
    for s, images, slots, rows, cols in level_cells(partitions, device):
        pooled = grid if s == 1 else F.avg_pool2d(grid, s)
        out[images, slots] = pooled[0, :, rows, cols].transpose(0, 1)
    return out


def rotary_embedding(rope: nn.Module, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, 2 * dim) timm's concatenated sin/cos for the slots' tokens (padding at position 0)."""
    b, n = token_ids.shape
    at = positions.gather(1, token_ids.clamp_min(0).unsqueeze(-1).expand(-1, -1, 2))
    sin, cos = rope._get_pos_embed_from_coords(at.reshape(b * n, 2))
    return torch.cat([sin, cos], dim=-1).reshape(b, n, -1).unsqueeze(1)


def merge_positions(positions: torch.Tensor, token_ids: torch.Tensor, sizes: torch.Tensor, merged: torch.Tensor,
                    into: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Positions after a merge: each target at the size-weighted mean position of its group (the
    slots merged into it and itself); `sizes` are the slots' sizes before the merge."""
    b, n = token_ids.shape
    at = positions.gather(1, token_ids.clamp_min(0).unsqueeze(-1).expand(-1, -1, 2))
    target = torch.where(merged, into, torch.arange(n, device=into.device).expand(b, n))
    w = torch.where(valid, sizes.float(), torch.zeros_like(sizes, dtype=torch.float32)).unsqueeze(-1)
    total = torch.zeros((b, n, 2), dtype=torch.float32, device=at.device).scatter_add_(
        1, target.unsqueeze(-1).expand(-1, -1, 2), at * w)
    weight = torch.zeros((b, n), dtype=torch.float32, device=at.device).scatter_add_(1, target, w[..., 0])
    hit = torch.zeros((b, n + 1), dtype=torch.bool, device=at.device)
    scatter_tokens(hit, merged, into, merged)
    is_target = hit[:, :n] & ~merged & valid
    moved = torch.where(is_target.unsqueeze(-1), total / weight.clamp_min(1e-12).unsqueeze(-1), at)
    out = positions.clone()
    scatter_tokens(out, moved, token_ids, is_target)
    return out
