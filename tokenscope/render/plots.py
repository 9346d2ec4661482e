"""Matplotlib figures from traces: per-layer token histograms and the baseline-vs-STEP comparison."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tokenscope.analysis.stats import exit_level_matrix, level_block_matrix  # noqa: E402
from tokenscope.models.partition import MAX_LEVEL  # noqa: E402
from tokenscope.render.figures import save_figure  # noqa: E402
from tokenscope.render.palette import LEVEL_COLOURS, level_labels, method_style  # noqa: E402
from tokenscope.trace.trace import Trace  # noqa: E402


def _rgb(c: Sequence[int]) -> tuple[float, float, float]:
    return (c[0] / 255.0, c[1] / 255.0, c[2] / 255.0)


def token_histogram(trace: Trace, path: str | os.PathLike[str], title: str | None = None) -> None:
    """Write `histogram_figure` to `path`."""
    fig = histogram_figure(trace, title)
    # one of these per image: fast PNG compression (the file is ~20% larger, written 3x faster)
    save_figure(fig, Path(path), dpi=120, pil_kwargs={"compress_level": 1})
    plt.close(fig)


def histogram_figure(trace: Trace, title: str | None = None) -> plt.Figure:
    """Left: tokens entering each block, stacked by superpatch level (gates marked).
    Right: tokens leaving at each gate, at each pruning step and at the end, stacked by level."""
    m = trace.meta
    by_block = level_block_matrix(trace)
    points, by_exit = exit_level_matrix(trace)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1.4]})
    x = np.arange(1, m.depth + 1)
    bottom = np.zeros(m.depth)
    for k in range(MAX_LEVEL + 1):
        if by_block[:, k].any():
            ax1.bar(x, by_block[:, k], bottom=bottom, color=_rgb(LEVEL_COLOURS[k]), label=level_labels(trace.patch_size)[k],
                    edgecolor="white", linewidth=0.3)
        bottom += by_block[:, k]
    merged = trace.merges_per_block()
    if merged.any():  # the share of each block's tokens that merges away between attention and MLP
        ax1.bar(x, merged, bottom=bottom - merged, color="none", edgecolor="black", hatch="////", linewidth=0.5,
                label="merged inside the block")
    cut = trace.pruned_inside_per_block()
    if cut.any():  # the share of each block's tokens that a pruning step removes before its MLP
        ax1.bar(x, cut, bottom=bottom - cut, color="none", edgecolor="black", hatch="\\\\", linewidth=0.5,
                label="pruned inside the block")
    for g in (m.exit_after if m.exits else ()):
        ax1.axvline(g + 0.5, color="black", linestyle="--", linewidth=0.8)
        ax1.text(g + 0.55, bottom.max() * 0.98, f"gate {g}", fontsize=8, va="top")
    ax1.axhline(trace.num_patches, color="grey", linestyle=":", linewidth=0.8)
    ax1.text(0.6, trace.num_patches, f"{trace.patch_size}x{trace.patch_size} px patches", fontsize=8, va="bottom", color="grey")
    ax1.set_xlabel("encoder block")
    ax1.set_ylabel("tokens entering the block")
    ax1.set_xticks(x if m.depth <= 24 else x[:: max(1, m.depth // 12)])
    ax1.set_ylim(0, max(trace.num_patches, int(bottom.max())) * 1.12)
    ax1.legend(fontsize=7, loc="upper right", title="superpatch", title_fontsize=7)
    labels = points
    b2 = np.zeros(len(points))
    for k in range(MAX_LEVEL + 1):
        if by_exit[:, k].any():
            ax2.bar(labels, by_exit[:, k], bottom=b2, color=_rgb(LEVEL_COLOURS[k]), edgecolor="white", linewidth=0.3)
        b2 += by_exit[:, k]
    for i, v in enumerate(b2):
        ax2.text(i, v, f"{int(v)}", ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("tokens leaving")
    ax2.set_ylim(0, max(1, b2.max()) * 1.15)
    groups = trace.survivors
    pruned = trace.token_pruned_at > 0 if trace.token_pruned_at is not None else np.zeros(trace.num_tokens, bool)
    share = lambda sel: 100 * float((sel & groups).sum()) / max(int(groups.sum()), 1)  # noqa: E731
    early = share(trace.exited_early & ~pruned)
    merges = f", {int(merged.sum())} merged inside" if merged.any() else ""
    merges += f", {share(pruned):.1f}% pruned" if pruned.any() else ""
    how = f"method {m.method}" if m.method else f"{m.policy} policy"
    fig.suptitle(title or f"{os.path.basename(m.source)}: {trace.num_tokens} tokens from {trace.num_patches} patches"
                 f"{merges}, {early:.1f}% exit early ({how})", fontsize=10)
    # fixed margins: tight_layout draws the whole figure once more just to measure it (a quarter
    # of the time of a per-image histogram)
    fig.subplots_adjust(left=0.065, right=0.99, bottom=0.13, top=0.88, wspace=0.28)
    return fig


def compare_figure(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], step: Trace, base: Trace,
                   path: str | os.PathLike[str], title: str, chart_note: str = "") -> None:
    """The image and labelled panels side by side, with tokens per block of both runs below."""
    n = 1 + len(panels)
    fig = plt.figure(figsize=(3.2 * n, 6.4))
    grid = fig.add_gridspec(2, n, height_ratios=[1.4, 1])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(image)
    ax.set_title("input", fontsize=9)
    ax.axis("off")
    for i, (name, img) in enumerate(panels, start=1):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    x = np.arange(1, step.meta.depth + 1)
    ax.step(x, base.block_tokens_in, where="mid", label=f"baseline ({base.num_tokens} tokens)", color="grey")
    ax.step(x, step.block_tokens_in, where="mid", label=f"STEP ({step.num_tokens} tokens, {step.meta.policy})",
            color=_rgb(LEVEL_COLOURS[2]), linewidth=2)
    for g in step.meta.exit_after:
        ax.axvline(g + 0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("encoder block" + chart_note)
    ax.set_ylabel("tokens entering")
    ax.set_ylim(0, max(base.block_tokens_in.max(), 1) * 1.1)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, Path(path), dpi=110)
    plt.close(fig)


def methods_figure(image: np.ndarray, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                   traces: Sequence[tuple[str, Trace]], path: str | os.PathLike[str], title: str, block: int) -> None:
    """One row per method (segmentation, its tokens entering `block`, its exits), and below, the
    tokens entering every block for all methods on one chart."""
    n = len(rows)
    fig = plt.figure(figsize=(10.5, 3.0 * n + 3.2))
    grid = fig.add_gridspec(n + 1, 3, height_ratios=[1.0] * n + [1.1])
    depth = traces[0][1].meta.depth
    stage = "after the encoder" if block > depth else f"tokens entering block {block}"
    for i, (name, seg, groups, exits) in enumerate(rows):
        for j, (img, what) in enumerate(((seg, "segmentation"), (groups, stage), (exits, "where tokens left"))):
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(img)
            ax.set_title(f"{name}\n{what}" if j == 0 else what, fontsize=8)
            ax.axis("off")
    ax = fig.add_subplot(grid[n, :])
    x = np.arange(1, depth + 1)
    for k, (name, trace) in enumerate(traces):
        colour = _rgb(method_style(name)[0])
        ax.step(x, trace.block_tokens_in, where="mid", color=colour, linewidth=2 if k else 1.2,
                label=f"{name}: {trace.mean_tokens_per_block:.0f} tokens/block, "
                      f"{trace.meta.flops.get('total', 0) / 1e9:.2f} GFLOPs")
    ax.axvline(block - 0.5, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlabel("encoder block")
    ax.set_ylabel("tokens entering")
    ax.set_ylim(0, max(int(t.block_tokens_in.max()) for _, t in traces) * 1.1)
    ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    save_figure(fig, Path(path), dpi=100)
    plt.close(fig)
