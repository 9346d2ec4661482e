"""Data-set tables: where the tokens went, per image, per class, per superpatch level, per block.

Everything is a sum over per-image records (a Trace plus, where labels exist, the confusion
matrices of STEP and of the baseline), so a table can always be re-derived from the image
folders of a run. A token's class is the ground-truth majority of its patches when the trace has
patch labels, else its predicted class (`class_source` says which).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from tokenscope.analysis.metrics import iou_per_class, mean_iou
from tokenscope.analysis.uncertainty import class_counts, miou_change_interval, miou_interval
from tokenscope.analysis.stats import level_block_matrix
from tokenscope.data.images import IGNORE_INDEX
from tokenscope.models.partition import MAX_LEVEL
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


def token_classes(trace: Trace) -> tuple[np.ndarray, str]:
    """Class of every token: ground-truth majority over its patches if known, else predicted."""
    if trace.patch_labels is None:
        return trace.token_class.astype(np.int64), "predicted"
    t = trace.num_tokens
    lab = trace.patch_labels.ravel().astype(np.int64)
    tok = trace.token_of_patch.ravel().astype(np.int64)
    keep = lab != IGNORE_INDEX
    counts = np.zeros((t, IGNORE_INDEX + 1), dtype=np.int64)
    np.add.at(counts, (tok[keep], lab[keep]), 1)
    cls = counts.argmax(axis=1)
    cls[counts.max(axis=1) == 0] = IGNORE_INDEX
    return cls, "ground truth"


def exit_points(trace: Trace) -> list[int]:
    return [*trace.meta.exit_after, trace.meta.depth]


def point_name(trace: Trace, k: int) -> str:
    return "end" if k == trace.meta.depth else f"gate{k}"


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
    class_acc: dict[int, dict[str, int]] = {}
    level_acc = np.zeros((MAX_LEVEL + 1, 6), dtype=np.float64)  # tokens, patches, exited, exited patches, correct, judged
    block_in: np.ndarray | None = None
    block_exit: np.ndarray | None = None
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
    totals = {"patches": 0, "tokens": 0, "groups": 0, "merged": 0, "block_tokens": 0.0, "exited": 0, "exited_patches": 0, "flops": 0, "baseline_flops": 0, "images": 0}
    for name, tr, ev in records:
        first = first or tr
        names = names or tuple(tr.meta.class_names)
        points = exit_points(tr)
        cls, source = token_classes(tr)
        sources.add(source)
        side = tr.token_side.astype(np.int64)
        patches = side * side
        early = tr.exited_early  # per token: its patches left early (with its group, when merged)
        surv = tr.survivors
        early_groups = early & surv
        patch_lab = tr.patch_labels
        correct_patches = np.zeros(tr.num_tokens, dtype=np.int64)
        judged_patches = np.zeros(tr.num_tokens, dtype=np.int64)
        if patch_lab is not None:
            tok = tr.token_of_patch.ravel()
            lab = patch_lab.ravel()
            ok = lab != IGNORE_INDEX
            judged_patches = np.bincount(tok[ok], minlength=tr.num_tokens)
            correct_patches = np.bincount(tok[ok & (lab == tr.token_class[tok])], minlength=tr.num_tokens)
        for c in np.unique(cls):
            sel = cls == c
            acc = class_acc.setdefault(int(c), {})
            acc["tokens"] = acc.get("tokens", 0) + int(sel.sum())
            acc["token_patches"] = acc.get("token_patches", 0) + int(patches[sel].sum())
            for k in points:
                key = f"tokens_exit_{point_name(tr, k)}"
                acc[key] = acc.get(key, 0) + int(np.sum(sel & surv & (tr.token_exit_block == k)))
            acc["exited_judged_patches"] = acc.get("exited_judged_patches", 0) + int(judged_patches[sel & early].sum())
            acc["exited_correct_patches"] = acc.get("exited_correct_patches", 0) + int(correct_patches[sel & early].sum())
        # patches per class at each level (a patch's class is its own label when known)
        patch_cls = patch_lab.ravel() if patch_lab is not None else tr.per_patch(tr.token_class).ravel()
        patch_lvl = tr.per_patch(tr.token_level).ravel().astype(np.int64)
        for c in np.unique(patch_cls):
            acc = class_acc.setdefault(int(c), {})
            lv = np.bincount(patch_lvl[patch_cls == c], minlength=MAX_LEVEL + 1)
            for k in range(MAX_LEVEL + 1):
                acc[f"patches_level{k}"] = acc.get(f"patches_level{k}", 0) + int(lv[k])
        for k in range(MAX_LEVEL + 1):
            sel = tr.token_level == k
            level_acc[k] += [sel.sum(), patches[sel].sum(), (sel & early).sum(), patches[sel & early].sum(),
                             correct_patches[sel].sum(), judged_patches[sel].sum()]
        exits_after = np.array([np.sum(surv & (tr.token_exit_block == b)) if b in tr.meta.exit_after else 0
                                for b in range(1, tr.meta.depth + 1)])
        block_in = tr.block_tokens_in.astype(np.int64) if block_in is None else block_in + tr.block_tokens_in
        block_exit = exits_after if block_exit is None else block_exit + exits_after
        block_flops = tr.block_flops.astype(np.int64) if block_flops is None else block_flops + tr.block_flops
        bl = level_block_matrix(tr)
        block_levels = bl if block_levels is None else block_levels + bl
        ft = np.zeros((MAX_LEVEL + 1, len(points)), dtype=np.int64)
        fp = np.zeros_like(ft)
        for j, k in enumerate(points):
            at = tr.token_exit_block == k
            ft[:, j] = np.bincount(tr.token_level[at & surv].astype(np.int64), minlength=MAX_LEVEL + 1)[: MAX_LEVEL + 1]
            fp[:, j] = np.bincount(tr.token_level[at].astype(np.int64), weights=patches[at],
                                   minlength=MAX_LEVEL + 1)[: MAX_LEVEL + 1].astype(np.int64)
        fm = np.zeros_like(ft)  # patches of tokens that were merged into another inside the encoder
        for j, k in enumerate(points):
            gone = (tr.token_exit_block == k) & ~surv
            fm[:, j] = np.bincount(tr.token_level[gone].astype(np.int64), weights=patches[gone],
                                   minlength=MAX_LEVEL + 1)[: MAX_LEVEL + 1].astype(np.int64)
        flow_tokens = ft if flow_tokens is None else flow_tokens + ft
        flow_patches = fp if flow_patches is None else flow_patches + fp
        flow_merged = fm if flow_merged is None else flow_merged + fm
        flops = tr.meta.flops
        row: dict[str, Any] = {"image": name, "source": tr.meta.source, "h": tr.meta.input_hw[0], "w": tr.meta.input_hw[1],
                               "patches": tr.num_patches, "tokens": tr.num_tokens, "reduction": tr.reduction,
                               "mean_tokens": tr.mean_tokens_per_block, "merged": int((~surv).sum()),
                               "exited_early": int(early_groups.sum()),
                               "exited_early_pct": 100.0 * float(early_groups.sum()) / max(int(surv.sum()), 1),
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
        totals["merged"] += int((~surv).sum())
        totals["block_tokens"] += float(tr.tokens_in_block().sum())
        totals["exited"] += int(early_groups.sum())
        totals["exited_patches"] += int(patches[early].sum())
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
    class_rows = []
    for c in sorted(class_acc):
        a = class_acc[c]
        row = {"class": c, "name": "ignore" if c == IGNORE_INDEX else first.meta.class_name(c), **{k: a.get(k, 0) for k in sorted(a)}}
        for k in range(MAX_LEVEL + 1):
            row.setdefault(f"patches_level{k}", 0)
        # a class can cover patches without being the majority of any token: its token counts are 0
        for key in ("tokens", "token_patches", "exited_judged_patches", "exited_correct_patches",
                    *(f"tokens_exit_{point_name(first, k)}" for k in exit_points(first))):
            row.setdefault(key, 0)
        row["patches"] = sum(row[f"patches_level{k}"] for k in range(MAX_LEVEL + 1))
        judged = a.get("exited_judged_patches", 0)
        row["exit_accuracy"] = a.get("exited_correct_patches", 0) / judged if judged else float("nan")
        if step_iou is not None and 0 <= c < len(step_iou):
            row["iou_step"] = float(step_iou[c])
        if base_iou is not None and 0 <= c < len(base_iou):
            row["iou_baseline"] = float(base_iou[c])
        class_rows.append(row)
    levels = pd.DataFrame(level_acc, columns=["tokens", "patches", "exited", "exited_patches", "correct_patches",
                                              "judged_patches"]).astype(np.int64)
    levels.insert(0, "level", np.arange(MAX_LEVEL + 1))
    levels.insert(1, "side_px", first.patch_size * 2 ** levels["level"])
    levels["exit_rate"] = levels["exited"] / levels["tokens"].where(levels["tokens"] > 0)
    levels["accuracy"] = levels["correct_patches"] / levels["judged_patches"].where(levels["judged_patches"] > 0)
    n = totals["images"]
    per_image = images if images is not None else n
    blocks = pd.DataFrame({"block": np.arange(1, first.meta.depth + 1), "tokens_in": block_in, "mean_tokens_in": block_in / n,
                           "exited_after": block_exit, "flops": block_flops})
    for k in range(MAX_LEVEL + 1):
        blocks[f"tokens_in_level{k}"] = block_levels[:, k]  # type: ignore[index]
    summary: dict[str, Any] = {
        "images": per_image, "windows": n, "patches": totals["patches"], "tokens": totals["tokens"],
        "token_reduction": totals["patches"] / max(totals["tokens"], 1),
        "exited_early_pct": 100.0 * totals["exited"] / max(totals["groups"], 1),
        "mean_tokens_per_block": totals["block_tokens"] / max(n * first.meta.depth, 1),
        "block_token_reduction": totals["patches"] * first.meta.depth / max(totals["block_tokens"], 1e-9),
        "merged_tokens": totals["merged"],
        "method": first.meta.method_name,
        "exited_early_patch_pct": 100.0 * totals["exited_patches"] / max(totals["patches"], 1),
        "gflops_per_image": totals["flops"] / 1e9 / per_image,
        "baseline_gflops_per_image": totals["baseline_flops"] / 1e9 / per_image,
        "flop_reduction": totals["baseline_flops"] / max(totals["flops"], 1),
        "class_source": " + ".join(sorted(sources)),
        "model": first.meta.model, "policy": first.meta.policy, "exits": first.meta.exits,
        "merge_thresholds": list(first.meta.merge_thresholds), "exit_threshold": first.meta.exit_threshold,
        "exit_after": list(first.meta.exit_after), "depth": first.meta.depth, "class_names": list(names),
        "flow_points": [point_name(first, k) for k in exit_points(first)],
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
