"""Class names and standard palettes of the public segmentation data sets.

Imported models and data-set runs name real classes in overlays, tables and reports. The lists
ship as JSON files beside this module (`classes/<name>.json`), in the order of the data sets'
train ids: ADE20K's 150 (annotation 0 is ignored, annotation k is class k-1), Cityscapes' 19,
and Pascal Context's 60 with background first (Segmenter's release); a 59-class model of
Pascal Context drops background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenscope.errors import ConfigError

CLASSES_DIR = Path(__file__).resolve().parent / "classes"
KNOWN_DATASETS = ("ade20k", "cityscapes", "pascal_context")


SEGMENTER_PROTOCOL = {"ade20k": (512, 512, 512), "cityscapes": (768, 512, 1024), "pascal_context": (480, 320, 520)}
"""(window, stride, short side) of Segmenter's sliding-window evaluation per data set (its config.yml)."""


@dataclass(frozen=True)
class ClassInfo:
    """Names and RGB colours of a data set's classes, in train-id order."""

    dataset: str
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]


@lru_cache(maxsize=None)
def _read(name: str) -> ClassInfo:
    doc = json.loads((CLASSES_DIR / f"{name}.json").read_text())
    return ClassInfo(name, tuple(doc["classes"]), tuple(tuple(int(v) for v in c) for c in doc["palette"]))


def dataset_classes(dataset: str, num_classes: int | None = None) -> ClassInfo:
    """The classes of `dataset`, for a model with `num_classes` outputs (checked)."""
    if dataset not in KNOWN_DATASETS:
        raise ConfigError(f"no class list for data set {dataset!r}; known: {', '.join(KNOWN_DATASETS)}")
    info = _read(dataset)
    n = len(info.names) if num_classes is None else num_classes
    if dataset == "pascal_context" and n == len(info.names) - 1:
        return ClassInfo(dataset, info.names[1:], info.palette[1:])
    if n != len(info.names):
        raise ConfigError(f"a {dataset} model has {len(info.names)} classes, this one has {n}")
    return info


def guess_dataset(num_classes: int, hint: str = "") -> str:
    """The data set a model with `num_classes` outputs was most likely trained on ('' if none).

    `hint` (a config file name or data-set entry, e.g. 'ade20k' or 'cityscapes') wins when it names one.
    """
    h = hint.lower().replace("-", "_").replace(" ", "_")
    for name, keys in (("ade20k", ("ade",)), ("cityscapes", ("cityscapes",)), ("pascal_context", ("pascal", "context"))):
        if any(k in h for k in keys):
            return name
    return {150: "ade20k", 19: "cityscapes", 60: "pascal_context", 59: "pascal_context"}.get(num_classes, "")
