"""Bootstrap intervals of mIoU against a plain reference computation on small confusion sets."""

from __future__ import annotations

import numpy as np
import pytest

from tokenscope.analysis.metrics import mean_iou
from tokenscope.analysis.uncertainty import (class_counts, draws, miou_change_interval, miou_interval,
                                             miou_of_counts)


def _confusions(n: int, c: int, seed: int, noise: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        present = rng.random(c) < 0.7  # not every class in every image
        diag = rng.integers(20, 200, c) * present
        off = (rng.random((c, c)) < noise) * rng.integers(0, 40, (c, c))
        np.fill_diagonal(off, 0)
        out.append(np.diag(diag) + off * present[:, None])
    return out


def _reference(confs: list[np.ndarray], resamples: int, seed: int, other: list[np.ndarray] | None = None) -> np.ndarray:
    """The textbook bootstrap: for each draw of images, sum their confusion matrices, take mIoU."""
    values = []
    for idx in draws(len(confs), resamples, seed):
        v = mean_iou(sum(confs[i] for i in idx))
        if other is not None:
            v -= mean_iou(sum(other[i] for i in idx))
        values.append(v)
    return np.array(values)


def test_pooled_miou_of_counts_equals_mean_iou_of_the_summed_confusion() -> None:
    confs = _confusions(7, 5, seed=1, noise=0.3)
    assert miou_of_counts(np.sum([class_counts(c) for c in confs], 0)) == pytest.approx(mean_iou(sum(confs)))


def test_interval_equals_the_reference_bootstrap_on_the_same_draws() -> None:
    confs = _confusions(12, 4, seed=2, noise=0.4)
    got = miou_interval([class_counts(c) for c in confs], resamples=300, seed=7)
    ref = _reference(confs, 300, 7)
    assert got.value == pytest.approx(mean_iou(sum(confs)))
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    assert got.images == 12 and got.seed == 7 and got.resamples == 300
    assert got.low <= got.value <= got.high


def test_paired_change_interval_equals_the_reference_and_is_tighter_than_unpaired() -> None:
    base = _confusions(15, 4, seed=3, noise=0.3)
    rng = np.random.default_rng(9)
    variant = []
    for c in base:  # the same images, a little worse: some correct pixels moved off the diagonal
        v = c.copy()
        for k in range(4):
            moved = int(v[k, k] * rng.uniform(0.0, 0.1))
            v[k, k] -= moved
            v[k, (k + 1) % 4] += moved
        variant.append(v)
    got = miou_change_interval([class_counts(c) for c in variant], [class_counts(c) for c in base], 400, seed=5)
    ref = _reference(variant, 400, 5, other=base)
    assert (got.low, got.high) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    assert got.value < 0 and got.high < 0  # a real drop on every image is seen as one
    lone_v, lone_b = miou_interval([class_counts(c) for c in variant]), miou_interval([class_counts(c) for c in base])
    assert got.high - got.low < (lone_v.high - lone_v.low) + (lone_b.high - lone_b.low)


def test_more_images_give_a_narrower_interval_and_one_image_none_at_all() -> None:
    """One image has no spread over images to resample: its interval is undefined, not zero-width."""
    few = miou_interval([class_counts(c) for c in _confusions(6, 4, seed=4, noise=0.5)])
    many = miou_interval([class_counts(c) for c in _confusions(200, 4, seed=4, noise=0.5)])
    assert many.high - many.low < few.high - few.low
    one = miou_interval([class_counts(_confusions(1, 4, seed=4, noise=0.5)[0])])
    assert np.isnan(one.low) and np.isnan(one.high) and one.images == 1 and np.isfinite(one.value)
    with pytest.raises(ValueError, match="same images"):
        miou_change_interval([class_counts(np.eye(3, dtype=int))] * 2, [class_counts(np.eye(3, dtype=int))])
    assert np.isnan(miou_interval([]).low) and miou_interval([]).images == 0
