"""Print the Expedit comparison (Segmenter ViT-L/16, ADE20K, 640 px) from a sweep's `sweep.csv`:
tokenscope's mIoU and GFLOPs per image beside the figures Expedit published.

    .venv/bin/python benchmarks/expedit_table.py benchmarks/results/expedit/sweep.csv

Every tokenscope number is read from the file (`scripts/reproduce_expedit_table.sh` writes it); a
published figure names its source, and a row without one says so rather than show a number.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

EXPEDIT = "Expedit README (Segmenter, ViT-L/16, ADE20K, 640x640, official Segmenter weights)"
PUBLISHED = {  # method: (mIoU, GFLOPs, source)
    "vit": (51.82, 659.0, EXPEDIT),
    "hourglass": (51.56, 444.0, EXPEDIT + ", Hourglass"),
}
NOTES = {
    "vit": "mmsegmentation's release of the same model (what `--model segmenter-vit-l-mask-ade20k` reads) reports "
           "52.16 mIoU itself",
    "hourglass": "tokenscope's defaults (side 0.7, after block 10 of 24), not read from the reference's configuration",
    "tome": "ToMe's rule at 5% of the tokens per block; no Segmenter figure transcribed from Expedit",
    "evit": "EViT's keep rate 0.7 at blocks 4, 7, 10 of 12 scaled to the depth; no Segmenter figure transcribed",
}


def main(path: str = "benchmarks/results/expedit/sweep.csv") -> int:
    csv = Path(path)
    if not csv.is_file():
        print(f"error: {csv} not found (run scripts/reproduce_expedit_table.sh first)", file=sys.stderr)
        return 2
    df = pd.read_csv(csv)
    cols = ("method", "operating point", "published mIoU", "published GFLOPs", "tokenscope mIoU",
            "tokenscope GFLOPs/img", "FLOP reduction", "note")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    base = df[df["is_baseline"].astype(str) == "True"]
    base_gflops = float(base["gflops_per_image"].iloc[0]) if len(base) else float("nan")
    for _, row in df.iterrows():
        method = str(row["method"])
        miou, gflops, source = PUBLISHED.get(method, (None, None, "not published for Segmenter ViT-L"))
        point = "reduction off" if str(row["is_baseline"]) == "True" else str(row["point"])
        measured = float(row["gflops_per_image"])
        print(f"| {method} | {point} | {'' if miou is None else f'{miou:.2f}'} | "
              f"{'' if gflops is None else f'{gflops:.0f}'} | {100 * float(row['miou']):.2f} | {measured:.4g} | "
              f"{base_gflops / measured:.2f} | {NOTES.get(method, '')}{'; ' if method in NOTES else ''}{source} |")
    print(f"\n{len(df)} operating points, {int(df['images'].iloc[0])} images; GFLOPs: 2 per multiply-add, "
          "counted by torch's flop counter; mIoU pooled over the images.")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
