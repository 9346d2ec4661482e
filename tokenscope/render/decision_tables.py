"""Tables and a figure of early decisions, read from the traces of a compare or run folder.

- `agreement_table`: for each method of a `compare --methods` folder and each place a token's fate
  was decided (merged inside block k, pruned at k, exited at gate g, reached the end), and by class
  and by superpatch level, the share of those patches whose final label differs from the unreduced
  model's on the same image, pooled over images with a 95% bootstrap interval.
- `boundary_table` / `boundary_figure`: merge, prune and exit rates against the distance (in patches)
  to the nearest class boundary, for a compare folder's methods or a run's method.

Nothing here runs a model: the traces `compare` and `run` saved are the record.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tokenscope.analysis.agreement import DISTANCE_BINS, agreement_counts, boundary_counts, distance_label  # noqa: E402
from tokenscope.analysis.uncertainty import RESAMPLES, SEED, ratio_intervals  # noqa: E402
from tokenscope.errors import ConfigError  # noqa: E402
from tokenscope.render.manifest import method_folder_name, read_manifest  # noqa: E402
from tokenscope.render.palette import FATE_COLOURS  # noqa: E402
from tokenscope.render.paper_table import PaperTable  # noqa: E402
from tokenscope.trace.fates import FATES  # noqa: E402
from tokenscope.trace.trace import TRACE_JSON, Trace, trace_folders  # noqa: E402

FATE_WORDS = {"merged": "merged", "pruned": "pruned", "exited": "exited", "reached_end": "reached the end"}


@dataclass
class FolderTraces:
    """The traces of a compare or run folder: per image, per method, its traces (one, or one per window)."""

    kind: str
    methods: list[str]
    images: list[dict[str, list[Trace]]]
    baseline: str | None
    """The key of the unreduced model's traces (compare folders), None for a run."""
    manifest: dict[str, Any]


def _load(folder: Path) -> list[Trace]:
    return [Trace.load(t) for t in trace_folders(folder) if (t / TRACE_JSON).is_file()]


def folder_traces(folder: str | Path) -> FolderTraces:
    """Every trace of a compare (`--methods` or plain) or run folder, read once."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    manifest = read_manifest(root, "compare or run folder")
    kind = manifest.get("kind")
    entries = [e for e in manifest.get("images", []) if e.get("folder")]
    if kind == "run":
        method = str((manifest.get("summary") or {}).get("method") or manifest.get("method") or "method")
        images = [{method: _load(root / e["folder"])} for e in entries]
        return FolderTraces("run", [method], [im for im in images if im[method]], None, manifest)
    if kind != "compare":
        raise ConfigError(f"{root}: early decisions come from compare or run folders; this is a {kind} folder")
    if manifest.get("methods"):
        folders = {str(m): method_folder_name(str(m)) for m in manifest["methods"]}
    else:  # a plain compare: the model's operating point in "step", whatever its method
        step = manifest.get("step") if isinstance(manifest.get("step"), dict) else {}
        folders = {str(step.get("method") or "step"): "step"}
    methods = list(folders)
    images = []
    for e in entries:
        d = root / e["folder"]
        im = {"baseline": _load(d / "baseline")}
        for m, sub in folders.items():
            im[m] = _load(d / sub)
        images.append(im)
    return FolderTraces("compare", methods, images, "baseline", manifest)


def _pairs(image: dict[str, list[Trace]], method: str, baseline: str | None) -> Iterator[tuple[Trace, Trace | None]]:
    """(method trace, its baseline trace or None) of one image, window by window."""
    base = image.get(baseline) if baseline else None
    for k, t in enumerate(image.get(method) or []):
        yield t, (base[k] if base and k < len(base) else None)


def _pct(v: float) -> str:
    return "" if not np.isfinite(v) else f"{100 * v:.1f}"


def _with_interval(value: float, low: float, high: float) -> str:
    text = _pct(value)
    if text and np.isfinite(low) and np.isfinite(high):
        text += f" [{_pct(low)}, {_pct(high)}]"
    return text


def _place_words(key: str) -> str:
    if key == "reached_end":
        return "reached the end"
    fate, _, where = key.rpartition("_")
    return f"exited at gate {where[4:]}" if fate == "exited" else f"{fate} in block {where[1:]}"


def agreement_rows(ft: FolderTraces) -> list[dict[str, Any]]:
    """One row per method and group (place, fate, class, level): patches, the share whose final label
    differs from the unreduced model's, and its 95% interval over images."""
    if ft.baseline is None:
        raise ConfigError("agreement needs the unreduced model's traces beside the method's: run `tokenscope compare "
                          "IMAGES --methods ...` and pass that folder")
    rows = []
    for method in ft.methods:
        per_image: list[Counter] = []
        for im in ft.images:
            c: Counter = Counter()
            for t, base in _pairs(im, method, ft.baseline):
                if base is None:
                    continue
                c.update(agreement_counts(t, base))
            if c:
                per_image.append(c)
        if not per_image:
            continue
        keys = sorted({k for c in per_image for (k, what) in c if what == "patches"}, key=_group_order)
        hits = np.array([[c[(k, "differs")] for k in keys] for c in per_image], dtype=np.float64)
        totals = np.array([[c[(k, "patches")] for k in keys] for c in per_image], dtype=np.float64)
        for (by, key), iv, n in zip(keys, ratio_intervals(hits, totals), totals.sum(0)):
            rows.append({"method": method, "by": by, "group": key, "patches": int(n), "differs": iv.value,
                         "differs_low": iv.low, "differs_high": iv.high, "images": len(per_image)})
    return rows


