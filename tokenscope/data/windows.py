"""Segmenter's (and EoMT's) sliding-window protocol: where the windows of an image go. Pure functions.

The image's short side is resized to the model's training size (`resize_short`), then square
windows of the training size are cut with a stride; the last window of each row and column is
anchored at the far edge so every pixel is covered. Each window is one forward pass with its own
trace; the per-pixel logits of the windows are averaged where they overlap (`analysis/stitch.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tokenscope.data.images import PreparedImage, prepare_image
from tokenscope.errors import ConfigError


def window_anchors(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one side: every `stride`, plus one flush with the far edge.

    A side no longer than the window has a single window at 0 (it is then shorter than `window`).
    """
    if length <= window:
        return [0]
    starts = [a for a in range(0, length, stride) if a < length - window]
    return starts + [length - window]


EVEN = -1
"""A stride that spreads the windows evenly instead (EoMT's protocol): ceil(length / window)
windows per side, their overlaps equal, the first at 0 and the last flush with the far edge."""


def even_anchors(length: int, window: int) -> list[int]:
    """EoMT's window starts along one side: as few windows as cover it, overlapping equally."""
    if length <= window:
        return [0]
    n = -(-length // window)
    overlap = n * window - length
    step = window - (overlap / (n - 1) if overlap > 0 else 0)
    return [int(j * step) for j in range(n)]


def short_side_hw(hw: tuple[int, int], short: int) -> tuple[int, int]:
    """Size after resizing so that the short side is `short` (aspect kept)."""
    h, w = hw
    scale = short / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one image lie, in the resized image."""

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    window: int
    stride: int
    boxes: tuple[tuple[int, int, int, int], ...]
    """(top, left, height, width) of every window, row-major."""

    def to_json(self) -> dict[str, object]:
        return {"original_hw": list(self.original_hw), "resized_hw": list(self.resized_hw), "window": self.window,
                "stride": self.stride, "boxes": [list(b) for b in self.boxes]}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> "WindowPlan":
        return cls(tuple(d["original_hw"]), tuple(d["resized_hw"]), int(d["window"]), int(d["stride"]),  # type: ignore[arg-type]
                   tuple(tuple(int(v) for v in b) for b in d["boxes"]))  # type: ignore[union-attr, attr-defined]


@dataclass(frozen=True)
class WindowSpec:
    """Sliding-window settings of a run: window side, stride, short side to resize to (0 = none)."""

    window: int
    stride: int
    resize_short: int


def resolve_windows(model_window: int, model_stride: int, model_short: int, window: int | None, stride: int | None,
                    size: int | None, patch: int = 16) -> WindowSpec | None:
    """The window settings of a run from the options (None = the model's) and the model's defaults.

    `--window 0` (or a model without a window) means one forward over the whole image. A window
    and `--size` exclude each other: the protocol resizes the short side itself. A window narrower
    than two patches would hold single patches only (nothing to merge, one token per forward).
    """
    side = model_window if window is None else window
    if side < 0:
        raise ConfigError(f"--window must be 0 (whole image) or a positive number of pixels, got {side}")
    if 0 < side < 2 * patch:
        raise ConfigError(f"--window {side} is smaller than two {patch}-px patches; use at least {2 * patch} "
                          "(or 0 for whole images)")
    if side == 0:
        if stride is not None:
            raise ConfigError("--stride applies to sliding windows; this run has none (pass --window N)")
        return None
    if size is not None:
        raise ConfigError("--size and sliding windows exclude each other (the protocol resizes the short side "
                          f"to {model_short or side} px); pass --window 0 to run whole images at --size")
    step = stride if stride is not None else (model_stride if window is None and model_stride else max(1, side - 32))
    if not (1 <= step <= side or (step == EVEN and stride is None)):
        raise ConfigError(f"--stride must be between 1 and the window ({side}), got {step}")
    short = model_short if (window is None and model_short) else side
    return WindowSpec(side, step, short)


def plan_windows(original_hw: tuple[int, int], window: int, stride: int, resize_short: int | None) -> WindowPlan:
    """The windows of an image of `original_hw` (resize_short None or 0 = do not resize)."""
    if window < 1 or (stride < 1 and stride != EVEN):
        raise ConfigError(f"--window and --stride must be positive, got {window} and {stride}")
    if stride > window:
        raise ConfigError(f"--stride {stride} is larger than --window {window}: some pixels would get no window")
    resized = short_side_hw(original_hw, resize_short) if resize_short else original_hw
    h, w = resized
    anchors = (lambda n: even_anchors(n, window)) if stride == EVEN else (lambda n: window_anchors(n, window, stride))
    boxes = tuple((y, x, min(window, h), min(window, w)) for y in anchors(h) for x in anchors(w))
    return WindowPlan(original_hw, resized, window, stride, boxes)


def cut_windows(rgb: np.ndarray, labels: np.ndarray | None, plan: WindowPlan, source: str,
                patch: int) -> list[PreparedImage]:
    """The windows of `rgb` (float RGB (H, W, 3) at the original size) as prepared model inputs.

    The image is resized once (bilinear; labels nearest, so patches still know their class);
    each window is then padded to a multiple of the patch like any other input.
    """
    if rgb.shape[:2] != plan.original_hw:
        raise ValueError(f"image is {rgb.shape[:2]}, the plan was made for {plan.original_hw}")
    h, w = plan.resized_hw
    if (h, w) != plan.original_hw:
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        if labels is not None:
            labels = cv2.resize(labels.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    out = []
    for k, (y, x, wh, ww) in enumerate(plan.boxes):
        crop_labels = None if labels is None else labels[y:y + wh, x:x + ww]
        out.append(prepare_image(np.ascontiguousarray(rgb[y:y + wh, x:x + ww]), f"{source}#w{k:02d}",
                                 labels=crop_labels, patch=patch))
    return out
