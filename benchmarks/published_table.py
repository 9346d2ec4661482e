"""Print README's "published vs tokenscope" table from `benchmarks/results/published/MODEL.csv`.

    .venv/bin/python benchmarks/published_table.py [RESULTS_DIR]

Every published figure names its source; every tokenscope figure is read from a result file that
`scripts/reproduce_published.sh` wrote (a `sweep` over ADE20K val). A row whose file is missing
says "not measured yet" rather than a number.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tokenscope.models.published import PUBLISHED

ALGM = "ALGM README (tue-mps/algm-segmenter), Results and Models, ADE20K"
CTS = "CTS README (tue-mps/cts-segmenter), Results and Models, ADE20K, 30% token reduction"


@dataclass(frozen=True)
class Point:
    model: str
    point: str
    """The operating point's name in the sweep (`baseline` = reduction off)."""
    published: float | None
    source: str
    training: str


def points() -> list[Point]:
    out = [Point(m.name, "baseline", m.miou, f"{m.reference} (single scale)",
                 "same weights, reduction off: expect within 0.3")
           for m in PUBLISHED.values()]
    fine_tuned = {  # backbone: (ALGM, its Segmenter baseline, CTS, its baseline), ADE20K val single scale
        "segmenter-vit-t-mask-ade20k": (38.9, 38.1, 38.2, 38.1),
        "segmenter-vit-s-mask-ade20k": (46.4, 45.3, 45.1, 45.0),
        "segmenter-vit-b-mask-ade20k": (49.4, 48.5, 48.7, 48.5),
        "segmenter-vit-l-mask-ade20k": (52.7, 51.8, 51.6, 51.8),
    }
    for name in PUBLISHED:
        algm, algm_base, cts, cts_base = fine_tuned.get(name, (None, None, None, None))
        out.append(Point(name, "algm:threshold=0.88", algm, ALGM if algm else "no published figure for this model",
                         f"published: fine-tuned with ALGM (Segmenter's own weights gave {algm_base} there); "
                         "here training-free" if algm else "training-free"))
        out.append(Point(name, "cts:groups=0.4", cts, CTS if cts else "no published figure for this model",
                         f"published: fine-tuned with CTS and its policy network (baseline {cts_base} there); "
                         "here training-free, uniformity scores" if cts else "training-free, uniformity scores"))
        out.append(Point(name, "tome:r=0.05", None, "ToMe publishes no segmentation figure", "training-free"))
    return out


def main(folder: str = "benchmarks/results/published") -> None:
    root = Path(folder)
    cols = ("model", "operating point", "published mIoU", "source", "tokenscope mIoU", "GFLOPs/img", "note")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for p in points():
        csv = root / f"{p.model}.csv"
        measured, gflops = "not measured yet", ""
        if csv.is_file():
            df = pd.read_csv(csv)
            row = df[df["point"] == p.point]
            if len(row):
                measured = f"{100 * float(row['miou'].iloc[0]):.2f}"
                gflops = f"{float(row['gflops_per_image'].iloc[0]):.1f}"
        published = "" if p.published is None else f"{p.published:.2f}"
        print(f"| {p.model} | {p.point if p.point != 'baseline' else 'vit (reduction off)'} | {published} | {p.source} "
              f"| {measured} | {gflops} | {p.training} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
