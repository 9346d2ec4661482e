"""The console script's entry point: imports the CLI inside a handler, so Ctrl-C pressed while
torch loads (the first second of every command) ends quietly with exit 130, not a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    _stop_quietly_under_torchrun()
    try:
        from tokenscope.cli import app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was done\n")
        raise SystemExit(130) from None
    try:
        app(prog_name="tokenscope")
    except SystemExit as exc:  # typer turns a Ctrl-C it catches itself (before any work began) into a silent 130
        from tokenscope import cli

        if exc.code == 130 and not cli.INTERRUPT_SAID:
            sys.stderr.write("interrupted before any work began; nothing was done\n")
        raise


def _stop_quietly_under_torchrun() -> None:
    """Under torchrun, a rank that dies makes torchrun stop the others with SIGTERM: each then stops as on
    Ctrl-C (its command's one line: what was kept, how to resume), instead of vanishing without a word."""
    import os
    import signal

    if not os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return

    def stopped(signum: int, frame: object) -> None:
        sys.stderr.write(f"rank {os.environ.get('RANK', '?')}: stopped by torchrun (another rank failed; its "
                         "report follows)\n")
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stopped)
