"""An animated GIF of one image's tokens leaving the encoder, block by block.

Frame b shows the tokens that enter block b+1 outlined (supertokens and groups merged inside the
encoder alike), and the patches whose token already left greyed out under its gate's colour. GIF (via Pillow, which
matplotlib already needs) rather than MP4, because no video encoder can be assumed installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tokenscope.render.overlays import draw_group_edges, legend_strip, size_class
from tokenscope.render.palette import LEVEL_COLOURS, exit_colours
from tokenscope.storage import atomic_write
from tokenscope.trace.trace import Trace

MAX_WIDTH = 512


def exit_frames(image: np.ndarray, trace: Trace) -> list[np.ndarray]:
    """One RGB frame per stage: entering block 1, then after each block.

    Live tokens are outlined (any shape: supertokens and in-network merged groups alike) and
    tinted by how many patches they cover; patches whose token left are greyed under the colour
    of the gate it left at.
    """
    m = trace.meta
    h, w = m.input_hw
    ph, pw = m.padded_hw
    patch = trace.patch_size
    base = np.full((ph, pw, 3), 255, np.uint8)
    base[:h, :w] = image
    grey = cv2.cvtColor(cv2.cvtColor(base, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB).astype(np.float32) * 0.5 + 127
    cols = np.asarray(exit_colours(m.exit_after), np.float32)
    points = np.asarray([*m.exit_after, m.depth])
    exit_of_patch = trace.per_patch(trace.token_exit_block)
    tint_index = np.searchsorted(points, exit_of_patch)
    levels = np.asarray(LEVEL_COLOURS, np.float32)

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, patch, axis=0), patch, axis=1)

    frames = []
    for b in range(m.depth + 1):
        cover = trace.cover_at(b + 1)
        gone = exit_of_patch <= b
        area = np.bincount(cover.ravel(), minlength=trace.num_tokens)[cover]
        frame = base.astype(np.float32)
        gone_px = up(gone)
        frame[gone_px] = (0.45 * grey + 0.55 * up(cols[tint_index]))[gone_px]
        big = up(~gone & (area > 1))
        frame[big] = (0.75 * frame + 0.25 * up(levels[size_class(area)]))[big]
        frame = frame.astype(np.uint8)
        draw_group_edges(frame, np.where(gone, -1, cover), patch, (25, 25, 25))
        frame = frame[:h, :w]
        live = int(np.unique(cover[~gone]).size)
        exited = int(np.unique(cover[gone]).size)
        merged = int(np.sum((trace.token_merged_at > 0) & (trace.token_merged_at <= b))) if trace.has_merges else 0
        stage = "entering block 1" if b == 0 else f"after block {b}"
        caption = f"{stage}: {live} tokens live, {exited} exited" + (f", {merged} merged away" if merged else "")
        items = [(tuple(int(v) for v in cols[j]), f"left at gate {k}") for j, k in enumerate(m.exit_after)]
        frames.append(np.concatenate([frame, legend_strip(w, items, caption)], axis=0))
    return frames


def shared_palette_frames(frames: list[np.ndarray]) -> list[Image.Image]:
    """Palette images of the frames, all quantised to one palette made once from a sample of them.

    Pillow would otherwise compute an adaptive palette per frame (about 60 ms each at 512 px: 90%
    of a run's rendering time); one fast-octree palette for the whole animation is ~30x cheaper,
    the file about half the size, and colours stay stable from frame to frame.
    """
    sample = np.concatenate(frames[:: max(1, len(frames) // 4)], axis=0)
    palette = Image.fromarray(sample).quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    return [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]


def write_exit_animation(path: str | os.PathLike[str], image: np.ndarray, trace: Trace, ms_per_frame: int = 450) -> None:
    """Write the GIF atomically; frames wider than MAX_WIDTH are shrunk to keep the file small."""
    frames = exit_frames(image, trace)
    h, w = frames[0].shape[:2]
    if w > MAX_WIDTH:
        size = (MAX_WIDTH, int(round(h * MAX_WIDTH / w)))
        frames = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
    pil = shared_palette_frames(frames)
    durations = [ms_per_frame] * (len(pil) - 1) + [ms_per_frame * 4]
    target = Path(path)
    atomic_write(target, lambda f: pil[0].save(f, format="GIF", save_all=True, append_images=pil[1:],
                                               duration=durations, loop=0), mode="wb", file_mode=0o644)
