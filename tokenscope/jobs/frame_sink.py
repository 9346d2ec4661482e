"""Where a clip run's frames go once traced: two separate processes, one that writes each
frame's folder and one that draws the clip's overlay video, so the model's process only traces.

A video run writes a small folder per frame (trace, summary, JPEG) and draws a video from the
same trace and image. Done in the model's process, the writing alone cost 1.1 s of 240 frames'
10 s on 2 CPU cores, and the video re-read every folder it drew. Here the run hands each frame
(its image and trace, already in memory) to `FrameSink`, which pickles it once and sends it down
the pipes of

    python -m tokenscope.jobs.frame_sink write     # writes the folders
    python -m tokenscope.jobs.frame_sink draw      # draws the videos

The writer makes each folder complete or not at all, like every image folder of a run; the
drawer draws each frame's panel from what it received, reading a folder only for frames of an
earlier, interrupted run or frames whose turn came later. Two processes rather than one with
threads: a CPU run leaves them nothing until the model is done (its threads keep every core),
and then one process with three threads was held back by Python's lock (1.5 s for 240 frames
with two free cores, where writing, drawing and encoding take 1.9 s of CPU in all).

On Linux both run under SCHED_IDLE (`idle_priority`): they take a core only when no thread of
the model wants one, and a waking model thread takes it back at once; on a GPU machine they use
the cores the model leaves.

Messages are dicts pickled with their arrays out of band (`encode`, `decode`: the lengths, the
pickle, then each array's bytes, so neither side copies a frame into or out of a pickle):

    {"op": "frame", "run_dir", "name", "image", "trace", "info", "eval", "video", "fps"}
        writer: write the folder run_dir/name; drawer: draw the frame into `video`
    {"op": "draw", "video", "fps", "folder"}   drawer: draw a frame from its folder
    {"op": "close", "video"}                   drawer: the video's last frame was sent
    {"op": "sync"}                             writer: answer {"written": n} once every frame before is written

At the end of its input the writer prints {"written": n} and the drawer {"videos": {path: frames}}.
A failure ends a process with one line on standard error naming the frame or the video.
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

try:
    import fcntl
except ImportError:  # not on Windows
    fcntl = None  # type: ignore[assignment]

import numpy as np

from tokenscope.errors import RunFolderError
from tokenscope.jobs.runfolder import image_folder, write_json_atomic, write_rgb
from tokenscope.render.video import OverlayVideo, partial_path, read_frame
from tokenscope.trace.trace import Trace, narrowest

SWITCH_INTERVAL = 2e-4
"""Seconds a thread holding Python's lock keeps it while another waits (Python's default: 5 ms).
The video encoder lets go of the lock for each frame and needs it back to return; at the
default it waited behind the drawing thread so long that drawing and encoding 240 frames took
1.11 s where each alone took 0.72 s (0.80 s at 0.2 ms)."""

FEED_BUDGET = 256 << 20
"""Bytes of frames the run may have handed to one process and it not yet taken: beyond it the
run waits (the processes then have the cores they need to catch up)."""


def write_frame_files(folder: Path, trace: Trace, display: np.ndarray) -> None:
    """A video frame's own files: its trace and its image (JPEG: the frame was lossy already)."""
    trace.save(folder, atomic=False)  # the frame's folder is renamed into place once complete
    write_rgb(folder / "image.jpg", display)


def write_frame_folder(run_dir: Path, name: str, display: np.ndarray, trace: Trace, info: dict[str, Any],
                       evaluation: dict[str, Any] | None) -> None:
    """The folder `run_dir/name` of one frame, complete or not at all, from its summary `info` and
    its evaluation: written here by the sink, or by the run itself when it keeps its frames
    (jobs/run.py, write_image_folder), so both write the same folder."""
    with image_folder(run_dir, name) as folder:
        write_frame_files(folder, trace, display)
        if evaluation is not None:
            write_json_atomic(folder / "eval.json", evaluation)
        write_json_atomic(folder / "summary.json", info)


Message = list[bytes | memoryview]
"""One message as written to a pipe: lengths, the pickle, then the arrays' bytes."""


