"""Where a clip run's frames go once traced: a separate process that writes each frame's folder
and draws the clip's overlay video, so the model's process only traces.

A video run writes a small folder per frame (trace, summary, JPEG) and draws a video from the
same trace and image. Done in the model's process, the writing alone cost 1.1 s of 240 frames'
10 s on 2 CPU cores, and the video re-read every folder it drew. Here the run hands each frame
(its image and trace, already in memory) to `FrameSink`, which pickles it down a pipe to

    python -m tokenscope.jobs.frame_sink

That process writes the folder (complete or not at all, like every image folder of a run) and
draws the frame's panel from what it received, reading a folder only for frames of an earlier,
interrupted run or when more than `DRAW_BUDGET` bytes of frames wait to be drawn. On Linux it
runs under SCHED_IDLE (`idle_priority`): it takes a core only when no thread of the model wants
one, and a waking model thread takes it back at once, so it follows a CPU run for free and
finishes once the model is done; on a GPU machine it uses the cores the model leaves.

Messages are pickled dicts, each after its length (8 bytes, little-endian):

    {"op": "frame", "run_dir", "name", "image", "trace", "info", "eval", "video", "fps"}
        write the folder run_dir/name; draw it into `video` (None: not drawn now)
    {"op": "draw", "video", "fps", "folder"}   draw a frame from its folder
    {"op": "close", "video"}                   the video's last frame was sent
    {"op": "sync"}                             answer {"written": n} once every frame before is written

At the end of its input the process finishes the videos and prints {"videos": {path: frames}}.
A failure ends it with one line on standard error naming the frame or the video.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tokenscope.errors import RunFolderError
from tokenscope.jobs.runfolder import image_folder, write_json_atomic, write_rgb
from tokenscope.render.video import OverlayVideo, partial_path, read_frame
from tokenscope.trace.trace import Trace, narrowest

FEED_BUDGET = 256 << 20
"""Bytes of frames the run may have handed over and the process not yet taken: beyond it the run
waits (the process then has the cores it needs to catch up)."""
DRAW_BUDGET = 256 << 20
"""Bytes of frames the process keeps in memory until drawn; beyond it, it reads them back from
their folders when their turn comes."""


def write_frame_files(folder: Path, trace: Trace, display: np.ndarray) -> None:
    """A video frame's own files: its trace and its image (JPEG: the frame was lossy already)."""
    trace.save(folder, atomic=False)  # the frame's folder is renamed into place once complete
    write_rgb(folder / "image.jpg", display)


def write_frame_folder(run_dir: Path, name: str, display: np.ndarray, trace: Trace, info: dict[str, Any],
                       evaluation: dict[str, Any] | None) -> None:
    """The folder `run_dir/name` of one frame, complete or not at all: what `run` writes for a
    frame (see jobs/run.py, write_image_folder), from its summary `info` and its evaluation."""
    with image_folder(run_dir, name) as folder:
        write_frame_files(folder, trace, display)
        if evaluation is not None:
            write_json_atomic(folder / "eval.json", evaluation)
        write_json_atomic(folder / "summary.json", info)


