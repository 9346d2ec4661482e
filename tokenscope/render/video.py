"""Overlay videos of clips: frame | supertokens and merges | exits, side by side, one row per frame.

`OverlayVideo` writes one clip from traces and images in memory; `read_frame` gives a traced
frame's image and trace from its folder. A run draws its videos in the process that writes its
frames (jobs/frame_sink.py); this module never imports torch.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import cv2
import numpy as np

from tokenscope.render.overlays import render_overlay
from tokenscope.trace.trace import Trace, image_beside


def side_by_side(pictures: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Pictures next to each other on white, top-aligned (overlays carry a legend below), with
    even sides as video codecs want; drawn into `out` when it has the right shape. Only the
    margins are painted white."""
    h = max(p.shape[0] for p in pictures)
    w = sum(p.shape[1] for p in pictures)
    shape = (h + h % 2, w + w % 2, 3)
    row = out if out is not None and out.shape == shape and out.dtype == np.uint8 else np.empty(shape, np.uint8)
    x = 0
    for p in pictures:
        row[: p.shape[0], x:x + p.shape[1]] = p
        row[p.shape[0]:, x:x + p.shape[1]] = 255
        x += p.shape[1]
    row[:, x:] = 255
    return row


def overlay_panel(image: np.ndarray, trace: Trace, out: np.ndarray | None = None) -> np.ndarray:
    """One video frame: the frame, its supertokens and merges, its exits (into `out` if it fits)."""
    return side_by_side([image, render_overlay("merge", image, trace), render_overlay("exit", image, trace)], out)


def partial_path(path: Path) -> Path:
    """Where a video is written until it is complete (hidden, beside its final name)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


class OverlayVideo:
    """An mp4 (MPEG-4 part 2, which every OpenCV build writes) filled one frame at a time; written
    to a hidden partial name and renamed when closed with at least one frame.

    Encoding runs in a thread of its own, a few frames behind the drawing: OpenCV lets go of
    Python's lock while it encodes, so the next frame is drawn meanwhile. Panels are drawn into
    buffers used over and over (one to draw in, a ring of `backlog` + 2 handed to the encoder):
    a fresh panel a frame cost more in page faults than drawing it."""

    def __init__(self, path: Path, fps: float, backlog: int = 4) -> None:
        self.path, self.fps, self.frames = path, fps, 0
        self.partial = partial_path(path)
        self._writer: cv2.VideoWriter | None = None
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=backlog)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._drawn: np.ndarray | None = None
        self._ring: list[np.ndarray] = []

    def add(self, image: np.ndarray, trace: Trace) -> None:
        if self._error is not None:
            raise self._error
        self._drawn = overlay_panel(image, trace, self._drawn)
        if not self._ring or self._ring[0].shape != self._drawn.shape:
            # at most `backlog` panels wait in the queue and one is being encoded: the next slot is free
            self._ring = [np.empty_like(self._drawn) for _ in range(self._queue.maxsize + 2)]
        panel = cv2.cvtColor(self._drawn, cv2.COLOR_RGB2BGR, dst=self._ring[self.frames % len(self._ring)])
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                           (panel.shape[1], panel.shape[0]))
            if not self._writer.isOpened():
                raise OSError(f"{self.path}: OpenCV cannot write mp4v video here")
            self._thread = threading.Thread(target=self._encode, args=(self._writer,), daemon=True)
            self._thread.start()
        self._queue.put(panel)
        self.frames += 1

    def _encode(self, writer: cv2.VideoWriter) -> None:
        while (panel := self._queue.get()) is not None:
            if self._error is None:
                try:
                    writer.write(panel)
                except BaseException as exc:  # raised by the next add() or by close()
                    self._error = exc

    def close(self, complete: bool = True) -> int:
        """Finish the file (renamed into place when `complete` and not empty); returns its frames."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        error, self._error = self._error, None
        if complete and error is None and self.frames:
            os.replace(self.partial, self.path)
        elif self.partial.exists():
            self.partial.unlink()
        if error is not None and complete:
            raise error
        return self.frames


def read_frame(folder: Path) -> tuple[np.ndarray, Trace]:
    """A traced frame's image (RGB) and trace, from its folder."""
    path = image_beside(folder)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"{path}: missing or unreadable")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), Trace.load(folder)
