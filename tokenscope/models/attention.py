"""Attention that also returns its keys, and the size-weighted (proportional) attention mask.

Merging methods decide inside a block, between attention and MLP, so the model runs such a block
in its two halves. `attend` computes exactly what timm's `Attention.forward` computes (same
operations in the same order, so outputs are bitwise equal) and also hands back the keys, which
ToMe uses as its similarity metric; recomputing them would cost a quarter of a block's qkv.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def attend(attn: nn.Module, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention on normalised input `h` (B, N, C): (output (B, N, C), keys averaged over heads)."""
    out, _, k = attend_heads(attn, h, mask)
    return out, k.mean(dim=1)


def attend_heads(attn: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor | None = None,
                 num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm Attention on `h` (B, N, C): (output (B, N, C), queries and keys (B, H, N, Dh) per head).

    With `rope` (B, 1, N - num_prefix, 2 Dh: timm's concatenated sin/cos), the queries and keys of the
    tokens after the first `num_prefix` are rotated as timm's EVA / DINOv3 attention rotates them
    (the class and register tokens, and a head's queries, are not)."""
    b, n, _ = h.shape
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", 0) or attn.qkv.out_features // (3 * heads))
    attn_dim = int(getattr(attn, "attn_dim", heads * head_dim))
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(h).sigmoid() if gate_layer is not None else None
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:  # EVA's separate q/k/v biases
        qkv = F.linear(h, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
    else:
        qkv = attn.qkv(h)
    qkv = qkv.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat

        half = bool(getattr(attn, "rotate_half", False))
        p = num_prefix
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    if getattr(attn, "fused_attn", True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        w = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask
        out = attn.attn_drop(w.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(b, n, attn_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, q, k


def query_attention(queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    query: int = 0) -> torch.Tensor:
    """(B, H, N) softmax attention of one query position over every key, per head: what the full
    attention matrix holds in row `query`, computed for that row alone (EViT's class attention)."""
    w = (queries[:, :, query:query + 1].float() * scale) @ keys.float().transpose(-2, -1)
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask.float()
    return w.softmax(dim=-1)[:, :, 0]


def size_weighted_mask(valid: torch.Tensor, sizes: torch.Tensor, num_prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive key mask (B, 1, 1, P + N): log(size) for live tokens, -inf for padding, 0 for prefix.

    Adding log(size) to a key's logit weighs a token that stands for s merged tokens as if it
    were s copies of itself (ToMe's proportional attention), so merging changes attention less.
    """
    bias = torch.where(valid, sizes.clamp_min(1.0).log(), torch.full_like(sizes, -math.inf))
    prefix = bias.new_zeros((valid.shape[0], num_prefix))
    return torch.cat([prefix, bias], dim=1)[:, None, None, :].to(dtype)
