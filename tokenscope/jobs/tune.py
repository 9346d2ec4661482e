"""`tokenscope tune`: the operating point that meets a compute or latency target within an accuracy
limit, chosen on a calibration split and reported honestly on a held-out one.

An operating point is a method label with its settings (`step:merge=0.7:exit=0.9`, `tome:r=0.05`,
`algm:threshold=0.92`, `dcts:budget=2.5`): everything that decides which tokens a forward keeps, in one string that
`run`, `evaluate`, `bench` and the API already accept. `tune` writes it to a small JSON file
(`--operating-point FILE` reads it back) with what was measured where.

The search: every point of the method's grid (plus the baseline) is evaluated on the calibration
images; a point qualifies when it meets every target given (GFLOPs per image, p95 latency,
speed-up over the unreduced model) and loses at most `max_miou_drop` mIoU points against the
labels, or, for unlabelled images (`--data images`), against the unreduced model's own
predictions (whose mIoU is then 100 by definition). Among those, the cheapest in GFLOPs wins. The winner is then measured on the held-out images and the report says
whether it still meets the target there.
"""

from __future__ import annotations

import math
import os
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenscope import __version__
from tokenscope.analysis.evaluate import OperatingPoint, VariantScores, evaluate
from tokenscope.data.datasets import open_dataset
from tokenscope.data.windows import resolve_windows
from tokenscope.errors import ConfigError, TokenscopeError
from tokenscope.schema import read_json
from tokenscope.jobs.setup import ModelOptions, load_model, method_setting
from tokenscope.models.methods.point import external_names, resolve
from tokenscope.models.methods.registry import all_methods
from tokenscope.storage import check_writable, output_lock, write_exclusive, writing

OP_FORMAT = "tokenscope-operating-point"
OP_VERSION = 1


def search_grid(method: str) -> list[str]:
    """The grid `tune --method NAME` searches: the method's own search (declared with it), or a
    named alternative some method declares (dcts's `budget`: exact token reductions)."""
    name = method.strip().lower()
    for m in all_methods().methods:
        if name in m.searches:
            return list(m.searches[name])
    point = resolve(method)
    if len(point.parts) > 1 or point.point.settings or not point.first.search:
        raise ConfigError(f"tune searches one method's grid (e.g. step, tome, algm, budget); {method!r} has none "
                          "(name a method without settings)")
    return point.spelled(point.first.search)


EXIT_NOT_MET_CALIBRATION = 4
EXIT_NOT_MET_HELD_OUT = 5


@dataclass
class Target:
    max_gflops: float | None = None
    p95_latency_ms: float | None = None
    min_speedup: float | None = None
    max_miou_drop: float = 1.0
    """mIoU points (0-100 scale) the point may lose against the unreduced model."""

    def check(self) -> None:
        """Refuse targets no point can meet or that are not numbers, before the search starts."""
        if self.max_gflops is None and self.p95_latency_ms is None and self.min_speedup is None:
            raise ConfigError("tune needs a target: --max-gflops, --p95-latency-ms or --min-speedup")
        for flag, value in (("--max-gflops", self.max_gflops), ("--p95-latency-ms", self.p95_latency_ms),
                            ("--min-speedup", self.min_speedup)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a finite number above 0, got {value}")
        if not (math.isfinite(self.max_miou_drop) and 0 <= self.max_miou_drop <= 100):
            raise ConfigError(f"--max-miou-drop is in mIoU points, from 0 to 100, got {self.max_miou_drop}")


@dataclass
class Measured:
    point: str
    miou: float
    miou_drop: float
    gflops: float
    p95_ms: float
    speedup: float
    meets: dict[str, bool] = field(default_factory=dict)
    miou_ci: dict[str, float | int] = field(default_factory=dict)
    """95% bootstrap interval of the mIoU over the images (fractions, see analysis/uncertainty.py)."""
    change_ci: dict[str, float | int] = field(default_factory=dict)
    """mIoU change against the unreduced model on the same images, paired 95% interval."""

    @property
    def ok(self) -> bool:
        return all(self.meets.values())


def measure(point: str, scores: VariantScores, base: VariantScores, target: Target) -> Measured:
    tail = scores.tails().get("latency_ms", {})
    base_tail = base.tails().get("latency_ms", {})
    p95 = float(tail.get("p95", float("nan")))
    speedup = float(base_tail.get("mean", float("nan"))) / max(float(tail.get("mean", float("nan"))), 1e-9)
    m = Measured(point, 100 * scores.miou, 100 * (base.miou - scores.miou), scores.gflops_per_image, p95, speedup,
                 miou_ci=scores.miou_interval().as_dict(), change_ci=scores.miou_change(base).as_dict())
    m.meets["miou"] = m.miou_drop <= target.max_miou_drop + 1e-9
    if target.max_gflops is not None:
        m.meets["gflops"] = m.gflops <= target.max_gflops
    if target.p95_latency_ms is not None:
        m.meets["p95_latency"] = m.p95_ms <= target.p95_latency_ms
    if target.min_speedup is not None:
        m.meets["speedup"] = m.speedup >= target.min_speedup
    return m


@dataclass
class TuneResult:
    chosen: Measured | None
    held_out: Measured | None
    calibration: list[Measured]
    path: Path | None
    exit_code: int


def _evaluate(loaded: Any, device: Any, points: list[str], opts: ModelOptions, data: str, root: str | None, split: str,
              seeds: str, size: int, progress: Any, window: int | None = None,
              stride: int | None = None) -> tuple[dict[str, VariantScores], dict[str, Any]]:
    ops = [OperatingPoint("baseline", "none", False)]
    for label in points:
        s = method_setting(loaded, opts, label, have_labels=True)
        ops.append(OperatingPoint(label, s.policy, s.exits, s.merge_thresholds, s.exit_threshold, setting=s))
    # unlabelled images: `--data-root DIR` holds one folder per split (DIR/train, DIR/val)
    ds = open_dataset(data, str(Path(root) / split) if data == "images" and root else root, split, seeds, size)
    cfg = loaded.config
    windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, window, stride, None, loaded.model.patch_size)
    result = evaluate(loaded, ds, ops, device, progress, amp=opts.amp, windows=windows, data_label=data,
                      class_map=opts.class_map, ignore_class_mismatch=opts.ignore_class_mismatch)
    return result.variants, result.class_space.record() if result.class_space is not None else {}


