"""Data-set tables: where the tokens went, per image, per class, per superpatch level, per block.

Everything is a sum over per-image records (a Trace plus, where labels exist, the confusion
matrices of the reduced and of the unreduced model), so a table can always be re-derived from the
image folders of a run. Fates come from the one account (trace/fates.py, counted per class and level
in fate_counts.py): a patch's class is its ground-truth label when the trace has patch labels, else
its predicted class; a token's is its patches' majority (`class_source` says which).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from tokenscope.analysis.fate_counts import column_order, finish_rates, image_counts, place_columns, token_classes  # noqa: F401
from tokenscope.analysis.metrics import iou_per_class, mean_iou
from tokenscope.analysis.uncertainty import class_counts, miou_change_interval, miou_interval
from tokenscope.analysis.stats import level_block_matrix
from tokenscope.data.images import IGNORE_INDEX
from tokenscope.models.partition import MAX_LEVEL
from tokenscope.trace.fates import EXITED, FATES, MERGED, PRUNED, TokenFates, fate_totals, token_fates
from tokenscope.storage import text_of
from tokenscope.trace.trace import Trace


@dataclass
class ImageEval:
    """Accuracy side of one image: confusion matrices (rows = truth) of STEP and of the baseline."""

    step_confusion: np.ndarray | None = None
    baseline_confusion: np.ndarray | None = None
    agreement: float | None = None
    baseline_tokens: int | None = None
    baseline_flops: int | None = None

    def to_json(self) -> dict[str, Any]:
        def sparse(c: np.ndarray | None) -> Any:
            if c is None:
                return None
            r, k = np.nonzero(c)
            return {"n": int(c.shape[0]), "entries": [[int(a), int(b), int(c[a, b])] for a, b in zip(r, k)]}

        return {"step_confusion": sparse(self.step_confusion), "baseline_confusion": sparse(self.baseline_confusion),
                "agreement": self.agreement, "baseline_tokens": self.baseline_tokens, "baseline_flops": self.baseline_flops}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ImageEval":
        def dense(s: Any) -> np.ndarray | None:
            if s is None:
                return None
            c = np.zeros((s["n"], s["n"]), dtype=np.int64)
            for a, b, v in s["entries"]:
                c[a, b] = v
            return c

        return cls(dense(d.get("step_confusion")), dense(d.get("baseline_confusion")), d.get("agreement"),
                   d.get("baseline_tokens"), d.get("baseline_flops"))


def flow_points(trace: Trace) -> list[str]:
    """Where a patch's token group ends, left to right in the token-flow figure: each gate, pruned, the end."""
    return [*(f"gate{g}" for g in trace.meta.exit_after), "pruned", "end"]


