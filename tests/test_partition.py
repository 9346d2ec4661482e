"""The quadtree partition: pure decision rules and the accounting invariant."""

from __future__ import annotations

import numpy as np
import torch

from tokenscope.models.partition import (
    block_homogeneity,
    grid_partition,
    level_shape,
    partition_from_merges,
    quadtree_partition,
)


def _check_partition(p) -> None:
    """Every patch in exactly one aligned square token, tokens in raster order."""
    gh, gw = p.grid
    counts = np.zeros((gh, gw), dtype=int)
    for i, (lvl, r, c) in enumerate(zip(p.level, p.row, p.col)):
        s = 1 << int(lvl)
        assert r % s == 0 and c % s == 0
        assert np.all(p.token_of_patch[r:r + s, c:c + s] == i)
        counts[r:r + s, c:c + s] += 1
    assert np.all(counts == 1)
    keys = p.row.astype(np.int64) * gw + p.col
    assert np.all(np.diff(keys) > 0)


def test_grid_partition_numbers_patches_like_a_plain_vit() -> None:
    p = grid_partition((3, 5))
    assert p.num_tokens == 15
    assert np.array_equal(p.token_of_patch, np.arange(15).reshape(3, 5))
    _check_partition(p)


def test_random_scores_give_valid_partitions_for_odd_grids() -> None:
    rng = np.random.default_rng(0)
    for grid in [(1, 1), (3, 7), (17, 9), (32, 32), (40, 21)]:
        for _ in range(5):
            scores = [rng.random(level_shape(grid, k)) for k in range(1, 5)]
            p = quadtree_partition(scores, rng.random(4), grid)
            _check_partition(p)
            assert int(p.patches_per_token.sum()) == grid[0] * grid[1]


def test_larger_block_wins_over_its_children() -> None:
    grid = (16, 16)
    merged = [np.ones(level_shape(grid, k), bool) for k in range(1, 5)]
    p = partition_from_merges(grid, merged)
    assert p.num_tokens == 1 and p.level[0] == 4


def test_failed_parent_lets_children_merge() -> None:
    grid = (4, 4)
    scores = [np.ones((2, 2)), np.zeros((1, 1)), np.zeros((0, 0)), np.zeros((0, 0))]
    p = quadtree_partition(scores, [0.5] * 4, grid)
    assert p.num_tokens == 4 and set(p.level.tolist()) == {1}


def test_blocks_that_do_not_fit_never_merge() -> None:
    grid = (3, 3)  # only one 2x2 block fits; the last row/column stay single patches
    scores = [np.ones(level_shape(grid, k)) for k in range(1, 5)]
    p = quadtree_partition(scores, [0.5] * 4, grid)
    assert p.tokens_per_level().tolist() == [5, 1, 0, 0, 0]
    _check_partition(p)


def test_threshold_above_one_disables_a_level() -> None:
    grid = (8, 8)
    scores = [np.ones(level_shape(grid, k)) for k in range(1, 5)]
    p = quadtree_partition(scores, [0.5, 0.5, 2.0, 2.0], grid)
    assert p.tokens_per_level().tolist() == [0, 0, 4, 0, 0]


def test_block_homogeneity_counts_ignore_as_a_class() -> None:
    lab = torch.zeros(1, 64, 64, dtype=torch.long)
    lab[0, :32, :32] = 255  # one all-ignore 2x2 block
    lab[0, 40, 40] = 3  # one pixel spoils one 2x2 block and its ancestors
    h1, h2 = block_homogeneity(lab, levels=2)
    assert h1.shape == (1, 2, 2) and h2.shape == (1, 1, 1)
    assert h1[0].tolist() == [[True, True], [True, False]]
    assert h2[0].tolist() == [[False]]
