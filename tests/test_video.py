"""Video clips as input: one trace per frame, frame-to-frame stability, an overlay video, tails."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from test_cli import invoke

from tokenscope.data.synthetic import synthetic_scene
from tokenscope.data.video import FrameSelection, VideoInfo
from tokenscope.errors import ConfigError


def _frames(seed: int, n: int, pan: int = 8, size: int = 128) -> list[np.ndarray]:
    scene = synthetic_scene(seed, size, size + pan * n)
    rgb = (np.clip(scene.image, 0, 1) * 255).round().astype(np.uint8)
    return [np.ascontiguousarray(rgb[:, pan * k:pan * k + size]) for k in range(n)]


def write_clip(path: Path, frames: list[np.ndarray], fps: float = 10.0) -> Path:
    """Motion-JPEG AVI: every frame decodes on its own, so a cut file keeps its first frames."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def _run(clip: Path, out: Path, *flags: str) -> tuple[object, Path]:
    r = invoke("run", clip, "--device", "cpu", "--no-animation", "--out", out, *flags)
    runs = sorted(out.glob("run-*"))
    return r, runs[-1] if runs else out


def test_a_clip_is_traced_frame_by_frame_with_an_overlay_video_and_tails(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "pan.avi", _frames(3, 8))
    r, run = _run(clip, tmp_path / "out")
    assert r.exit_code == 0, r.output
    folders = sorted(p.name for p in run.iterdir() if (p / "trace.json").is_file())
    assert folders == [f"pan-f{k:06d}" for k in range(8)]
    frames = pd.read_csv(run / "tables" / "frames.csv")
    assert frames["frame"].tolist() == list(range(8)) and np.allclose(frames["time_s"], np.arange(8) / 10.0)
    assert np.isnan(frames["level_change"].iloc[0]) and (frames["class_change"].iloc[1:] >= 0).all()
    video = cv2.VideoCapture(str(run / "pan_overlay.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 8
    assert int(video.get(cv2.CAP_PROP_FRAME_WIDTH)) >= 3 * 128 and int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)) >= 128
    assert (run / "figures" / "timeline_pan.png").is_file() and (run / "figures" / "tails.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    images = pd.read_csv(run / "tables" / "images.csv")
    for q in (50, 90, 95, 99):  # the tails are numpy's percentiles of the run's own table
        assert summary["tails"]["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(images["forward_ms"], q), rel=1e-12)
        assert summary["tails"]["tokens"][f"p{q}"] == pytest.approx(np.percentile(images["tokens"], q), rel=1e-12)
    worst = summary["tails"]["gflops"]["worst"][0]
    assert worst["name"] == images.loc[images["gflops"].idxmax(), "image"]
    assert summary["clips"]["pan"]["frames"] == 8 and "p99" in r.output and "clip pan: 8 frames" in r.output


def test_a_still_clip_changes_nothing_and_a_cut_shows_as_a_jump(tmp_path: Path) -> None:
    still = write_clip(tmp_path / "still.avi", [_frames(4, 1)[0]] * 5)
    r, run = _run(still, tmp_path / "a", "--no-figures")
    assert r.exit_code == 0, r.output
    frames = pd.read_csv(run / "tables" / "frames.csv")
    for column in ("level_change", "exit_change", "class_change"):
        assert frames[column].iloc[1:].tolist() == [0.0] * 4
    cut = write_clip(tmp_path / "cut.avi", _frames(5, 4, pan=2) + _frames(6, 4, pan=2))
    r, run = _run(cut, tmp_path / "b", "--no-figures")
    frames = pd.read_csv(run / "tables" / "frames.csv")
    change = frames["level_change"] + frames["exit_change"] + frames["class_change"]
    assert int(change.idxmax()) == 4 and change[4] > 2 * change.drop(index=[0, 4]).max()


def test_frame_selection_takes_every_nth_between_start_and_end() -> None:
    info = VideoInfo("x.mp4", 10.0, 100, 64, 64)
    assert FrameSelection(every=5, start="1s", end="30").indices(info) == [10, 15, 20, 25]
    assert FrameSelection(every=2, max_frames=3).indices(info) == [0, 2, 4]
    assert FrameSelection(start="95", end="2000").indices(info) == [95, 96, 97, 98, 99]
    for bad in (FrameSelection(every=0), FrameSelection(start="abc"), FrameSelection(max_frames=0)):
        with pytest.raises(ConfigError):
            bad.indices(info)


def test_a_truncated_clip_keeps_the_frames_before_the_damage(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "cut.avi", _frames(7, 10))
    data = clip.read_bytes()
    clip.write_bytes(data[: int(len(data) * 0.55)])
    r, run = _run(clip, tmp_path / "out", "--no-figures")
    assert r.exit_code == 3, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cut.avi" in errors[0] and "last frame read" in errors[0]
    traced = sorted(p.name for p in run.iterdir() if (p / "trace.json").is_file())
    assert 0 < len(traced) < 10 and traced == [f"cut-f{k:06d}" for k in range(len(traced))]
    assert len(pd.read_csv(run / "tables" / "frames.csv")) == len(traced)
    r = invoke("run", tmp_path / "missing.mp4", "--device", "cpu", "--out", tmp_path / "o2")
    assert r.exit_code != 0 and "missing.mp4: cannot be read as a video" in r.output and "Traceback" not in r.output


def test_evaluate_compare_and_bench_report_latency_tails_as_numpy_computes_them(tmp_path: Path) -> None:
    import torch
    from conftest import TINY, make_tiny

    from tokenscope.analysis.bench import VariantTiming
    from tokenscope.analysis.evaluate import OperatingPoint, evaluate
    from tokenscope.data.datasets import SyntheticDataset
    from tokenscope.models.checkpoints import LoadedModel

    loaded = LoadedModel(make_tiny(0, TINY), TINY, {"backbone": True, "decoder": True, "exits": True, "policy": True},
                         "t", "t")
    res = evaluate(loaded, SyntheticDataset(range(5), 64, 64), [OperatingPoint("baseline", "none", False)],
                   torch.device("cpu"), ignore_class_mismatch=True)  # a 4-class model on 8 classes
    scores = res.variants["baseline"]
    lat = np.array([row[1] for row in scores.per_image])
    tail = scores.as_dict()["tails"]["latency_ms"]
    assert len(lat) == 5 and tail["p95"] == pytest.approx(np.percentile(lat, 95)) and tail["max"] == pytest.approx(lat.max())
    timing = VariantTiming("step", "none", False, latencies_s=[0.010, 0.012, 0.011, 0.030])
    t = timing.latency_tail()
    assert t["p50"] == pytest.approx(11.5) and t["p99"] == pytest.approx(np.percentile([10, 12, 11, 30], 99))
    out = tmp_path / "cmp"
    clip_frames = _frames(8, 3)
    for k, f in enumerate(clip_frames):
        cv2.imwrite(str(tmp_path / f"im{k}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    r = invoke("compare", *(tmp_path / f"im{k}.png" for k in range(3)), "--methods", "tome:r=4", "--device", "cpu",
               "--repeats", "1", "--warmup", "0", "--out", out)
    assert r.exit_code == 0, r.output
    df = pd.read_csv(next(out.glob("compare-*")) / "methods.csv")
    per_image = df[(df["image"] != "ALL") & (df["method"] == "tome:r=4")]["latency_ms"].to_numpy()
    overall = df[(df["image"] == "ALL") & (df["method"] == "tome:r=4")].iloc[0]
    assert overall["latency_p99_ms"] == pytest.approx(np.percentile(per_image, 99))


def test_a_folder_of_numbered_frames_is_a_clip_in_numeric_order(tmp_path: Path) -> None:
    frames = _frames(9, 11)
    seq = tmp_path / "seq"
    seq.mkdir()
    for k, f in enumerate(frames):  # frame_2 must come before frame_10
        cv2.imwrite(str(seq / f"frame_{k}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    r, run = _run(seq, tmp_path / "out", "--frames", "--fps", "5", "--every", "2", "--no-figures")
    assert r.exit_code == 0, r.output
    table = pd.read_csv(run / "tables" / "frames.csv")
    assert table["frame"].tolist() == [0, 2, 4, 6, 8, 10] and np.allclose(table["time_s"], table["frame"] / 5.0)
    manifest = json.loads((run / "run.json").read_text())
    sources = [e["source"] for e in manifest["images"]]
    assert [Path(s).name for s in sources] == [f"frame_{k}.png" for k in (0, 2, 4, 6, 8, 10)]


def test_the_stopwatch_times_work_on_the_cpu() -> None:
    import time

    import torch

    from tokenscope.models.runtime import Stopwatch

    with Stopwatch(torch.device("cpu")) as watch:
        time.sleep(0.05)
    assert 0.045 <= watch.seconds < 0.5


def test_frame_folders_hold_a_jpeg_and_the_run_reads_them_like_images(tmp_path: Path) -> None:
    """A frame keeps its trace (class map stored narrow, read back as int32), a JPEG and a summary;
    its tokens are rows of the run's token table; heatmap and explorer find the JPEG."""
    from tokenscope.trace.trace import Trace

    clip = write_clip(tmp_path / "pan.avi", _frames(10, 3))
    r, run = _run(clip, tmp_path / "out", "--no-figures")
    assert r.exit_code == 0, r.output
    frame = run / "pan-f000001"
    assert {p.name for p in frame.iterdir()} == {"trace.json", "trace.npz", "image.jpg", "summary.json"}
    with np.load(frame / "trace.npz") as z:
        assert z["label_map"].dtype == np.uint8
    trace = Trace.load(frame)
    assert trace.label_map.dtype == np.int32 and trace.label_map.shape == (128, 128)
    tokens = pd.read_parquet(run / "tables" / "tokens.parquet")
    assert (tokens["image"] == "pan-f000001").sum() == trace.num_tokens
    r = invoke("heatmap", run, "--kind", "merge")
    assert r.exit_code == 0, r.output
    assert (next(run.glob("heatmaps-*")) / "pan-f000001" / "merge.png").is_file()
    r = invoke("view", run)
    assert r.exit_code == 0, r.output
    assert (run / "explorer.html").is_file()


def test_the_video_follows_frames_in_order_whatever_order_they_finish_in(tmp_path: Path) -> None:
    """Frames handed to the sink and frames settled (written elsewhere, or failed) come in any
    order; the video gets them in frame order (a failed frame left out), a frame handed over
    before its turn is written at once and drawn from its folder when its turn comes, and the
    last frame closes the clip's video."""
    from tokenscope.jobs.clips import Clip, ClipFrame, ClipPass

    clip = Clip("c", "c.mp4", 10.0, 1, [ClipFrame(k, k / 10, f"c-f{k:06d}") for k in range(5)])
    for k in (2,):
        (tmp_path / f"c-f{k:06d}").mkdir()
        (tmp_path / f"c-f{k:06d}" / "trace.json").write_text("{}")
    sent: list[tuple[str, str]] = []

    class Recorder:
        def frame(self, run_dir: Path, name: str, *data: object, video: Path | None = None, fps: float = 0.0) -> None:
            video = data[4] if len(data) > 4 else video  # type: ignore[assignment]
            sent.append(("write+draw" if video is not None else "write", name))

        def draw(self, video: Path, fps: float, folder: Path) -> None:
            sent.append(("draw", folder.name))

        def close(self, video: Path) -> None:
            sent.append(("close", video.name))

        def sync(self) -> int:
            return 0

    clip_pass = ClipPass(tmp_path, [clip], figures=True)
    assert clip_pass.sink is not None
    clip_pass.sink.abort()
    clip_pass.sink, clip_pass.writes = Recorder(), True  # type: ignore[assignment]
    frame = np.zeros((4, 4, 3), np.uint8)
    clip_pass.settle("c-f000002", True)  # written by another process
    clip_pass.settle("c-f000001", False)  # failed
    assert sent == []
    clip_pass.write("c-f000000", frame, None, {}, None)  # type: ignore[arg-type]
    assert sent == [("write+draw", "c-f000000"), ("draw", "c-f000002")]
    clip_pass.write("c-f000004", frame, None, {}, None)  # type: ignore[arg-type]
    assert sent[-1] == ("write", "c-f000004")
    clip_pass.write("c-f000003", frame, None, {}, None)  # type: ignore[arg-type]
    assert sent[-3:] == [("write+draw", "c-f000003"), ("draw", "c-f000004"), ("close", "c_overlay.mp4")]


def test_the_sink_reports_a_damaged_frame_or_a_failed_write_in_one_line_and_abort_leaves_nothing(tmp_path: Path) -> None:
    from tokenscope.errors import RunFolderError
    from tokenscope.jobs.frame_sink import FrameSink
    from tokenscope.trace.trace import Trace

    clip = write_clip(tmp_path / "pan.avi", _frames(11, 2))
    r, run = _run(clip, tmp_path / "out", "--no-figures")
    assert r.exit_code == 0, r.output
    (run / "pan-f000001" / "image.jpg").write_bytes(b"not a jpeg")
    video = run / "pan_overlay.mp4"
    sink = FrameSink()
    sink.draw(video, 10.0, run / "pan-f000000")
    sink.draw(video, 10.0, run / "pan-f000001")
    sink.close(video)
    with pytest.raises(RunFolderError, match="overlay video: .*pan-f000001.*unreadable"):
        sink.finish()
    assert not list(run.glob("*.mp4")) and not list(run.glob(".*partial*"))
    sink = FrameSink()  # a frame whose folder cannot be written: the run learns it at the next sync
    trace = Trace.load(run / "pan-f000000")
    sink.frame(tmp_path / "no-such-run", "pan-f000000", np.zeros((128, 128, 3), np.uint8), trace, {}, None)
    with pytest.raises(RunFolderError, match="frame pan-f000000: "):
        sink.sync()
    sink.abort()
    sink = FrameSink()
    sink.draw(video, 10.0, run / "pan-f000000")
    sink.abort()
    assert sink._writer.proc.returncode is not None and sink._drawer is not None and sink._drawer.proc.returncode is not None
    assert not list(run.glob(".*partial*")) and not list(run.glob("*.mp4"))


def test_frame_messages_carry_their_arrays_out_of_band_and_back_exactly() -> None:
    import io

    from tokenscope.jobs.frame_sink import decode, encode

    arrays = {"image": np.arange(48, dtype=np.uint8).reshape(4, 4, 3), "strided": np.arange(20.0)[::2],
              "empty": np.zeros((0, 3), np.int16), "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
              "big_endian": np.arange(5, dtype=">i4")}
    wire = b"".join(bytes(part) for message in (encode({"op": "frame", "name": "f", **arrays}), encode({"op": "sync"}))
                    for part in message)
    stream = io.BytesIO(wire)
    got = decode(stream)
    assert got is not None and got["op"] == "frame" and got["name"] == "f"
    for key, a in arrays.items():
        b = got[key]
        assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b), key
    got["image"][0, 0, 0] = 7  # arrays come back writable
    assert decode(stream) == {"op": "sync"} and decode(stream) is None
    assert decode(io.BytesIO(wire[:len(wire) // 2])) is None  # a message cut short reads as the end


def test_frames_written_by_the_sink_equal_frames_the_run_writes_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the sink cannot run at idle priority a CPU run writes its frames itself and draws the
    video from the folders once the model is done: the same folders, tables and video."""
    import tokenscope.jobs.frame_sink as frame_sink
    from tokenscope.trace.trace import Trace

    clip = write_clip(tmp_path / "pan.avi", _frames(13, 4))
    r, handed = _run(clip, tmp_path / "a")
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(frame_sink, "idle_priority", lambda pid: False)
    r, own = _run(clip, tmp_path / "b")
    assert r.exit_code == 0, r.output
    for k in range(4):
        name = f"pan-f{k:06d}"
        assert sorted(p.name for p in (handed / name).iterdir()) == sorted(p.name for p in (own / name).iterdir())
        a, b = Trace.load(handed / name), Trace.load(own / name)
        assert np.array_equal(a.label_map, b.label_map) and np.array_equal(a.token_of_patch, b.token_of_patch)
        sa, sb = (json.loads((d / name / "summary.json").read_text()) for d in (handed, own))
        assert set(sa) == set(sb) and sa["tokens"] == sb["tokens"] and sa["folder"] == sb["folder"] == name
        assert np.array_equal(cv2.imread(str(handed / name / "image.jpg")), cv2.imread(str(own / name / "image.jpg")))
    for run in (handed, own):
        video = cv2.VideoCapture(str(run / "pan_overlay.mp4"))
        assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    ta, tb = (pd.read_csv(d / "tables" / "frames.csv") for d in (handed, own))
    pd.testing.assert_frame_equal(ta.drop(columns=["forward_ms"]), tb.drop(columns=["forward_ms"]))


def test_tables_from_held_traces_equal_tables_read_from_the_folders(tmp_path: Path) -> None:
    from tokenscope.jobs.run import HeldTraces, finish_run
    from tokenscope.trace.trace import Trace

    clip = write_clip(tmp_path / "pan.avi", _frames(12, 3))
    r, run = _run(clip, tmp_path / "out", "--no-figures")
    assert r.exit_code == 0, r.output
    names = [f"pan-f{k:06d}" for k in range(3)]
    read = finish_run(run, names, figures=False)
    held = HeldTraces()
    for n in names[:2]:
        held.hold(n, Trace.load(run / n))
    mixed = finish_run(run, names, figures=False, held=held)
    assert read is not None and mixed is not None
    for table in ("images", "classes", "levels", "blocks"):
        pd.testing.assert_frame_equal(getattr(read, table), getattr(mixed, table))
    assert HeldTraces(budget=10).take("x") is None
    small = HeldTraces(budget=10)
    small.hold(names[0], Trace.load(run / names[0]))
    assert small.take(names[0]) is None  # over the budget: read from the folder instead


def test_a_killed_clip_run_resumes_to_the_same_frames_and_a_whole_video(tmp_path: Path) -> None:
    """Killed after three frames: the frame sink stops, leaves no video, and the folders it had
    not written yet are traced again on resume; the finished run equals an uninterrupted one."""
    from dataclasses import asdict

    from tokenscope.jobs.run import RunRequest, run_job
    from tokenscope.jobs.setup import ModelOptions

    clip = write_clip(tmp_path / "pan.avi", _frames(14, 6))
    r, whole = _run(clip, tmp_path / "a")
    assert r.exit_code == 0, r.output

    class Killed(Exception):
        pass

    def kill_at_fourth(done: int, total: int, item: str) -> None:
        if done == 3:
            raise Killed

    request = RunRequest(inputs=[str(clip)], model=asdict(ModelOptions(model="demo", device="cpu")), animation=False)
    with pytest.raises(Killed):
        run_job(request, out=tmp_path / "b", progress=kill_at_fourth)
    (part,) = list((tmp_path / "b").glob("run-*"))
    assert not list(part.glob("*.mp4")) and not list(part.glob(".*partial*.mp4"))
    assert len([p for p in part.iterdir() if p.is_dir() and not p.name.startswith(".")]) <= 3
    r = invoke("run", "--resume", part, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads((part / "run.json").read_text())["status"] == "complete" and not list(part.glob(".partial-*"))
    video = cv2.VideoCapture(str(part / "pan_overlay.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    a, b = (pd.read_csv(d / "tables" / "frames.csv").drop(columns=["forward_ms"]) for d in (whole, part))
    pd.testing.assert_frame_equal(a, b)
