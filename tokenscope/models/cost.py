"""Analytic FLOPs of a StepViT as a function of how many tokens enter each part.

Counts 2 FLOPs per multiply-add and only matrix products (linear layers, attention), the
convention of `torch.utils.flop_counter`; tests check the two agree exactly. Knowing the cost
per token count lets a trace give per-block FLOPs without re-running anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


@dataclass(frozen=True)
class BlockCost:
    """FLOPs of one encoder block for N tokens: N * per_token + N^2 * per_pair.

    When tokens merge inside the block (between attention and MLP), the MLP's share of
    `per_token` (`mlp_per_token`) is paid only by the `n_mid` tokens left after merging.
    """

    per_token: int
    per_pair: int
    mlp_per_token: int = 0

    def flops(self, n: int, n_mid: int | None = None) -> int:
        mid = int(n) if n_mid is None else int(n_mid)
        return (int(n) * (self.per_token - self.mlp_per_token) + mid * self.mlp_per_token
                + int(n) * int(n) * self.per_pair)


@dataclass(frozen=True)
class DecoderCost:
    """FLOPs of the decoder for N tokens entering it.

    Linear: N * per_token. Mask transformer: per-token projections, `fixed` for the class
    embeddings' projection, and its blocks over N + `extra` tokens (the class embeddings).
    """

    per_token: int
    fixed: int = 0
    blocks: tuple[BlockCost, ...] = ()
    extra: int = 0

    def flops(self, n: int) -> int:
        if n <= 0:
            return 0
        return int(n) * self.per_token + self.fixed + sum(c.flops(int(n) + self.extra) for c in self.blocks)


@dataclass(frozen=True)
class CostModel:
    """Per-part FLOP coefficients of a model (prefix tokens count as tokens in blocks)."""

    blocks: tuple[BlockCost, ...]
    embed_per_token: int
    gate_per_token: int
    decoder: DecoderCost
    num_prefix_tokens: int
    decoder_needs_context: bool = False
    """The decoder sees every token (mask transformer), not only those that reached the end."""
    block_extra: tuple[int, ...] = ()
    """Tokens a head inside the encoder adds to each block (EoMT's queries in the last blocks);
    such a block runs even when no image token is left."""
    decoder_per_patch: bool = False
    """The decoder works on the whole patch grid (EoMT's upscaler), whatever the token count."""

    def decoder_tokens(self, num_tokens: int, final_tokens: int, num_patches: int = 0) -> int:
        if self.decoder_per_patch:
            return num_patches
        return num_tokens if self.decoder_needs_context else final_tokens

    def block_flops(self, patch_tokens_in: list[int] | tuple[int, ...],
                    patch_tokens_mid: list[int] | tuple[int, ...] | None = None) -> list[int]:
        """FLOPs of each block given the patch-derived tokens entering it (0 = block skipped) and,
        with in-block merging, the tokens left for its MLP."""
        mids = patch_tokens_in if patch_tokens_mid is None else patch_tokens_mid
        p = self.num_prefix_tokens
        extra = self.block_extra or (0,) * len(self.blocks)
        return [c.flops(n + p + e, m + p + e) if n > 0 or e > 0 else 0
                for c, n, m, e in zip(self.blocks, patch_tokens_in, mids, extra)]

    def total(self, num_tokens: int, patch_tokens_in: list[int] | tuple[int, ...], gate_tokens_in: list[int],
              final_tokens: int) -> int:
        """Encoder + heads for one image (policy excluded: it is measured, not modelled)."""
        return (num_tokens * self.embed_per_token + sum(self.block_flops(patch_tokens_in))
                + sum(gate_tokens_in) * self.gate_per_token
                + self.decoder.flops(self.decoder_tokens(num_tokens, final_tokens, num_tokens)))


def _linear_flops_per_token(module: nn.Module) -> int:
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def block_cost(block: nn.Module) -> BlockCost:
    """Per-token linear cost plus attention's q@k^T and attn@v (2 * 2 * N^2 * D_attn)."""
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    if not isinstance(qkv, nn.Linear):
        raise ValueError("block has no fused qkv projection; cannot model its cost")
    attn_dim = qkv.out_features // 3
    mlp = getattr(block, "mlp", None)
    return BlockCost(per_token=_linear_flops_per_token(block), per_pair=4 * attn_dim,
                     mlp_per_token=_linear_flops_per_token(mlp) if isinstance(mlp, nn.Module) else 0)


def eomt_cost(head: nn.Module) -> DecoderCost:
    """EoMT's head: per patch, the upscaler (each 2x step: a 2x2 transposed conv on its input
    positions, a depthwise 3x3 conv on its output positions) and the query-mask products at the
    upscaled resolution; fixed, the class and mask heads on the queries."""
    dim = int(head.q.weight.shape[1])  # type: ignore[union-attr]
    queries = int(head.num_queries)  # type: ignore[union-attr]
    per_patch, positions = 0, 1
    for _ in head.upscale:  # type: ignore[union-attr]
        per_patch += positions * 2 * dim * dim * 4 + positions * 4 * 2 * 9 * dim
        positions *= 4
    classes = int(head.num_classes)  # type: ignore[union-attr]
    per_patch += positions * 2 * queries * dim  # each query's mask over the upscaled positions
    per_patch += positions * 2 * queries * classes  # mask sigmoids times class probabilities there
    fixed = queries * (_linear_flops_per_token(head.class_head) + _linear_flops_per_token(head.mask_head))  # type: ignore[arg-type]
    return DecoderCost(per_token=per_patch, fixed=fixed)


def decoder_cost(decoder: nn.Module) -> DecoderCost:
    """Coefficients of a LinearDecoder, a MaskTransformerDecoder or an EoMT head."""
    if getattr(decoder, "inside_encoder", False):
        return eomt_cost(decoder)
    blocks = getattr(decoder, "blocks", None)
    if blocks is None:
        return DecoderCost(per_token=_linear_flops_per_token(decoder))
    dim = int(decoder.proj_patch.shape[0])  # type: ignore[union-attr]
    classes = int(decoder.num_classes)  # type: ignore[union-attr]
    per_token = _linear_flops_per_token(decoder.proj_dec) + 2 * dim * dim + 2 * dim * classes  # type: ignore[union-attr]
    return DecoderCost(per_token=per_token, fixed=2 * dim * dim * classes,
                       blocks=tuple(block_cost(b) for b in blocks), extra=classes)


def cost_model(model: nn.Module) -> CostModel:
    """Read the coefficients off a StepViT's modules."""
    proj = model.embed.patch_embed.proj  # type: ignore[attr-defined]
    embed = 2 * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels
    gates = list(model.gates.values())  # type: ignore[attr-defined]
    gate = _linear_flops_per_token(gates[0]) if gates else 0
    return CostModel(
        blocks=tuple(block_cost(b) for b in model.blocks),  # type: ignore[attr-defined]
        embed_per_token=embed,
        gate_per_token=gate,
        decoder=decoder_cost(model.decoder),  # type: ignore[attr-defined]
        num_prefix_tokens=int(model.num_prefix_tokens),  # type: ignore[attr-defined]
        decoder_needs_context=bool(getattr(model.decoder, "needs_context", False)),  # type: ignore[attr-defined]
        block_extra=_query_tokens_per_block(model),
        decoder_per_patch=bool(getattr(model.decoder, "inside_encoder", False)),  # type: ignore[attr-defined]
    )


def _query_tokens_per_block(model: nn.Module) -> tuple[int, ...]:
    join = int(getattr(model.decoder, "joins_at", 0))  # type: ignore[attr-defined]
    queries = int(getattr(model.decoder, "num_queries", 0))  # type: ignore[attr-defined]
    return tuple(queries if join and i + 1 >= join else 0 for i in range(len(model.blocks)))  # type: ignore[attr-defined]


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_ATTENTION_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
"""torch's counter has no formula for the CPU fused attention kernel and would silently count
zero attention FLOPs on the CPU; this supplies the same formula it uses for the GPU kernels."""


def measure_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int], Any]:
    """Run `fn()` under torch's FLOP counter: (total, per-module totals, fn's result)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS) as counter:
        result = fn()
    per_module = {name: int(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return int(counter.get_total_flops()), per_module, result
