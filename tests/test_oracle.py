"""The oracle policy merges exactly the blocks whose ground truth is one class."""

from __future__ import annotations

import numpy as np
import torch

from tokenscope.models.partition import block_homogeneity
from tokenscope.models.policy import OraclePolicy


def _random_label_map(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int64)
    for _ in range(6):  # rectangles of random classes at random (unaligned) places
        y, x = rng.integers(0, h), rng.integers(0, w)
        lab[y:y + rng.integers(8, h // 2), x:x + rng.integers(8, w // 2)] = rng.integers(0, 5)
    return lab


def test_oracle_merges_exactly_the_one_class_blocks() -> None:
    for seed in range(4):
        lab = _random_label_map(seed, 272, 400)  # grid 17 x 25: partial blocks at the edges
        labels = torch.from_numpy(lab)[None]
        images = torch.zeros(1, 3, 272, 400)
        part = OraclePolicy().eval()(images, labels).partitions[0]
        homog = [h[0].numpy() for h in block_homogeneity(labels)]
        for lvl, r, c in zip(part.level, part.row, part.col):
            s = 16 << int(lvl)
            # every token is one class (single patches trivially need not be)
            if lvl > 0:
                assert len(np.unique(lab[r * 16:r * 16 + s, c * 16:c * 16 + s])) == 1
        # maximality: every one-class aligned block lies inside a token at least as large
        for k, h in enumerate(homog, start=1):
            for i, j in zip(*np.nonzero(h)):
                tok = part.token_of_patch[i << k, j << k]
                assert part.level[tok] >= k
        # and blocks that are not one class are never a token
        for k, h in enumerate(homog, start=1):
            sel = part.level == k
            assert np.all(h[part.row[sel] >> k, part.col[sel] >> k])
