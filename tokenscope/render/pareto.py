"""Pareto plots of a threshold sweep: cost (or speed) against mIoU, default point marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tokenscope.render.figures import DEFAULT_STYLE, FigureStyle  # noqa: E402
from tokenscope.render.palette import OKABE_ITO, method_style  # noqa: E402


def _rgb(name: str) -> tuple[float, float, float]:
    c = OKABE_ITO[name]
    return (c[0] / 255, c[1] / 255, c[2] / 255)


def pareto_front(x: np.ndarray, y: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Indices of points no other point beats in both cost (x) and mIoU (y), sorted by x."""
    idx = []
    for i in range(len(x)):
        better_x = (x < x[i]) if lower_is_better else (x > x[i])
        same_x = x == x[i]
        dominated = np.any((better_x & (y >= y[i])) | (same_x & (y > y[i])))
        if not dominated:
            idx.append(i)
    return np.array(sorted(idx, key=lambda i: x[i]), dtype=int)


def _error_bars(ax: plt.Axes, df: pd.DataFrame, column: str, colour: Any) -> None:
    """The 95% bootstrap interval of each point's mIoU, as a vertical bar (rows without one: none), and
    for throughput its interval over the images as a horizontal bar: a measured speed is less sure than
    a FLOP count, and the plot says so."""
    if f"{column}_low" in df and len(df):
        x = df[column].to_numpy(float)
        xl, xh = df[f"{column}_low"].to_numpy(float), df[f"{column}_high"].to_numpy(float)
        ok = np.isfinite(xl) & np.isfinite(xh)
        if ok.any():
            ax.errorbar(x[ok], 100 * df["miou"].to_numpy(float)[ok], xerr=np.vstack([x[ok] - xl[ok], xh[ok] - x[ok]]),
                        fmt="none", ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.8, zorder=3)
    if "miou_low" not in df or not len(df):
        return
    y = 100 * df["miou"].to_numpy(float)
    low, high = 100 * df["miou_low"].to_numpy(float), 100 * df["miou_high"].to_numpy(float)
    ok = np.isfinite(low) & np.isfinite(high)
    if ok.any():
        ax.errorbar(df[column].to_numpy(float)[ok], y[ok], yerr=np.vstack([y[ok] - low[ok], high[ok] - y[ok]]),
                    fmt="none", ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.8, zorder=3)


