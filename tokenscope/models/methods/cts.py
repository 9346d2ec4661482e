"""CTS (Lu et al., CVPR 2023): a policy shares a fixed number K of 2x2 patch groups.

Where dCTS lets a score threshold decide how many groups merge and at which of four sizes, CTS
fixes the count: the K highest-scoring aligned 2x2 groups become one token each, nothing larger.
The scores come from another policy of the same model (the trained dCTS network's level-1 head
when there is one, else the training-free uniformity score), so CTS and dCTS differ only in
their decision rule.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from tokenscope.errors import ConfigError
from tokenscope.models.partition import MAX_LEVEL, level_shape, partition_from_merges
from tokenscope.models.policy import Policy, PolicyOutput


def parse_groups(text: str | float | int) -> float:
    """`300` -> exactly 300 groups; `0.4` -> 40% of the image's 2x2 groups."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--cts-groups must be a count (e.g. 300) or a fraction below 1 (e.g. 0.4), got {text!r}") from None
    if not np.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        raise ConfigError(f"--cts-groups must be a whole count or a fraction in [0, 1), got {text!r}")
    return value


def groups_for(value: float, available: int) -> int:
    """How many groups `value` means for an image with `available` aligned 2x2 groups."""
    k = int(round(value * available)) if value < 1 else int(value)
    return min(k, available)


class CTSPolicy(Policy):
    """Share exactly K 2x2 groups (or a fraction of them): the K best by a source policy's score."""

    name = "cts"

    def __init__(self, sources: dict[str, Policy], patch: int = 16, groups: float = 0.5, source: str = "uniform") -> None:
        super().__init__(patch=patch)
        self._sources = dict(sources)  # a plain dict: the source policies are owned (and saved) elsewhere
        self.groups = groups
        self.source = source

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        level1 = self._sources[self.source].score(images, labels)[0]
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        return [level1, *(level1.new_zeros((images.shape[0], *level_shape(grid, k))) for k in range(2, MAX_LEVEL + 1))]

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                sample_seeds: Sequence[int] | None = None) -> PolicyOutput:
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        scores = self.score(images, labels)
        host = scores[0].detach().float().cpu().numpy()
        partitions = []
        for b in range(images.shape[0]):
            flat = host[b].reshape(-1)
            k = groups_for(self.groups, flat.size)
            chosen = np.zeros(flat.size, dtype=bool)
            chosen[np.argsort(-flat, kind="stable")[:k]] = True
            merged = [chosen.reshape(host[b].shape), *(np.zeros(level_shape(grid, lv), dtype=bool)
                                                        for lv in range(2, MAX_LEVEL + 1))]
            partitions.append(partition_from_merges(grid, merged))
        return PolicyOutput(scores=scores, partitions=partitions)
