"""The second hostile probe's most serious cases (shared/probes/bad-inputs-2026-12-04.md), as tests:
nothing runs because a data file names it, nothing outside a run folder is read or written through a
link, nothing already written is lost, two writers of one --out cannot both succeed, and odd paths and
inputs are one line, never a traceback or a hang."""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.data.images import load_image, load_label_map
from tokenscope.errors import StorageError
from tokenscope.jobs.view import serve
from tokenscope.storage import output_lock, storage_error, write_exclusive

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_images" / "street_5000001.png"
LABELS = ROOT / "sample_images" / "labels"
EVIL = "from pathlib import Path\nPath({marker!r}).write_text('code from a data file ran')\n"


def _cli(*args: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENSCOPE_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tokenscope", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def base_run(labelled_run: Path) -> Path:
    return labelled_run


def _copy_run(base: Path, dest: Path, status: str = "running") -> Path:
    shutil.copytree(base, dest)
    manifest = json.loads((dest / "run.json").read_text())
    manifest["status"] = status
    (dest / "run.json").write_text(json.dumps(manifest))
    return dest


# ---- 2 code from run folders and operating points ----------------------------------------------

def test_a_run_folder_naming_a_method_file_runs_no_code_on_resume(base_run: Path, tmp_path: Path) -> None:
    run = _copy_run(base_run, tmp_path / "rf_evil")
    marker = tmp_path / "PWNED_resume"
    (run / "evil.py").write_text(EVIL.format(marker=str(marker)))
    manifest = json.loads((run / "run.json").read_text())
    manifest["request"]["model"]["method"] = str(run / "evil.py")
    (run / "run.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(app, ["run", "--resume", str(run), "--device", "cpu"])
    assert r.exit_code != 0 and "never makes code run" in r.output and "--method" in r.output
    assert not marker.exists()


@pytest.mark.parametrize("method", ["evil.py", "this.x"])
def test_an_operating_point_file_naming_code_is_refused_before_importing_it(tmp_path: Path, method: str) -> None:
    marker = tmp_path / "PWNED_op"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    op = tmp_path / "op.json"
    op.write_text(json.dumps({"format": "tokenscope-operating-point", "version": 1,
                              "method": str(tmp_path / method) if method.endswith(".py") else method}))
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "128", "--operating-point", str(op), "--device", "cpu",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "never makes code run" in r.output and "--method" in r.output
    assert not marker.exists() and "Beautiful is better than ugly" not in r.output  # `import this` never ran


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_as_an_operating_point_or_an_image_are_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "op.json"
    os.mkfifo(fifo)
    r = _cli("run", IMAGE, "--size", "128", "--operating-point", fifo, "--device", "cpu", "--out", tmp_path / "o",
             timeout=60)
    assert r.returncode != 0 and "not a regular file" in r.stderr and "Traceback" not in r.stderr
    img = tmp_path / "img.png"
    os.mkfifo(img)
    with pytest.raises(Exception, match="not a regular file"):
        load_image(img)


# ---- 1 and 6: nothing outside the run folder is served or embedded ----------------------------

def _get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", f"{host}:{port}")
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def test_the_server_never_follows_links_out_of_the_folder_nor_lists_it(tmp_path: Path) -> None:
    served = tmp_path / "run"
    (served / "img").mkdir(parents=True)
    (served / "img" / "ok.txt").write_text("inside")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET outside the run folder")
    os.symlink(secret, served / "img" / "notes.txt")
    os.symlink(tmp_path, served / "up")
    server, _ = serve(served)
    port = server.server_address[1]
    try:
        assert _get(port, "/img/ok.txt") == (200, b"inside")
        for path in ("/img/notes.txt", "/up/secret.txt", "/up/", "/img/", "/../secret.txt"):
            status, body = _get(port, path)
            assert status == 404 and b"TOP SECRET" not in body, path
        assert _get(port, "/img/ok.txt%00.json")[0] in (400, 404)
        assert _get(port, "/img/ok.txt", host="attacker.example")[0] == 403  # DNS rebinding
    finally:
        server.shutdown()
        server.server_close()


def test_the_report_never_embeds_a_file_a_link_leads_to(base_run: Path, tmp_path: Path) -> None:
    run = _copy_run(base_run, tmp_path / "repsym", status="complete")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"TOP SECRET outside the run folder")
    target = run / "figures" / "tokens_per_block.png"
    target.unlink()
    os.symlink(secret, target)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 3 and "a link out of the run folder" in r.output
    html = next(run.glob("report*.html")).read_text()
    import base64
    assert base64.b64encode(b"TOP SECRET outside the run folder").decode() not in html


# ---- 9 and 7: nothing already written is lost ---------------------------------------------------

def test_images_named_like_the_run_folders_own_files_get_folders_of_their_own(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("tables", "explorer_data", "summary.json", "run.json"):
        shutil.copy(IMAGE, src / f"{name}.png")
    r = CliRunner().invoke(app, ["run", str(src), "--size", "128", "--no-animation", "--device", "cpu",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "o").glob("run-*"))
    manifest = json.loads((run / "run.json").read_text())
    folders = {im["folder"] for im in manifest["images"]}
    assert folders == {"tables-image", "explorer_data-image", "summary.json-image", "run.json-image"}
    assert manifest["status"] == "complete" and (run / "tables" / "images.csv").is_file()
    for f in folders:
        assert (run / f / "trace.json").is_file() and (run / f / "blocks.csv").is_file()
    r = CliRunner().invoke(app, ["view", str(run)])
    assert r.exit_code == 0, r.output
    assert all((run / f / "trace.json").is_file() for f in folders)


def test_resume_never_writes_through_a_link_inside_the_run_folder(base_run: Path, tmp_path: Path) -> None:
    run = _copy_run(base_run, tmp_path / "symtab")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "images.csv").write_text("precious user data")
    shutil.rmtree(run / "tables")
    os.symlink(victim, run / "tables")
    r = CliRunner().invoke(app, ["run", "--resume", str(run), "--device", "cpu"])
    assert r.exit_code != 0 and "symbolic link" in r.output
    assert (victim / "images.csv").read_text() == "precious user data" and len(list(victim.iterdir())) == 1


def _write_same(path: str, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    barrier.wait()
    try:
        write_exclusive(path, lambda f: f.write(f"written by {os.getpid()}"))
        results.put("ok")
    except StorageError as exc:
        results.put(f"refused: {exc}")


def test_two_writers_of_one_output_started_together_cannot_both_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    target = tmp_path / "op.json"
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_write_same, args=(str(target), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes[0] == "ok" and outcomes[1].startswith("refused") and "nothing was overwritten" in outcomes[1]
    assert target.read_text().startswith("written by")


def _hold(path: str, ready: multiprocessing.Event, release: multiprocessing.Event) -> None:
    with output_lock(path, "checkpoint"):
        ready.set()
        release.wait(30)


def test_an_output_held_by_one_process_is_refused_to_another(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path / "m.json"), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        r = _cli("train", "--out", tmp_path / "m", "--crops", "64x2", "--size", "128", "--steps", "1", "--no-eval",
                 "--device", "cpu")
        assert r.returncode != 0 and "being written by another tokenscope process" in r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "m.json").exists()
    finally:
        release.set()
        holder.join(30)


# ---- 11.26: a main command on its own output ---------------------------------------------------

def test_table_reads_a_threshold_sweep(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["sweep", "--seeds", "100000:100002", "--scene-size", "128", "--merge-thresholds", "0.5",
                                 "--exit-thresholds", "0.95", "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    sweep = next(tmp_path.glob("sweep-*"))
    assert json.loads((sweep / "run.json").read_text())["methods"] is None
    t = CliRunner().invoke(app, ["table", str(sweep)])
    assert t.exit_code == 0 and "| vit |" in t.output


# ---- 7: odd output paths -------------------------------------------------------------------------

def test_paths_holding_rich_markup_are_printed_not_parsed(tmp_path: Path) -> None:
    for name in ("o[/]", "o2[@a=(]", "d[/x]"):
        out = tmp_path / name
        r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "128", "--no-animation", "--no-figures", "--device",
                                     "cpu", "--out", str(out)])
        assert r.exit_code == 0 and r.exception is None and name in r.output, r.output
        run = next(out.glob("run-*"))
        for args in (["heatmap", str(run), "--kind", "merge"], ["view", str(run)], ["report", str(run)]):
            r = CliRunner().invoke(app, args)
            assert r.exit_code == 0 and r.exception is None, (args, r.output)


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_an_out_that_is_a_dangling_link_or_a_loop_is_one_line(tmp_path: Path, kind: str) -> None:
    link = tmp_path / kind
    os.symlink(tmp_path / "nowhere" if kind == "dangling" else link, link)
    for args in (["run", IMAGE, "--size", "128", "--no-animation", "--device", "cpu", "--out", link],
                 ["compare", IMAGE, "--size", "128", "--repeats", "1", "--device", "cpu", "--out", link],
                 ["tune", "--max-gflops", "4.5", "--calib-seeds", "200000:200001", "--held-seeds", "300000:300001",
                  "--scene-size", "128", "--out", link / "op.json", "--device", "cpu"]):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code not in (0, 1) and r.exception is None or isinstance(r.exception, SystemExit), r.output
        assert "error:" in r.output and r.output.count("error:") == 1, r.output


def test_every_os_error_is_one_line_naming_the_path() -> None:
    import errno
    for code in (errno.EEXIST, errno.ENAMETOOLONG, errno.EISDIR, errno.EFBIG, errno.ELOOP, errno.EBUSY):
        msg = str(storage_error(OSError(code, os.strerror(code)), Path("/x/y")))
        assert msg.startswith("cannot write /x/y:") and "\n" not in msg


# ---- 5 and 9: images ---------------------------------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height, with no pixel data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_an_image_whose_header_is_too_large_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 30000, 30000)
    with pytest.raises(Exception, match="more than tokenscope decodes"):
        load_image(bomb)


def test_exif_orientation_turns_the_image_and_its_labels_alike(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :5] = 255  # a white band on the left, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    lab = np.zeros((10, 20), np.uint8)
    lab[:, :5] = 1
    Image.fromarray(lab).save(tmp_path / "photo.png", exif=exif.tobytes())
    img = load_image(tmp_path / "photo.jpg")
    labels = load_label_map(tmp_path / "photo.png")
    assert img.shape[:2] == (20, 10) and labels.shape == (20, 10)
    assert img[:5, :, 0].mean() > 0.9 and img[-5:, :, 0].mean() < 0.1  # the band is now on top
    assert (labels[:5] == 1).all() and (labels[5:] == 0).all()


# ---- 8: messages -------------------------------------------------------------------------------

def test_ctrl_c_and_memory_errors_are_said_for_the_command_that_had_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenscope import api

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    def exhausted(*a: object, **k: object) -> None:
        raise MemoryError

    monkeypatch.setattr(api, "compare", interrupted)
    r = CliRunner().invoke(app, ["compare", str(IMAGE)])
    assert r.exit_code == 130 and "run.json" not in r.output and "interrupted" in r.output
    monkeypatch.setattr(api, "compare", exhausted)
    r = CliRunner().invoke(app, ["compare", str(IMAGE)])
    assert r.exit_code != 0 and "out of memory" in r.output and "Traceback" not in r.output


# ---- 3: crafted checkpoint descriptions -----------------------------------------------------------

@pytest.mark.parametrize("change", [{"version": "abc"}, {"version": [1]}, {"trained": [1]}, {"metadata": [1]},
                                    {"config.class_colours": [[1e400, 0, 0]] * 8},
                                    {"config.merge_thresholds": "abcd"},
                                    {"config.timm_kwargs": {"checkpoint_path": "/etc/passwd"}}])
def test_a_checkpoint_description_of_the_wrong_types_is_one_line(tmp_path: Path, change: dict) -> None:
    weights = ROOT / "tokenscope" / "weights"
    doc = json.loads((weights / "demo.json").read_text())
    for key, value in change.items():
        where = doc
        *parents, last = key.split(".")
        for p in parents:
            where = where[p]
        where[last] = value
    (tmp_path / "m.json").write_text(json.dumps(doc))
    shutil.copy(weights / "demo.safetensors", tmp_path / "m.safetensors")
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "128", "--weights", str(tmp_path / "m.json"),
                                 "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (change, r.output, r.exception)
    assert r.output.count("error:") == 1 and str(tmp_path / "m.json") in r.output


# ---- 11: crafted run-folder content --------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("size", "abc"), ("inputs", 5), ("model.exit_threshold", "high")])
def test_a_run_json_field_of_the_wrong_type_is_one_line_on_resume(base_run: Path, tmp_path: Path, field: str,
                                                                  value: object) -> None:
    run = _copy_run(base_run, tmp_path / "rfm")
    manifest = json.loads((run / "run.json").read_text())
    where = manifest["request"]
    *parents, last = field.split(".")
    for p in parents:
        where = where[p]
    where[last] = value
    (run / "run.json").write_text(json.dumps(manifest))
    r = CliRunner().invoke(app, ["run", "--resume", str(run), "--device", "cpu"])
    assert r.exit_code not in (0, 1) and isinstance(r.exception, SystemExit), r.output
    assert f"request.{field}" in r.output and "must be" in r.output


@pytest.mark.parametrize("change", [{"grid": [100000, 100000]}, {"depth": "x"}, {"num_classes": 1e9},
                                    {"padded_hw": [1600000, 1600000]}])
def test_a_trace_meta_that_disagrees_with_its_arrays_is_one_line(base_run: Path, tmp_path: Path, change: dict) -> None:
    run = _copy_run(base_run, tmp_path / "tr", status="complete")
    image = next(p for p in run.iterdir() if (p / "trace.json").is_file())
    doc = json.loads((image / "trace.json").read_text())
    doc["meta"].update(change)
    (image / "trace.json").write_text(json.dumps(doc))
    for cmd in ("heatmap", "view"):
        r = CliRunner().invoke(app, [cmd, str(run)])
        assert r.exit_code == 3 and r.exception is None or isinstance(r.exception, SystemExit), (cmd, r.output)
        assert "re-run the image" in r.output or "meta" in r.output, (cmd, r.output)


def test_a_compare_manifest_naming_methods_that_are_not_names_is_one_line(tmp_path: Path) -> None:
    from tokenscope.errors import RunFolderError
    from tokenscope.render.manifest import check_manifest

    for methods in ([1], [{"a": 1}], ["../../../../etc"]):
        with pytest.raises(RunFolderError, match="methods\\[0\\]"):
            check_manifest({"kind": "compare", "methods": methods}, tmp_path / "run.json")


def test_an_npz_member_larger_than_a_trace_holds_is_refused_before_it_is_inflated(
        base_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    trace_module = importlib.import_module("tokenscope.trace.trace")
    from tokenscope.errors import RunFolderError

    monkeypatch.setattr(trace_module, "MAX_MEMBER_BYTES", 1000)
    image = next(p for p in base_run.iterdir() if (p / "trace.json").is_file())
    with pytest.raises(RunFolderError, match="would unpack to"):
        trace_module.Trace.load(image)


# ---- 10: plug-ins and class maps -------------------------------------------------------------------

def test_a_method_file_calling_sys_exit_is_one_line_not_a_silent_success(tmp_path: Path) -> None:
    (tmp_path / "exit0.py").write_text("import sys\nsys.exit(0)\n")
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "128", "--method", str(tmp_path / "exit0.py"),
                                 "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "SystemExit" in r.output and not (tmp_path / "o").exists()


def test_a_class_map_key_that_only_looks_like_a_digit_is_one_line(tmp_path: Path) -> None:
    cm = tmp_path / "sup.json"
    cm.write_text(json.dumps({"²": 1}))
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--labels", str(LABELS), "--size", "128", "--class-map", str(cm),
                                 "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output


def test_control_characters_in_a_file_name_cannot_rewrite_the_terminal(tmp_path: Path) -> None:
    bad = tmp_path / "\x1b[2J\x1b[31mansi\nname.png"
    bad.write_bytes(b"")
    r = CliRunner().invoke(app, ["run", str(bad), "--size", "128", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 3 and "\x1b" not in r.output and "\\x1b" in r.output
    assert len([ln for ln in r.output.splitlines() if "error:" in ln]) == 1 and "\\n" in r.output


# ---- 4: foreign configs are parsed within a budget --------------------------------------------------

def test_an_mmseg_config_built_from_names_is_parsed_at_once_not_expanded(tmp_path: Path) -> None:
    from tokenscope.models.importers.mmseg_config import parse_config_text

    text = ("a0 = dict(x=1, y=2)\n" + "".join(f"a{i} = dict(p=a{i - 1}, q=a{i - 1})\n" for i in range(1, 60))
            + "model = dict(backbone=dict(num_heads=2), decode_head=a59)\nx = " + "-" * 50000 + "1\n")
    t0 = time.perf_counter()
    cfg = parse_config_text(text)
    assert time.perf_counter() - t0 < 5
    assert parse_config_text("model = dict(backbone=dict(num_heads=2), decode_head=dict(a=1))\n")["model"][
        "backbone"] == {"num_heads": 2}
    assert cfg == {} or "a59" not in cfg


# ---- 13: the Python API's arguments ---------------------------------------------------------------

def test_the_python_api_refuses_wrong_types_in_one_error_and_takes_one_path_as_a_list(tmp_path: Path) -> None:
    import tokenscope as ts

    m = ts.load_model("demo")
    img = str(IMAGE)
    tr = ts.trace(m, img, size=64)
    calls = [lambda: ts.load_model("demo", exit_threshold="high"), lambda: ts.load_model("demo", budget="x"),
             lambda: ts.load_model("demo", method=7), lambda: ts.load_model("demo", device=0),
             lambda: ts.trace(m, img, size="abc"), lambda: ts.trace_many(m, [img], batch_size="2"),
             lambda: ts.run([img], size="x"), lambda: ts.bench(size="x"), lambda: ts.load_trace(123),
             lambda: tr.save(123), lambda: ts.heatmap(123), lambda: ts.view(42), lambda: ts.import_segmenter(5, "x"),
             lambda: ts.check_data("folder", root=5), lambda: ts.read_operating_point(5), lambda: ts.table(5),
             lambda: ts.train(5), lambda: m.save(5), lambda: ts.tabulate("x"), lambda: ts.tabulate([1, 2]),
             lambda: ts.plot.merge(None), lambda: ts.plot.histogram("x"), lambda: ts.plot.groups(tr, "a"),
             lambda: ts.run(123), lambda: ts.compare([img], methods=5), lambda: ts.compare([img], methods=["tome", 7]),
             lambda: ts.evaluate(m, seeds=5), lambda: ts.list_methods(1)]
    for i, call in enumerate(calls):
        with pytest.raises(ts.TokenscopeError):
            call()
    result = ts.compare(img, size=64, repeats=1, warmup=0, out=tmp_path)  # one path: one image, not 55 characters
    assert len(result.images) == 1 and result.images[0].error is None


@pytest.mark.parametrize("bad", ["net_kwargs: [1, 2]\n", "net_kwargs:\n  n_heads: abc\n", "net_kwargs:\n  n_heads: .inf\n",
                                 "inference_kwargs:\n  window_size: [abc]\n"])
def test_a_variant_yml_of_the_wrong_types_is_one_line(tmp_path: Path, bad: str) -> None:
    from segmenter_reference import segmenter_state, write_segmenter_release

    ckpt = write_segmenter_release(tmp_path / "rel", segmenter_state("mask"), "mask_transformer")
    (ckpt.parent / "variant.yml").write_text(bad)
    r = CliRunner().invoke(app, ["import", "segmenter", str(ckpt), "--out", str(tmp_path / "out")])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    assert "variant.yml" in r.output and r.output.count("error:") == 1


def test_a_trace_holding_a_pickled_array_is_named_damaged_by_report_too(base_run: Path, tmp_path: Path) -> None:
    import zipfile

    run = _copy_run(base_run, tmp_path / "pick", status="complete")
    image = next(p for p in run.iterdir() if (p / "trace.npz").is_file())
    with zipfile.ZipFile(image / "trace.npz", "a") as zf:
        with zf.open("evil.npy", "w") as out:
            np.lib.format.write_array(out, np.array([object()], dtype=object), allow_pickle=True)
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 3 and "pickled object array" in r.output


def test_a_file_name_that_is_not_utf8_is_traced_and_tabled(tmp_path: Path) -> None:
    folder = tmp_path / "uni"
    folder.mkdir()
    try:
        shutil.copy(IMAGE, os.fsencode(folder) + b"/bad\xffname.png")
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    r = CliRunner().invoke(app, ["run", str(folder), "--size", "128", "--no-animation", "--device", "cpu",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 0 and r.exception is None, r.output
    run = next((tmp_path / "o").glob("run-*"))
    assert "bad\ufffdname.png" in pd.read_csv(run / "tables" / "images.csv")["source"].iloc[0]


def test_a_method_file_cannot_pass_for_a_built_in_and_empty_parts_are_refused(tmp_path: Path) -> None:
    from tokenscope.errors import ConfigError
    from tokenscope.models.methods.point import parse_point, resolve

    src = (ROOT / "examples" / "plugins" / "norm_prune" / "norm_prune.py").read_text()
    fake = tmp_path / "fake_tome.py"
    fake.write_text(src.replace('name="norm_prune"', 'name="tome"'))
    assert 'name="tome"' in fake.read_text()
    with pytest.raises(ConfigError, match="built-in method's name"):
        resolve(str(fake))
    for text in ("+tome", "tome+", "dtop++tome"):
        with pytest.raises(ConfigError, match="empty name"):
            parse_point(text)
