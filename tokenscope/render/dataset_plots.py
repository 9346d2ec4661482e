"""Data-set figures from aggregated tables: publication-ready, colour-blind-safe (Okabe-Ito).

- tokens_per_block.png: mean tokens entering each block, stacked by superpatch level;
- class_fates.png: for each class, the share of its patches merged, pruned, exited (by block or gate) or reaching the end;
- class_levels.png: for each class, the share of its patches in each superpatch level;
- token_flow.png: patches -> superpatch levels -> exit points, band widths in patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import PathPatch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from tokenscope.analysis.aggregate import DatasetTables  # noqa: E402
from tokenscope.models.partition import MAX_LEVEL  # noqa: E402
from tokenscope.render.figures import DEFAULT_STYLE, FigureStyle  # noqa: E402
from tokenscope.render.palette import FATE_COLOURS, LEVEL_COLOURS, exit_colours, fate_colour, level_labels  # noqa: E402

plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})


def _patch(t: DatasetTables) -> int:
    """Patch side of the run's model, from the levels table (level 0's side)."""
    return int(t.levels["side_px"].iloc[0]) if len(t.levels) else 16


def _rgb(c: Sequence[int]) -> tuple[float, float, float]:
    return (c[0] / 255.0, c[1] / 255.0, c[2] / 255.0)


def tokens_per_block_figure(t: DatasetTables) -> plt.Figure:
    """Tokens entering each block (mean per image), stacked by superpatch level, gates marked."""
    s, blocks = t.summary, t.blocks
    n = s["images"]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = blocks["block"].to_numpy()
    bottom = np.zeros(len(x))
    for k in range(MAX_LEVEL + 1):
        vals = blocks[f"tokens_in_level{k}"].to_numpy() / n
        if vals.any():
            ax.bar(x, vals, bottom=bottom, color=_rgb(LEVEL_COLOURS[k]), label=level_labels(_patch(t))[k], edgecolor="white", linewidth=0.3)
        bottom += vals
    patches = s["patches"] / n
    ax.axhline(patches, color="grey", linestyle=":", linewidth=0.9)
    ax.text(x[0] - 0.4, patches, f" {_patch(t)}x{_patch(t)} px patches", fontsize=8, va="bottom", color="grey")
    for g in s["exit_after"]:
        ax.axvline(g + 0.5, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("encoder block")
    ax.set_ylabel("tokens entering (mean per image)")
    ax.set_xticks(x if len(x) <= 24 else x[:: max(1, len(x) // 12)])
    ax.set_ylim(0, max(patches, bottom.max()) * 1.12)
    ax.legend(title="superpatch", fontsize=7, title_fontsize=7, loc="upper right")
    ax.set_title(f"{n} images: {s['token_reduction']:.2f}x fewer tokens than patches, "
                 f"{s['exited_early_pct']:.1f}% of tokens exit early")
    fig.tight_layout()
    return fig


def _class_frame(t: DatasetTables):
    df = t.classes[t.classes["class"] != 255].copy()
    return df.sort_values("patches", ascending=True)


def class_fates_figure(t: DatasetTables) -> plt.Figure:
    """Per class, the share of its patches in each fate and place (merged inside block k, pruned at k,
    exited at gate g, reached the end). Shares are of the class's patches and add up to 1 by the fate
    invariant: nothing is renormalised, so a method's prunes and merges are as visible as exits."""
    df = _class_frame(t)
    places = [*t.summary.get("fate_places", []), "reached_end"]
    places = list(dict.fromkeys(places))
    depth = int(t.summary.get("depth", 1))
    patches = df["patches"].to_numpy().astype(float)
    fig, ax = plt.subplots(figsize=(8.5, 0.35 * len(df) + 1.8))
    left = np.zeros(len(df))
    shown: set[str] = set()
    for place in places:
        col = f"patches_{place}"
        if col not in df:
            continue
        share = df[col].to_numpy().astype(float) / np.maximum(patches, 1)
        family = place.rpartition("_")[0] if place != "reached_end" else "reached_end"
        label = None
        if family not in shown:
            label = {"merged": "merged (inside block k)", "pruned": "pruned (at block k)", "exited": "exited (at gate g)",
                     "reached_end": "reached the end"}[family]
            shown.add(family)
        ax.barh(df["name"], share, left=left, color=_rgb(fate_colour(place, depth)), label=label, edgecolor="white",
                linewidth=0.2)
        if place != "reached_end":  # name the block or gate inside segments wide enough to hold it
            tag = place.rpartition("_")[2].replace("gate", "g")
            for i, (x0, w) in enumerate(zip(left, share)):
                if w >= 0.06:
                    ax.text(x0 + w / 2, i, tag, ha="center", va="center", fontsize=6.5, color="black")
        left += share
    cost = df.get("token_blocks_per_patch")
    for i, n in enumerate(df["patches"]):
        note = f"{int(n)} patches"
        if cost is not None and np.isfinite(cost.iloc[i]):
            note += f", {cost.iloc[i]:.1f} token-blocks/patch"
        ax.text(1.01, i, note, va="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the class's patches (lighter = later block)")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, frameon=False)
    ax.set_title(f"{t.summary.get('method', '')}: the fate of each class's patches "
                 f"(class = {t.summary['class_source']})", pad=18)
    fig.tight_layout()
    return fig


