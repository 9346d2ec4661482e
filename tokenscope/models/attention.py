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

from tokenscope.models.sequence import Packing


def attend(attn: nn.Module, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention on normalised input `h` (B, N, C): (output (B, N, C), keys averaged over heads)."""
    out, _, k = attend_heads(attn, h, mask)
    return out, k.mean(dim=1)


def _shape(attn: nn.Module) -> tuple[int, int, int]:
    """(heads, head dim, output width) of a timm attention module."""
    heads = int(attn.num_heads)
    head_dim = int(getattr(attn, "head_dim", 0) or attn.qkv.out_features // (3 * heads))
    return heads, head_dim, int(getattr(attn, "attn_dim", heads * head_dim))


def _qkv(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    q_bias = getattr(attn, "q_bias", None)
    if q_bias is not None:  # EVA's separate q/k/v biases
        return F.linear(h, attn.qkv.weight, torch.cat((q_bias, attn.k_bias, attn.v_bias)))
    return attn.qkv(h)


def _rotate(x: torch.Tensor, rope: torch.Tensor, attn: nn.Module) -> torch.Tensor:
    from timm.layers import apply_rot_embed_cat

    return apply_rot_embed_cat(x, rope, half=bool(getattr(attn, "rotate_half", False)))


def _project(attn: nn.Module, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """What timm's attention does after the heads are joined: its norm, gate and output projection."""
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def attend_heads(attn: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, rope: torch.Tensor | None = None,
                 num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm Attention on `h` (B, N, C): (output (B, N, C), queries and keys (B, H, N, Dh) per head).

    With `rope` (B, 1, N - num_prefix, 2 Dh: timm's concatenated sin/cos), the queries and keys of the
    tokens after the first `num_prefix` are rotated as timm's EVA / DINOv3 attention rotates them
    (the class and register tokens, and a head's queries, are not)."""
    b, n, _ = h.shape
    heads, head_dim, attn_dim = _shape(attn)
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(h).sigmoid() if gate_layer is not None else None
    qkv = _qkv(attn, h).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p = num_prefix
        q = torch.cat([q[:, :, :p], _rotate(q[:, :, p:], rope, attn)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], _rotate(k[:, :, p:], rope, attn)], dim=2).type_as(v)
    if getattr(attn, "fused_attn", True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        w = (q * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask
        out = attn.attn_drop(w.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(b, n, attn_dim)
    return _project(attn, out, gate), q, k


def attend_packed(attn: nn.Module, h: torch.Tensor, packing: Packing, key_bias: torch.Tensor | None = None,
                  rope: torch.Tensor | None = None) -> torch.Tensor:
    """timm Attention over the images of a batch laid back to back without padding: `h` (1, T, C), image
    i the next `packing.lengths[i]` tokens, attending only within itself. Output (1, T, C).

    Every projection runs once over the T real tokens; only the attention itself is per image: on CUDA
    in half precision one variable-length flash kernel (torch.nn.attention.varlen, where the installed
    torch has it), otherwise one SDPA call per image on its exact length (no mask, no padded rows).
    `key_bias` (B, 1, 1, >= max length) is an additive per-key bias (proportional attention), read per
    image; `rope` (T, 1, 2 Dh) the packed rotary angles, identity rows (sin 0, cos 1) for the tokens
    in front, so one elementwise rotation covers every image."""
    t = h.shape[1]
    heads, head_dim, attn_dim = _shape(attn)
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(h).sigmoid() if gate_layer is not None else None
    q, k, v = _qkv(attn, h[0]).reshape(t, 3, heads, head_dim).unbind(1)  # (T, H, Dh) each
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = _rotate(q, rope, attn).type_as(v), _rotate(k, rope, attn).type_as(v)
    varlen = _varlen_kernel(q, k, v) if key_bias is None else None
    if varlen is not None:
        cu = packing.cumulative(q.device)
        out = varlen(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, packing.longest, packing.longest)
    else:
        parts = []
        for i, (start, end) in enumerate(packing.spans):
            qi, ki, vi = (z[start:end].transpose(0, 1).unsqueeze(0) for z in (q, k, v))
            bias = None if key_bias is None else key_bias[i:i + 1, :, :, :end - start]
            parts.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=bias)[0].transpose(0, 1))
        out = torch.cat(parts)
    return _project(attn, out.reshape(1, t, attn_dim), gate)


def _varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):  # type: ignore[no-untyped-def]
    """torch's variable-length flash attention when it can run these (CUDA, all fp16 or all bf16), else None."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # an older torch: one SDPA call per image instead
        return None
    return varlen_attn


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