def flow_matrices(trace: Trace, fates: TokenFates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels, flow points) each: tokens ending at each point (merged tokens not counted: their group is),
    patches ending there (with the group they merged into), and the patches among those whose own token
    merged into another."""
    points = flow_points(trace)
    final_kind = fates.final_kind
    final_block = fates.block[fates.final]
    column = np.full(trace.num_tokens, points.index("end"), dtype=np.int64)
    column[final_kind == PRUNED] = points.index("pruned")
    for j, g in enumerate(trace.meta.exit_after):
        column[(final_kind == EXITED) & (final_block == g)] = j
    level = trace.token_level.astype(np.int64)
    patches = trace.token_patches.astype(np.int64)
    merged = fates.kind == MERGED
    shape = (MAX_LEVEL + 1, len(points))
    ft = np.zeros(shape, dtype=np.int64)
    fp = np.zeros(shape, dtype=np.int64)
    fm = np.zeros(shape, dtype=np.int64)
    np.add.at(ft, (level[~merged], column[~merged]), 1)
    np.add.at(fp, (level, column), patches)
    np.add.at(fm, (level[merged], column[merged]), patches[merged])
    return ft, fp, fm


@dataclass
class DatasetTables:
    images: pd.DataFrame
    classes: pd.DataFrame
    levels: pd.DataFrame
    blocks: pd.DataFrame
    summary: dict[str, Any]


def aggregate(records: Iterable[tuple[str, Trace, ImageEval | None]], image_evals: Iterable[ImageEval] = (),
              images: int | None = None) -> DatasetTables:
    """Sum per-image records into the four tables and an overall summary.

    With sliding windows a record is one window (its trace, no eval); the windows' images are
    scored on their stitched label maps, passed as `image_evals`, and `images` counts the images
    (the summary then also gives `windows`, and per-image numbers divide by images).
    """
    image_rows: list[dict[str, Any]] = []
    class_acc: dict[int, Counter] = {}
    level_acc: dict[int, Counter] = {k: Counter() for k in range(MAX_LEVEL + 1)}
    block_in: np.ndarray | None = None
    block_exit: np.ndarray | None = None
    block_merged: np.ndarray | None = None
    block_pruned: np.ndarray | None = None
    block_flops: np.ndarray | None = None
    block_levels: np.ndarray | None = None
    flow_tokens: np.ndarray | None = None
    flow_patches: np.ndarray | None = None
    flow_merged: np.ndarray | None = None
    step_conf: np.ndarray | None = None
    base_conf: np.ndarray | None = None
    scored: list[ImageEval] = []
    sources = set()
    names: tuple[str, ...] = ()
    first: Trace | None = None
    places: set[str] = set()
    totals: Counter = Counter()
    for name, tr, ev in records:
        first = first or tr
        names = names or tuple(tr.meta.class_names)
        fates = token_fates(tr)
        by_class, by_level, source = image_counts(tr, fates)
        sources.add(source)
        for c, counts in by_class.items():
            class_acc.setdefault(c, Counter()).update(counts)
        for k, counts in by_level.items():
            level_acc[k].update(counts)
        places.update(c for c in place_columns(fates) if c != "reached_end")
        surv = tr.survivors
        fate = fate_totals(tr, fates)
        exits_after = np.bincount(fates.block[fates.kind == EXITED].astype(np.int64), minlength=tr.meta.depth + 1)[1:]
        block_in = tr.block_tokens_in.astype(np.int64) if block_in is None else block_in + tr.block_tokens_in
        block_exit = exits_after if block_exit is None else block_exit + exits_after
        merged_here, pruned_here = tr.merges_per_block(), tr.pruned_per_block()
        block_merged = merged_here if block_merged is None else block_merged + merged_here
        block_pruned = pruned_here if block_pruned is None else block_pruned + pruned_here
        block_flops = tr.block_flops.astype(np.int64) if block_flops is None else block_flops + tr.block_flops
        bl = level_block_matrix(tr)
        block_levels = bl if block_levels is None else block_levels + bl
        ft, fp, fm = flow_matrices(tr, fates)
        flow_tokens = ft if flow_tokens is None else flow_tokens + ft
        flow_patches = fp if flow_patches is None else flow_patches + fp
        flow_merged = fm if flow_merged is None else flow_merged + fm
        flops = tr.meta.flops
        row: dict[str, Any] = {"image": text_of(name), "source": text_of(tr.meta.source), "h": tr.meta.input_hw[0], "w": tr.meta.input_hw[1],
                               "patches": tr.num_patches, "tokens": tr.num_tokens, "reduction": tr.reduction,
                               "mean_tokens": tr.mean_tokens_per_block,
                               **{f"{kind}": fate[f"tokens_{kind}"] for kind in FATES},
                               **{f"{kind}_pct": 100.0 * fate[f"tokens_{kind}"] / tr.num_tokens for kind in FATES},
                               **{f"{kind}_patch_pct": 100.0 * fate[f"patches_{kind}"] / tr.num_patches for kind in FATES},
                               "gflops": flops.get("total", 0) / 1e9, "baseline_gflops": flops.get("baseline_total", 0) / 1e9,
                               "forward_ms": 1e3 * tr.meta.timings.get("forward_s", float("nan"))}
        if ev is not None:
            scored.append(ev)
            if ev.step_confusion is not None:
                row["step_miou"] = mean_iou(ev.step_confusion)
            if ev.baseline_confusion is not None:
                row["baseline_miou"] = mean_iou(ev.baseline_confusion)
            if ev.agreement is not None:
                row["agreement"] = ev.agreement
            if ev.baseline_flops is not None:
                row["measured_baseline_gflops"] = ev.baseline_flops / 1e9
        image_rows.append(row)
        totals["patches"] += tr.num_patches
        totals["tokens"] += tr.num_tokens
        totals["groups"] += int(surv.sum())
        totals["block_tokens"] += float(tr.tokens_in_block().sum())
        totals.update(fate)
        totals["flops"] += int(flops.get("total", 0))
        totals["baseline_flops"] += int(flops.get("baseline_total", 0))
        totals["images"] += 1
    for ev in [*scored, *image_evals]:  # per-image evals, and the stitched ones of windowed images
        if ev.step_confusion is not None:
            step_conf = ev.step_confusion.copy() if step_conf is None else step_conf + ev.step_confusion
        if ev.baseline_confusion is not None:
            base_conf = ev.baseline_confusion.copy() if base_conf is None else base_conf + ev.baseline_confusion
    if first is None:
        empty = pd.DataFrame()
        return DatasetTables(empty, empty, empty, empty, {"images": 0})
    step_iou = iou_per_class(step_conf) if step_conf is not None else None
    base_iou = iou_per_class(base_conf) if base_conf is not None else None
    place_cols = column_order(places)
    counted = ["patches", *(f"patches_level{k}" for k in range(MAX_LEVEL + 1)), "tokens",
               *(f"patches_{kind}" for kind in FATES), *(f"patches_{c}" for c in place_cols),
               *(f"tokens_{kind}" for kind in FATES), *(f"tokens_{c}" for c in place_cols),
               "token_blocks", "block_flops"]
    class_rows = []
    for c in sorted(class_acc):
        a = class_acc[c]
        # a class can cover patches without being the majority of any token: its token counts are 0
        row = {"class": c, "name": "ignore" if c == IGNORE_INDEX else first.meta.class_name(c),
               **{k: a.get(k, 0) for k in counted}}
        for kind in ("exited", "pruned"):
            row[f"{kind}_judged_patches"] = a.get(f"{kind}_judged_patches", 0)
            row[f"{kind}_correct_patches"] = a.get(f"{kind}_correct_patches", 0)
        finish_rates(row)
        if step_iou is not None and 0 <= c < len(step_iou):
            row["iou"] = float(step_iou[c])
        if base_iou is not None and 0 <= c < len(base_iou):
            row["iou_baseline"] = float(base_iou[c])
        class_rows.append(row)
    level_rows = []
    for k in range(MAX_LEVEL + 1):
        a = level_acc[k]
        row = {"level": k, "side_px": first.patch_size * 2 ** k, "tokens": a.get("tokens", 0), "patches": a.get("patches", 0),
               **{f"tokens_{kind}": a.get(f"tokens_{kind}", 0) for kind in FATES},
               **{f"patches_{kind}": a.get(f"patches_{kind}", 0) for kind in FATES},
               "token_blocks": a.get("token_blocks", 0.0), "block_flops": a.get("block_flops", 0.0),
               "correct_patches": a.get("correct_patches", 0), "judged_patches": a.get("judged_patches", 0)}
        for kind in ("exited", "pruned"):
            row[f"{kind}_judged_patches"] = a.get(f"{kind}_judged_patches", 0)
            row[f"{kind}_correct_patches"] = a.get(f"{kind}_correct_patches", 0)
        finish_rates(row)
        tokens = row["tokens"]
        for kind in FATES:
            row[f"{kind}_rate"] = row[f"tokens_{kind}"] / tokens if tokens else float("nan")
        row["exit_rate"] = row["exited_rate"]
        row["accuracy"] = row["correct_patches"] / row["judged_patches"] if row["judged_patches"] else float("nan")
        level_rows.append(row)
    levels = pd.DataFrame(level_rows)
    n = totals["images"]
    per_image = images if images is not None else n
    blocks = pd.DataFrame({"block": np.arange(1, first.meta.depth + 1), "tokens_in": block_in, "mean_tokens_in": block_in / n,
                           "merged_in_block": block_merged, "pruned_at_block": block_pruned,
                           "exited_after": block_exit, "flops": block_flops})
    for k in range(MAX_LEVEL + 1):
        blocks[f"tokens_in_level{k}"] = block_levels[:, k]  # type: ignore[index]
    summary: dict[str, Any] = {
        "images": per_image, "windows": n, "patches": totals["patches"], "tokens": totals["tokens"],
        "token_reduction": totals["patches"] / max(totals["tokens"], 1),
        **{f"{kind}_pct": 100.0 * totals[f"tokens_{kind}"] / max(totals["tokens"], 1) for kind in FATES},
        **{f"{kind}_patch_pct": 100.0 * totals[f"patches_{kind}"] / max(totals["patches"], 1) for kind in FATES},
        "exited_early_pct": 100.0 * totals["tokens_exited"] / max(totals["tokens"], 1),
        "pruned_tokens": totals["tokens_pruned"],
        "fate_places": column_order(places),
        "mean_tokens_per_block": totals["block_tokens"] / max(n * first.meta.depth, 1),
        "block_token_reduction": totals["patches"] * first.meta.depth / max(totals["block_tokens"], 1e-9),
        "merged_tokens": totals["tokens_merged"],
        "method": first.meta.method_name,
        "exited_early_patch_pct": 100.0 * totals["patches_exited"] / max(totals["patches"], 1),
        "gflops_per_image": totals["flops"] / 1e9 / per_image,
        "baseline_gflops_per_image": totals["baseline_flops"] / 1e9 / per_image,
        "flop_reduction": totals["baseline_flops"] / max(totals["flops"], 1),
        "class_source": " + ".join(sorted(sources)),
        "model": first.meta.model, "policy": first.meta.policy, "exits": first.meta.exits,
        "merge_thresholds": list(first.meta.merge_thresholds), "exit_threshold": first.meta.exit_threshold,
        "exit_after": list(first.meta.exit_after), "depth": first.meta.depth, "class_names": list(names),
        "flow_points": flow_points(first),
        "flow_tokens": flow_tokens.tolist(), "flow_patches": flow_patches.tolist(),  # type: ignore[union-attr]
        "flow_merged_patches": flow_merged.tolist(),  # type: ignore[union-attr]
    }
    evals = [*scored, *image_evals]
    if step_conf is not None:
        summary["step_miou"] = mean_iou(step_conf)
        summary["step_miou_ci"] = miou_interval([class_counts(ev.step_confusion) for ev in evals
                                                 if ev.step_confusion is not None]).as_dict()
    if base_conf is not None:
        summary["baseline_miou"] = mean_iou(base_conf)
        summary["baseline_miou_ci"] = miou_interval([class_counts(ev.baseline_confusion) for ev in evals
                                                     if ev.baseline_confusion is not None]).as_dict()
    paired = [ev for ev in evals if ev.step_confusion is not None and ev.baseline_confusion is not None]
    if paired:
        summary["miou_change_ci"] = miou_change_interval([class_counts(ev.step_confusion) for ev in paired],
                                                         [class_counts(ev.baseline_confusion) for ev in paired]).as_dict()
    return DatasetTables(pd.DataFrame(image_rows), pd.DataFrame(class_rows), levels, blocks, summary)