def class_levels_figure(t: DatasetTables) -> plt.Figure:
    """Per class, the share of its patches in each superpatch level."""
    df = _class_frame(t)
    counts = np.stack([df[f"patches_level{k}"].to_numpy() for k in range(MAX_LEVEL + 1)], axis=1).astype(float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(df) + 1.4))
    left = np.zeros(len(df))
    for k in range(MAX_LEVEL + 1):
        ax.barh(df["name"], share[:, k], left=left, color=_rgb(LEVEL_COLOURS[k]), label=level_labels(_patch(t))[k],
                edgecolor="white", linewidth=0.3)
        left += share[:, k]
    for i, n in enumerate(df["patches"]):
        ax.text(1.01, i, f"{int(n)} patches", va="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the class's patches")
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, frameon=False)
    ax.set_title("which superpatch each class's patches end up in", pad=30)
    fig.tight_layout()
    return fig


def _band(ax: plt.Axes, x0: float, y0: tuple[float, float], x1: float, y1: tuple[float, float], colour, alpha: float) -> None:
    """A smooth band from span y0 at x0 to span y1 at x1 (cubic Bezier edges)."""
    xm = (x0 + x1) / 2
    verts = [(x0, y0[0]), (xm, y0[0]), (xm, y1[0]), (x1, y1[0]), (x1, y1[1]), (xm, y1[1]), (xm, y0[1]), (x0, y0[1]), (x0, y0[0])]
    codes = [MplPath.MOVETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4, MplPath.LINETO,
             MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4, MplPath.CLOSEPOLY]
    ax.add_patch(PathPatch(MplPath(verts, codes), facecolor=colour, edgecolor="none", alpha=alpha))


