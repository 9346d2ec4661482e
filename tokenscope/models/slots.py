"""Writing into per-token buffers from sequence slots, shared by the encoder and the mergers.

Buffers carry one spare slot at the end of dim 1: writes that are not wanted go there, so the
index never depends on data the host would have to read first (no synchronisation).
"""

from __future__ import annotations

import torch


def scatter_tokens(target: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor) -> None:
    """target[b, token_ids[b, n]] = values[b, n] wherever mask[b, n], without a host sync.

    `target` has one spare slot at the end of dim 1: unselected slots are written there, so the
    index never depends on data the host would have to read first.
    """
    spare = target.shape[1] - 1
    idx = torch.where(mask, token_ids, torch.full_like(token_ids, spare))
    if target.ndim == 3:
        target.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, target.shape[-1]), values.to(target.dtype))
    else:
        target.scatter_(1, idx, values.to(target.dtype))
