"""Pareto plots of a threshold sweep: cost (or speed) against mIoU, default point marked."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tokenscope.render.palette import METHOD_COLOURS, OKABE_ITO  # noqa: E402


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


def _finish(fig: plt.Figure, ax: plt.Axes, df: pd.DataFrame, label: str, path: Path, lower_is_better: bool,
            what: str) -> None:
    """Axes, legend and title shared by both plots, then write the file."""
    ax.set_xlabel(label)
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if lower_is_better else "lower left")
    ax.set_title(f"size {int(df['size'].iloc[0])}: {what}mIoU vs {'cost' if lower_is_better else 'speed'}")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def pareto_plot(df: pd.DataFrame, column: str, label: str, path: Path, lower_is_better: bool) -> None:
    pts = df[~df["is_baseline"] & ~df["is_default"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    exits = sorted(pts["exit_threshold"].dropna().unique())
    markers = "osD^v<>p"
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
    _finish(fig, ax, df, label, path, lower_is_better, "")


def methods_pareto_plot(df: pd.DataFrame, column: str, label: str, path: Path, lower_is_better: bool) -> None:
    """Every method's operating points in its own colour, joined in order of cost, with the
    plain ViT and the Pareto front over all methods."""
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    pts = df[~df["is_baseline"]]
    markers = "osD^v<>p"
    for j, (method, sub) in enumerate(pts.groupby("method", sort=False)):
        sub = sub.sort_values(column)
        colour = _rgb(METHOD_COLOURS[(j + 1) % len(METHOD_COLOURS)])
        ax.plot(sub[column], 100 * sub["miou"], color=colour, linewidth=1.0, alpha=0.8)
        ax.scatter(sub[column], 100 * sub["miou"], color=colour, marker=markers[j % len(markers)], s=40,
                   edgecolor="black", linewidth=0.4, label=method, zorder=4)
        for _, r in sub.iterrows():
            ax.annotate(str(r["point"]).partition(":")[2], (r[column], 100 * r["miou"]), fontsize=5.5,
                        xytext=(3, 3), textcoords="offset points", color="0.3")
    x, y = df[column].to_numpy(float), 100 * df["miou"].to_numpy(float)
    front = pareto_front(x, y, lower_is_better)
    ax.plot(x[front], y[front], color="black", linewidth=0.8, linestyle="--", label="Pareto front (all methods)")
    row = df[df["is_baseline"]]
    if len(row):
        ax.scatter(row[column], 100 * row["miou"], color=_rgb("grey"), marker="X", s=160, edgecolor="black",
                   linewidth=0.6, zorder=5, label="no reduction (vit)")
    _finish(fig, ax, df, label, path, lower_is_better, "methods, ")