def token_flow_figure(t: DatasetTables) -> plt.Figure | None:
    """Sankey-style: all patches -> superpatch level -> exit point; widths are patches covered."""
    s = t.summary
    flow = np.asarray(s["flow_patches"], dtype=float)  # (levels, points)
    flow_tok = np.asarray(s["flow_tokens"], dtype=float)
    merged_flow = np.asarray(s["flow_merged_patches"], dtype=float) if "flow_merged_patches" in s else None
    points = s["flow_points"]
    total = flow.sum()
    if total <= 0:
        return None
    gap = 0.02 * total
    fig, ax = plt.subplots(figsize=(8, 4.2))
    level_tot = flow.sum(axis=1)
    point_tot = flow.sum(axis=0)
    levels = [k for k in range(MAX_LEVEL + 1) if level_tot[k] > 0]
    y = 0.0
    level_span = {}
    for k in levels:
        level_span[k] = (y, y + level_tot[k])
        y += level_tot[k] + gap
    height = y - gap
    y = 0.0
    point_span = {}
    shown = [j for j in range(len(points)) if point_tot[j] > 0]  # a gate nothing left at takes no room
    for j in shown:
        point_span[j] = (y, y + point_tot[j])
        y += point_tot[j] + gap
    off = (height - (y - gap)) / 2
    point_span = {j: (a + off, b + off) for j, (a, b) in point_span.items()}
    src_off = (height - total) / 2
    # left: one bar of all patches, split into the levels' shares
    cur = src_off
    for k in levels:
        _band(ax, 0.08, (cur, cur + level_tot[k]), 0.42, level_span[k], _rgb(LEVEL_COLOURS[k]), 0.45)
        cur += level_tot[k]
    ax.add_patch(plt.Rectangle((0.0, src_off), 0.08, total, color="0.35"))
    ax.text(-0.01, src_off + total / 2, f"{int(total)}\npatches", ha="right", va="center", fontsize=8)
    gate_cols = exit_colours(s["exit_after"])
    cols = [*gate_cols[:-1], FATE_COLOURS["pruned"], gate_cols[-1]] if "pruned" in points else gate_cols
    pcur = {j: point_span[j][0] for j in point_span}
    for k in levels:
        a, b = level_span[k]
        ax.add_patch(plt.Rectangle((0.42, a), 0.06, b - a, color=_rgb(LEVEL_COLOURS[k])))
        gone = float(merged_flow[k].sum()) if merged_flow is not None else 0.0
        if gone > 0:  # patches whose token merged into another inside the encoder
            ax.add_patch(plt.Rectangle((0.42, a), 0.06, gone, facecolor="none", edgecolor="black", hatch="///",
                                       linewidth=0.4))
            ax.text(0.49, a + gone / 2, f"{100 * gone / max(b - a, 1):.0f}% merged\ninside", va="center", fontsize=6.5)
        ntok = int(flow_tok[k].sum())
        ax.text(0.45, (a + b) / 2, f"{level_labels(_patch(t))[k].split(' ')[0]}\n{ntok} tok", ha="center", va="center", fontsize=6.5)
        cur = a
        for j in shown:
            v = flow[k, j]
            if v <= 0:
                continue
            _band(ax, 0.48, (cur, cur + v), 0.86, (pcur[j], pcur[j] + v), _rgb(LEVEL_COLOURS[k]), 0.35)
            cur += v
            pcur[j] += v
    for j in shown:
        p = points[j]
        a, b = point_span[j]
        ax.add_patch(plt.Rectangle((0.86, a), 0.06, b - a, color=_rgb(cols[j])))
        name = "end of encoder" if p == "end" else "pruned" if p == "pruned" else f"exit after block {p[4:]}"
        ax.text(0.93, (a + b) / 2, f"{name}\n{100 * point_tot[j] / total:.1f}% of patches,"
                f" {int(flow_tok[:, j].sum())} tokens", va="center", fontsize=7.5)
    ax.set_xlim(-0.12, 1.25)
    ax.set_ylim(-gap, height + gap)
    ax.invert_yaxis()
    ax.axis("off")
    title = f"token flow: {_patch(t)} px patches -> superpatch level -> where the token leaves (widths = patches)"
    merged = int(s.get("merged_tokens", 0))
    if merged:  # in-network merging: a merged token's patches leave with the group it joined
        title += f"\n{merged} tokens merged into others inside the encoder; token counts at the right count groups"
    ax.set_title(title, fontsize=10 if merged else None)
    fig.tight_layout()
    return fig


DATASET_FIGURES = (("tokens_per_block", tokens_per_block_figure), ("class_fates", class_fates_figure),
                   ("class_levels", class_levels_figure), ("token_flow", token_flow_figure))


def write_dataset_figures(t: DatasetTables, folder: Path, style: FigureStyle = DEFAULT_STYLE) -> list[Path]:
    """All data-set figures into `folder` in `style` (png by default); returns their paths."""
    out = []
    for name, make in DATASET_FIGURES:
        fig = make(t)
        if fig is None:  # no patch was traced
            continue
        out.append(style.save(fig, folder / f"{name}.png"))
        plt.close(fig)
    return out
