"""Nothing lost, never a traceback: checkpoints are never replaced, a full or read-only disk is one
line, bad values are refused before any work, damaged run folders are named, a resumed run is locked.

The full-disk and read-only cases use a small tmpfs where the test may mount one (root on Linux), else
an OSError injected where the files are written."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny
from tokenscope.cli import app
from tokenscope.models.checkpoints import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_images"
IMAGE = SAMPLES / "street_5000001.png"
TRAIN = ["--crops", "64x2", "--size", "128", "--warmup", "0", "--no-eval", "--device", "cpu"]


def invoke(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(r: object, code: int | None = None) -> str:
    """The command failed with exactly one error line and no traceback; returns that line."""
    assert r.exit_code != 0 and (code is None or r.exit_code == code), (r.exit_code, r.output)  # type: ignore[attr-defined]
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output  # type: ignore[attr-defined]
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]  # type: ignore[attr-defined]
    assert len(errors) == 1, r.output  # type: ignore[attr-defined]
    return errors[0]


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files and empty folders anywhere under `folder`."""
    bad = [str(p) for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or ".partial" in str(p))]
    bad += [str(p) for p in folder.rglob("*") if p.is_dir() and not any(p.iterdir())]
    return bad


# ---- checkpoints are never replaced ---------------------------------------------------------------

def test_train_refuses_to_write_over_a_checkpoint_and_overwrite_keeps_a_backup(tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = invoke("train", "--out", out, "--steps", "2", *TRAIN)
    assert r.exit_code == 0, r.output
    files = [out.with_suffix(s) for s in (".json", ".safetensors", ".train.pt")]
    before = digest(*files)
    line = one_line_error(invoke("train", "--out", out, "--steps", "3", *TRAIN), 2)
    assert "m.json exists" in line and "--resume" in line and "--overwrite" in line
    assert digest(*files) == before  # untouched
    r = invoke("train", "--out", out, "--steps", "3", "--overwrite", *TRAIN)
    assert r.exit_code == 0, r.output
    backups = sorted(tmp_path.glob("m.backup-*"))
    assert [b.suffixes[-1] for b in backups] == [".json", ".safetensors", ".pt"]
    assert digest(*backups) == before  # the old model, whole, beside the new one
    assert json.loads(out.with_suffix(".json").read_text())["metadata"]["step"] == 3
    r = invoke("train", "--out", out, "--steps", "3", "--resume", *TRAIN)  # resuming a finished run: allowed
    assert r.exit_code == 0, r.output
    one_line_error(invoke("train", "--out", out, "--steps", "3", "--resume", "--overwrite", *TRAIN), 2)


def test_train_onto_an_imported_checkpoint_is_refused(tmp_path: Path) -> None:
    from segmenter_reference import segmenter_state, write_segmenter_release

    release = write_segmenter_release(tmp_path / "seg", segmenter_state("linear"), "linear")
    r = invoke("import", "segmenter", release, "--out", tmp_path / "imp")
    assert r.exit_code == 0, r.output
    before = digest(tmp_path / "imp.json", tmp_path / "imp.safetensors")
    one_line_error(invoke("train", "--out", tmp_path / "imp", "--steps", "2", *TRAIN), 2)
    assert digest(tmp_path / "imp.json", tmp_path / "imp.safetensors") == before


@pytest.mark.parametrize("lr", ["nan", "inf", "1e30", "-1", "0"])
def test_a_learning_rate_that_cannot_train_is_refused_before_any_step(tmp_path: Path, lr: str) -> None:
    line = one_line_error(invoke("train", "--out", tmp_path / "m", "--steps", "3", "--lr", lr, *TRAIN), 2)
    assert "--lr must be a finite number in (0, 1]" in line
    assert not list(tmp_path.iterdir())


def test_crops_too_large_to_allocate_are_refused(tmp_path: Path) -> None:
    line = one_line_error(invoke("train", "--out", tmp_path / "m", "--steps", "1", "--crops", "100000x1", "--no-eval"), 2)
    assert "multiples of 16 from 16 to 4096" in line


def test_weights_that_diverge_are_never_saved_and_nan_checkpoints_are_refused(tmp_path: Path) -> None:
    from tokenscope.data.datasets import SyntheticDataset
    from tokenscope.errors import ConfigError
    from tokenscope.models.checkpoints import LoadedModel
    from tokenscope.train.trainer import Trainer, TrainSettings

    from conftest import TINY

    net = make_tiny()
    trainer = Trainer(LoadedModel(net, TINY, {}, "t", "t"), SyntheticDataset(range(2), 64, 64),
                      TrainSettings(steps=2, crops=((64, 2),), warmup=0), tmp_path / "m", torch.device("cpu"))
    with torch.no_grad():
        net.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="diverged .*nothing was written"):
        trainer.save()
    assert not list(tmp_path.iterdir())
    save_checkpoint(net, tmp_path / "nan.json", trained={"backbone": True, "decoder": True, "exits": True, "policy": True})
    line = one_line_error(invoke("run", IMAGE, "--weights", tmp_path / "nan.json", "--out", tmp_path / "o"), 2)
    assert "NaN or infinite" in line and not (tmp_path / "o").exists()


