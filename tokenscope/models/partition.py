"""The superpatch partition of a patch grid: pure functions, no weights.

A partition assigns every 16x16 patch of the (gh, gw) grid to exactly one token. A token of
level k covers an aligned square of 2^k x 2^k patches whose top-left patch is (row, col),
with row and col multiples of 2^k. Tokens are numbered in raster order of their top-left
patch, so the all-level-0 partition numbers tokens exactly like a plain ViT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MAX_LEVEL = 4


@dataclass(frozen=True)
class Partition:
    """Which patches share a token (see module docstring)."""

    grid: tuple[int, int]
    token_of_patch: np.ndarray
    """int32 (gh, gw): the token id of every patch."""
    level: np.ndarray
    """int8 (T,): superpatch level of every token (side = 2**level patches)."""
    row: np.ndarray
    """int32 (T,): top-left patch row of every token."""
    col: np.ndarray
    """int32 (T,): top-left patch column of every token."""

    @property
    def num_tokens(self) -> int:
        return int(self.level.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.grid[0] * self.grid[1])

    @property
    def side(self) -> np.ndarray:
        return (1 << self.level.astype(np.int32)).astype(np.int32)

    @property
    def patches_per_token(self) -> np.ndarray:
        return self.side**2

    def tokens_per_level(self, max_level: int = MAX_LEVEL) -> np.ndarray:
        return np.bincount(self.level.astype(np.int64), minlength=max_level + 1)


def grid_partition(grid: tuple[int, int]) -> Partition:
    """The plain ViT partition: one token per patch."""
    gh, gw = grid
    rows, cols = np.divmod(np.arange(gh * gw, dtype=np.int32), gw)
    return Partition(
        grid=(gh, gw),
        token_of_patch=np.arange(gh * gw, dtype=np.int32).reshape(gh, gw),
        level=np.zeros(gh * gw, dtype=np.int8),
        row=rows.astype(np.int32),
        col=cols.astype(np.int32),
    )


def level_shape(grid: tuple[int, int], level: int) -> tuple[int, int]:
    """Number of aligned level-k blocks that fit entirely inside the grid."""
    return grid[0] >> level, grid[1] >> level


def partition_from_merges(grid: tuple[int, int], merged: Sequence[np.ndarray]) -> Partition:
    """Build a partition from per-level merge decisions.

    `merged[k-1]` is a bool array of `level_shape(grid, k)`; a True block becomes one token
    unless an ancestor block already merged (ancestors win: decisions are top-down).
    """
    gh, gw = grid
    levels = len(merged)
    covered = np.zeros((gh, gw), dtype=bool)
    chosen: list[tuple[int, np.ndarray, np.ndarray]] = []
    for k in range(levels, 0, -1):
        m = np.asarray(merged[k - 1], dtype=bool)
        shape = level_shape(grid, k)
        if m.shape != shape:
            raise ValueError(f"level {k} decisions have shape {m.shape}, expected {shape}")
        if m.size == 0:
            continue
        s = 1 << k
        # A block is blocked when its top-left patch is already covered by a merged ancestor.
        blocked = covered[: shape[0] * s : s, : shape[1] * s : s]
        take = m & ~blocked
        ii, jj = np.nonzero(take)
        if ii.size:
            chosen.append((k, ii.astype(np.int32) * s, jj.astype(np.int32) * s))
            up = np.repeat(np.repeat(take, s, axis=0), s, axis=1)
            covered[: up.shape[0], : up.shape[1]] |= up
    r0, c0 = np.nonzero(~covered)
    chosen.append((0, r0.astype(np.int32), c0.astype(np.int32)))
    level = np.concatenate([np.full(r.shape[0], k, dtype=np.int8) for k, r, _ in chosen])
    row = np.concatenate([r for _, r, _ in chosen])
    col = np.concatenate([c for _, _, c in chosen])
    order = np.lexsort((col, row))
    level, row, col = level[order], row[order], col[order]
    token_of_patch = np.full((gh, gw), -1, dtype=np.int32)
    for k in range(levels, -1, -1):
        sel = np.nonzero(level == k)[0]
        if sel.size == 0:
            continue
        s = 1 << k
        ids = np.full(level_shape(grid, k), -1, dtype=np.int32)
        ids[row[sel] >> k, col[sel] >> k] = sel
        up = np.repeat(np.repeat(ids, s, axis=0), s, axis=1)
        region = token_of_patch[: up.shape[0], : up.shape[1]]
        np.copyto(region, up, where=up >= 0)
    return Partition(grid=(gh, gw), token_of_patch=token_of_patch, level=level, row=row, col=col)


def quadtree_partition(
    scores: Sequence[np.ndarray], thresholds: Sequence[float], grid: tuple[int, int]
) -> Partition:
    """dCTS decision rule: a block merges when its score reaches its level's threshold,
    unless a larger block containing it already merged."""
    if len(thresholds) < len(scores):
        raise ValueError(f"{len(scores)} levels of scores but only {len(thresholds)} thresholds")
    merged = [np.asarray(s) >= t for s, t in zip(scores, thresholds)]
    return partition_from_merges(grid, merged)


def block_homogeneity(labels: torch.Tensor, levels: int = MAX_LEVEL, patch: int = 16) -> list[torch.Tensor]:
    """For each level 1..levels, whether each aligned block holds a single label value.

    `labels` is an integer tensor (B, H, W) with H, W multiples of `patch`. The ignore value
    counts as a label of its own, as in CTS. Returns bool tensors of shape (B, gh>>k, gw>>k).
    """
    lab = labels.to(torch.float32).unsqueeze(1)
    hi = F.max_pool2d(lab, patch)
    lo = -F.max_pool2d(-lab, patch)
    out: list[torch.Tensor] = []
    for k in range(1, levels + 1):
        s = 1 << k
        gh, gw = hi.shape[-2] >> k, hi.shape[-1] >> k
        if gh == 0 or gw == 0:
            out.append(torch.zeros(labels.shape[0], gh, gw, dtype=torch.bool, device=labels.device))
            continue
        h = F.max_pool2d(hi[..., : gh * s, : gw * s], s)
        l_ = -F.max_pool2d(-lo[..., : gh * s, : gw * s], s)
        out.append((h == l_).squeeze(1))
    return out
