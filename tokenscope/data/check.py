"""`tokenscope data check`: is a data-set tree usable, and if not, what exactly is wrong?

For each split: images, labels and pairs counted; every pair read once to check that the label
map has the image's size and only class ids the data set knows (after its own conversion, so a
raw ADE20K value of 200 is named as such). Problems come back one line each, in file order, so
the first few say what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tokenscope.data.datasets import PairedFiles, open_dataset
from tokenscope.data.fetch import dataset_dir
from tokenscope.data.images import IGNORE_INDEX, load_label_map
from tokenscope.errors import TokenscopeError

SPLITS = {"ade20k": ("train", "val"), "cityscapes": ("train", "val"), "pascal_context": ("train", "val"),
          "folder": ("all",)}


@dataclass
class SplitReport:
    split: str
    images: int = 0
    pairs: int = 0
    checked: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    kind: str
    root: str
    splits: list[SplitReport]

    @property
    def problems(self) -> list[str]:
        return [p for s in self.splits for p in s.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(kind: str, root: str | Path | None = None, limit: int | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> CheckReport:
    """Check every split of data set `kind` (at `root`, else in the cache); `limit` pairs per split
    bounds the time on big trees (counts and missing labels are always complete)."""
    if kind not in SPLITS:
        raise TokenscopeError(f"cannot check data set {kind!r}; choose one of {', '.join(SPLITS)}")
    splits = []
    where = str(root) if root is not None else str(dataset_dir(kind))
    for split in SPLITS[kind]:
        report = SplitReport(split)
        splits.append(report)
        try:
            ds = open_dataset(kind, root, split)
        except TokenscopeError as exc:
            report.problems.append(f"{split}: {exc}")
            continue
        assert isinstance(ds, PairedFiles)
        report.images, report.pairs = len(ds.pairs) + len(ds.unpaired), len(ds.pairs)
        report.problems += [f"{split}: {img.name}: no label file" for img in ds.unpaired]
        n = len(ds) if limit is None else min(limit, len(ds))
        for i in range(n):
            if progress:
                progress(i, n, f"{split} {ds.pairs[i][0].name}")
            problem = _check_pair(ds, i)
            report.checked += 1
            if problem:
                report.problems.append(f"{split}: {problem}")
    return CheckReport(kind, where, splits)


def _check_pair(ds: PairedFiles, i: int) -> str | None:
    img_path, lab_path = ds.pairs[i]
    try:
        sample = ds[i]
    except TokenscopeError as exc:
        return str(exc)
    if sample.image.shape[:2] != sample.labels.shape[:2]:
        return (f"{img_path.name}: image is {sample.image.shape[1]}x{sample.image.shape[0]}, its label map "
                f"{lab_path.name} is {sample.labels.shape[1]}x{sample.labels.shape[0]}")
    bad = (sample.labels != IGNORE_INDEX) & ((sample.labels < 0) | (sample.labels >= ds.num_classes))
    if bad.any():
        raw = np.unique(load_label_map(lab_path)[bad])
        shown = ", ".join(str(v) for v in raw[:5]) + (", ..." if raw.size > 5 else "")
        return (f"{lab_path.name}: label value(s) {shown} outside the {ds.num_classes} classes of the data set "
                f"({int(bad.sum())} pixels)")
    return None
