"""What a run writes for each video clip once its frames are traced: the frame table (per frame:
tokens, exits, GFLOPs, latency and the changes since the previous frame), a timeline figure, an
overlay video (frame | supertokens and merges | exits, side by side) and `clips.json`.

Everything is derived from the frames' folders and the run's tables, so a resumed run or a run
copied elsewhere gives the same outputs. The frame tables ride on the pass in which the run's
tables read every trace (`finish_run(visit=...)`), so the run reads each frame's trace once; the
frames' folders and the videos are written by a separate idle-priority process that follows the
run (`FrameSink`, jobs/frame_sink.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokenscope.analysis.stability import frame_changes, tails
from tokenscope.jobs.frame_sink import FrameSink
from tokenscope.jobs.runfolder import write_json_atomic, write_table
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


@dataclass
class _ClipState:
    rows: list[dict[str, Any]] = field(default_factory=list)
    prev: Trace | None = None
    position: int = -2
    """Where `prev` stands in the clip's selected frames (a gap means a frame failed)."""
    settled: dict[str, bool] = field(default_factory=dict)
    """Frames whose fate is known (True: its folder exists), not yet handed to the video."""
    handed: int = 0
    """Frames handed to the video (or skipped), in order."""
    closed: bool = False


class ClipPass:
    """Frame tables, overlay videos, timelines and `clips.json` of a run's clips.

    Frames reach their folders one of two ways: handed over with `write` (image and trace in
    memory) to the frame sink, which writes the folder and draws the frame into its video; or
    written by the run itself and then `settle`d (also for a frame that failed, or one written by
    an earlier run or another process). Either may come in any order; the videos get their
    frames in frame order. Then `visit` each (name, folder, trace) in run order while the run's
    tables read the traces, and `finish` with the run's per-image table (or `abort` on failure:
    no half-written video is kept).

    The sink takes frames as they come where it runs at idle priority or the model leaves cores
    free (`cores_free`: not a CPU run); otherwise (`writes` False) the run writes its frames, and
    the videos are drawn from their folders once the model is done (`model_done`)."""

    def __init__(self, run_dir: Path, clips: list[Clip], figures: bool, cores_free: bool = True) -> None:
        self.run_dir, self.clips, self.figures = run_dir, clips, figures
        self._where = {f.folder: (clip, k) for clip in clips for k, f in enumerate(clip.frames)}
        self._state = {clip.name: _ClipState() for clip in clips}
        self.sink = FrameSink(videos=figures) if clips else None
        self.writes = self.sink is not None and (self.sink.idle or cores_free)
        """Whether the run should hand its frames over with `write`."""
        self._draws: list[tuple[Path, float, Path] | Path] = []
        """Video work held back until `model_done` (when the sink would compete with the model)."""
        self._in_sink: set[str] = set()
        self._must_sync = False
        self.videos = {clip.name: run_dir / f"{clip.name}_overlay.mp4" for clip in clips}
        self.fps = {clip.name: max(clip.fps / clip.every, 1.0) for clip in clips}

    def write(self, name: str, display: np.ndarray, trace: Trace, info: dict[str, Any],
              evaluation: dict[str, Any] | None, held: bool = True) -> None:
        """Hand frame `name` to the sink, which writes its folder (and draws it, when its turn has
        come). `held`: the run keeps the trace for its tables; if not, they read it from the
        folder, which `model_done` then waits for."""
        assert self.sink is not None and self.writes
        self._must_sync |= not held
        clip, k = self._where[name]
        state = self._state[clip.name]
        draw_now = self.figures and k == state.handed
        self.sink.frame(self.run_dir, name, display, trace, info, evaluation,
                        self.videos[clip.name] if draw_now else None, self.fps[clip.name])
        self._in_sink.add(name)
        if draw_now:
            state.handed += 1  # drawn from what the sink was handed
        else:
            state.settled[name] = True  # drawn from its folder when its turn comes
        self._advance(clip)

    def settle(self, name: str, written: bool) -> None:
        """Frame `name` is done: its folder was `written` (or it failed). Hands the clip's frames
        that are done, in order, to the video."""
        hit = self._where.get(name)
        if hit is None:
            return
        clip, k = hit
        state = self._state[clip.name]
        if k < state.handed or name in self._in_sink:  # already handed over
            return
        state.settled[name] = written
        self._advance(clip)

    def _advance(self, clip: Clip) -> None:
        state = self._state[clip.name]
        while state.handed < len(clip.frames) and clip.frames[state.handed].folder in state.settled:
            folder = clip.frames[state.handed].folder
            if state.settled.pop(folder) and self.figures and (
                    folder in self._in_sink or (self.run_dir / folder / "trace.json").is_file()):
                self._video(self.videos[clip.name], self.fps[clip.name], self.run_dir / folder)
            state.handed += 1
        if state.handed == len(clip.frames) and self.figures and not state.closed:
            state.closed = True
            self._video(self.videos[clip.name])

    def _video(self, video: Path, fps: float = 0.0, folder: Path | None = None) -> None:
        """Draw `folder` into `video` (None: close the video), now or once the model is done."""
        assert self.sink is not None
        if not self.writes:
            self._draws.append(video if folder is None else (video, fps, folder))
        elif folder is None:
            self.sink.close(video)
        else:
            self.sink.draw(video, fps, folder)

    def model_done(self) -> None:
        """The model has traced every frame: held-back drawing may take the cores now. Frames
        handed over are written while the run builds its tables from the traces it holds (all
        of them written before `finish` returns); a frame the run did not hold is waited for here,
        since the tables read it from its folder."""
        if self.sink is None:
            return
        self.writes = True
        for job in self._draws:
            if isinstance(job, Path):
                self.sink.close(job)
            else:
                self.sink.draw(*job)
        self._draws.clear()
        if self._must_sync:
            self.sink.sync()
            self._must_sync = False

    def visit(self, name: str, folder: Path, trace: Trace) -> None:
        hit = self._where.get(name)
        if hit is None:  # an image, or a window of a frame: not a frame's own trace
            return
        clip, k = hit
        state, frame = self._state[clip.name], clip.frames[k]
        prev = state.prev if state.position == k - 1 else None  # a frame that failed breaks the chain
        row: dict[str, Any] = {"clip": clip.name, "frame": frame.index, "time_s": frame.time_s, "image": frame.folder}
        row.update(frame_changes(prev, trace) if prev is not None else
                   {"level_change": np.nan, "exit_change": np.nan, "class_change": np.nan})
        state.rows.append(row)
        state.prev, state.position = trace, k

    def abort(self) -> None:
        """Stop the sink without keeping its videos (called while another error propagates)."""
        if self.sink is not None:
            self.sink.abort()

    def finish(self, images: pd.DataFrame) -> dict[str, Any]:
        """Write every clip's outputs; returns the per-clip summary. `images`: the run's per-image
        table, whose tokens, exits, GFLOPs and latency each frame's row repeats."""
        tables, summary = [], {}
        columns = [c for c in ("tokens", "mean_tokens", "exited_early_pct", "gflops", "forward_ms") if c in images]
        numbers = images.set_index("image")[columns] if "image" in images.columns else pd.DataFrame()
        for name in self._where:  # frames of other processes (torchrun), settled by their folders
            self.settle(name, (self.run_dir / name).is_dir())
        self.model_done()  # held-back drawing, if the run never said so (a resumed run with nothing to trace)
        for clip in self.clips:
            state = self._state[clip.name]
            if not state.rows:
                continue
            table = pd.DataFrame(state.rows)
            if len(numbers.columns):
                table = table.join(numbers, on="image")
            table = table[[c for c in ["clip", "frame", "time_s", "image", *columns, "level_change", "exit_change",
                                       "class_change"] if c in table.columns]]
            tables.append(table)
            stats: dict[str, Any] = {"path": clip.path, "fps": clip.fps, "every": clip.every, "frames": len(table)}
            for column in ("level_change", "exit_change", "class_change"):
                v = table[column].dropna()
                stats[column] = {"mean": float(v.mean()) if len(v) else 0.0, "max": float(v.max()) if len(v) else 0.0}
            stats["tails"] = tails(table)
            if self.figures:
                (self.run_dir / "figures").mkdir(exist_ok=True)
                timeline_figure(table, self.run_dir / "figures" / f"timeline_{clip.name}.png", f"{clip.name}: frame by frame")
            summary[clip.name] = stats
        written = self.sink.finish() if self.sink is not None else {}  # the timelines were drawn meanwhile
        if self.figures:
            for clip in self.clips:
                if clip.name in summary:
                    summary[clip.name]["overlay_video"] = self.videos[clip.name].name
                    summary[clip.name]["overlay_frames"] = written.get(str(self.videos[clip.name]), 0)
        if tables:
            (self.run_dir / "tables").mkdir(exist_ok=True)
            write_table(pd.concat(tables, ignore_index=True), self.run_dir / "tables" / "frames.csv")
        write_json_atomic(self.run_dir / CLIPS_JSON, {"clips": [asdict(c) for c in self.clips], "summary": summary})
        return summary
