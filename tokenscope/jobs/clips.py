"""What a run writes for each video clip once its frames are traced: the frame table (per frame:
tokens, exits, GFLOPs, latency and the changes since the previous frame), a timeline figure, an
overlay video (frame | supertokens and merges | exits, side by side) and `clips.json`.

Everything is derived from the frames' folders and the run's tables, so a resumed run or a run
copied elsewhere gives the same outputs. The frame tables ride on the pass in which the run's
tables read every trace (`finish_run(visit=...)`), so the run reads each frame's trace once; the
videos are drawn by a separate idle-priority process that follows the run as frames are written
(`ClipVideos`).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tokenscope.analysis.stability import frame_changes, tails
from tokenscope.errors import RunFolderError
from tokenscope.jobs.runfolder import write_json_atomic, write_table
from tokenscope.render.timeline import timeline_figure
from tokenscope.render.video import partial_path
from tokenscope.trace.trace import Trace

CLIPS_JSON = "clips.json"


def idle_priority(pid: int) -> bool:
    """Put process `pid` under SCHED_IDLE (Linux); False where the system does not allow it (the
    process then keeps the lowest nice value it gives itself)."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True


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


class ClipVideos:
    """The overlay videos of a run's clips, drawn by a separate process (`python -m
    tokenscope.render.video`) that follows the run: each frame is handed over as soon as its
    folder exists, in frame order. The process reads only the frame folders, so the videos are
    derived from them as everything else is.

    On Linux the process runs under SCHED_IDLE: it gets a core only when no other task wants it,
    and a waking model thread takes the core back at once. Following a CPU run that way cost
    the model next to nothing (2 cores: 1.17 s of tracing overhead against 1.01 s for 240 frames)
    and left less to draw once the model is done (derived outputs 1.49 s against 1.78 s), where
    merely the lowest nice value slowed the model by more than it saved (2.58 s of overhead).
    Where idle scheduling is not available and the model needs every core (`cores_free`
    False: a CPU run), frames are held back until `release`."""

    def __init__(self, run_dir: Path, clips: list[Clip], cores_free: bool = True) -> None:
        self.paths = {clip.name: run_dir / f"{clip.name}_overlay.mp4" for clip in clips}
        self._held: list[str] = []
        self.fps = {clip.name: max(clip.fps / clip.every, 1.0) for clip in clips}
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # tokenscope importable without installing
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._stderr = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "tokenscope.render.video"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        self.idle = idle_priority(self._proc.pid)
        self.follow = cores_free or self.idle
        """Hand frames over as they come (else keep them until `release`)."""
        self._lines: queue.Queue[str | None] = queue.Queue()  # the pipe may fill while the process waits for CPU
        self._feeder = threading.Thread(target=self._feed, name="overlay-video-feed", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self._proc.stdin is not None
        try:
            while (line := self._lines.get()) is not None:
                self._proc.stdin.write(line)
                self._proc.stdin.flush()
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):  # the process died: finish() reports why
            pass

    def _send(self, line: str) -> None:
        if self.follow:
            self._lines.put(line)
        else:
            self._held.append(line)

    def add(self, clip: str, folder: Path) -> None:
        self._send(json.dumps({"video": str(self.paths[clip]), "fps": self.fps[clip], "frame": str(folder)}) + "\n")

    def close(self, clip: str) -> None:
        self._send(json.dumps({"close": str(self.paths[clip])}) + "\n")

    def release(self) -> None:
        """From now on frames go to the drawing process as they come, the held ones first."""
        self.follow = True
        for line in self._held:
            self._lines.put(line)
        self._held.clear()

    def finish(self) -> dict[str, int]:
        """Wait for the videos; returns the frames written per clip."""
        self.release()
        self._lines.put(None)
        self._feeder.join()
        assert self._proc.stdout is not None
        out = self._proc.stdout.read()  # the feeder closed its input; it prints once, at the end
        self._proc.wait()
        if self._proc.returncode != 0:
            self._stderr.seek(0)
            lines = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
            raise RunFolderError(f"overlay video: {lines[-1] if lines else f'drawing process exited with {self._proc.returncode}'}")
        written = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        return {clip: int(written.get(str(path), 0)) for clip, path in self.paths.items()}

    def abort(self) -> None:
        """Stop drawing and leave no video behind (its partial files included)."""
        self._lines.put(None)
        self._proc.kill()
        self._proc.wait()
        for path in self.paths.values():
            partial_path(path).unlink(missing_ok=True)


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


class ClipPass:
    """Frame tables, overlay videos, timelines and `clips.json` of a run's clips. `settle` each
    frame as its folder is written (or fails), in any order: the video follows in frame order;
    `visit` each (name, folder, trace) in run order while the run's tables read the traces; then
    `finish` with the run's per-image table (or `abort` on failure: no half-written video is kept)."""

    def __init__(self, run_dir: Path, clips: list[Clip], figures: bool, cores_free: bool = True) -> None:
        self.run_dir, self.clips, self.figures = run_dir, clips, figures
        self._where = {f.folder: (clip, k) for clip in clips for k, f in enumerate(clip.frames)}
        self._state = {clip.name: _ClipState() for clip in clips}
        self.videos = ClipVideos(run_dir, clips, cores_free) if figures and clips else None

    def model_done(self) -> None:
        """The model has traced every frame: the videos may take the cores now."""
        if self.videos is not None:
            self.videos.release()

    def settle(self, name: str, written: bool) -> None:
        """Frame `name` is done: its folder was `written` (or it failed). Hands the clip's frames
        that are done, in order, to the video."""
        hit = self._where.get(name)
        if hit is None:
            return
        clip, k = hit
        state = self._state[clip.name]
        if k < state.handed:  # already handed over
            return
        state.settled[name] = written
        while state.handed < len(clip.frames) and clip.frames[state.handed].folder in state.settled:
            folder = clip.frames[state.handed].folder
            if state.settled.pop(folder) and self.videos is not None and (self.run_dir / folder / "trace.json").is_file():
                self.videos.add(clip.name, self.run_dir / folder)  # a windowed frame has no single trace
            state.handed += 1
            if state.handed == len(clip.frames) and self.videos is not None:
                self.videos.close(clip.name)

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
        """Stop the videos without keeping them (called while another error propagates)."""
        if self.videos is not None:
            self.videos.abort()

    def finish(self, images: pd.DataFrame) -> dict[str, Any]:
        """Write every clip's outputs; returns the per-clip summary. `images`: the run's per-image
        table, whose tokens, exits, GFLOPs and latency each frame's row repeats."""
        tables, summary = [], {}
        columns = [c for c in ("tokens", "mean_tokens", "exited_early_pct", "gflops", "forward_ms") if c in images]
        numbers = images.set_index("image")[columns] if "image" in images.columns else pd.DataFrame()
        for name in self._where:  # frames of other processes (torchrun), settled by their folders
            self.settle(name, (self.run_dir / name).is_dir())
        written = self.videos.finish() if self.videos is not None else {}
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
                stats["overlay_video"] = f"{clip.name}_overlay.mp4"
                stats["overlay_frames"] = written.get(clip.name, 0)
            summary[clip.name] = stats
        if tables:
            (self.run_dir / "tables").mkdir(exist_ok=True)
            write_table(pd.concat(tables, ignore_index=True), self.run_dir / "tables" / "frames.csv")
        write_json_atomic(self.run_dir / CLIPS_JSON, {"clips": [asdict(c) for c in self.clips], "summary": summary})
        return summary
