"""`tokenscope view`: write the explorer of a run or comparison folder, and serve it if asked.

The page is written next to the traces it reads: `explorer.html` (everything inline: opens from
disk with no network), or for `--serve` `explorer-served.html` + `explorer_data/`, served from the
run folder on 127.0.0.1 by the standard library's HTTP server, so each image's data loads only
when it is opened.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tokenscope.jobs.runfolder import fresh_file, latest_run, write_text_atomic
from tokenscope.render.explorer import DATA_DIR, Progress, explorer_html, served_files
from tokenscope.storage import resolved_inside, writing


@dataclass
class ViewResult:
    run_dir: Path
    page: Path
    """The page written (explorer.html, or explorer-served.html for --serve)."""
    problems: list[str] = field(default_factory=list)
    """One line per damaged or missing image (the page shows each in place of that image)."""


def write_view(run_dir: str | Path | None = None, out: str | Path = "outputs", served: bool = False,
               progress: Progress | None = None) -> ViewResult:
    """Write the explorer of a run or comparison folder. `--serve`'s data folder is written whole
    beside the old one and swapped in when complete, so a killed export never leaves an index
    naming images whose files were not written."""
    run_path = Path(run_dir) if run_dir is not None else latest_run(out)
    problems: list[str] = []
    if not served:
        page = fresh_file(run_path / "explorer.html")
        write_text_atomic(page, explorer_html(run_path, progress, problems=problems))
        return ViewResult(run_path, page, problems)
    page = run_path / "explorer-served.html"
    _remove_stale_staging(run_path)
    staging = run_path / f".{DATA_DIR}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for rel, text in served_files(run_path, progress, problems=problems):
            if rel == page.name:  # the page comes last: only once its data is in place
                _swap_in(staging, run_path / DATA_DIR)
                write_text_atomic(page, text)
                continue
            target = staging / Path(rel).relative_to(DATA_DIR)
            with writing(target.parent):
                target.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(target, text)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ViewResult(run_path, page, problems)


def _remove_stale_staging(run_path: Path) -> None:
    """Staging folders of exports whose process is gone (killed mid-export) are litter: take them away."""
    for stale in run_path.glob(f".{DATA_DIR}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or stale.is_symlink():
            if stale.is_symlink():
                stale.unlink(missing_ok=True)
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running: another export's, leave it
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _swap_in(new: Path, current: Path) -> None:
    """Put the complete folder `new` where `current` is (the old one removed after the swap)."""
    old = current.with_name(f".{current.name}.old-{os.getpid()}")
    with writing(current):
        if current.exists() or current.is_symlink():
            os.replace(current, old)
        os.replace(new, current)
    if old.is_symlink():  # a link put there by someone: the link goes, never what it points to
        old.unlink(missing_ok=True)
    else:
        shutil.rmtree(old, ignore_errors=True)


class _FolderOnlyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files of one folder and nothing else: a path is resolved through every symbolic link and
    refused (404) unless it ends inside the folder; folders are never listed; a request whose Host is
    not this machine's loopback address is refused (a DNS-rebinding page cannot read the run); a
    malformed path (a NUL byte) is a 400, not a traceback in the user's terminal."""

    root = ""

    def log_message(self, *args: object) -> None:  # the CLI says what is served; no log per request
        pass

    def translate_path(self, path: str) -> str:
        candidate = super().translate_path(path)
        try:
            real = resolved_inside(candidate, self.root)
        except (ValueError, OSError):
            real = None
        return real if real is not None else os.path.join(self.root, ".tokenscope-refused", "x")  # never exists: 404

    def list_directory(self, path: str | os.PathLike[str]):  # type: ignore[override]
        self.send_error(404, "No listing")
        return None

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        return host in ("127.0.0.1", "localhost", "::1", "")

    def send_head(self):  # type: ignore[override]
        if not self._host_ok():
            self.send_error(403, "Only this machine's loopback address may ask")
            return None
        try:
            return super().send_head()
        except ValueError:  # an embedded NUL byte and the like
            self.send_error(400, "Bad path")
            return None


def serve(folder: Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, threading.Thread]:
    """Serve `folder` on 127.0.0.1 (a free port when 0) in a background thread, never anything outside
    it (see `_FolderOnlyHandler`); the caller stops it with `server.shutdown()`."""
    root = os.path.realpath(folder)
    handler_type = type("FolderHandler", (_FolderOnlyHandler,), {"root": root})
    handler = functools.partial(handler_type, directory=root)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
