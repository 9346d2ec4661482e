"""EoMT's head: learned queries that join the last encoder blocks, a mask head and an upscaler.

EoMT (Kerssies et al., CVPR 2025, tue-mps/eomt `models/eomt.py`) has no decoder: before the last
`query_blocks` blocks, `queries` learned tokens are put in front of the sequence and go through
those blocks with the image tokens. After the encoder's final norm, each query gives class logits
(`class_head`, classes + "no object") and a mask embedding (`mask_head`, three linears with GELU);
the image tokens, laid out on the patch grid, are upsampled by `ScaleBlock`s (2x each: transposed
conv, GELU, depthwise 3x3 conv, LayerNorm2d) and every query's mask is the dot product of its
embedding with every upsampled position. Semantic inference: per-pixel class scores are the mask
sigmoids, upsampled to the input, times the class probabilities without the no-object column.

Here the queries are protected tokens in front of the sequence (never merged, pruned or exited,
never counted as image tokens); the encoder asks this head for them at `joins_at`. The image
tokens are reassembled on the patch grid before the upscaler: survivors with their final
features, exited or pruned tokens with the features they left with, merged tokens un-merged to
every patch they cover. Masked attention (EoMT's training-time annealing) is off, as in its
released inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d


class ScaleBlock(nn.Module):
    """2x upsampling of a feature map: transposed conv, GELU, depthwise 3x3 conv, LayerNorm2d."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv2(self.act(self.conv1(x))))


def upscale_steps(patch: int) -> int:
    """EoMT's count of 2x upscaling blocks: log2(patch) - 2, at least 1 (2 for 16-px patches)."""
    return max(1, int(math.log2(patch)) - 2)


class EoMTHead(nn.Module):
    """Queries, class head, mask head and upscaler of an EoMT model (see the module docstring)."""

    needs_context = True
    inside_encoder = True

    def __init__(self, dim: int, num_classes: int, queries: int, query_blocks: int, depth: int, upscale: int) -> None:
        super().__init__()
        if not 1 <= query_blocks <= depth:
            raise ValueError(f"EoMT's queries join {query_blocks} blocks, outside 1..{depth}")
        self.num_classes = num_classes
        self.num_queries = queries
        self.joins_at = depth - query_blocks + 1
        """1-based block before which the queries join the sequence."""
        self.q = nn.Embedding(queries, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(),
                                       nn.Linear(dim, dim))
        self.upscale = nn.Sequential(*[ScaleBlock(dim) for _ in range(upscale)])

    def query_tokens(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.q.weight[None].expand(batch, -1, -1).to(dtype)

    def masks(self, queries: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask logits (B, Q, h, w) at the upscaled grid, class logits (B, Q, C + 1)) from the
        normalised queries (B, Q, D) and the normalised image features on the grid (B, D, gh, gw)."""
        class_logits = self.class_head(queries)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(queries), self.upscale(grid))
        return mask_logits, class_logits


def pixel_scores(mask_logits: torch.Tensor, class_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """EoMT's semantic per-pixel scores (B, C, H, W): mask logits upsampled (bilinear) to `size`,
    sigmoid, weighted by the class probabilities without the no-object column."""
    up = F.interpolate(mask_logits.float(), size=size, mode="bilinear")
    return torch.einsum("bqhw,bqc->bchw", up.sigmoid(), class_logits.float().softmax(dim=-1)[..., :-1])
