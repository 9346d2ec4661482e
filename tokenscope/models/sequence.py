"""The padded token sequence as the encoder carries it: masks, compaction, and per-token buffers
read back onto the patch grid. Pure tensor functions, no model state.

Images of one batch have different token counts (supertokens, exits, merges, pruning), so the
sequence is padded to the longest image with a validity mask; compaction removes the slots that
left and shrinks the padding; `unmerge` and `by_owner` turn per-token values into per-patch ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from tokenscope.models.partition import Partition


def attention_mask(valid: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Key-padding mask (B, 1, 1, P + N) for SDPA: True where a key may be attended."""
    prefix = valid.new_ones((valid.shape[0], num_prefix))
    return torch.cat([prefix, valid], dim=1)[:, None, None, :]


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype queries will have inside attention: autocast's (bf16) when it is on, else x's.
    An additive mask must match it on the CUDA kernels."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def compact(x: torch.Tensor, token_ids: torch.Tensor, keep: torch.Tensor, sizes: torch.Tensor | None = None,
            key: torch.Tensor | None = None, counts: Sequence[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]:
    """Remove the slots not in `keep`, per image, and shrink the padding to the longest image.

    The kept slots stay in their order, or, with `key` (B, N), are sorted by it: a merger's
    reference order after its merge.

    Returns the new tokens, ids, validity, per-image counts (a host list: read from the device, one
    synchronisation, unless the caller knows them and passes `counts`) and, when given, the token sizes
    in the new order.
    """
    counts = keep.sum(dim=1).tolist() if counts is None else [int(c) for c in counts]
    n = max(counts)
    if key is None:
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]
    else:  # kept slots by their key, the others after them
        order = torch.argsort(torch.where(keep, key, key.new_full(key.shape, torch.iinfo(key.dtype).max)),
                              dim=1, stable=True)[:, :n]
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    valid = keep.gather(1, order)
    ids = torch.where(valid, token_ids.gather(1, order), torch.full_like(order, -1))
    if sizes is not None:
        sizes = torch.where(valid, sizes.gather(1, order), torch.zeros_like(order, dtype=sizes.dtype))
    return x, ids, valid, counts, sizes


@dataclass
class Packing:
    """A padded batch (B, width, ...) whose row i holds `lengths[i]` real tokens in front, and the same
    tokens laid back to back (T = sum of lengths) as packed attention and MLPs run them.

    The lengths are host integers the encoder already holds (token counts per image plus the tokens
    in front), so building the packing reads nothing from the device; its index tensors are made
    once per packing and copied without blocking."""

    lengths: tuple[int, ...]
    width: int
    _on: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @staticmethod
    def of(counts: Sequence[int], num_prefix: int, width: int) -> "Packing | None":
        """The packing of a batch whose images have `counts` tokens behind `num_prefix` shared ones,
        or None when no image is shorter than the padded width (nothing to pack)."""
        lengths = tuple(num_prefix + int(c) for c in counts)
        return Packing(lengths, width) if min(lengths) < width else None

    @property
    def spans(self) -> list[tuple[int, int]]:
        ends = np.cumsum(self.lengths).tolist()
        return [(e - n, e) for e, n in zip(ends, self.lengths)]

    @property
    def longest(self) -> int:
        return max(self.lengths)

    def _tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            rows = np.concatenate([i * self.width + np.arange(n) for i, n in enumerate(self.lengths)])
            cumulative = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)
            self._on[key] = (_to_device(torch.from_numpy(rows), device),
                             _to_device(torch.from_numpy(cumulative), device))
        return self._on[key]

    def index(self, device: torch.device) -> torch.Tensor:
        """(T,) positions of the real tokens in the padded batch flattened to (B * width)."""
        return self._tensors(device)[0]

    def cumulative(self, device: torch.device) -> torch.Tensor:
        """(B + 1,) int32 offsets of each image in the packed order (flash attention's cu_seqlens)."""
        return self._tensors(device)[1]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory without blocking (no synchronisation)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def token_grid(partitions: Sequence[Partition], device: torch.device) -> torch.Tensor:
    """(B, gh, gw) long tensor: which token covers each patch, for `unmerge` and per-patch lookups."""
    return torch.from_numpy(np.stack([p.token_of_patch for p in partitions])).long().to(device)


def unmerge(token_values: torch.Tensor, token_of_patch: torch.Tensor) -> torch.Tensor:
    """Copy every token's values (B, T, C) to each patch it covers: (B, C, gh, gw)."""
    b, gh, gw = token_of_patch.shape
    idx = token_of_patch.reshape(b, gh * gw, 1).expand(-1, -1, token_values.shape[-1])
    return token_values.gather(1, idx).transpose(1, 2).reshape(b, -1, gh, gw)


def by_owner(values: torch.Tensor, owner: torch.Tensor | None) -> torch.Tensor:
    """values[b, owner[b, t]] for every token t (B, T[, C]): what the token standing for each one
    holds, after in-network merging; `values` itself without merging."""
    if owner is None:
        return values
    index = owner if values.ndim == 2 else owner.unsqueeze(-1).expand(-1, -1, values.shape[-1])
    return values.gather(1, index)


def pool_to_tokens(patch_values: torch.Tensor, token_of_patch: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, T, C) the mean of per-patch values (B, C, gh, gw) over the patches each token covers."""
    b, c = patch_values.shape[:2]
    flat = patch_values.reshape(b, c, -1).transpose(1, 2)
    idx = token_of_patch.reshape(b, -1)
    total = flat.new_zeros((b, num_tokens, c)).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, c), flat)
    count = flat.new_zeros((b, num_tokens)).scatter_add_(1, idx, flat.new_ones(idx.shape))
    return total / count.clamp_min(1).unsqueeze(-1)


def rank_descending(values: torch.Tensor) -> torch.Tensor:
    """Each entry's place along dim 1 in a stable descending sort (0 = the largest)."""
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    places = torch.arange(order.shape[1], device=values.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)
