"""Overlays: a trace drawn over its image (pure functions: (image, trace) -> RGB image).

Each overlay is the image blended with a per-patch colour map, supertoken outlines where they
help, and a legend strip under the image so that nothing in the picture is hidden by it.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from tokenscope.render.palette import LEVEL_COLOURS, class_palette, exit_colours, level_labels
from tokenscope.trace.trace import Trace

OVERLAY_KINDS = ("merge", "exit", "confidence", "segmentation")

GROUP_BINS = (1, 2, 16, 64, 256)
"""Lower bounds of group sizes (patches) coloured like superpatch levels 0..4: a 2x2 supertoken
and an in-network group of 2-15 patches share a colour, a 4x4 supertoken and a group of 16-63
the next, so supertokens and merged groups read on one scale."""
GROUP_LABELS = ("1 patch", "2-15", "16-63", "64-255", "256+")


def group_edges(cover: np.ndarray, patch: int) -> np.ndarray:
    """(gh * patch, gw * patch) bool: pixels on a border between two different tokens of `cover`."""
    gh, gw = cover.shape
    right = np.zeros((gh, gw), dtype=bool)
    right[:, :-1] = cover[:, :-1] != cover[:, 1:]
    down = np.zeros((gh, gw), dtype=bool)
    down[:-1, :] = cover[:-1, :] != cover[1:, :]
    cell = np.zeros((gh, gw, patch, patch), dtype=bool)
    cell[:, :, :, -1] |= right[:, :, None]
    cell[:, :, -1, :] |= down[:, :, None]
    return cell.transpose(0, 2, 1, 3).reshape(gh * patch, gw * patch)


def draw_group_edges(canvas: np.ndarray, cover: np.ndarray, patch: int, colour: tuple[int, int, int]) -> None:
    """Outline in place, on a canvas of the padded size, every border between tokens of `cover`."""
    canvas[group_edges(cover, patch)] = colour


def size_class(patches: np.ndarray) -> np.ndarray:
    """Index into GROUP_BINS / LEVEL_COLOURS for groups of `patches` patches."""
    return np.clip(np.searchsorted(np.asarray(GROUP_BINS), patches, side="right") - 1, 0, len(GROUP_BINS) - 1)


def groups_overlay(image: np.ndarray, trace: Trace, block: int, alpha: float = 0.45) -> np.ndarray:
    """The tokens as block `block` begins (1-based; depth + 1 = after the encoder): each group of
    patches one token covers is filled by its size and outlined, whatever its shape; patches whose
    token already exited are greyed. Works on every trace (without merges: the policy's tokens)."""
    m = trace.meta
    block = int(np.clip(block, 1, m.depth + 1))
    cover = trace.cover_at(block)
    area = np.bincount(cover.ravel(), minlength=trace.num_tokens)
    gone = trace.per_patch(trace.token_exit_block) < block
    cls = size_class(area[cover])
    colours = np.asarray(LEVEL_COLOURS, dtype=np.uint8)[cls]
    pix = _patch_map_to_pixels(colours, trace)
    shaded = _patch_map_to_pixels((cls > 0)[..., None], trace)[..., 0]
    out = _blend(image, pix, alpha, where=shaded)
    grey = _patch_map_to_pixels(gone[..., None], trace)[..., 0]
    if grey.any():
        g = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        out[grey] = (0.35 * g[grey] + 0.65 * 235).astype(np.uint8)
    canvas = _padded_canvas(out, trace)
    draw_group_edges(canvas, np.where(gone, -1, cover), trace.patch_size, (20, 20, 20))
    live = np.unique(cover[~gone])
    counts = np.bincount(size_class(area[live]), minlength=len(GROUP_BINS))
    items = [(LEVEL_COLOURS[k], f"{GROUP_LABELS[k]}: {int(counts[k])}") for k in range(len(GROUP_BINS))]
    exited = int(np.unique(cover[gone]).size)
    stage = "after the encoder" if block > m.depth else f"entering block {block}"
    title = f"{stage}: {live.size} tokens" + (f", {exited} exited" if exited else "") + "; patches per token"
    return _with_strip(_crop(canvas, trace), legend_strip(image.shape[1], items, title))


def _patch_map_to_pixels(colours: np.ndarray, trace: Trace) -> np.ndarray:
    """(gh, gw, C) per-patch values -> (h, w, C) at the input size (nearest: each patch a block).

    OpenCV's nearest resize does it in one pass over the output (two numpy repeats cost ten
    times more at 1024 px, and every overlay of every frame of a clip pays it)."""
    h, w = trace.meta.input_hw
    patch = trace.patch_size
    gh, gw = colours.shape[:2]
    src = np.ascontiguousarray(colours.astype(np.uint8) if colours.dtype == bool else colours)
    if src.dtype == np.uint8 and src.ndim == 3 and src.shape[2] in (1, 3):
        up = cv2.resize(src, (gw * patch, gh * patch), interpolation=cv2.INTER_NEAREST_EXACT)
        up = up.reshape(gh * patch, gw * patch, src.shape[2])
        if colours.dtype == bool:
            up = up.view(bool)
    else:
        up = np.repeat(np.repeat(colours, patch, axis=0), patch, axis=1)
    return up[:h, :w]


def _blend(image: np.ndarray, colour: np.ndarray, alpha: float, where: np.ndarray | None = None) -> np.ndarray:
    """(1 - alpha) * image + alpha * colour, rounded, on the pixels `where` says (all without it);
    in uint8 by OpenCV rather than through a float copy of the whole picture."""
    mix = cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, np.ascontiguousarray(colour, dtype=np.uint8),
                          alpha, 0.0)
    if where is None:
        return mix
    out = image.copy()
    cv2.copyTo(mix, np.ascontiguousarray(where, dtype=np.uint8), out)  # a uint8 mask: 40x faster than numpy
    return out


