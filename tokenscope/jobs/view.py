"""`tokenscope view`: write the explorer of a run or comparison folder, and serve it if asked.

The page is written next to the traces it reads: `explorer.html` (everything inline: opens from
disk with no network), or for `--serve` `explorer-served.html` + `explorer_data/`, served from the
run folder on 127.0.0.1 by the standard library's HTTP server, so each image's data loads only
when it is opened.
"""

from __future__ import annotations

import functools
import http.server
import threading
from dataclasses import dataclass
from pathlib import Path

from tokenscope.jobs.runfolder import fresh_file, latest_run, write_text_atomic
from tokenscope.render.explorer import Progress, explorer_html, served_files


@dataclass
class ViewResult:
    run_dir: Path
    page: Path
    """The page written (explorer.html, or explorer-served.html for --serve)."""


def write_view(run_dir: str | Path | None = None, out: str | Path = "outputs", served: bool = False,
               progress: Progress | None = None) -> ViewResult:
    run_path = Path(run_dir) if run_dir is not None else latest_run(out)
    if not served:
        page = fresh_file(run_path / "explorer.html")
        write_text_atomic(page, explorer_html(run_path, progress))
        return ViewResult(run_path, page)
    page = run_path / "explorer-served.html"
    for rel, text in served_files(run_path, progress):
        target = run_path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text)
    return ViewResult(run_path, page)


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