def test_a_checkpoint_description_asking_for_absurd_sizes_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    save_checkpoint(make_tiny(), path, trained={"backbone": True, "decoder": True, "exits": True, "policy": True})
    doc = json.loads(path.read_text())
    doc["config"]["num_classes"] = 1e12
    path.write_text(json.dumps(doc))
    line = one_line_error(invoke("run", IMAGE, "--weights", path, "--out", tmp_path / "o"))
    assert "num_classes" in line and "outside 1..65535" in line


# ---- full and read-only disks ---------------------------------------------------------------------

def _mount(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=10)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (skipped where this process may not mount one)."""
    folder = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    if not _mount(folder, "3m"):
        pytest.skip("cannot mount a tmpfs here; the injected-error test covers the same path")
    try:
        yield folder
    finally:
        _umount(folder)


def _fill(folder: Path) -> None:
    """Leave a few KB free."""
    with open(folder / "ballast", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
    with open(folder / "ballast", "r+b") as f:
        f.truncate(max(0, (folder / "ballast").stat().st_size - 40_000))


def test_a_full_disk_is_one_line_leaves_nothing_half_written_and_a_run_resumes_once_space_is_back(
        small_disk: Path, tmp_path: Path) -> None:
    base_run = invoke("run", IMAGE, "--out", tmp_path / "good", "--no-animation")  # for view/report/heatmap
    assert base_run.exit_code == 0
    good = next((tmp_path / "good").glob("run-*"))
    from segmenter_reference import segmenter_state, write_segmenter_release

    release = write_segmenter_release(tmp_path / "seg", segmenter_state("linear"), "linear")
    copy = small_disk / "copy"  # a finished run on the small disk, for view, report and heatmap
    shutil.copytree(good, copy, ignore=shutil.ignore_patterns("*.gif", "*.parquet"))
    _fill(small_disk)
    out = small_disk / "out"
    cases = [["run", SAMPLES / "street_5000001.png", SAMPLES / "street_5000002.png", "--labels", SAMPLES / "labels",
              "--out", out],
             ["compare", IMAGE, "--repeats", "1", "--out", out],
             ["compare", IMAGE, "--methods", "step,tome", "--repeats", "1", "--out", out],
             ["sweep", "--methods", "tome", "--seeds", "1:3", "--scene-size", "128", "--out", out],
             ["train", "--out", small_disk / "m", "--steps", "1", *TRAIN],
             ["import", "segmenter", release, "--out", small_disk / "imp"],
             ["run", "--dataset", "synthetic", "--seeds", "1:3", "--scene-size", "256", "--out", small_disk / "ds"],
             ["run", SAMPLES / "street_clip.avi", "--max-frames", "6", "--out", small_disk / "clip"]]
    for case in cases:
        r = invoke(*case, "--device", "cpu") if case[0] in ("run", "compare", "sweep") else invoke(*case)
        line = one_line_error(r, 3)
        assert "cannot write" in line and "disk is full" in line, (case[0], line)
    for case in (["view", copy], ["report", copy], ["heatmap", copy]):
        r = invoke(*case)
        assert r.exit_code == 3 and "Traceback" not in r.output, (case[0], r.output)
    if out.exists():
        assert not leftovers(out)
    assert not [p for p in small_disk.rglob("*.tmp")] and not [p for p in small_disk.rglob(".*.tmp")]
    runs = list(out.glob("run-*"))  # the run folder exists with its run.json (status running): resumable
    assert len(runs) <= 1 and not list(out.glob("compare-*")) and not list(out.glob("sweep-*"))
    if runs:
        assert json.loads((runs[0] / "run.json").read_text())["status"] == "running"
        (small_disk / "ballast").unlink()  # space is back
        subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], capture_output=True, timeout=10)
        r = invoke("run", "--resume", runs[0])
        assert r.exit_code == 0, r.output
        assert json.loads((runs[0] / "run.json").read_text())["status"] == "complete"


def test_a_read_only_output_folder_is_one_line_before_any_work(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    if not _mount(ro, "1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        from segmenter_reference import segmenter_state, write_segmenter_release

        release = write_segmenter_release(tmp_path / "seg", segmenter_state("linear"), "linear")
        for case in (["tune", "--max-gflops", "4.5", "--calib-seeds", "1:2", "--held-seeds", "5:6", "--out", ro / "op.json"],
                     ["train", "--out", ro / "m", "--steps", "1", *TRAIN],
                     ["import", "segmenter", release, "--out", ro / "imp"],
                     ["run", IMAGE, "--out", ro / "o"],
                     ["view", ro]):
            line = one_line_error(invoke(*case))
            assert "read-only" in line or "no run.json" in line, (case[0], line)
    finally:
        _umount(ro)


def test_an_injected_disk_error_is_one_line_and_leaves_no_temporary_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted: the same path, with the write itself failing (ENOSPC)."""
    import tokenscope.storage as storage

    real = storage.os.replace

    def full(src: str, dst: str) -> None:
        if str(dst).endswith("summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(storage.os, "replace", full)
    r = invoke("run", IMAGE, "--out", tmp_path / "r", "--device", "cpu", "--no-figures")
    line = one_line_error(r, 3)
    assert "summary.json" in line and "disk is full" in line
    assert not list((tmp_path / "r").rglob("*.tmp"))


# ---- bad values are refused before any work -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["run", IMAGE, "--method", "tome:r=1e400"], "must be a finite number"),
    (["run", IMAGE, "--method", "tome", "--tome-r", "1e400"], "--tome-r is gone: a method's settings follow its name"),
    (["compare", IMAGE, "--methods", "tome:r=1e400"], "must be a finite number"),
    (["compare", IMAGE, "--methods", "tome:r=16:r=8"], "given twice"),
    (["compare", IMAGE, "--methods", ""], "needs at least one method"),
    (["compare", IMAGE, "--methods", ","], "needs at least one method"),
    (["run", IMAGE, "--method", "algm:threshold=7"], "cosine similarity in [-1, 1]"),
    (["run", IMAGE, "--method", "dcts", "--budget", "nan"], "--budget"),
    (["view", "--serve", "--port", "99999"], "0 (a free one) to 65535"),
    (["view", "--serve", "--port", "-5"], "0 (a free one) to 65535"),
    (["data", "fetch", "ade20k", "--url", "not a url", "--offline"], "expected an http"),
    (["tune", "--max-gflops", "-1", "--out", "op.json"], "--max-gflops must be a finite number above 0"),
    (["tune", "--max-gflops", "0", "--out", "op.json"], "--max-gflops must be a finite number above 0"),
    (["tune", "--p95-latency-ms", "nan", "--out", "op.json"], "--p95-latency-ms must be a finite number"),
    (["tune", "--p95-latency-ms", "inf", "--out", "op.json"], "--p95-latency-ms must be a finite number"),
    (["data", "check", "folder", "--root", ".", "--show", "-1"], "--show must be >= 0"),
    (["run", "--resume", "x", IMAGE], "give it alone"),
    (["run", IMAGE, "--keep-per-class", "-3"], "--keep-per-class"),
])
def test_values_that_overflow_or_make_no_sense_are_one_line_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[object], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke(*args, *(["--out", tmp_path / "o"] if args[0] in ("run", "compare") else [])))
    assert message in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "op.json").exists()


