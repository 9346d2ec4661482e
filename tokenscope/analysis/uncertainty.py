"""How sure an mIoU is: percentile bootstrap over images, paired for the change between two variants.

mIoU is not a mean over images (it pools pixels per class over the whole data set), so its
interval is found by resampling whole images with replacement and recomputing the pooled mIoU.
Each image is kept as three counts per class (intersection, target pixels, predicted pixels):
everything IoU needs, so a resample is one matrix product instead of C x C confusions summed.
A change (a method against the unreduced model on the same images) is resampled *paired*: the
same image draw for both, so the interval reflects the images both saw, not two independent
noises. The draws come from `numpy.random.default_rng(seed)`; the seed, the number of
resamples and of images travel with every interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95
SEED = 0


def class_counts(conf: np.ndarray) -> np.ndarray:
    """(3, C) int64: per class the intersection, the target pixels and the predicted pixels of one
    image's confusion matrix (rows target, columns prediction)."""
    conf = np.asarray(conf, dtype=np.int64)
    return np.stack([np.diag(conf), conf.sum(1), conf.sum(0)])


def miou_of_counts(counts: np.ndarray) -> np.ndarray:
    """mIoU (0..1) of pooled counts (..., 3, C): the mean over classes present in target or
    prediction, exactly as `metrics.mean_iou` of the summed confusion matrix."""
    tp, target, pred = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    union = target + pred - tp
    present = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / np.where(present, union, 1), 0.0)
    n = present.sum(-1)
    return np.where(n > 0, iou.sum(-1) / np.maximum(n, 1), np.nan)


@dataclass(frozen=True)
class Interval:
    """An estimate (on the full set of images) with its bootstrap interval, all as fractions (0..1);
    fewer than two images have no interval (low and high are NaN)."""

    value: float
    low: float
    high: float
    images: int
    level: float = LEVEL
    resamples: int = RESAMPLES
    seed: int = SEED

    def as_dict(self) -> dict[str, float | int | None]:
        """For JSON: an undefined bound (fewer than two images) is null, not NaN."""
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def _finite(v: object) -> bool:
    try:
        return np.isfinite(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def points(value: object, signed: bool = False) -> str:
    """A fraction as mIoU points (`46.21`, `+0.52`); "n/a" when undefined (no class was present)."""
    if not _finite(value):
        return "n/a"
    return f"{100 * float(value):{'+' if signed else ''}.2f}"  # type: ignore[arg-type]


def bounds_text(interval: dict[str, object] | None, signed: bool = False) -> str:
    """` [45.10, 47.30]` from an interval's dict (`as_dict`, or a row with low/high), "" when it has
    none (fewer than two images): the one way every command, table and report writes an interval."""
    if not interval or not _finite(interval.get("low")) or not _finite(interval.get("high")):
        return ""
    return f" [{points(interval['low'], signed)}, {points(interval['high'], signed)}]"


def draws(images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, images) image indices drawn with replacement: the one source of randomness, so a
    reference computation with the same seed sees the same resamples."""
    return np.random.default_rng(seed).integers(0, images, size=(resamples, images))


def _weights(images: int, resamples: int, seed: int) -> np.ndarray:
    idx = draws(images, resamples, seed)
    offsets = (np.arange(resamples) * images)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=resamples * images).reshape(resamples, images)


def _boot(per_image: np.ndarray, weights: np.ndarray) -> np.ndarray:
    n, three, c = per_image.shape
    pooled = weights.astype(np.float64) @ per_image.reshape(n, three * c).astype(np.float64)
    return miou_of_counts(pooled.reshape(-1, three, c))


def _interval(value: float, samples: np.ndarray, images: int, level: float, resamples: int, seed: int) -> Interval:
    alpha = (1.0 - level) / 2.0
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Interval(value, float("nan"), float("nan"), images, level, resamples, seed)
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return Interval(float(value), float(low), float(high), images, level, resamples, seed)


def _stack(per_image: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    arr = np.asarray(per_image, dtype=np.int64)
    if arr.size == 0 and arr.ndim < 3:  # no images at all
        return np.zeros((0, 3, 0), np.int64)
    if arr.ndim != 3 or arr.shape[1] != 3:
        raise ValueError(f"per-image class counts must be (images, 3, classes), got {arr.shape}")
    return arr


def miou_interval(per_image: Sequence[np.ndarray] | np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                  seed: int = SEED) -> Interval:
    """mIoU over the images with its percentile bootstrap interval (`per_image`: (N, 3, C) counts)."""
    arr = _stack(per_image)
    value = float(miou_of_counts(arr.sum(0)))
    if len(arr) < 2:  # one image says nothing about the spread over images
        return Interval(value, float("nan"), float("nan"), len(arr), level, resamples, seed)
    return _interval(value, _boot(arr, _weights(len(arr), resamples, seed)), len(arr), level, resamples, seed)


def miou_change_interval(variant: Sequence[np.ndarray] | np.ndarray, reference: Sequence[np.ndarray] | np.ndarray,
                         resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """mIoU(variant) - mIoU(reference) on the same images, with a paired bootstrap interval."""
    a, b = _stack(variant), _stack(reference)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a paired interval needs the same images: {a.shape[0]} against {b.shape[0]}")
    value = float(miou_of_counts(a.sum(0)) - miou_of_counts(b.sum(0)))
    if len(a) < 2:
        return Interval(value, float("nan"), float("nan"), len(a), level, resamples, seed)
    w = _weights(len(a), resamples, seed)
    return _interval(value, _boot(a, w) - _boot(b, w), len(a), level, resamples, seed)


def ratio_intervals(hits: np.ndarray, totals: np.ndarray, resamples: int = RESAMPLES, level: float = LEVEL,
                    seed: int = SEED) -> list[Interval]:
    """Pooled ratios sum(hits) / sum(totals) of many groups at once (`hits`, `totals`: (images, groups)),
    each with its percentile bootstrap interval over images (the same draws for every group, as for mIoU).
    A group no image has is NaN; fewer than two images give no interval."""
    hits = np.asarray(hits, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.float64)
    n = hits.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = hits.sum(0) / totals.sum(0)
        if n < 2:
            return [Interval(float(v), float("nan"), float("nan"), n, level, resamples, seed) for v in values]
        w = _weights(n, resamples, seed).astype(np.float64)
        samples = (w @ hits) / (w @ totals)  # (resamples, groups)
    return [_interval(float(v), samples[:, g], n, level, resamples, seed) for g, v in enumerate(values)]
