"""What a run writes for each video clip once its frames are traced: the frame table (per frame:
tokens, exits, GFLOPs, latency and the changes since the previous frame), a timeline figure, an
overlay video (frame | supertokens and merges | exits, side by side) and `clips.json`, in one
pass over the frames.

Everything is derived from the frames' folders and the run's tables, so a resumed run or a run
copied elsewhere gives the same outputs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from tokenscope.analysis.stability import frame_changes, tails
from tokenscope.jobs.runfolder import read_rgb, write_json_atomic, write_table
from tokenscope.render.overlays import render_overlay
from tokenscope.render.timeline import timeline_figure
from tokenscope.trace.trace import Trace

CLIPS_JSON = "clips.json"


@dataclass
class ClipFrame:
    index: int
    time_s: float
    folder: str


@dataclass
class Clip:
    name: str
    path: str
    fps: float
    every: int
    frames: list[ClipFrame] = field(default_factory=list)


def side_by_side(pictures: list[np.ndarray]) -> np.ndarray:
    """Pictures next to each other, shorter ones padded white below (overlays carry a legend),
    with even sides as video codecs want."""
    h = max(p.shape[0] for p in pictures)
    h += h % 2
    padded = [np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in pictures]
    row = np.hstack(padded)
    return row if row.shape[1] % 2 == 0 else np.pad(row, ((0, 0), (0, 1), (0, 0)), constant_values=255)


class OverlayVideo:
    """frame | supertokens and merges | exits, side by side, one frame at a time; written to a
    partial name and renamed when closed with at least one frame."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps, self.frames = path, fps, 0
        self._partial = path.with_name(f".{path.stem}.partial{path.suffix}")
        self._writer: cv2.VideoWriter | None = None

    def add(self, folder: Path, trace: Trace) -> None:
        image = read_rgb(folder / "image.png")
        panel = side_by_side([image, render_overlay("merge", image, trace), render_overlay("exit", image, trace)])
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self._partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                           (panel.shape[1], panel.shape[0]))
        self._writer.write(cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self, complete: bool = True) -> int:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if complete and self.frames:
            os.replace(self._partial, self.path)
        elif self._partial.exists():
            self._partial.unlink()
        return self.frames


def frames_table(run_dir: Path, clip: Clip, images: pd.DataFrame, video: OverlayVideo | None = None) -> pd.DataFrame:
    """One row per traced frame, in order; the changes are against the previous traced frame.
    With `video`, each traced frame is also added to it (one pass, each trace loaded once)."""
    rows: list[dict[str, Any]] = []
    prev: Trace | None = None
    by_name = images.set_index("image") if "image" in images.columns else pd.DataFrame()
    for f in clip.frames:
        folder = run_dir / f.folder
        if not (folder / "trace.json").exists():
            prev = None  # a frame that failed breaks the chain of comparisons
            continue
        trace = Trace.load(folder)
        if video is not None:
            video.add(folder, trace)
        row: dict[str, Any] = {"clip": clip.name, "frame": f.index, "time_s": f.time_s, "image": f.folder}
        if f.folder in by_name.index:
            r = by_name.loc[f.folder]
            for column in ("tokens", "mean_tokens", "exited_early_pct", "gflops", "forward_ms"):
                if column in r:
                    row[column] = float(r[column])
        row.update(frame_changes(prev, trace) if prev is not None else
                   {"level_change": np.nan, "exit_change": np.nan, "class_change": np.nan})
        rows.append(row)
        prev = trace
    return pd.DataFrame(rows)


def clip_outputs(run_dir: Path, clips: list[Clip], images: pd.DataFrame, figures: bool) -> dict[str, Any]:
    """Tables, figures, overlay videos and `clips.json` of every clip; returns the per-clip summary."""
    tables, summary = [], {}
    for clip in clips:
        video = OverlayVideo(run_dir / f"{clip.name}_overlay.mp4", max(clip.fps / clip.every, 1.0)) if figures else None
        try:
            table = frames_table(run_dir, clip, images, video)
        except BaseException:
            if video is not None:
                video.close(complete=False)  # no half-written video is left under the final name
            raise
        written = video.close() if video is not None else 0
        if table.empty:
            continue
        tables.append(table)
        stats: dict[str, Any] = {"path": clip.path, "fps": clip.fps, "every": clip.every, "frames": len(table)}
        for column in ("level_change", "exit_change", "class_change"):
            v = table[column].dropna()
            stats[column] = {"mean": float(v.mean()) if len(v) else 0.0, "max": float(v.max()) if len(v) else 0.0}
        stats["tails"] = tails(table)
        if figures:
            (run_dir / "figures").mkdir(exist_ok=True)
            timeline_figure(table, run_dir / "figures" / f"timeline_{clip.name}.png", f"{clip.name}: frame by frame")
            stats["overlay_video"] = f"{clip.name}_overlay.mp4"
            stats["overlay_frames"] = written
        summary[clip.name] = stats
    if tables:
        (run_dir / "tables").mkdir(exist_ok=True)
        write_table(pd.concat(tables, ignore_index=True), run_dir / "tables" / "frames.csv")
    write_json_atomic(run_dir / CLIPS_JSON, {"clips": [asdict(c) for c in clips], "summary": summary})
    return summary
