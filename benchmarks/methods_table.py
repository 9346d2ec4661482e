"""Print README's methods table from a `tokenscope sweep --methods` folder.

    .venv/bin/python benchmarks/methods_table.py outputs/sweep-YYYYMMDD-HHMMSS [--format markdown|latex|csv]

One row per operating point, in the sweep's order, every number read from the folder's files
(the same table as `tokenscope table FOLDER`): mIoU and its change against the unreduced model
with 95% bootstrap intervals, per-image GFLOPs, measured throughput, and the conditions as notes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenscope.errors import TokenscopeError
from tokenscope.render.tables import FORMATS, paper_table, render_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sweep folder (or its sweep.csv)")
    parser.add_argument("--format", choices=FORMATS, default="markdown")
    args = parser.parse_args(argv)
    folder = args.folder.parent if args.folder.name == "sweep.csv" else args.folder
    try:
        sys.stdout.write(render_table(paper_table(folder, "methods"), args.format))
    except TokenscopeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
