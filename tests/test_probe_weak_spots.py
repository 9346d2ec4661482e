"""The second probe's weak spots (rows it marked S) and the one schema check every read-back file goes
through: a render killed half-way never looks finished, a download cannot fill the disk, a diverging
training run is not saved as a success, multi-frame files are said, messages name the right knob and
stay one short line, and every file tokenscope reads back is checked by type in one place."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.errors import CheckpointError, ConfigError, DownloadError, RunFolderError, StorageError

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_images" / "street_5000001.png"


# ---- one schema check ------------------------------------------------------------------------------

def test_the_schema_check_names_the_file_the_field_and_what_it_must_be(tmp_path: Path) -> None:
    from tokenscope.schema import check_fields, describe, has_type, read_json

    assert has_type(None, int | None) and has_type([1.5, 2], list[float]) and not has_type(True, int)
    assert not has_type(float("nan"), float) and not has_type(["a", 1], list[str]) and has_type({"a": 1}, dict)
    assert describe(int | None) == "a whole number or null" and describe(list[str]) == "a list of texts"
    with pytest.raises(RunFolderError, match=r"x.json: field 'request.size' must be a whole number or null, got string"):
        check_fields({"size": "abc"}, {"size": int | None}, "x.json", prefix="request")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="bad.json: a thing file holds a JSON object, got a list"):
        read_json(bad, "thing", CheckpointError)
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json: not readable as a thing file"):
        read_json(bad, "thing", ConfigError)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(RunFolderError, match="not a regular file"):
        read_json(fifo, "thing")


def test_every_reader_of_run_folder_files_goes_through_the_schema_check() -> None:
    """No reader of a file parses JSON by itself: json.load / json.loads of a file's text appear only in the
    schema module (and where tokenscope reads the class lists it ships)."""
    import re

    pattern = re.compile(r"json\.load\(|json\.loads\([^\n]*read_(text|regular_text)\(")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tokenscope").rglob("*.py")
                 if p.name not in {"schema.py", "classes.py"} and pattern.search(p.read_text())]
    assert offenders == [], offenders


def test_an_eval_json_of_a_billion_classes_is_refused_before_it_is_allocated(labelled_run: Path, tmp_path: Path) -> None:
    from tokenscope.jobs.run import read_eval_file

    run = tmp_path / "r"
    shutil.copytree(labelled_run, run)
    ev = next(run.glob("*/eval.json"))
    doc = json.loads(ev.read_text())
    doc["step_confusion"] = {"n": 10**9, "entries": [[0, 0, 1]]}
    ev.write_text(json.dumps(doc))
    with pytest.raises(RunFolderError, match="step_confusion"):
        read_eval_file(ev)
    doc["step_confusion"] = {"n": 3, "entries": [[0, 7, 1]]}
    ev.write_text(json.dumps(doc))
    with pytest.raises(RunFolderError, match="confusion matrix"):
        read_eval_file(ev)


def test_a_checkpoint_description_with_trained_parts_not_true_or_false_is_one_line(tmp_path: Path) -> None:
    doc = json.loads((ROOT / "tokenscope" / "weights" / "demo.json").read_text())
    doc["trained"] = {"policy": "yes"}
    (tmp_path / "ck.json").write_text(json.dumps(doc))
    shutil.copy(ROOT / "tokenscope" / "weights" / "demo.safetensors", tmp_path / "ck.safetensors")
    from tokenscope.models.checkpoints import load_checkpoint

    with pytest.raises(CheckpointError, match=r"field 'trained' must be a JSON object"):
        load_checkpoint(tmp_path / "ck.json")


def test_a_report_names_an_image_summary_of_the_wrong_types_and_leaves_it_out(labelled_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    shutil.copytree(labelled_run, run)
    summary = next(run.glob("*/summary.json"))
    doc = json.loads(summary.read_text())
    doc["tokens"] = "many"
    summary.write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 3 and isinstance(r.exception, SystemExit), r.output
    assert "field 'tokens' must be a finite number" in r.output and "left out" in r.output


# ---- S rows ------------------------------------------------------------------------------------------

def test_a_heatmap_render_is_hidden_until_every_image_is_drawn(labelled_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenscope.jobs import heatmap as hm

    run = tmp_path / "r"
    shutil.copytree(labelled_run, run)
    real = hm.token_histogram

    def dies_after_drawing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        real(*args, **kwargs)
        raise KeyboardInterrupt  # killed with a picture on disk

    monkeypatch.setattr(hm, "token_histogram", dies_after_drawing)
    with pytest.raises(KeyboardInterrupt):
        hm.rerender(run, kind="histogram")
    assert not list(run.glob("heatmaps-*")), "a half-drawn render looks finished"
    assert list(run.glob(".heatmaps-partial-*"))  # hidden: what a kill -9 leaves
    monkeypatch.undo()
    result = hm.rerender(run, kind="histogram")
    assert result.out_dir.name.startswith("heatmaps-") and result.out_dir.is_dir()
    assert len(list(result.out_dir.glob("*/histogram.png"))) == len(result.rendered) == 1


def test_an_export_over_a_link_put_in_the_run_folder_leaves_neither_litter_nor_harm(labelled_run: Path,
                                                                                     tmp_path: Path) -> None:
    from tokenscope.jobs.view import write_view

    run = tmp_path / "r"
    shutil.copytree(labelled_run, run)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    os.symlink(victim, run / "explorer_data")
    write_view(run, served=True)
    assert (victim / "keep.txt").read_text() == "precious" and sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".explorer_data")]
    assert (run / "explorer_data").is_dir() and not (run / "explorer_data").is_symlink()


def test_a_multi_frame_file_is_traced_by_its_first_frame_and_the_run_says_so(tmp_path: Path) -> None:
    street = Image.open(IMAGE).convert("RGB").resize((96, 64))
    gif = tmp_path / "anim.gif"
    street.save(gif, save_all=True, append_images=[street.rotate(90), street.rotate(180)])
    r = CliRunner().invoke(app, ["run", str(gif), "--size", "64", "--no-animation", "--device", "cpu",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "3 frames or pages in one file; only the first is traced" in r.output
    manifest = json.loads(next((tmp_path / "o").glob("run-*/run.json")).read_text())
    assert any("only the first is traced" in w for w in manifest["warnings"])


def test_a_diverging_training_run_stops_with_an_error_instead_of_saving(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "lr1"), "--lr", "1", "--crops", "64x2", "--steps",
                                 "6", "--warmup", "0", "--save-every", "1", "--size", "128", "--no-eval",
                                 "--device", "cpu"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "training diverged at step" in r.output and "lower --lr" in r.output


class _Endless(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        if self.path == "/announced":
            self.send_header("Content-Length", str(5_000_000))
        self.end_headers()
        try:
            for _ in range(2000):
                self.wfile.write(bytes(65536))
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("path", ["/endless", "/announced"])
def test_a_download_larger_than_the_published_file_is_stopped_and_nothing_is_kept(tmp_path: Path, path: str) -> None:
    from tokenscope.data.download import download

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = tmp_path / "dl" / "x.zip"
    try:
        with pytest.raises(DownloadError, match="not the published file .nothing was kept."):
            download(f"http://127.0.0.1:{server.server_address[1]}{path}", target, "sha256",
                     hashlib.sha256(b"").hexdigest(), offline=False, max_bytes=1_000_000)
    finally:
        server.shutdown()
        server.server_close()
    assert not target.exists() and not list(target.parent.glob("*.part"))


def test_a_tokenscope_home_that_is_a_file_or_read_only_names_tokenscope_home(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenscope.data.download import download
    from tokenscope.storage import storage_error

    home = tmp_path / "homefile"
    home.write_text("a file")
    monkeypatch.setenv("TOKENSCOPE_HOME", str(home))
    with pytest.raises(StorageError, match="it is a file, not a folder .point TOKENSCOPE_HOME at a folder"):
        download("http://127.0.0.1:1/x.zip", home / "downloads" / "x.zip", "sha256", "00", offline=True)
    import errno

    line = str(storage_error(OSError(errno.EROFS, "Read-only file system"), home / "data", "use"))
    assert "point TOKENSCOPE_HOME at another folder" in line and "--out" not in line


def test_a_message_of_79_kilobytes_is_printed_as_one_short_line(tmp_path: Path) -> None:
    spec = "tome:" + ":".join(f"k{i}=1" for i in range(10_000))
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "64", "--method", spec, "--out", str(tmp_path)])
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(lines) == 1 and len(lines[0]) < 800 and "characters ..." in lines[0], r.output[:300]


def test_a_block_outside_the_trace_is_one_error_not_a_silent_answer(labelled_run: Path) -> None:
    import tokenscope as ts

    tr = ts.load_trace(next(p for p in labelled_run.iterdir() if (p / "trace.json").is_file()))
    assert tr.cover_at(1).shape == tuple(tr.meta.grid)
    for block in (-1, 0, tr.meta.depth + 2, 1000, "a"):
        with pytest.raises(ts.TokenscopeError, match="blocks are counted from 1"):
            tr.cover_at(block)
    assert np.array_equal(tr.cover_at(tr.meta.depth + 1), tr.cover_at(tr.meta.depth + 1))


def test_ctrl_c_in_a_run_names_the_folder_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenscope.jobs import run as run_job

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(run_job, "write_image_folder", interrupted)
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "64", "--device", "cpu", "--no-animation",
                                 "--out", str(tmp_path / "o")])
    folder = next((tmp_path / "o").glob("run-*"))
    assert r.exit_code == 130 and "Traceback" not in r.output, r.output
    assert f"tokenscope run --resume {folder}" in r.output.replace("\n", "")
    assert json.loads((folder / "run.json").read_text())["status"] == "running"


def test_python_dash_m_starts_through_the_same_guarded_entry_point() -> None:
    main = (ROOT / "tokenscope" / "__main__.py").read_text()
    assert "from tokenscope.entry import main" in main and "tokenscope.cli" not in main and "KeyboardInterrupt" in main


def test_a_table_with_text_where_numbers_belong_is_one_line(tmp_path: Path) -> None:
    from tokenscope.render.tables import _read_csv

    path = tmp_path / "methods.csv"
    path.write_text("image,method,agreement,tokens\na.png,tome,abc,12\n")
    with pytest.raises(ConfigError, match=r"methods.csv: column 'agreement' holds 'abc' where a number belongs"):
        _read_csv(path)
    path.write_text("image,method,agreement,tokens\na.png,tome,0.9,12\n")
    assert _read_csv(path)["agreement"].dtype.kind == "f"


def test_the_explorer_refuses_a_sweep_folder_in_one_line(labelled_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "sweep-1"
    shutil.copytree(labelled_run, run)
    doc = json.loads((run / "run.json").read_text())
    doc["kind"] = "sweep"
    (run / "run.json").write_text(json.dumps(doc))
    r = CliRunner().invoke(app, ["view", str(run)])
    assert r.exit_code == 2 and "explorer shows run and compare folders" in r.output and "Traceback" not in r.output


def test_a_ctrl_c_typer_swallows_before_any_work_is_still_said(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import tokenscope.cli as cli
    from tokenscope import entry

    def typer_caught_it(**kwargs: object) -> None:
        raise SystemExit(130)  # what typer does with a KeyboardInterrupt it catches itself

    monkeypatch.setattr(cli, "app", typer_caught_it)
    monkeypatch.setattr(cli, "INTERRUPT_SAID", False)
    with pytest.raises(SystemExit) as exc:
        entry.main()
    assert exc.value.code == 130 and "interrupted before any work began" in capsys.readouterr().err


def test_a_ctrl_c_a_library_turns_into_another_error_is_still_an_interruption(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib, interrupted while drawing, raises ValueError('Invalid affine transformation matrix')
    instead of KeyboardInterrupt: the command still says it was interrupted (exit 130), not a traceback."""
    import os
    import signal

    from tokenscope import api

    def drawing(*args: object, **kwargs: object) -> None:
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError("Invalid affine transformation matrix") from None

    monkeypatch.setattr(api, "run", drawing)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may run with it ignored)
    try:
        r = CliRunner().invoke(app, ["run", str(IMAGE), "--out", str(tmp_path / "o")])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    finally:
        signal.signal(signal.SIGINT, before)
    assert r.exit_code == 130 and "interrupted" in r.output and r.exception is not None
    assert not isinstance(r.exception, ValueError)
