"""One encoder block that a method may act inside: timm's pre-norm block, with a point between
attention and MLP.

The block adopts the parts of timm's `Block` (norm1, attn, ls1, drop_path1, norm2, mlp, ls2,
drop_path2) under the same names, so checkpoints keep their keys and the cost model reads the
same layers. Without a step inside it, its forward is timm's, operation for operation (outputs are
bitwise equal). With one (`between`), attention also hands over its queries and keys and the
step may change the sequence before the MLP: the block is still called as one module, so hooks
and `torch.compile` see merging and pruning blocks like every other.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tokenscope.models.attention import attend_heads, attend_packed
from tokenscope.models.sequence import Packing

BLOCK_PARTS = ("norm1", "attn", "drop_path1", "norm2", "mlp", "drop_path2")
SCALES = (("ls1", "ls2"), ("gamma_1", "gamma_2"))
"""Layer scale: timm's ViT Block has modules ls1/ls2, its EVA block (DINOv3) parameters gamma_1/gamma_2."""

Between = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""between(x after the attention residual, queries, keys) -> the sequence the MLP receives."""


def is_plain_block(block: nn.Module) -> bool:
    """Whether `block` is a pre-norm block with timm's parts (the ViTs tokenscope can drive): timm's
    Block, or its EVA block with a fused qkv projection (DINOv3)."""
    return (all(hasattr(block, part) for part in BLOCK_PARTS) and isinstance(getattr(block.attn, "qkv", None), nn.Linear)
            and any(all(hasattr(block, s) for s in pair) for pair in SCALES))


class EncoderBlock(nn.Module):
    """x -> x + attn(norm1(x)) -> [between] -> x + mlp(norm2(x)), with timm's layer scale and drop path."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for part in BLOCK_PARTS:
            setattr(self, part, getattr(block, part))
        self.eva = not hasattr(block, "ls1")
        """timm's EVA block (gamma_1/gamma_2, rotary positions): its attention always runs here, so the
        rotation covers the image tokens after whatever sits in front (registers, fused tokens, queries)."""
        if self.eva:
            self.gamma_1, self.gamma_2 = block.gamma_1, block.gamma_2
        else:
            self.ls1, self.ls2 = block.ls1, block.ls2

    def _scale(self, x: torch.Tensor, which: int) -> torch.Tensor:
        if not self.eva:
            return (self.ls1 if which == 1 else self.ls2)(x)
        gamma = self.gamma_1 if which == 1 else self.gamma_2
        return x if gamma is None else gamma * x

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, num_prefix: int = 0,
                between: Between | None = None, rope: torch.Tensor | None = None,
                packing: Packing | None = None) -> torch.Tensor:
        """`num_prefix`: tokens in front of the image tokens (for observers counting image tokens, and
        the first token `rope`, the image tokens' rotary angles, applies to). `packing`: where the
        real tokens of a padded batch are; the block then runs over them alone (see `_packed`)."""
        if packing is not None and between is None and not self.training and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            return self._packed(x, attn_mask, num_prefix, rope, packing)
        if between is None and not self.eva:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)))
        else:
            h, q, k = attend_heads(self.attn, self.norm1(x), attn_mask, rope, num_prefix)
            x = x + self.drop_path1(self._scale(h, 1))
            if between is not None:
                x = between(x, q, k)
                attn_mask = _mask_for(x, attn_mask)
        live = _packable(x, attn_mask)
        if live is None:
            return x + self.drop_path2(self._scale(self.mlp(self.norm2(x)), 2))
        # the MLP is per token: on the CPU it runs over the real tokens only, packed, not the padding
        packed = x[live]
        out = x.clone()
        out[live] = packed + self.drop_path2(self._scale(self.mlp(self.norm2(packed)), 2))
        return out

    def _packed(self, x: torch.Tensor, attn_mask: torch.Tensor | None, num_prefix: int, rope: torch.Tensor | None,
                packing: Packing) -> torch.Tensor:
        """The block over the real tokens of a padded batch only, laid back to back: every projection
        and the MLP see T = sum of lengths tokens instead of B x width, attention runs per image on its
        exact length (attend_packed), and the padding slots come back unchanged. Per token the same
        operations as the padded block, so the real tokens' outputs agree with it to float rounding."""
        b, n, d = x.shape
        index = packing.index(x.device)
        packed = x.reshape(b * n, d).index_select(0, index).unsqueeze(0)
        key_bias = attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None
        angles = None if rope is None else _packed_rope(rope, packing, num_prefix)
        h = attend_packed(self.attn, self.norm1(packed), packing, key_bias, angles)
        packed = packed + self.drop_path1(self._scale(h, 1))
        packed = packed + self.drop_path2(self._scale(self.mlp(self.norm2(packed)), 2))
        return x.reshape(b * n, d).index_copy(0, index, packed[0].to(x.dtype)).reshape(b, n, d)


def _packed_rope(rope: torch.Tensor, packing: Packing, num_prefix: int) -> torch.Tensor:
    """(T, 1, 2 Dh) rotary angles in packed order from the padded (B, 1, N - P, 2 Dh): each image's
    image tokens, behind identity rows (sin 0, cos 1) for the P tokens in front, which are not rotated."""
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(half)]).expand(num_prefix, -1)
    rows = [torch.cat([identity, rope[i, 0, :n - num_prefix]]) for i, n in enumerate(packing.lengths)]
    return torch.cat(rows).unsqueeze(1)


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The key mask still describes `x` unless a step inside the block changed its length."""
    return mask if mask is not None and mask.shape[-1] == x.shape[1] else None


def _packable(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) the real tokens of a padded CPU batch, or None to run the MLP over every slot: on a GPU
    (packing reads the mask's count on the host, a synchronisation there), under torch.compile, or
    without padding. Nothing here reads a value in Python: the gather costs a copy of the tokens, a
    small fraction of the MLP it spares the padding of."""
    if mask is None or x.device.type != "cpu" or x.shape[0] < 2 or torch.compiler.is_compiling():
        return None
    live = mask[:, 0, 0, :] if mask.dtype == torch.bool else torch.isfinite(mask[:, 0, 0, :])
    return live if live.shape == x.shape[:2] else None