def _finish(fig: plt.Figure, ax: plt.Axes, df: pd.DataFrame, label: str, lower_is_better: bool, what: str) -> plt.Figure:
    """Axes, legend and title shared by both plots."""
    ax.set_xlabel(label)
    images = int(df["images"].iloc[0]) if "images" in df and len(df) else 0
    axis = ("agreement with the unreduced model (mIoU of its labels, %)" if _against_unreduced(df) else "mIoU (%)")
    ax.set_ylabel(axis + (f", 95% CI over {images} images" if "miou_low" in df else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if lower_is_better else "lower left")
    side = int(df["size"].iloc[0])
    ax.set_title(f"{f'size {side}' if side else 'native sizes'}: {what}mIoU vs {'cost' if lower_is_better else 'speed'}")
    fig.tight_layout()
    return fig


def _against_unreduced(df: pd.DataFrame) -> bool:
    """Whether the sweep scored an unlabelled data set against the unreduced model's own labels."""
    return "scored_against" in df and len(df) and str(df["scored_against"].iloc[0]) == "unreduced model"


def place_labels(ax: plt.Axes, xs: np.ndarray, ys: np.ndarray, texts: list[str], fontsize: float = 5.5) -> None:
    """Annotate points with short labels that neither sit on a point nor on each other: each label starts
    up and right of its point and moves up (then left) in steps of its own height until its box is free."""
    fig = ax.figure
    fig.canvas.draw()
    to_px = ax.transData.transform
    points = to_px(np.column_stack([xs, ys])) if len(xs) else np.zeros((0, 2))
    scale = fig.dpi / 72.0
    h = fontsize * 1.3 * scale
    taken: list[tuple[float, float, float, float]] = [(px - 4 * scale, py - 4 * scale, px + 4 * scale, py + 4 * scale)
                                                      for px, py in points]
    for (px, py), text, x, y in zip(points, texts, xs, ys):
        w = fontsize * 0.6 * scale * max(len(text), 1)
        for k in range(12):
            dx = 3 * scale if k < 6 else -3 * scale - w
            dy = 3 * scale + (k % 6) * h
            box = (px + dx, py + dy, px + dx + w, py + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
                break
        taken.append(box)
        ax.annotate(text, (x, y), xycoords="data", xytext=((box[0] - px) / scale, (box[1] - py) / scale),
                    textcoords="offset points", fontsize=fontsize, color="0.3")


def write_figure(fig: plt.Figure, path: Path, style: FigureStyle = DEFAULT_STYLE) -> Path:
    """Write a figure in `style` and free it."""
    written = style.save(fig, path)
    plt.close(fig)
    return written


def pareto_figure(df: pd.DataFrame, column: str, label: str, lower_is_better: bool) -> plt.Figure:
    """A threshold sweep: every point coloured by merge threshold, marker by exit threshold, the
    95% interval of each mIoU as a bar, the Pareto front, the default and the unreduced model."""
    pts = df[~df["is_baseline"] & ~df["is_default"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    exits = sorted(pts["exit_threshold"].dropna().unique())
    markers = "osD^v<>p"
    _error_bars(ax, df, column, "0.45")
    if pts["exit_threshold"].isna().all() and len(pts):  # exits off: merge thresholds alone
        sc = ax.scatter(pts[column], 100 * pts["miou"], c=pts["merge_threshold"], cmap="viridis", vmin=0, vmax=1,
                        marker="o", s=36, edgecolor="black", linewidth=0.4, label="no exits")
    for j, e in enumerate(exits):
        sub = pts[pts["exit_threshold"] == e]
        sc = ax.scatter(sub[column], 100 * sub["miou"], c=sub["merge_threshold"], cmap="viridis", vmin=0, vmax=1,
                        marker=markers[j % len(markers)], s=36, edgecolor="black", linewidth=0.4, label=f"exit threshold {e:g}")
    if len(pts):
        fig.colorbar(sc, ax=ax, label="merge threshold")
    x, y = df[column].to_numpy(float), 100 * df["miou"].to_numpy(float)
    front = pareto_front(x, y, lower_is_better)
    ax.plot(x[front], y[front], color="black", linewidth=0.8, linestyle="-", label="Pareto front")
    for flag, colour, marker, name in (("is_baseline", "grey", "X", "no reduction"), ("is_default", "vermillion", "*", "default")):
        row = df[df[flag]]
        if len(row):
            ax.scatter(row[column], 100 * row["miou"], color=_rgb(colour), marker=marker, s=160, edgecolor="black",
                       linewidth=0.6, zorder=5, label=name)
    return _finish(fig, ax, df, label, lower_is_better, "")


def methods_pareto_figure(df: pd.DataFrame, column: str, label: str, lower_is_better: bool) -> plt.Figure:
    """Every method's operating points in its own colour, joined in order of cost, with the
    plain ViT and the Pareto front over all methods (bars: 95% intervals of the mIoUs)."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    pts = df[~df["is_baseline"]]
    labels: list[tuple[float, float, str]] = []
    for method, sub in pts.groupby("method", sort=False):
        sub = sub.sort_values(column)
        rgb, marker = method_style(str(method))
        colour = (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)
        ax.plot(sub[column], 100 * sub["miou"], color=colour, linewidth=1.0, alpha=0.8)
        _error_bars(ax, sub, column, colour)
        ax.scatter(sub[column], 100 * sub["miou"], color=colour, marker=marker, s=40,
                   edgecolor="black", linewidth=0.4, label=method, zorder=4)
        labels.extend((float(r[column]), 100 * float(r["miou"]), str(r["point"]).partition(":")[2])
                      for _, r in sub.iterrows())
    x, y = df[column].to_numpy(float), 100 * df["miou"].to_numpy(float)
    front = pareto_front(x, y, lower_is_better)
    ax.plot(x[front], y[front], color="black", linewidth=0.8, linestyle="--", label="Pareto front (all methods)")
    row = df[df["is_baseline"]]
    if len(row):
        _error_bars(ax, row, column, _rgb("grey"))
        ax.scatter(row[column], 100 * row["miou"], color=_rgb("grey"), marker="X", s=160, edgecolor="black",
                   linewidth=0.6, zorder=5, label="no reduction (vit)")
    fig = _finish(fig, ax, df, label, lower_is_better, "methods, ")
    if labels:
        place_labels(ax, np.array([a for a, _, _ in labels]), np.array([b for _, b, _ in labels]), [t for _, _, t in labels])
    return fig


def pareto_plot(df: pd.DataFrame, column: str, label: str, path: Path, lower_is_better: bool,
                style: FigureStyle = DEFAULT_STYLE) -> Path:
    return write_figure(pareto_figure(df, column, label, lower_is_better), path, style)


def methods_pareto_plot(df: pd.DataFrame, column: str, label: str, path: Path, lower_is_better: bool,
                        style: FigureStyle = DEFAULT_STYLE) -> Path:
    return write_figure(methods_pareto_figure(df, column, label, lower_is_better), path, style)


def size_scaling_figure(df: pd.DataFrame) -> plt.Figure:
    """A multi-size sweep against input size: token reduction (patches over mean tokens per block), FLOP
    reduction and mIoU change (95% paired interval), each size against its own unreduced model; one line
    per operating point, coloured by method (the same look as in every other figure)."""
    base = df[df["is_baseline"]].set_index("size")["gflops_per_image"]
    pts = df[~df["is_baseline"]].copy()
    pts["flop_reduction"] = pts["size"].map(base) / pts["gflops_per_image"]
    sizes = sorted(df["size"].unique())
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    panels = (("block_token_reduction", "token reduction (x, per block)"), ("flop_reduction", "FLOP reduction (x)"),
              ("miou_change", "mIoU change (points, 95% CI)"))
    dashes = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for point, sub in pts.groupby("point", sort=False):
        sub = sub.sort_values("size")
        method = str(sub["method"].iloc[0])
        k = seen[method] = seen.get(method, -1) + 1
        rgb, marker = method_style(method)
        colour = (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)
        for ax, (col, _) in zip(axes, panels):
            y = sub[col].to_numpy(float) * (100 if col == "miou_change" else 1)
            ax.plot(sub["size"], y, color=colour, marker=marker, linestyle=dashes[k % len(dashes)], label=str(point))
            if col == "miou_change" and "miou_change_low" in sub:
                low = 100 * sub["miou_change_low"].to_numpy(float)
                high = 100 * sub["miou_change_high"].to_numpy(float)
                ok = np.isfinite(low) & np.isfinite(high)
                if ok.any():
                    ax.errorbar(sub["size"].to_numpy(float)[ok], y[ok], yerr=np.vstack([y[ok] - low[ok], high[ok] - y[ok]]),
                                fmt="none", ecolor=colour, elinewidth=0.8, capsize=2, alpha=0.8)
    for ax, (col, label) in zip(axes, panels):
        ax.set_xlabel("input size (px, long side)")
        ax.set_ylabel(label)
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
        if col == "miou_change":
            ax.axhline(0, color="0.5", linewidth=0.8)
        else:
            ax.axhline(1, color="0.5", linewidth=0.8)
    axes[0].legend(fontsize=6.5, frameon=False)
    images = int(df["images"].iloc[0]) if "images" in df and len(df) else 0
    fig.suptitle(f"reduction against input size ({images} images per size; each size against its own unreduced model)",
                 fontsize=9)
    fig.tight_layout()
    return fig


def size_scaling_plot(df: pd.DataFrame, path: Path, style: FigureStyle = DEFAULT_STYLE) -> Path:
    return write_figure(size_scaling_figure(df), path, style)
