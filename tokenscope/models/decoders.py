"""Segmentation decoders: map the encoder's final tokens to class logits, one row per token.

Both decoders take tokens in any number and shape (plain patches or supertokens), because the
STEP encoder hands them a variable-length, padded sequence. `valid` (B, N) marks real tokens.

- `LinearDecoder`: Segmenter's linear decoder, one Linear per token. Tokens are independent, so
  only the tokens that reached the end of the encoder need to enter it.
- `MaskTransformerDecoder`: Segmenter's mask transformer. Class embeddings join the tokens in
  a few transformer blocks; a token's logit for class c is the (normalised) dot product of the
  two. Tokens attend to each other, so it needs the *whole* image as context: `needs_context`
  tells the encoder to hand it every token, the ones that exited early included (with the
  features they had when they left, as DToP reassembles pruned tokens before its decoder).
  Exited tokens still keep their gate's prediction; their decoder output is not used.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from tokenscope.models.eomt import EoMTHead, upscale_steps
from timm.models.vision_transformer import Block


class LinearDecoder(nn.Module):
    """Segmenter's linear decoder: one linear map per token (the norm is the encoder's)."""

    needs_context = False

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(tokens)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer, with parameter names as in Segmenter's checkpoints.

    `proj_patch` and `proj_classes` are right-multiplied matrices (x @ W), as Segmenter stores
    them; mmsegmentation's bias-free Linears hold their transposes (the importer converts).
    """

    needs_context = True

    def __init__(self, dim: int, num_classes: int, layers: int = 2, heads: int = 0, eps: float = 1e-5) -> None:
        super().__init__()
        heads = heads or max(1, dim // 64)
        norm = partial(nn.LayerNorm, eps=eps)
        self.proj_dec = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                     for _ in range(layers)])
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.decoder_norm = norm(dim)
        self.mask_norm = norm(num_classes)

    @property
    def num_classes(self) -> int:
        return int(self.cls_emb.shape[1])

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = tokens.shape
        c = self.num_classes
        x = torch.cat([self.proj_dec(tokens), self.cls_emb.expand(b, -1, -1).to(tokens.dtype)], dim=1)
        mask = None
        if valid is not None and not bool(valid.all()):
            # Padding slots must not be attended to; class embeddings always may.
            mask = torch.cat([valid, valid.new_ones((b, c))], dim=1)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        x = self.decoder_norm(x)
        patches = x[:, :n] @ self.proj_patch.to(x.dtype)
        classes = x[:, n:] @ self.proj_classes.to(x.dtype)
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        return self.mask_norm(patches @ classes.transpose(1, 2))


DECODERS = ("linear", "mask", "eomt")


def build_decoder(kind: str, dim: int, num_classes: int, layers: int = 2, heads: int = 0,
                  eps: float = 1e-5, queries: int = 0, query_blocks: int = 0, depth: int = 0,
                  patch: int = 16) -> nn.Module:
    """`linear`, `mask` (Segmenter's), or `eomt` (queries inside the last `query_blocks` blocks,
    see models/eomt.py)."""
    if kind == "linear":
        return LinearDecoder(dim, num_classes)
    if kind == "mask":
        return MaskTransformerDecoder(dim, num_classes, layers, heads, eps)
    if kind == "eomt":
        if queries < 1:
            raise ValueError("an EoMT head needs at least one query")
        return EoMTHead(dim, num_classes, queries, query_blocks, depth, upscale_steps(patch))
    raise ValueError(f"unknown decoder {kind!r}; expected one of {DECODERS}")