def encode(obj: dict[str, Any]) -> Message:
    """`obj` pickled with its arrays out of band: the arrays' bytes go down the pipe straight from
    the arrays (no copy into the pickle in the run, none out of it in the process). The run does
    not change an image or trace it handed over."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = b"".join(len(r).to_bytes(8, "little") for r in raws)
    return [len(head).to_bytes(8, "little") + len(raws).to_bytes(8, "little") + sizes, head, *raws]


def _read_exactly(stream: BinaryIO, size: int) -> bytearray | None:
    out = bytearray(size)
    view, got = memoryview(out), 0
    while got < size:
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            return None
        got += n
    return out


def decode(stream: BinaryIO) -> dict[str, Any] | None:
    """The next message on `stream` (None at its end); arrays come back writable, over the bytes read."""
    fixed = _read_exactly(stream, 16)
    if fixed is None:
        return None
    head_size, count = int.from_bytes(fixed[:8], "little"), int.from_bytes(fixed[8:], "little")
    sizes = _read_exactly(stream, 8 * count) if count else bytearray()
    head = _read_exactly(stream, head_size)
    if sizes is None or head is None:
        return None
    buffers = []
    for k in range(count):
        raw = _read_exactly(stream, int.from_bytes(sizes[8 * k:8 * k + 8], "little"))
        if raw is None:
            return None
        buffers.append(raw)
    return pickle.loads(head, buffers=buffers)


def idle_priority(pid: int) -> bool:
    """Put process `pid` under SCHED_IDLE (Linux); False where the system does not allow it."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True


# ---- the run's side ------------------------------------------------------------------------

def _widen_pipe(stream: Any) -> None:
    """A 1 MiB pipe (Linux; 64 KiB by default) where allowed: a frame then crosses in one or two
    turns instead of sixteen (240 frames of 512 px: 0.27 s against 0.64 s in one measurement)."""
    size_flag = getattr(fcntl, "F_SETPIPE_SZ", None) if fcntl is not None else None
    if size_flag is None or stream is None:
        return
    try:
        fcntl.fcntl(stream.fileno(), size_flag, 1 << 20)
    except OSError:
        pass  # above the system's limit for this user: the default pipe works, in more turns


def _size(message: Message) -> int:
    return sum(len(part) if isinstance(part, bytes) else part.nbytes for part in message)