def _outline_supertokens(img: np.ndarray, trace: Trace, min_level: int = 1, colour: Sequence[int] | None = None) -> None:
    patch = trace.patch_size
    pick = np.flatnonzero(trace.token_level >= min_level)
    colours = [tuple(int(v) for v in (colour if colour is not None else c)) for c in LEVEL_COLOURS]
    for r, c, lvl in zip(trace.token_row[pick].tolist(), trace.token_col[pick].tolist(), trace.token_level[pick].tolist()):
        s = patch << lvl
        cv2.rectangle(img, (c * patch, r * patch), (c * patch + s - 1, r * patch + s - 1), colours[lvl], 1)


def legend_strip(width: int, items: Sequence[tuple[tuple[int, int, int], str]], title: str = "") -> np.ndarray:
    """A white strip with coloured swatches and labels, wrapped over as many lines as needed."""
    font, scale, thick, line_h, sw = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1, 18, 12
    entries = ([((-1, -1, -1), title)] if title else []) + list(items)
    lines: list[list[tuple[tuple[int, int, int], str, int]]] = [[]]
    x = 6
    for colour, label in entries:
        tw = cv2.getTextSize(label, font, scale, thick)[0][0]
        need = tw + (0 if colour[0] < 0 else sw + 4) + 12
        if x + need > width and lines[-1]:
            lines.append([])
            x = 6
        lines[-1].append((colour, label, x))
        x += need
    strip = np.full((line_h * len(lines) + 6, width, 3), 255, dtype=np.uint8)
    for li, line in enumerate(lines):
        y = 4 + li * line_h
        for colour, label, x0 in line:
            tx = x0
            if colour[0] >= 0:
                cv2.rectangle(strip, (x0, y + 2), (x0 + sw, y + 2 + sw), tuple(int(v) for v in colour), -1)
                cv2.rectangle(strip, (x0, y + 2), (x0 + sw, y + 2 + sw), (60, 60, 60), 1)
                tx = x0 + sw + 4
            cv2.putText(strip, label, (tx, y + 13), font, scale, (20, 20, 20), thick, cv2.LINE_AA)
    return strip