def tune(opts: ModelOptions, method: str, target: Target, out: str | Path, data: str = "synthetic",
         data_root: str | None = None, calib_split: str = "train", held_split: str = "val",
         calib_seeds: str = "200000:200040", held_seeds: str = "300000:300040", scene_size: int = 512,
         progress: Any = None, window: int | None = None, stride: int | None = None) -> TuneResult:
    """Search `method`'s grid on the calibration images, write the chosen point to `out`, measure it
    on the held-out images. The exit code says whether the target was met (0), not even on the
    calibration images (4, nothing written), or not on the held-out ones (5, the file says so)."""
    target.check()
    path = Path(out)
    check_writable(path.parent)  # a read-only or full folder says so now, not after the whole search
    with output_lock(path, "operating point"):  # held from the check to the write: one tune per --out
        return _tune(opts, method, target, path, data, data_root, calib_split, held_split, calib_seeds, held_seeds,
                     scene_size, progress, window, stride)


def _tune(opts: ModelOptions, method: str, target: Target, path: Path, data: str, data_root: str | None,
          calib_split: str, held_split: str, calib_seeds: str, held_seeds: str, scene_size: int, progress: Any,
          window: int | None, stride: int | None) -> TuneResult:
    if os.path.lexists(path):  # a dangling link counts: nothing is written through it
        raise TokenscopeError(f"{path} exists; tune never overwrites an operating point (give another --out)")
    grid = search_grid(method)
    loaded, device = load_model(opts, have_labels=data != "images")
    calib, space = _evaluate(loaded, device, grid, opts, data, data_root, calib_split, calib_seeds,
                             scene_size, progress, window, stride)
    base = calib["baseline"]
    measured = [measure(p, calib[p], base, target) for p in grid]
    ok = [m for m in measured if m.ok]
    if not ok:
        return TuneResult(None, None, measured, None, EXIT_NOT_MET_CALIBRATION)
    chosen = min(ok, key=lambda m: (m.gflops, -m.miou))
    held, _ = _evaluate(loaded, device, [chosen.point], opts, data, data_root, held_split, held_seeds, scene_size,
                        progress, window, stride)
    held_m = measure(chosen.point, held[chosen.point], held["baseline"], target)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": OP_FORMAT, "version": OP_VERSION, "tool": "tokenscope", "tool_version": __version__,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "method": chosen.point, "model": opts.model,
           "weights": loaded.weights_id, "target": target.__dict__, "class_space": space,
           "calibration": {"data": data, "split": calib_split if data != "synthetic" else calib_seeds,
                           **{k: v for k, v in chosen.__dict__.items() if k != "point"}},
           "held_out": {"data": data, "split": held_split if data != "synthetic" else held_seeds,
                        **{k: v for k, v in held_m.__dict__.items() if k != "point"}, "met": held_m.ok}}
    write_exclusive(path, lambda f: json.dump(doc, f, indent=1))
    return TuneResult(chosen, held_m, measured, path, 0 if held_m.ok else EXIT_NOT_MET_HELD_OUT)


def read_operating_point(path: str | Path) -> str:
    """The method label an operating-point file holds; one line when the file is not one."""
    return operating_point_doc(path)["method"]


def operating_point_doc(path: str | Path) -> dict[str, Any]:
    """The checked contents of an operating-point file (method, model it was tuned for, targets)."""
    p = Path(path)
    try:
        doc = read_json(p, "operating-point", ConfigError)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such operating-point file") from None
    if doc.get("format") != OP_FORMAT or not isinstance(doc.get("method"), str):
        raise ConfigError(f"{p}: not a tokenscope operating point (written by `tokenscope tune`)")
    if not isinstance(doc.get("version"), int) or not 1 <= doc["version"] <= OP_VERSION:
        raise ConfigError(f"{p}: operating-point version {doc.get('version')!r} is unknown to this tokenscope "
                          f"(it reads version {OP_VERSION})")
    files = external_names(doc["method"])
    if files:  # a data file never makes code run: the command line must name the code itself
        raise ConfigError(f"{p} names the method file or module {files[0]}, and an operating-point file never makes "
                          f"code run; if you trust it, name it yourself: --method {shlex.quote(str(doc['method']))}")
    resolve(doc["method"])  # refuses an unknown method or setting with its own message
    return doc
