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
from tokenscope.storage import writing


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


def _swap_in(new: Path, current: Path) -> None:
    """Put the complete folder `new` where `current` is (the old one removed after the swap)."""
    old = current.with_name(f".{current.name}.old-{os.getpid()}")
    with writing(current):
        if current.exists():
            os.replace(current, old)
        os.replace(new, current)
    shutil.rmtree(old, ignore_errors=True)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # the CLI says what is served; no log per request
        pass


def serve(folder: Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, threading.Thread]:
    """Serve `folder` on 127.0.0.1 (a free port when 0) in a background thread; the caller stops
    it with `server.shutdown()`."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
