"""An animated GIF of one image's tokens leaving the encoder, block by block.

Frame b shows the tokens that enter block b+1 outlined in their superpatch colour, and the tokens
that already left greyed out under the colour of the gate they left at. GIF (via Pillow, which
matplotlib already needs) rather than MP4, because no video encoder can be assumed installed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from tokenscope.render.overlays import legend_strip
from tokenscope.render.palette import LEVEL_COLOURS, exit_colours
from tokenscope.trace.trace import Trace

MAX_WIDTH = 512


def exit_frames(image: np.ndarray, trace: Trace) -> list[np.ndarray]:
    """One RGB frame per stage: before block 1, then after each block."""
    m = trace.meta
    h, w = m.input_hw
    ph, pw = m.padded_hw
    base = np.full((ph, pw, 3), 255, np.uint8)
    base[:h, :w] = image
    grey = cv2.cvtColor(cv2.cvtColor(base, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB).astype(np.float32) * 0.5 + 127
    cols = exit_colours(m.exit_after)
    point_index = {k: i for i, k in enumerate(m.exit_after)}
    frames = []
    patch = trace.patch_size
    for b in range(m.depth + 1):
        frame = base.copy()
        gone = trace.token_exit_block <= b
        alive = ~gone
        for i in np.nonzero(gone)[0]:
            r, c, s = int(trace.token_row[i]) * patch, int(trace.token_col[i]) * patch, patch << int(trace.token_level[i])
            tint = np.asarray(cols[point_index.get(int(trace.token_exit_block[i]), len(cols) - 1)], np.float32)
            frame[r:r + s, c:c + s] = (0.45 * grey[r:r + s, c:c + s] + 0.55 * tint).astype(np.uint8)
        for i in np.nonzero(alive & (trace.token_level > 0))[0]:
            r, c, s = int(trace.token_row[i]) * patch, int(trace.token_col[i]) * patch, patch << int(trace.token_level[i])
            cv2.rectangle(frame, (c, r), (c + s - 1, r + s - 1), LEVEL_COLOURS[int(trace.token_level[i])], 1)
        frame = frame[:h, :w]
        stage = "merged, entering block 1" if b == 0 else f"after block {b}"
        caption = f"{stage}: {int(alive.sum())} tokens in, {int(gone.sum())} exited"
        items = [(cols[j], f"left at gate {k}") for j, k in enumerate(m.exit_after)]
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
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".gif", delete=False) as f:
        pil[0].save(f, format="GIF", save_all=True, append_images=pil[1:], duration=durations, loop=0)
    os.chmod(f.name, 0o644)
    os.replace(f.name, target)