def idle_priority(pid: int) -> bool:
    """Put process `pid` under SCHED_IDLE (Linux); False where the system does not allow it."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True


def _nbytes(image: np.ndarray, trace: Trace) -> int:
    return image.nbytes + sum(a.nbytes for a in vars(trace).values() if isinstance(a, np.ndarray))


# ---- the run's side ------------------------------------------------------------------------

class FrameSink:
    """The run's end of the pipe: hands frames, draws and closes over in the order given, from a
    feeder thread (the process may be slow to read while the model has the cores)."""

    def __init__(self, budget: int = FEED_BUDGET) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # tokenscope importable without installing
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._stderr = tempfile.TemporaryFile("w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "tokenscope.jobs.frame_sink"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self.idle = idle_priority(self._proc.pid)
        self.videos: set[str] = set()
        self._budget, self._waiting = budget, 0
        self._cond = threading.Condition()
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._broken = False
        self._feeder = threading.Thread(target=self._feed, name="frame-sink-feed", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self._proc.stdin is not None
        try:
            while (data := self._lines.get()) is not None:
                self._proc.stdin.write(len(data).to_bytes(8, "little"))
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
                with self._cond:
                    self._waiting -= len(data)
                    self._cond.notify_all()
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):  # the process died: sync() or finish() says why
            with self._cond:
                self._broken = True
                self._cond.notify_all()

    def _send(self, message: dict[str, Any]) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._cond:
            while self._waiting > 0 and self._waiting + len(data) > self._budget and not self._broken:
                self._cond.wait()
            if self._broken:
                raise self._failure()
            self._waiting += len(data)
        self._lines.put(data)

    def frame(self, run_dir: Path, name: str, display: np.ndarray, trace: Trace, info: dict[str, Any],
              evaluation: dict[str, Any] | None, video: Path | None = None, fps: float = 0.0) -> None:
        """Write frame `name` (and draw it into `video` now, when given)."""
        light = copy.copy(trace)  # the class map travels as it is stored (uint8 for most data sets)
        light.label_map = narrowest(trace.label_map)
        if video is not None:
            self.videos.add(str(video))
        self._send({"op": "frame", "run_dir": str(run_dir), "name": name, "image": display, "trace": light,
                    "info": info, "eval": evaluation, "video": None if video is None else str(video), "fps": fps})

    def draw(self, video: Path, fps: float, folder: Path) -> None:
        self.videos.add(str(video))
        self._send({"op": "draw", "video": str(video), "fps": fps, "folder": str(folder)})

    def close(self, video: Path) -> None:
        self._send({"op": "close", "video": str(video)})

    def sync(self) -> int:
        """Wait until every frame handed over so far is written; returns how many were."""
        self._send({"op": "sync"})
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise self._failure()
        return int(json.loads(line)["written"])

    def finish(self) -> dict[str, int]:
        """Wait for the videos; returns the frames written into each."""
        self._lines.put(None)
        self._feeder.join()
        assert self._proc.stdout is not None
        out = self._proc.stdout.read().decode()
        self._proc.wait()
        if self._proc.returncode != 0:
            raise self._failure()
        lines = out.strip().splitlines()
        return {k: int(v) for k, v in json.loads(lines[-1])["videos"].items()} if lines else {}

    def _failure(self) -> RunFolderError:
        self._proc.wait()
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
        return RunFolderError(lines[-1] if lines else f"frame writer exited with {self._proc.returncode}")

    def abort(self) -> None:
        """Stop at once and leave no video behind (partial frame folders are a resumed run's to clear)."""
        self._lines.put(None)
        self._proc.kill()
        self._proc.wait()
        for video in self.videos:
            partial_path(Path(video)).unlink(missing_ok=True)


# ---- the process's side --------------------------------------------------------------------

class _Drawer:
    """Draws frames into their videos in the order given, in a thread of its own, so frames are
    written as they arrive whatever the drawing's pace."""

    def __init__(self, budget: int = DRAW_BUDGET) -> None:
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._videos: dict[str, OverlayVideo] = {}
        self.written: dict[str, int] = {}
        self._held, self._budget = 0, budget
        self._lock = threading.Lock()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="overlay-video-draw", daemon=True)
        self._thread.start()

    def frame(self, video: str, fps: float, folder: Path, image: np.ndarray, trace: Trace) -> None:
        size = _nbytes(image, trace)
        with self._lock:
            keep = self._held + size <= self._budget
            if keep:
                self._held += size
        self._queue.put(("frame", (video, fps, folder, (image, trace, size) if keep else None)))

    def draw(self, video: str, fps: float, folder: Path) -> None:
        self._queue.put(("frame", (video, fps, folder, None)))

    def close(self, video: str) -> None:
        self._queue.put(("close", video))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is not None:
                continue  # drain: the process reports the first failure
            kind, arg = item
            try:
                if kind == "close":
                    v = self._videos.pop(arg, None)
                    self.written[arg] = v.close() if v is not None else 0
                    continue
                video, fps, folder, held = arg
                if held is not None:
                    image, trace, size = held
                    with self._lock:
                        self._held -= size
                else:
                    image, trace = read_frame(folder)
                v = self._videos.get(video)
                if v is None:
                    v = self._videos[video] = OverlayVideo(Path(video), fps)
                v.add(image, trace)
            except Exception as exc:
                self.error = f"overlay video: {type(exc).__name__}: {exc}"

    def finish(self) -> dict[str, int]:
        """Wait for every frame; videos left open (their run did not finish) are deleted."""
        self._queue.put(None)
        self._thread.join()
        for v in self._videos.values():
            v.close(complete=False)
        if self.error is not None:
            raise RuntimeError(self.error)
        return self.written


def _read_message(stream: BinaryIO) -> dict[str, Any] | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    size = int.from_bytes(head, "little")
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def serve(stream: BinaryIO, out: Any) -> dict[str, int]:
    """Follow the messages on `stream` (see the module docstring); returns frames per video."""
    drawer = _Drawer()
    written = 0
    try:
        while (msg := _read_message(stream)) is not None:
            op = msg["op"]
            if op == "frame":
                run_dir, name = Path(msg["run_dir"]), msg["name"]
                try:
                    write_frame_folder(run_dir, name, msg["image"], msg["trace"], msg["info"], msg["eval"])
                except Exception as exc:
                    raise RuntimeError(f"frame {name}: {type(exc).__name__}: {exc}") from exc
                written += 1
                if msg["video"] is not None:
                    drawer.frame(msg["video"], msg["fps"], run_dir / name, msg["image"], msg["trace"])
            elif op == "draw":
                drawer.draw(msg["video"], msg["fps"], Path(msg["folder"]))
            elif op == "close":
                drawer.close(msg["video"])
            elif op == "sync":
                print(json.dumps({"written": written}), file=out, flush=True)
            if drawer.error is not None:
                break
    finally:
        videos = drawer.finish()
    print(json.dumps({"videos": videos}), file=out, flush=True)
    return videos


def main() -> int:
    if hasattr(os, "nice"):
        os.nice(19)  # where SCHED_IDLE is not to be had, at least the lowest nice value
    try:
        serve(sys.stdin.buffer, sys.stdout)
    except Exception as exc:  # the run reports this line as its error
        print(str(exc) if isinstance(exc, RuntimeError) else f"frame writer: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
