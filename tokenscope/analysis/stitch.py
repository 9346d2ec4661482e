"""Stitching sliding windows back into one prediction, as Segmenter and mmsegmentation do.

Each window's patch logits are upsampled (bilinear) to the window's pixels; the logits of all
windows are summed on a canvas of the resized image and divided by how many windows cover each
pixel; the averaged logits are resized (bilinear) to the original image and the arg-max is the
label map.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tokenscope.data.windows import WindowPlan


def stitch_logits(window_logits: Sequence[torch.Tensor], plan: WindowPlan, patch: int) -> torch.Tensor:
    """Averaged logits (C, H, W) at the resized size from per-window patch logits (C, gh, gw), or
    per-pixel scores at each window's padded size (a mask head's)."""
    c = int(window_logits[0].shape[0])
    h, w = plan.resized_hw
    canvas = torch.zeros((c, h, w), dtype=torch.float32)
    count = torch.zeros((1, h, w), dtype=torch.float32)
    for logits, (y, x, wh, ww) in zip(window_logits, plan.boxes, strict=True):
        target = (-(-wh // patch) * patch, -(-ww // patch) * patch)  # the window's padded pixels
        up = logits[None].float().cpu()
        if tuple(up.shape[-2:]) != target:  # patch logits; per-pixel scores are already there
            up = F.interpolate(up, size=target, mode="bilinear", align_corners=False)
        up = up[0, :, :wh, :ww]
        canvas[:, y:y + wh, x:x + ww] += up
        count[:, y:y + wh, x:x + ww] += 1
    if bool((count == 0).any()):
        raise AssertionError("the windows leave pixels uncovered")
    return canvas / count


def stitched_label_map(window_logits: Sequence[torch.Tensor], plan: WindowPlan, patch: int,
                       class_chunk: int = 32) -> np.ndarray:
    """int32 label map (H0, W0) at the original size: averaged logits resized, then arg-max.

    Classes are resized in chunks with a running max, so 150 classes of a large image do not
    need one full-size float buffer per class at once.
    """
    logits = stitch_logits(window_logits, plan, patch)
    best_val: torch.Tensor | None = None
    best_idx: torch.Tensor | None = None
    for c0 in range(0, logits.shape[0], class_chunk):
        part = logits[c0:c0 + class_chunk]
        if tuple(part.shape[-2:]) != tuple(plan.original_hw):
            part = F.interpolate(part[None], size=plan.original_hw, mode="bilinear", align_corners=False)[0]
        val, idx = part.max(dim=0)
        idx = idx + c0
        if best_val is None or best_idx is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val, best_idx = torch.where(better, val, best_val), torch.where(better, idx, best_idx)
    assert best_idx is not None
    return best_idx.numpy().astype(np.int32)
