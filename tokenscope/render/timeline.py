"""Pictures of a clip (frame by frame) and of a run's tails: read from tables, never from models."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tokenscope.render.figures import FigureStyle, save_figure  # noqa: E402


def timeline_figure(frames: pd.DataFrame, path: Path, title: str) -> None:
    """Tokens, exited %, GFLOPs, latency and frame-to-frame changes against time."""
    rows = [("tokens", "tokens in"), ("exited_early_pct", "exited early %"), ("gflops", "GFLOPs"),
            ("forward_ms", "latency ms")]
    rows = [(c, label) for c, label in rows if c in frames.columns]
    fig, axes = plt.subplots(len(rows) + 1, 1, figsize=(9, 1.6 * (len(rows) + 1)), sharex=True)
    t = frames["time_s"].to_numpy()
    for ax, (column, label) in zip(axes, rows):
        ax.plot(t, frames[column].to_numpy(), lw=1.4, color="#00798c")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for column, colour in (("level_change", "#d1495b"), ("exit_change", "#edae49"), ("class_change", "#30638e")):
        ax.plot(t, 100 * frames[column].to_numpy(), lw=1.2, color=colour, label=column.replace("_change", ""))
    ax.set_ylabel("changed\npatches %", fontsize=8)
    ax.set_xlabel("time (s)")
    ax.legend(fontsize=7, ncol=3, loc="upper right")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, Path(path), dpi=110)
    plt.close(fig)


def tails_figure(images: pd.DataFrame, path: Path, title: str, figure_style: FigureStyle | None = None) -> None:
    """Cumulative distribution of latency and tokens, with p50 / p95 / p99 marked (`figure_style`:
    the file format, resolution and titles; default a 110-dpi PNG)."""
    cols = [(c, label) for c, label in (("forward_ms", "latency (ms)"), ("tokens", "tokens in"), ("gflops", "GFLOPs"))
            if c in images.columns and not images[c].dropna().empty]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.2))
    for ax, (column, label) in zip(np.atleast_1d(axes), cols):
        v = np.sort(images[column].dropna().to_numpy(dtype=np.float64))
        ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", color="#00798c")
        for q, style in ((50, ":"), (95, "--"), (99, "-")):
            x = np.percentile(v, q)
            ax.axvline(x, color="#d1495b", ls=style, lw=1)
            ax.text(x, 0.02 + q / 400, f"p{q}", fontsize=7, color="#d1495b")
        ax.set_xlabel(label)
        ax.set_ylabel("share of images")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if figure_style is None:
        save_figure(fig, Path(path), dpi=110)
    else:
        figure_style.save(fig, Path(path))
    plt.close(fig)