def colourbar_strip(width: int, colormap: int, label_lo: str, label_hi: str, title: str) -> np.ndarray:
    """A horizontal colour bar under an image, for continuous quantities such as confidence."""
    strip = np.full((26, width, 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    tw = cv2.getTextSize(title, font, scale, 1)[0][0]
    cv2.putText(strip, title, (6, 17), font, scale, (20, 20, 20), 1, cv2.LINE_AA)
    x0 = 6 + tw + 8 + cv2.getTextSize(label_lo, font, scale, 1)[0][0] + 4
    x1 = width - 8 - cv2.getTextSize(label_hi, font, scale, 1)[0][0] - 4
    if x1 - x0 > 10:
        ramp = np.linspace(0, 255, x1 - x0).astype(np.uint8)[None, :]
        bar = cv2.cvtColor(cv2.applyColorMap(ramp, colormap), cv2.COLOR_BGR2RGB)
        strip[6:20, x0:x1] = np.repeat(bar, 14, axis=0)
        cv2.putText(strip, label_lo, (6 + tw + 8, 17), font, scale, (20, 20, 20), 1, cv2.LINE_AA)
        cv2.putText(strip, label_hi, (x1 + 4, 17), font, scale, (20, 20, 20), 1, cv2.LINE_AA)
    return strip


def default_group_blocks(trace: Trace, limit: int = 4) -> list[int]:
    """Blocks worth a groups picture: just after merging blocks (spread out when there are many)
    and after the encoder; for a trace without merges only the policy's tokens (block 1)."""
    depth = trace.meta.depth
    if not trace.has_merges:
        return [1]
    after = sorted({min(k + 1, depth + 1) for k in trace.meta.merge_blocks})
    if len(after) > limit - 1:
        pick = np.linspace(0, len(after) - 1, limit - 1).round().astype(int)
        after = [after[i] for i in sorted(set(pick.tolist()))]
    return sorted(set(after) | {depth + 1})


def merge_overlay(image: np.ndarray, trace: Trace, alpha: float = 0.4) -> np.ndarray:
    """Supertokens filled and outlined by level; single patches left as they are. With
    in-network merging, the groups the encoder ended with (any shape, outlined)."""
    if trace.has_merges:
        return groups_overlay(image, trace, trace.meta.depth + 1)
    levels = trace.per_patch(trace.token_level).astype(np.int64)
    colours = np.asarray(LEVEL_COLOURS, dtype=np.uint8)[levels]
    pix = _patch_map_to_pixels(colours, trace)
    merged = _patch_map_to_pixels(levels[..., None] > 0, trace)[..., 0]
    out = _blend(image, pix, alpha, where=merged)
    canvas = _padded_canvas(out, trace)
    _outline_supertokens(canvas, trace)
    counts = np.bincount(trace.token_level.astype(np.int64), minlength=5)
    names = level_labels(trace.patch_size)
    items = [(LEVEL_COLOURS[k], f"{names[k]}: {int(counts[k])}") for k in range(5)]
    title = f"{trace.num_tokens} tokens / {trace.num_patches} patches ({trace.reduction:.2f}x)"
    return _with_strip(_crop(canvas, trace), legend_strip(image.shape[1], items, title))


def exit_overlay(image: np.ndarray, trace: Trace, alpha: float = 0.5) -> np.ndarray:
    """Each patch coloured by where its token left: at a gate, or at the end of the encoder."""
    points = [*trace.meta.exit_after, trace.meta.depth]
    cols = np.asarray(exit_colours(trace.meta.exit_after), dtype=np.uint8)
    index = np.searchsorted(np.asarray(points), trace.token_exit_block)
    pix = _patch_map_to_pixels(cols[trace.per_patch(index)], trace)
    canvas = _padded_canvas(_blend(image, pix, alpha), trace)
    if trace.has_merges:
        draw_group_edges(canvas, trace.cover_at(trace.meta.depth + 1), trace.patch_size, (255, 255, 255))
    else:
        _outline_supertokens(canvas, trace, colour=(255, 255, 255))
    items = []
    for i, k in enumerate(points):
        n = int(np.sum(trace.survivors & (trace.token_exit_block == k)))
        name = f"after block {k}" if i < len(points) - 1 else f"end (block {k})"
        items.append((tuple(int(v) for v in cols[i]), f"{name}: {n}"))
    return _with_strip(_crop(canvas, trace), legend_strip(image.shape[1], items, "tokens exiting"))


def confidence_overlay(image: np.ndarray, trace: Trace, alpha: float = 0.55) -> np.ndarray:
    """Top-1 probability of each patch's final prediction (its gate's, if it exited)."""
    conf = np.clip(trace.per_patch(trace.token_confidence), 0, 1)
    lut = cv2.applyColorMap((conf * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    pix = _patch_map_to_pixels(cv2.cvtColor(lut, cv2.COLOR_BGR2RGB), trace)
    out = _blend(image, pix, alpha)
    strip = colourbar_strip(image.shape[1], cv2.COLORMAP_VIRIDIS, "0", "1",
                            f"confidence (exit threshold {trace.meta.exit_threshold:g})")
    return _with_strip(out, strip)


def segmentation_overlay(image: np.ndarray, trace: Trace, alpha: float = 0.5) -> np.ndarray:
    """Predicted classes; the legend lists the most frequent ones."""
    m = trace.meta
    return render_label_map(image, trace.label_map, m.class_colours, m.class_names, m.num_classes, alpha)


def render_label_map(image: np.ndarray, label_map: np.ndarray, colours: Sequence[tuple[int, int, int]] = (),
                     names: Sequence[str] = (), num_classes: int = 0, alpha: float = 0.5) -> np.ndarray:
    """A label map over its image (the same size), with a legend of the most frequent classes.

    Used for traces and for predictions that have no single trace (stitched sliding windows).
    """
    pal = class_palette(max(num_classes, len(colours)), tuple(colours))
    pix = pal[np.clip(label_map, 0, len(pal) - 1)]
    out = _blend(image, pix, alpha)
    ids, counts = np.unique(label_map, return_counts=True)
    top = ids[np.argsort(-counts)][:8]
    items = [(tuple(int(v) for v in pal[c]), names[c] if 0 <= c < len(names) else f"class_{c}") for c in top]
    return _with_strip(out, legend_strip(image.shape[1], items, "predicted"))


def _padded_canvas(img: np.ndarray, trace: Trace) -> np.ndarray:
    """`img` on white at the padded size, to draw outlines on; `img` itself (callers hand over
    a picture of their own) when it needs no padding, the usual case, saving two copies."""
    ph, pw = trace.meta.padded_hw
    if img.shape[:2] == (ph, pw) and img.flags.c_contiguous:
        return img
    canvas = np.full((ph, pw, 3), 255, dtype=np.uint8)
    canvas[: img.shape[0], : img.shape[1]] = img
    return canvas


def _crop(canvas: np.ndarray, trace: Trace) -> np.ndarray:
    h, w = trace.meta.input_hw
    return canvas if canvas.shape[:2] == (h, w) else np.ascontiguousarray(canvas[:h, :w])


def _with_strip(img: np.ndarray, strip: np.ndarray) -> np.ndarray:
    return np.concatenate([img, strip], axis=0)


def render_overlay(kind: str, image: np.ndarray, trace: Trace) -> np.ndarray:
    """Dispatch by name: merge | exit | confidence | segmentation."""
    fn = {"merge": merge_overlay, "exit": exit_overlay, "confidence": confidence_overlay,
          "segmentation": segmentation_overlay}.get(kind)
    if fn is None:
        raise ValueError(f"unknown overlay kind {kind!r}")
    if image.shape[:2] != tuple(trace.meta.input_hw):
        raise ValueError(f"image is {image.shape[:2]}, trace expects {tuple(trace.meta.input_hw)}")
    return fn(image, trace)
