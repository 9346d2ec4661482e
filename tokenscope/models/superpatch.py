"""Supertoken embedding: every token, whatever its level, through the ViT's own patch embedding.

A level-k token covers a (16*2^k)-pixel square. Area-resizing that square to 16x16 is exactly
2^k x 2^k average pooling, so the image is pooled once per level present and only the selected
blocks are cut out and projected: no work is spent on patches that were merged away. The
position embedding of a supertoken is the mean of those of the patches it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from tokenscope.models.partition import Partition


@dataclass
class EmbeddedTokens:
    """Patch-derived tokens padded to a common length, plus bookkeeping.

    `tokens` (B, N, D) has position embeddings added; `token_ids` (B, N) holds each slot's token
    id in its image's partition (-1 for padding); `valid` (B, N) marks real tokens.
    """

    tokens: torch.Tensor
    token_ids: torch.Tensor
    valid: torch.Tensor


def patch_rows(pooled: torch.Tensor, patch: int, bi: torch.Tensor, ri: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
    """(n, C*p*p) the p x p patches (image bi, row ri, column ci) of (B, C, H, W), each flattened in the
    (C, y, x) order of a conv kernel: one gather of the requested patches through a strided view,
    not a copy of every patch of the batch."""
    pooled = pooled.contiguous()
    b, c, hh, ww = pooled.shape
    sb, sc, sy, _ = pooled.stride()
    view = pooled.as_strided((b, c, hh // patch, patch, ww // patch, patch),
                             (sb, sc, patch * sy, sy, patch, 1))
    return view[bi, :, ri, :, ci].reshape(bi.shape[0], -1)


def sum_pool2(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H // 2, W // 2), each pixel the sum of a 2 x 2 block: 4 avg_pool2d(x, 2).

    Written as two strided adds because the CPU's avg_pool2d runs several times slower than
    memory allows; applied k times it gives the 2^k x 2^k sums (to float rounding 4^k avg_pool2d(x, 2^k)),
    each level from the one before, so every superpatch level costs a quarter of the previous one; the
    caller divides the few pixels it reads, not every pooled one."""
    b, c, h, w = images.shape
    x = images[..., : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2 * 2)
    rows = x[:, :, :, 0] + x[:, :, :, 1]
    cols = rows.reshape(b, c, h // 2, w // 2, 2)
    return cols[..., 0] + cols[..., 1]


POS_RESIZE_MODES = ("timm", "bilinear", "bicubic")


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], native: tuple[int, int], num_prefix: int,
                     mode: str = "timm") -> torch.Tensor:
    """(1, P + gh*gw, D) position embeddings for `grid`, from those made for `native`.

    `timm` is timm's resampling (bicubic, antialiased); `bilinear`/`bicubic` are the plain
    interpolations Segmenter and mmsegmentation use. A model must be run with the rule it was
    trained with, or its outputs drift at every size but the native one.
    """
    if tuple(grid) == tuple(native):
        return pos_embed
    if mode == "timm":
        return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(native),
                                      num_prefix_tokens=num_prefix)
    prefix, body = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    d = body.shape[-1]
    body = body.reshape(1, native[0], native[1], d).permute(0, 3, 1, 2).float()
    body = F.interpolate(body, size=tuple(grid), mode=mode, align_corners=False)
    body = body.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d).to(pos_embed.dtype)
    return torch.cat([prefix, body], dim=1)


