"""Data sets in two commands: the one downloader (resume, lock, hash, offline) and `tokenscope data`.

The "internet" is an HTTP server on 127.0.0.1 started by each test and shut down after it; it
serves a small fake ADE20K archive with its own hash and can drop a connection halfway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TINY, make_tiny
from test_cli import invoke

from tokenscope.data import fetch as data_fetch
from tokenscope.data.download import download, lock_path
from tokenscope.errors import DownloadError
from tokenscope.models.checkpoints import save_checkpoint


class Server:
    """Serves `files` (path -> bytes) with Range support; `drop_first` cuts the first response of
    each file after half its body; `delay` slows every chunk (to make downloads overlap)."""

    def __init__(self, files: dict[str, bytes], drop_first: bool = False, delay: float = 0.0) -> None:
        self.files, self.requests, self.sent = files, [], 0
        self.dropped: set[str] = set()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner.requests.append((self.path, self.headers.get("Range")))
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_error(416, "Range Not Satisfiable")
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                part = body[start:]
                if owner.drop_first and self.path not in owner.dropped:
                    owner.dropped.add(self.path)
                    part = part[: len(part) // 2]
                    self.close_connection = True
                for i in range(0, len(part), 4096):
                    owner.sent += len(part[i:i + 4096])  # counted before the write: the client may finish first
                    self.wfile.write(part[i:i + 4096])
                    if owner.delay:
                        time.sleep(owner.delay)

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        self.drop_first, self.delay = drop_first, delay
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TOKENSCOPE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("TOKENSCOPE_OFFLINE", raising=False)
    return tmp_path / "cache"


def _png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def fake_ade20k(images: int = 2, size: int = 64, seed: int = 0) -> bytes:
    """A zip laid out as ADEChallengeData2016.zip: images/{training,validation}/*.jpg with
    annotations/{...}/*.png (0 = other, 1..150 = classes)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
            for i in range(1, images + 1):
                name = f"{prefix}_{i:08d}"
                img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
                lab = np.zeros((size, size), np.uint8)
                lab[: size // 2] = 3
                lab[size // 2:] = 7
                ok, jpg = cv2.imencode(".jpg", img)
                z.writestr(f"ADEChallengeData2016/images/{split}/{name}.jpg", jpg.tobytes())
                z.writestr(f"ADEChallengeData2016/annotations/{split}/{name}.png", _png(lab))
    return buf.getvalue()


def _serve_ade20k(monkeypatch: pytest.MonkeyPatch, server: Server, archive: bytes, digest: str | None = None) -> None:
    source = dataclasses.replace(data_fetch.SOURCES["ade20k"], url=server.url("/ADEChallengeData2016.zip"),
                                 digest=digest or hashlib.sha1(archive).hexdigest())
    monkeypatch.setitem(data_fetch.SOURCES, "ade20k", source)


def _checkpoint_150(tmp_path: Path) -> Path:
    cfg = dataclasses.replace(TINY, num_classes=150, class_names=())
    path = tmp_path / "ckpt150" / "tiny150.json"
    save_checkpoint(make_tiny(0, cfg), path, trained={"backbone": True, "decoder": True, "exits": True, "policy": True})
    return path


def test_fetch_verifies_unpacks_and_evaluate_finds_the_data_without_a_root(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = fake_ade20k()
    server = Server({"/ADEChallengeData2016.zip": archive})
    try:
        _serve_ade20k(monkeypatch, server, archive)
        r = invoke("evaluate", "--data", "ade20k", "--weights", _checkpoint_150(tmp_path), "--device", "cpu")
        assert r.exit_code != 0 and "not in the cache" in r.output and "data fetch ade20k" in r.output
        r = invoke("data", "fetch", "ade20k")
        assert r.exit_code == 0, r.output
        assert (home / "data" / "ade20k" / "ADEChallengeData2016" / "images" / "validation").is_dir()
        assert not (home / "downloads" / "ADEChallengeData2016.zip").exists()  # unpacked, then removed
        assert not list(home.glob("data/.ade20k.unpacking-*"))
        r = invoke("data", "fetch", "ade20k")  # a second fetch finds it and downloads nothing
        assert r.exit_code == 0 and len(server.requests) == 1
        out = tmp_path / "eval.json"
        r = invoke("evaluate", "--data", "ade20k", "--weights", _checkpoint_150(tmp_path), "--device", "cpu",
                   "--policy", "none", "--exits", "none", "--json", out)
        assert r.exit_code == 0, r.output
        assert json.loads(out.read_text())["variants"]["baseline"]["images"] == 2
        r = invoke("data", "list")
        assert r.exit_code == 0 and "ade20k" in r.output and "yes" in r.output
    finally:
        server.stop()


def test_an_interrupted_download_resumes_with_a_range_request_and_fetches_no_byte_twice(home: Path, tmp_path: Path) -> None:
    body = bytes(np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8))
    server = Server({"/f.bin": body}, drop_first=True)
    target = tmp_path / "dl" / "f.bin"
    digest = hashlib.sha256(body).hexdigest()
    try:
        with pytest.raises(DownloadError, match="bytes kept in .*f.bin.part, the next run resumes"):
            download(server.url("/f.bin"), target, "sha256", digest, attempts=1)
        part = target.with_name("f.bin.part")
        assert part.stat().st_size == len(body) // 2 and not target.exists()
        assert download(server.url("/f.bin"), target, "sha256", digest) == digest  # the next try
        assert target.read_bytes() == body and not part.exists()
        assert server.requests == [("/f.bin", None), ("/f.bin", f"bytes={len(body) // 2}-")]
        assert server.sent == len(body)
        server.dropped.clear()  # within one call, the automatic retry resumes the same way
        target.unlink()
        sent = server.sent
        download(server.url("/f.bin"), target, "sha256", digest)
        assert server.requests[-1] == ("/f.bin", f"bytes={len(body) // 2}-") and server.sent - sent == len(body)
    finally:
        server.stop()


def test_two_processes_started_together_download_once_and_both_succeed(home: Path, tmp_path: Path) -> None:
    body = bytes(np.random.default_rng(2).integers(0, 256, 200_000, dtype=np.uint8))
    server = Server({"/g.bin": body}, delay=0.01)  # about half a second per download
    target = tmp_path / "dl" / "g.bin"
    digest = hashlib.sha256(body).hexdigest()
    code = ("import sys; from pathlib import Path; from tokenscope.data.download import download; "
            "print(download(sys.argv[1], Path(sys.argv[2]), 'sha256', sys.argv[3]))")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code, server.url("/g.bin"), str(target), digest],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert [o.strip() for o, _ in outs] == [digest, digest]
        assert len(server.requests) == 1 and target.read_bytes() == body
        assert lock_path(target).parent == home / ".locks"
    finally:
        server.stop()


def test_a_wrong_hash_is_one_line_and_leaves_nothing_in_the_cache(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = fake_ade20k()
    server = Server({"/ADEChallengeData2016.zip": archive})
    try:
        _serve_ade20k(monkeypatch, server, archive, digest="0" * 40)
        r = invoke("data", "fetch", "ade20k")
        assert r.exit_code == 2
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "SHA-1" in errors[0] and "nothing was kept" in errors[0]
        assert not list((home / "downloads").iterdir()) and not (home / "data" / "ade20k").exists()
    finally:
        server.stop()


def test_offline_and_missing_files_fail_at_once_with_one_line(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = fake_ade20k()
    server = Server({})
    try:
        _serve_ade20k(monkeypatch, server, archive)
        r = invoke("data", "fetch", "ade20k", "--offline")
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1
        assert server.url("/ADEChallengeData2016.zip") in errors[0] and str(home / "downloads") in errors[0]
        monkeypatch.setenv("TOKENSCOPE_OFFLINE", "1")
        r = invoke("data", "fetch", "ade20k")
        assert r.exit_code == 2 and "offline" in r.output and server.requests == []
        monkeypatch.delenv("TOKENSCOPE_OFFLINE")
        r = invoke("data", "fetch", "ade20k")  # the server has no such file
        assert r.exit_code == 2 and "HTTP 404" in r.output
    finally:
        server.stop()
    r = invoke("data", "fetch", "pascal_context")  # needs an account: says what to do
    assert r.exit_code == 0 and "JPEGImages" in r.output and "pascal_context" in r.output


def _tree(root: Path, archive: bytes) -> Path:
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        z.extractall(root)
    return root / "ADEChallengeData2016"


def test_data_check_names_each_problem_of_a_broken_tree_and_counts_a_good_one(tmp_path: Path, home: Path) -> None:
    good = _tree(tmp_path / "good", fake_ade20k(images=3))
    r = invoke("data", "check", "ade20k", "--root", good)
    assert r.exit_code == 0, r.output
    rows = [ln for ln in r.output.splitlines() if ln.strip().startswith(("│ train", "│ val"))]
    assert len(rows) == 2 and all(" 3 " in ln for ln in rows)
    bad = _tree(tmp_path / "bad", fake_ade20k(images=3))
    ann = bad / "annotations" / "validation"
    (ann / "ADE_val_00000001.png").unlink()  # a missing label
    lab = np.full((64, 64), 3, np.uint8)
    lab[0, 0] = 200
    (ann / "ADE_val_00000002.png").write_bytes(_png(lab))  # a value ADE20K does not have
    (ann / "ADE_val_00000003.png").write_bytes(_png(np.full((32, 64), 3, np.uint8)))  # wrong size
    r = invoke("data", "check", "ade20k", "--root", bad)
    assert r.exit_code == 1
    problems = [ln for ln in r.output.splitlines() if ln.startswith("problem:")]
    assert len(problems) == 3
    assert "ADE_val_00000001.jpg: no label file" in problems[0]
    assert "label value(s) 200 outside the 150 classes" in problems[1]
    assert "is 64x64" in problems[2] and "is 64x32" in problems[2]


def test_a_full_disk_is_one_line_and_a_later_try_completes(home: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from tokenscope.data import download as dl

    body = bytes(300_000)
    server = Server({"/h.bin": body})
    real_open = open

    class Full:
        def __init__(self, path, mode):  # noqa: ANN001
            self.f = real_open(path, mode)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc) -> None:  # noqa: ANN002
            self.f.close()

        def write(self, chunk: bytes) -> None:
            if self.f.tell() + len(chunk) > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.f.write(chunk)

    def full_disk_open(path, mode="r", *args):  # noqa: ANN001, ANN002, ANN202
        return Full(path, mode) if mode in ("ab", "wb") else real_open(path, mode, *args)

    monkeypatch.setattr(dl, "open", full_disk_open, raising=False)
    target = tmp_path / "dl" / "h.bin"
    try:
        with pytest.raises(DownloadError, match=r"disk full writing .*h.bin.part .*free space and run again"):
            download(server.url("/h.bin"), target, "sha256", hashlib.sha256(body).hexdigest())
        assert not target.exists()
        monkeypatch.undo()
        monkeypatch.setenv("TOKENSCOPE_HOME", str(home))
        assert download(server.url("/h.bin"), target, "sha256", hashlib.sha256(body).hexdigest())
        assert target.read_bytes() == body
    finally:
        server.stop()