def test_an_operating_point_of_an_unknown_version_is_refused(tmp_path: Path) -> None:
    op = tmp_path / "op.json"
    op.write_text(json.dumps({"format": "tokenscope-operating-point", "version": 99, "method": "tome"}))
    assert "version 99" in one_line_error(invoke("run", IMAGE, "--operating-point", op, "--out", tmp_path / "o"))


# ---- damaged run folders --------------------------------------------------------------------------

@pytest.fixture
def finished_run(tmp_path: Path) -> Path:
    r = invoke("run", SAMPLES / "street_5000001.png", SAMPLES / "street_5000002.png", "--out", tmp_path / "out",
               "--no-animation", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return next((tmp_path / "out").glob("run-*"))


@pytest.mark.parametrize("bad", [[], "oops", {"images": "oops"}, {"images": [{"folder": "../../etc"}]},
                                 {"images": [3]}, {"warnings": "x"}])
def test_a_run_json_of_the_wrong_shape_is_one_line_everywhere(finished_run: Path, bad: object) -> None:
    manifest = json.loads((finished_run / "run.json").read_text())
    doc = {**manifest, **bad} if isinstance(bad, dict) else bad
    (finished_run / "run.json").write_text(json.dumps(doc))
    for cmd in (["view", finished_run], ["heatmap", finished_run], ["report", finished_run],
                ["run", "--resume", finished_run], ["table", finished_run, "--kind", "classes"]):
        line = one_line_error(invoke(*cmd))
        assert "run.json" in line, (cmd[0], line)


def test_view_and_report_name_damaged_images_and_exit_3_while_still_writing(finished_run: Path) -> None:
    npz = finished_run / "street_5000002" / "trace.npz"
    npz.write_bytes(npz.read_bytes()[:200])  # truncated
    for cmd, page in ((["view", finished_run], "explorer.html"), (["report", finished_run], "report.html")):
        r = invoke(*cmd)
        assert r.exit_code == 3, r.output
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "street_5000002" in errors[0] and "Traceback" not in r.output
        assert (finished_run / page).is_file()


def test_a_second_resume_of_the_same_run_is_told_it_is_busy(finished_run: Path) -> None:
    from tokenscope.jobs.runfolder import run_lock

    manifest = json.loads((finished_run / "run.json").read_text())
    (finished_run / "run.json").write_text(json.dumps({**manifest, "status": "running"}))
    with run_lock(finished_run):
        line = one_line_error(invoke("run", "--resume", finished_run))
    assert "is busy" in line
    r = invoke("run", "--resume", finished_run)  # the lock went with its holder
    assert r.exit_code == 0, r.output


def test_a_served_export_that_fails_midway_leaves_the_previous_data_whole(finished_run: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenscope.jobs.view import write_view
    from tokenscope.render import explorer

    write_view(finished_run, served=True)
    data = finished_run / "explorer_data"
    before = {p.name: p.read_bytes() for p in data.rglob("*.json")}
    real = explorer.image_payload
    calls = {"n": 0}

    def failing(*a: object, **k: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", "x")
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(explorer, "image_payload", failing)
    with pytest.raises(Exception):
        write_view(finished_run, served=True)
    after = {p.name: p.read_bytes() for p in data.rglob("*.json")}
    assert after == before and not [p for p in finished_run.iterdir() if p.name.startswith(".explorer_data")]
    index = json.loads((data / "index.json").read_text())
    assert all((data / "images" / f"{n}.json").is_file() for n in index["images"])


# ---- a fuzz of every command's options -------------------------------------------------------------

FUZZ_VALUES = ["nan", "inf", "-inf", "-1", "0", "1e400", "99999999999999999999", "", " ", "abc", "1,", ",,",
               "%s", "../../etc/passwd", "x" * 300, "-0", "1e-400", "0x10", "NaN:1"]
FUZZ_OPTIONS = {
    "run": ["--size", "--exit-threshold", "--merge-threshold", "--method", "--keep-per-class", "--budget", "--window",
            "--stride", "--every", "--max-frames", "--start", "--render-workers", "--seeds", "--scene-size"],
    "compare": ["--repeats", "--warmup", "--methods", "--at-block", "--size", "--exit-threshold", "--method"],
    "evaluate": ["--seeds", "--size", "--window", "--exit-threshold", "--method", "--merge-threshold"],
    "sweep": ["--merge-thresholds", "--exit-thresholds", "--sizes", "--methods", "--seeds", "--scene-size", "--dpi",
              "--format"],
    "bench": ["--size", "--batch", "--repeats", "--warmup", "--threads", "--budget", "--method"],
    "tune": ["--max-gflops", "--p95-latency-ms", "--min-speedup", "--max-miou-drop", "--calib-seeds", "--method"],
    "train": ["--steps", "--crops", "--lr", "--aux-weight", "--warmup", "--save-every", "--accumulate",
              "--exit-aware-steps", "--train-seeds"],
    "view": ["--port"],
    "heatmap": ["--kind", "--blocks"],
    "table": ["--kind", "--format"],
}
SAFE = {"run": [IMAGE], "compare": [IMAGE], "table": ["."], "heatmap": ["."], "view": ["."]}
FAST = {"run": ["--no-figures", "--no-animation", "--device", "cpu"], "compare": ["--repeats", "1", "--device", "cpu"],
        "evaluate": ["--seeds", "1:2", "--size", "64", "--device", "cpu"],
        "sweep": ["--seeds", "1:2", "--scene-size", "64", "--methods", "tome", "--device", "cpu"],
        "bench": ["--size", "64", "--repeats", "1", "--device", "cpu"],
        "tune": ["--calib-seeds", "1:2", "--held-seeds", "3:4", "--scene-size", "64", "--device", "cpu"],
        "train": ["--steps", "1", "--crops", "64x1", "--size", "64", "--no-eval", "--device", "cpu"]}


def test_fuzz_every_command_with_bad_values_is_one_line_and_writes_nothing_outside_its_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded and bounded: 60 (command, option, value) draws; each run either succeeds or fails with
    one line, never a traceback; nothing appears outside the output folder it was given."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2026)
    tried = failed = 0
    for _ in range(60):
        cmd = list(FUZZ_OPTIONS)[int(rng.integers(len(FUZZ_OPTIONS)))]
        option = FUZZ_OPTIONS[cmd][int(rng.integers(len(FUZZ_OPTIONS[cmd])))]
        value = FUZZ_VALUES[int(rng.integers(len(FUZZ_VALUES)))]
        out = tmp_path / f"out-{tried}"
        where = ["--out", out / ("m" if cmd == "train" else "op.json" if cmd == "tune" else "")] \
            if cmd in ("run", "compare", "sweep", "tune", "train") else []
        fast = [a for a in FAST.get(cmd, []) if a != option]
        if option in fast:  # the drawn option replaces the fast default of the same name
            i = fast.index(option)
            del fast[i:i + 2]
        r = invoke(cmd, *SAFE.get(cmd, []), *fast, *where, option, value)
        tried += 1
        assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), \
            (cmd, option, value, r.output, r.exception)
        if r.exit_code != 0:
            failed += 1
            errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1, (cmd, option, value, r.output)
        outside = [p.name for p in tmp_path.iterdir() if not p.name.startswith("out-")]
        assert not outside, (cmd, option, value, outside)
    print(f"fuzz: {tried} option values tried, {failed} refused in one line, {tried - failed} accepted and run")
    assert tried == 60 and failed >= 30  # most draws are bad values, and each was refused in one line


def test_a_resume_traces_a_damaged_image_folder_again(finished_run: Path) -> None:
    manifest = json.loads((finished_run / "run.json").read_text())
    (finished_run / "run.json").write_text(json.dumps({**manifest, "status": "running"}))
    npz = finished_run / "street_5000002" / "trace.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    r = invoke("run", "--resume", finished_run)
    assert r.exit_code == 0, r.output
    from tokenscope.trace.trace import Trace

    Trace.load(finished_run / "street_5000002").assert_consistent()
    assert json.loads((finished_run / "run.json").read_text())["status"] == "complete"


def test_random_bytes_named_pth_are_called_unreadable_not_unsafe(tmp_path: Path) -> None:
    junk = tmp_path / "random.pth"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    line = one_line_error(invoke("import", "segmenter", junk, "--out", tmp_path / "imp"))
    assert "not a readable PyTorch checkpoint" in line and "Weights only load failed" not in line
