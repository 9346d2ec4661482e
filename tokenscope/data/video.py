"""Frames are images: a video file as a source of frames with their index and time.

`tokenscope run clip.mp4` traces the frames a `FrameSelection` picks (every N-th, between a start
and an end given in seconds `12.5s` or frames `300`, at most M), each like an image: its own folder,
trace and resume. Decoding is OpenCV's and sequential: a `FrameReader` reads forward to the frame
asked for, so a run that takes frames in order decodes the clip once. A video that cannot be
opened, or that ends before its header says (truncated or damaged), is one `ImageError` naming the
file and the last frame read; the frames before it keep their outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tokenscope.errors import ConfigError, ImageError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float
    frames: int
    """Frame count from the file's header (what the file claims to hold)."""
    width: int
    height: int


@dataclass(frozen=True)
class FrameSelection:
    """Which frames of a clip a run takes."""

    every: int = 1
    start: str | None = None
    """`12.5s` (seconds) or `300` (a frame index); None = the first frame."""
    end: str | None = None
    """Exclusive, same forms; None = the last frame."""
    max_frames: int | None = None

    def check(self) -> None:
        if self.every < 1:
            raise ConfigError(f"--every must be >= 1, got {self.every}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ConfigError(f"--max-frames must be >= 1, got {self.max_frames}")

    def indices(self, info: VideoInfo) -> list[int]:
        self.check()
        first = 0 if self.start is None else position(self.start, info.fps, "--start")
        stop = info.frames if self.end is None else min(info.frames, position(self.end, info.fps, "--end"))
        picked = list(range(first, stop, self.every))
        return picked if self.max_frames is None else picked[: self.max_frames]


def frame_number(path: Path) -> tuple[int, str]:
    """Sort key of a numbered frame file: the last number in its name, then the name."""
    digits = re.findall(r"\d+", Path(path).stem)
    return (int(digits[-1]) if digits else -1, Path(path).name)


def position(text: str, fps: float, flag: str) -> int:
    """A frame index from `300` (frames) or `12.5s` (seconds, at the clip's frame rate)."""
    t = str(text).strip().lower()
    try:
        value = round(float(t[:-1]) * fps) if t.endswith("s") else int(t)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give frames (300) or seconds (12.5s)") from None
    if value < 0:
        raise ConfigError(f"{flag} {text!r} is before the start of the clip")
    return value


def probe(path: str | Path) -> VideoInfo:
    """Frame rate, frame count and size from the file's header; one line when it cannot be read."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ImageError(f"{path}: cannot be read as a video (missing, damaged, or a codec OpenCV lacks)")
        fps = float(cap.get(cv2.CAP_PROP_FPS)) or 25.0
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()
    if frames <= 0 or w <= 0 or h <= 0:
        raise ImageError(f"{path}: the video holds no readable frames")
    return VideoInfo(str(path), fps, frames, w, h)


class FrameReader:
    """Reads frames of one clip in increasing order (reopening only to go back)."""

    def __init__(self, info: VideoInfo) -> None:
        self.info = info
        self._cap: cv2.VideoCapture | None = None
        self._next = 0
        self.last_read = -1
        """The last frame that decoded; -1 before any."""

    def frame(self, index: int) -> np.ndarray:
        """Frame `index` as float32 RGB in [0, 1] (H, W, 3)."""
        if self._cap is None or index < self._next:
            if self._cap is not None:
                self._cap.release()
            self._cap = cv2.VideoCapture(self.info.path)
            self._next = 0
        while True:
            ok, bgr = self._cap.read()
            if not ok or bgr is None:
                raise ImageError(f"{self.info.path}: unreadable from frame {self._next} on (truncated or damaged; the "
                                 f"last frame read is {self.last_read}, of {self.info.frames} its header claims)")
            self.last_read = max(self.last_read, self._next)
            self._next += 1
            if self._next - 1 == index:
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