def _group_order(k: tuple[str, Any]) -> tuple[int, Any]:
    by, key = k
    order = {"fate": 0, "place": 1, "level": 2, "class": 3}[by]
    if by == "fate":
        return order, FATES.index(key)
    if by == "place":
        if key == "reached_end":
            return order, (1 << 30, 0)
        fate, _, where = key.rpartition("_")
        return order, (int(where.removeprefix("gate").removeprefix("b")), FATES.index(fate))
    return order, key


def _class_name(ft: FolderTraces, c: int) -> str:
    for im in ft.images:
        for traces in im.values():
            if traces:
                return "ignore" if c == 255 else traces[0].meta.class_name(int(c))
    return str(c)


def agreement_table(folder: str | Path) -> Any:
    """`tokenscope table --kind agreement`: how often an early decision differs from the unreduced model."""

    ft = folder_traces(folder)
    rows = agreement_rows(ft)
    if not rows:
        raise ConfigError(f"{folder}: no image holds both a method's traces and the unreduced model's")
    n = rows[0]["images"]
    words = {"fate": lambda k: FATE_WORDS[k], "place": _place_words, "level": lambda k: f"level {k}",
             "class": lambda k: f"class {_class_name(ft, k)}"}
    out = [[r["method"], words[r["by"]](r["group"]), str(r["patches"]),
            _with_interval(r["differs"], r["differs_low"], r["differs_high"])]
           for r in rows]
    notes = [f"Share of the patches whose final label (the prediction of the token they ended in: a gate's for an exit, "
             f"the decoder's otherwise) differs from the unreduced model's label for them on the same image; pooled over "
             f"{n} image{'s' if n != 1 else ''}, 95% percentile bootstrap over images ({RESAMPLES} resamples, seed {SEED})"
             + ("" if n > 1 else "; one image has no interval") + ".",
             "Agreement with the unreduced model, not accuracy: no ground truth enters it. Classes are the patches' "
             "ground truth when labels were given, else their predicted class.",
             f"Model: {ft.manifest.get('model', '?')}."]
    return PaperTable(f"Early decisions against the unreduced model ({n} images)",
                      ["method", "decided", "patches", "differs from unreduced (%) [95% CI]"], out, notes)


def boundary_rows(ft: FolderTraces) -> tuple[list[dict[str, Any]], set[str]]:
    """One row per method and distance bin: patches and each fate's rate with its 95% interval."""
    rows: list[dict[str, Any]] = []
    sources: set[str] = set()
    labels = [distance_label(lo, hi) for lo, hi in DISTANCE_BINS]
    for method in ft.methods:
        per_image: list[Counter] = []
        for im in ft.images:
            c: Counter = Counter()
            for t, base in _pairs(im, method, ft.baseline):
                counts, source = boundary_counts(t, base)
                sources.add(source)
                c.update(counts)
            if c:
                per_image.append(c)
        if not per_image:
            continue
        totals = np.array([[c[(b, "patches")] for b in labels] for c in per_image], dtype=np.float64)
        rates = {f: ratio_intervals(np.array([[c[(b, f)] for b in labels] for c in per_image], dtype=np.float64), totals)
                 for f in FATES}
        for j, b in enumerate(labels):
            if not totals[:, j].sum():  # no patch this far from a boundary
                continue
            row: dict[str, Any] = {"method": method, "distance": b, "patches": int(totals[:, j].sum()),
                                   "images": len(per_image)}
            for f in FATES:
                iv = rates[f][j]
                row.update({f"{f}_rate": iv.value, f"{f}_low": iv.low, f"{f}_high": iv.high})
            rows.append(row)
    return rows, sources


