"""The console script's entry point: imports the CLI inside a handler, so Ctrl-C pressed while
torch loads (the first second of every command) ends quietly with exit 130, not a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from tokenscope.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was done\n")
        raise SystemExit(130) from None
    app(prog_name="tokenscope")