class _Child:
    """One process of the sink, its pipe, and the thread that feeds the pipe (the process may be
    slow to read while the model has the cores)."""

    def __init__(self, role: str, budget: int) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # tokenscope importable without installing
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        self._stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "tokenscope.jobs.frame_sink", role], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self.idle = idle_priority(self.proc.pid)
        _widen_pipe(self.proc.stdin)
        self._budget, self._waiting = budget, 0
        self._cond = threading.Condition()
        self._queue: queue.Queue[Message | None] = queue.Queue()
        self._broken = False
        self._feeder = threading.Thread(target=self._feed, name=f"frame-sink-{role}", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self.proc.stdin is not None
        try:
            while (message := self._queue.get()) is not None:
                for part in message:
                    self.proc.stdin.write(part)
                self.proc.stdin.flush()
                with self._cond:
                    self._waiting -= _size(message)
                    self._cond.notify_all()
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):  # the process died: the next send, sync or finish says why
            with self._cond:
                self._broken = True
                self._cond.notify_all()

    def send(self, message: Message) -> None:
        size = _size(message)
        with self._cond:
            while self._waiting > 0 and self._waiting + size > self._budget and not self._broken:
                self._cond.wait()
            if self._broken:
                raise self.failure()
            self._waiting += size
        self._queue.put(message)

    def answer(self) -> dict[str, Any]:
        """The process's next line of JSON (it answers a sync, or ends its input)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise self.failure()
        return json.loads(line)

    def finish(self) -> dict[str, Any]:
        self._queue.put(None)
        self._feeder.join()
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().decode().strip().splitlines()
        self.proc.wait()
        if self.proc.returncode != 0 or not out:
            raise self.failure()
        return json.loads(out[-1])

    def failure(self) -> RunFolderError:
        self.proc.wait()
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
        return RunFolderError(lines[-1] if lines else f"frame sink exited with {self.proc.returncode}")

    def kill(self) -> None:
        self._queue.put(None)
        self.proc.kill()
        self.proc.wait()


class FrameSink:
    """The run's side: hands frames, draws and closes over in the order given; the writer gets
    every frame, the drawer (started only when `videos`) the frames it draws."""

    def __init__(self, videos: bool = True, budget: int = FEED_BUDGET) -> None:
        self._writer = _Child("write", budget)
        self._drawer = _Child("draw", budget) if videos else None
        self.idle = self._writer.idle and (self._drawer is None or self._drawer.idle)
        """Whether both processes run at idle priority."""
        self.videos: set[str] = set()
        self._unwritten: set[str] = set()
        """Frames handed over since the last sync (their folders may not be there yet)."""

    def frame(self, run_dir: Path, name: str, display: np.ndarray, trace: Trace, info: dict[str, Any],
              evaluation: dict[str, Any] | None, video: Path | None = None, fps: float = 0.0) -> None:
        """Write frame `name` (and draw it into `video` now, when given)."""
        light = copy.copy(trace)  # the class map travels as it is stored (uint8 for most data sets)
        light.label_map = narrowest(trace.label_map)
        data = encode({"op": "frame", "run_dir": str(run_dir), "name": name, "image": display, "trace": light,
                       "info": info, "eval": evaluation, "video": None if video is None else str(video), "fps": fps})
        self._writer.send(data)
        self._unwritten.add(str(Path(run_dir) / name))
        if video is not None:
            self._to_drawer().send(data)
            self.videos.add(str(video))

    def draw(self, video: Path, fps: float, folder: Path) -> None:
        """Draw the frame in `folder` into `video` (waiting for the writer if it has the folder still to write)."""
        if str(folder) in self._unwritten:
            self.sync()
        self.videos.add(str(video))
        self._to_drawer().send(encode({"op": "draw", "video": str(video), "fps": fps, "folder": str(folder)}))

    def close(self, video: Path) -> None:
        self._to_drawer().send(encode({"op": "close", "video": str(video)}))

    def _to_drawer(self) -> _Child:
        if self._drawer is None:
            raise ValueError("this frame sink was started without videos")
        return self._drawer

    def sync(self) -> int:
        """Wait until every frame handed over so far is written; returns how many were."""
        self._writer.send(encode({"op": "sync"}))
        self._unwritten.clear()
        return int(self._writer.answer()["written"])

    def finish(self) -> dict[str, int]:
        """Wait for the folders and the videos; returns the frames drawn into each video."""
        try:
            self._writer.finish()
        except RunFolderError:
            if self._drawer is not None:
                self._drawer.kill()
                self._remove_partials()
            raise
        if self._drawer is None:
            return {}
        return {k: int(v) for k, v in self._drawer.finish()["videos"].items()}

    def abort(self) -> None:
        """Stop at once and leave no video behind (partial frame folders are a resumed run's to clear)."""
        for child in (self._writer, self._drawer):
            if child is not None:
                child.kill()
        self._remove_partials()

    def _remove_partials(self) -> None:
        for video in self.videos:
            partial_path(Path(video)).unlink(missing_ok=True)


# ---- the processes' side ------------------------------------------------------------------

def serve_writer(stream: BinaryIO, out: Any) -> int:
    """Write the folders of the frames on `stream`; returns how many."""
    written = 0
    while (msg := decode(stream)) is not None:
        if msg["op"] == "frame":
            try:
                write_frame_folder(Path(msg["run_dir"]), msg["name"], msg["image"], msg["trace"], msg["info"], msg["eval"])
            except Exception as exc:
                raise RuntimeError(f"frame {msg['name']}: {type(exc).__name__}: {exc}") from exc
            written += 1
        elif msg["op"] == "sync":
            print(json.dumps({"written": written}), file=out, flush=True)
    print(json.dumps({"written": written}), file=out, flush=True)
    return written


def serve_drawer(stream: BinaryIO, out: Any) -> dict[str, int]:
    """Draw the frames on `stream` into their videos; returns frames per video. A video left open
    when the input ends is deleted: its run did not finish."""
    videos: dict[str, OverlayVideo] = {}
    drawn: dict[str, int] = {}
    try:
        while (msg := decode(stream)) is not None:
            op = msg["op"]
            try:
                if op == "close":
                    v = videos.pop(msg["video"], None)
                    drawn[msg["video"]] = v.close() if v is not None else 0
                    continue
                if op == "frame":
                    image, trace = msg["image"], msg["trace"]
                elif op == "draw":
                    image, trace = read_frame(Path(msg["folder"]))
                else:
                    continue
                v = videos.get(msg["video"])
                if v is None:
                    v = videos[msg["video"]] = OverlayVideo(Path(msg["video"]), float(msg["fps"]))
                v.add(image, trace)
            except Exception as exc:
                raise RuntimeError(f"overlay video: {type(exc).__name__}: {exc}") from exc
    finally:
        for v in videos.values():
            v.close(complete=False)
    print(json.dumps({"videos": drawn}), file=out, flush=True)
    return drawn


def main() -> int:
    sys.setswitchinterval(SWITCH_INTERVAL)
    if hasattr(os, "nice"):
        os.nice(19)  # where SCHED_IDLE is not to be had, at least the lowest nice value
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    serve = {"write": serve_writer, "draw": serve_drawer}.get(role)
    if serve is None:
        print(f"frame sink: unknown role {role!r} (write or draw)", file=sys.stderr)
        return 2
    try:
        serve(sys.stdin.buffer, sys.stdout)
    except Exception as exc:  # the run reports this line as its error
        print(str(exc) if isinstance(exc, RuntimeError) else f"frame sink: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