def level_cells(partitions: Sequence[Partition], device: torch.device | str
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each superpatch level present in the batch, its tokens: (side s in patches, image index, slot,
    row and column on the grid of s x s cells), so a grid pooled s x s is read at (row, column)."""
    counts = [p.num_tokens for p in partitions]
    levels = np.concatenate([p.level for p in partitions]).astype(np.int64)
    rows = np.concatenate([p.row for p in partitions]).astype(np.int64)
    cols = np.concatenate([p.col for p in partitions]).astype(np.int64)
    img_idx = np.concatenate([np.full(c, i, dtype=np.int64) for i, c in enumerate(counts)])
    slot = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    for k in np.unique(levels):
        sel = np.nonzero(levels == k)[0]
        yield (1 << int(k), torch.from_numpy(img_idx[sel]).to(device), torch.from_numpy(slot[sel]).to(device),
               torch.from_numpy(rows[sel] >> k).to(device), torch.from_numpy(cols[sel] >> k).to(device))


class SuperpatchEmbed(nn.Module):
    """Embeds a batch of images under their partitions (one per image)."""

    def __init__(self, patch_embed: nn.Module, pos_embed: torch.Tensor | None, native_grid: Sequence[int],
                 num_prefix_tokens: int, no_embed_class: bool, pos_resize: str = "timm") -> None:
        super().__init__()
        proj = patch_embed.proj
        if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding != (0, 0):
            raise ValueError("only ViTs with a plain conv patch embedding (kernel == stride) are supported")
        self.patch_embed = patch_embed
        self.patch = int(proj.kernel_size[0])
        self.pos_embed = pos_embed if pos_embed is None else nn.Parameter(pos_embed.detach().clone())
        self.native_grid = (int(native_grid[0]), int(native_grid[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.no_embed_class = no_embed_class
        if pos_resize not in POS_RESIZE_MODES:
            raise ValueError(f"unknown position-embedding resize {pos_resize!r}; expected one of {POS_RESIZE_MODES}")
        self.pos_resize = pos_resize

    def patch_pos_grid(self, grid: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Position embeddings resampled to `grid` as (D, gh, gw), and those of prefix tokens."""
        if self.pos_embed is None:
            return None, None
        n_prefix_pos = 0 if self.no_embed_class else self.num_prefix_tokens
        pe = resize_pos_embed(self.pos_embed, grid, self.native_grid, n_prefix_pos, self.pos_resize)
        prefix = pe[:, :n_prefix_pos] if n_prefix_pos else None
        if prefix is not None and not torch.is_grad_enabled():
            # At the native size this is a view of the parameter: under no_grad it still says
            # requires_grad but has no graph, which crashes torch's FLOP counter (module tracker).
            prefix = prefix.detach()
        grid_pe = pe[0, n_prefix_pos:].reshape(grid[0], grid[1], -1).permute(2, 0, 1)
        return grid_pe, prefix

    def forward(self, images: torch.Tensor, partitions: Sequence[Partition]) -> tuple[EmbeddedTokens, torch.Tensor | None]:
        """Returns the embedded patch tokens and the prefix position embedding (or None)."""
        b = images.shape[0]
        device = images.device
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        weight = self.patch_embed.proj.weight
        w2d = weight.reshape(weight.shape[0], -1)
        bias = self.patch_embed.proj.bias
        pos_grid, pos_prefix = self.patch_pos_grid(grid)
        counts = [p.num_tokens for p in partitions]
        n_max = max(counts)
        tokens = images.new_zeros((b, n_max, weight.shape[0]), dtype=weight.dtype)
        pooled, side = images, 1
        for s, bi, slot, ri, ci in level_cells(partitions, device):
            while side < s:  # levels come in increasing size: pool on from the last one
                pooled, side = sum_pool2(pooled), side * 2
            pixels = patch_rows(pooled, self.patch, bi, ri, ci).to(weight.dtype)
            if s > 1:
                pixels = pixels / float(s * s)
            emb = self.patch_embed.norm(F.linear(pixels, w2d, bias))
            if pos_grid is not None:
                pg = pos_grid if s == 1 else F.avg_pool2d(pos_grid.unsqueeze(0), s)[0]
                emb = emb + pg[:, ri, ci].transpose(0, 1).to(emb.dtype)
            tokens[bi, slot] = emb.to(tokens.dtype)  # autocast gives bf16
        ids = torch.full((b, n_max), -1, dtype=torch.long)
        for i, c in enumerate(counts):
            ids[i, :c] = torch.arange(c)
        ids = ids.to(device)
        return EmbeddedTokens(tokens=tokens, token_ids=ids, valid=ids >= 0), pos_prefix
