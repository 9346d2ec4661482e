"""Print the Markdown table of methods in README.md from a `tokenscope sweep --methods` folder.

    .venv/bin/python benchmarks/methods_table.py outputs/sweep-YYYYMMDD-HHMMSS/sweep.csv

One row per operating point, in the sweep's order; every number is read from the file.
"""

from __future__ import annotations

import sys

import pandas as pd

COLUMNS = ("method", "operating point", "mIoU", "GFLOPs/img", "FLOP reduction", "tokens/block", "exited",
           "images/s (measured)")


def main(path: str) -> None:
    df = pd.read_csv(path)
    base = df[df["is_baseline"]].iloc[0]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for _, r in df.iterrows():
        point = "-" if r["is_baseline"] else str(r["point"]).partition(":")[2] or "default"
        print("| " + " | ".join([
            str(r["method"]), point, f"{100 * r['miou']:.2f}", f"{r['gflops_per_image']:.2f}",
            f"{base['gflops_per_image'] / r['gflops_per_image']:.2f}x",
            f"{r['mean_tokens_per_block']:.0f}", f"{r['exited_early_pct']:.1f}%", f"{r['images_per_s']:.2f}",
        ]) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
