"""Do the model's classes mean the data's labels? Checked before any mIoU, or said beside it.

A model predicts class ids 0..C-1 with names (its config); a data set stores label ids with
names of its own (ADE20K's 150, Cityscapes' 19, ...), and a label file is just integers. If the
two spaces differ, an mIoU is computed over the wrong pairs of classes and looks as sure as a
right one. So every command that scores predictions first builds a `ClassSpace`:

- the spaces agree (same count, and the same names where both have names; label values inside
  the model's classes or 255): scoring goes ahead and nothing is said;
- they differ: the command refuses with one line naming both spaces and the two ways on:
  `--class-map FILE` (data-set id or name -> model id or name; everything else is ignored) or
  `--ignore-class-mismatch` (score anyway: labels outside the model's classes are skipped);
  either choice is recorded (run.json, summary.json, tables) and printed beside every mIoU.

A class map file is JSON, `{"road": "road", "3": 0, "sky": 5}` (keys: the data set's class ids
after its own conversion, or its class names; values: the model's class ids or names, or 255 to
ignore), or a two-column CSV `data_id,model_id`. Ids left out become 255 (ignored). Label files
given with `--labels` have no class names of their own: names on their side are the model's.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from tokenscope.data.images import IGNORE_INDEX
from tokenscope.errors import ConfigError

LOOKUP_SIZE = 65536
"""Label files are 8- or 16-bit: every raw value has a slot in the lookup table."""
HOW = "give --class-map FILE (data-set class -> model class) or --ignore-class-mismatch to score anyway"


def _norm(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _names_text(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return f" ({shown}{', ...' if len(names) > limit else ''})" if names else ""


@dataclass(frozen=True)
class ClassSpace:
    """How a data set's labels are scored against a model's predictions.

    `condition` is empty when the spaces agree; otherwise it is the sentence printed beside
    every mIoU (and recorded), because the user chose a class map or to ignore the mismatch.
    """

    model_classes: int
    model_label: str
    lookup: np.ndarray | None = None
    """Raw label value -> model class id (or 255); None = labels are already model ids."""
    ignore_mismatch: bool = False
    condition: str = ""
    class_map: str = ""
    """The class map file's path, when one was given."""
    notes: list[str] = field(default_factory=list)
    """Mismatches seen while scoring with --ignore-class-mismatch (one per kind, for the record)."""

    @property
    def tag(self) -> str:
        """The few words printed right after an mIoU ("" when the spaces agree)."""
        if self.class_map:
            return f"classes mapped by {Path(self.class_map).name}"
        return "class mismatch ignored" if self.condition or self.notes else ""

    def warnings(self) -> list[str]:
        """The lines a run's or comparison's warnings carry: the condition, then what scoring met."""
        return [*([self.condition] if self.condition else []), *self.notes]

    def record(self) -> dict[str, object]:
        return {"agree": not self.condition and not self.notes, "condition": self.condition, "class_map": self.class_map or None,
                "ignore_mismatch": self.ignore_mismatch, "model_classes": self.model_classes, "notes": list(self.notes)}

    def labels(self, raw: np.ndarray, source: str) -> np.ndarray:
        """`raw` in model class ids (255 = ignore), or one error when values lie outside them."""
        lab = raw if self.lookup is None else self.lookup[np.clip(raw, 0, LOOKUP_SIZE - 1)]
        bad = (lab != IGNORE_INDEX) & ((lab < 0) | (lab >= self.model_classes))
        if bad.any():
            values = np.unique(lab[bad])
            shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            what = (f"{source}: label values {shown} lie outside the {self.model_classes} classes of {self.model_label} "
                    f"(0-{self.model_classes - 1}, 255 = ignore)")
            if not self.ignore_mismatch:
                raise ConfigError(f"{what}; {HOW}")
            note = f"labels outside the model's classes skipped (e.g. {source}: {shown})"
            if not any(n.startswith("labels outside") for n in self.notes):
                self.notes.append(note)
            lab = np.where(bad, IGNORE_INDEX, lab)
        return lab.astype(np.int32, copy=False)


def _read_map(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--class-map {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--class-map {path}: cannot read it ({exc})") from None
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and not r[0].startswith("#")]
        if rows and not rows[0][0].strip().lstrip("-").isdecimal():
            rows = rows[1:]  # a header line
        if any(len(r) != 2 for r in rows):
            raise ConfigError(f"--class-map {path}: every CSV row must be data_id,model_id")
        return {r[0].strip(): r[1].strip() for r in rows}
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--class-map {path}: not JSON or CSV ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("map"), dict):
        doc = doc["map"]
    if not isinstance(doc, dict):
        raise ConfigError(f"--class-map {path}: expected a JSON object of data-set class -> model class")
    return {str(k): str(v) for k, v in doc.items()}


