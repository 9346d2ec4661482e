"""Segmentation metrics: confusion matrices, mIoU and the agreement between two label maps."""

from __future__ import annotations

import numpy as np

from tokenscope.data.images import IGNORE_INDEX


def confusion(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C) counts, rows = target class, columns = predicted class; ignored/out-of-range targets skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    t = target[keep].astype(np.int64)
    p = np.clip(pred[keep].astype(np.int64), 0, num_classes - 1)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN where the class appears in neither target nor prediction."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(conf: np.ndarray) -> float:
    """Mean IoU over classes present in target or prediction (accumulate `conf` over a dataset)."""
    ious = iou_per_class(conf)
    return float(np.nanmean(ious)) if np.any(~np.isnan(ious)) else float("nan")


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels where two label maps agree."""
    if a.shape != b.shape:
        raise ValueError(f"label maps {a.shape} and {b.shape} differ in shape")
    return float(np.mean(a == b))