def _boundary_of(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], set[str]]:
    """The folder's manifest and boundary rows, read once for the table and its figure together
    (`table --kind boundary --figure F` asks for both); the traces themselves are not kept."""
    root = Path(folder)
    try:
        stamp = (root / "run.json").stat().st_mtime_ns
    except OSError:
        stamp = 0
    return _boundary_cached(str(root.resolve()), stamp)


@functools.lru_cache(maxsize=1)
def _boundary_cached(folder: str, stamp: int) -> tuple[dict[str, Any], list[dict[str, Any]], set[str]]:
    ft = folder_traces(folder)
    rows, sources = boundary_rows(ft)
    return ft.manifest, rows, sources


def boundary_table(folder: str | Path) -> Any:
    """`tokenscope table --kind boundary`: fates against the distance to the nearest class boundary."""

    manifest, rows, sources = _boundary_of(folder)
    if not rows:
        raise ConfigError(f"{folder}: no traces to tabulate")
    shown = [f for f in FATES if any(np.isfinite(r[f"{f}_rate"]) and r[f"{f}_rate"] > 0 for r in rows)]
    out = []
    for r in rows:
        out.append([r["method"], r["distance"], str(r["patches"]),
                    *[_with_interval(r[f"{f}_rate"], r[f"{f}_low"], r[f"{f}_high"])
                      for f in shown]])
    n = rows[0]["images"]
    notes = [f"Distance: chessboard distance in patches to the nearest patch with a 4-neighbour of another class "
             f"(0 = on a boundary; classes from the {' + '.join(sorted(sources))}). Rates: share of the patches at that "
             f"distance whose token was merged, pruned, exited or reached the end; pooled over {n} image"
             f"{'s' if n != 1 else ''} with 95% percentile bootstrap intervals over images.",
             f"Model: {manifest.get('model', '?')}."]
    return PaperTable(f"Token fates against the distance to a class boundary ({n} images)",
                      ["method", "distance (patches)", "patches", *[f"{FATE_WORDS[f]} (%) [95% CI]" for f in shown]],
                      out, notes)


def boundary_figure(folder: str | Path) -> plt.Figure:
    """Merge, prune and exit rates (with 95% intervals) against the distance to a class boundary, one
    panel per method."""
    _, rows, sources = _boundary_of(folder)
    if not rows:
        raise ConfigError(f"{folder}: no traces to draw")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 0.6, 3.4), sharey=True, squeeze=False)
    handles: dict[str, Any] = {}
    for ax, method in zip(axes[0], methods):
        sub = [r for r in rows if r["method"] == method]
        x = np.arange(len(sub))
        for f in ("merged", "pruned", "exited"):
            y = np.array([r[f"{f}_rate"] for r in sub])
            if not np.nansum(y):
                continue
            lo = np.array([r[f"{f}_low"] for r in sub])
            hi = np.array([r[f"{f}_high"] for r in sub])
            colour = tuple(v / 255 for v in FATE_COLOURS[f])
            (line,) = ax.plot(x, 100 * y, marker="o", color=colour, label=FATE_WORDS[f])
            handles.setdefault(f, line)
            if np.isfinite(lo).any():
                ax.fill_between(x, 100 * lo, 100 * hi, color=colour, alpha=0.2, linewidth=0)
        ax.set_xticks(x, [r["distance"] for r in sub])
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("distance to a class boundary (patches)")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("share of the patches (%)")
    fig.legend(list(handles.values()), [FATE_WORDS[f] for f in handles], fontsize=8, frameon=False,
               loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"where merges, prunes and exits happen (classes: {' + '.join(sorted(sources))}; "
                 f"{rows[0]['images']} images, 95% intervals)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