def _class_id(token: str, names: Sequence[str], count: int | None, side: str, path: Path) -> int:
    t = token.strip()
    if t.lstrip("-").isdecimal() and t.lstrip("-").isascii():
        v = int(t)
        if v == IGNORE_INDEX or (0 <= v and (count is None or v < count) and v < LOOKUP_SIZE):
            return v
        raise ConfigError(f"--class-map {path}: {side} class {v} is out of range"
                          + (f" (0-{count - 1} or 255)" if count else ""))
    wanted = _norm(t)
    for i, n in enumerate(names):
        if _norm(n) == wanted:
            return i
    raise ConfigError(f"--class-map {path}: {side} has no class named {t!r}"
                      + (f" (it has {len(names)}: {', '.join(names[:4])}, ...)" if names else " (it has no class names)"))


def read_class_map(path: str | Path, model_names: Sequence[str], model_classes: int,
                   data_names: Sequence[str], data_classes: int | None) -> np.ndarray:
    """The lookup table (raw label -> model id or 255) a class map file describes."""
    p = Path(path)
    lookup = np.full(LOOKUP_SIZE, IGNORE_INDEX, dtype=np.int32)
    entries = _read_map(p)
    if not entries:
        raise ConfigError(f"--class-map {p}: maps no class")
    for key, value in entries.items():  # label files have no names of their own: theirs are the model's
        src = _class_id(key, data_names or model_names, data_classes, "the data set", p)
        dst = _class_id(value, model_names, model_classes, "the model", p)
        lookup[src] = dst
    return lookup


def class_space(model_label: str, model_names: Sequence[str], model_classes: int, data_label: str,
                data_names: Sequence[str] = (), data_classes: int | None = None, class_map: str | None = None,
                ignore_mismatch: bool = False) -> ClassSpace:
    """Check a model's classes against a data set's (`data_classes` None: label files whose values
    are checked as they are read) and say how scoring may go ahead; refuse when they differ."""
    if class_map:
        lookup = read_class_map(class_map, model_names, model_classes, data_names, data_classes)
        kept = int((lookup != IGNORE_INDEX).sum())
        return ClassSpace(model_classes, model_label, lookup, ignore_mismatch,
                          f"labels of {data_label} mapped to {model_label}'s classes by {class_map} "
                          f"({kept} classes mapped, the rest ignored)", str(class_map))
    problem = ""
    if data_classes is not None and data_names and data_classes != model_classes:
        problem = (f"{model_label} predicts {model_classes} classes{_names_text(model_names)}, "
                   f"{data_label} has {data_classes}{_names_text(data_names)}")
    elif data_classes is not None and not data_names and data_classes > model_classes:
        problem = (f"{data_label}'s labels reach class {data_classes - 1}, {model_label} predicts only "
                   f"{model_classes} classes{_names_text(model_names)}")
    elif data_names and model_names and [_norm(n) for n in data_names] != [_norm(n) for n in model_names]:
        first = next(i for i, (a, b) in enumerate(zip(data_names, model_names)) if _norm(a) != _norm(b))
        problem = (f"{model_label}'s classes are not {data_label}'s: class {first} is {model_names[first]!r} for the "
                   f"model, {data_names[first]!r} for the data")
    if not problem:
        return ClassSpace(model_classes, model_label, None, ignore_mismatch)
    if not ignore_mismatch:
        raise ConfigError(f"class spaces differ: {problem}; {HOW}")
    return ClassSpace(model_classes, model_label, None, True,
                      f"class spaces differ ({problem}); scored anyway (--ignore-class-mismatch): labels outside the "
                      "model's classes are skipped")


def dataset_space(model_label: str, model_names: Sequence[str], model_classes: int, dataset: object, data_label: str,
                  class_map: str | None = None, ignore_mismatch: bool = False) -> ClassSpace:
    """The class space of a model against a data set object (`class_names`, `num_classes`); an
    unlabelled one (scored against the model's own unreduced output) always agrees."""
    if getattr(dataset, "unlabelled", False):
        return ClassSpace(model_classes, model_label)
    names = tuple(getattr(dataset, "class_names", ()) or ())
    count = getattr(dataset, "num_classes", None) or None
    return class_space(model_label, model_names, model_classes, data_label, names, count, class_map, ignore_mismatch)
