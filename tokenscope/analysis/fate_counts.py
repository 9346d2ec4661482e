"""Per-image counts of the token fates (trace/fates.py) by class and by superpatch level.

Every count is read off the one account of fates, so a new method's merges, prunes and exits appear
in every table without anyone naming them. A patch's class is its ground-truth label when the trace
has patch labels, else its predicted class (`class_source` says which); a token's class is the
majority of its patches' labels (else its prediction). Counts are sums, so a data set's table is the
sum of its images' and can be re-derived from the image folders.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from tokenscope.data.images import IGNORE_INDEX
from tokenscope.models.partition import MAX_LEVEL
from tokenscope.trace.fates import FATES, TokenFates, fate_column, patch_cost, token_fates
from tokenscope.trace.trace import Trace


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


def patch_classes(trace: Trace) -> tuple[np.ndarray, str]:
    """(gh * gw,) the class of every patch: its ground-truth label, else its predicted class."""
    if trace.patch_labels is not None:
        return trace.patch_labels.ravel().astype(np.int64), "ground truth"
    return trace.per_patch(trace.token_class).ravel().astype(np.int64), "predicted"


def place_columns(fates: TokenFates) -> list[str]:
    """The fate-and-place columns of one trace (merged_b3, pruned_b7, exited_gate4, reached_end)."""
    return [fate_column(k, b, fates.depth) for k, b in fates.places()]


def column_order(columns: set[str]) -> list[str]:
    """Fate-and-place columns in the order of a token's life: by block, merges before prunes before
    exits, reached_end last."""
    def key(c: str) -> tuple[int, int]:
        if c == "reached_end":
            return (1 << 30, 3)
        fate, _, where = c.rpartition("_")
        block = int(where.removeprefix("gate").removeprefix("b"))
        return (block, FATES.index(fate))
    return sorted(columns, key=key)


def _judged(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(T,) patches with a label and patches predicted right, per token (zeros without labels)."""
    t = trace.num_tokens
    if trace.patch_labels is None:
        return np.zeros(t, np.int64), np.zeros(t, np.int64)
    tok = trace.token_of_patch.ravel()
    lab = trace.patch_labels.ravel()
    ok = lab != IGNORE_INDEX
    judged = np.bincount(tok[ok], minlength=t)
    correct = np.bincount(tok[ok & (lab == trace.token_class[tok])], minlength=t)
    return judged, correct


def image_counts(trace: Trace, fates: TokenFates | None = None) -> tuple[dict[int, Counter], dict[int, Counter], str]:
    """(per class, per level, class source): Counters of patches, tokens, patches and tokens in each
    fate (by name and by place), token-blocks, block FLOPs and the judged / correct patches of the
    exited and pruned tokens."""
    fates = fates or token_fates(trace)
    names = fates.names()
    places = fates.labels()
    tok = trace.token_of_patch.ravel().astype(np.int64)
    pcls, source = patch_classes(trace)
    tcls, _ = token_classes(trace)
    blocks, flops = patch_cost(trace)
    blocks, flops = blocks.ravel(), flops.ravel()
    judged, correct = _judged(trace)
    level = trace.token_level.astype(np.int64)
    patch_level = level[tok]
    by_class: dict[int, Counter] = {}
    by_level: dict[int, Counter] = {}

    def add(acc: Counter, patch_sel: np.ndarray, token_sel: np.ndarray) -> None:
        acc["patches"] += int(patch_sel.sum())
        acc["tokens"] += int(token_sel.sum())
        acc["token_blocks"] += float(blocks[patch_sel].sum())
        acc["block_flops"] += float(flops[patch_sel].sum())
        for fate_name in FATES:
            acc[f"patches_{fate_name}"] += 0
            acc[f"tokens_{fate_name}"] += 0
        for value, n in zip(*np.unique(names[tok[patch_sel]], return_counts=True)):
            acc[f"patches_{value}"] += int(n)
        for value, n in zip(*np.unique(places[tok[patch_sel]], return_counts=True)):
            if value != "reached_end":
                acc[f"patches_{value}"] += int(n)
        for value, n in zip(*np.unique(names[token_sel], return_counts=True)):
            acc[f"tokens_{value}"] += int(n)
        for value, n in zip(*np.unique(places[token_sel], return_counts=True)):
            if value != "reached_end":
                acc[f"tokens_{value}"] += int(n)
        for fate_name in ("exited", "pruned"):
            sel = token_sel & (names == fate_name)
            acc[f"{fate_name}_judged_patches"] += int(judged[sel].sum())
            acc[f"{fate_name}_correct_patches"] += int(correct[sel].sum())

    for c in np.unique(np.concatenate([pcls, tcls])):
        acc = by_class.setdefault(int(c), Counter())
        psel = pcls == c
        add(acc, psel, tcls == c)
        lv = np.bincount(patch_level[psel], minlength=MAX_LEVEL + 1)
        for k in range(MAX_LEVEL + 1):
            acc[f"patches_level{k}"] += int(lv[k])
    for k in range(MAX_LEVEL + 1):
        acc = by_level.setdefault(k, Counter())
        add(acc, patch_level == k, level == k)
        acc["judged_patches"] += int(judged[level == k].sum())
        acc["correct_patches"] += int(correct[level == k].sum())
    return by_class, by_level, source


def finish_rates(row: dict[str, Any]) -> dict[str, Any]:
    """Add the derived columns of a summed row: cost per patch and the accuracy of early decisions."""
    p = row.get("patches", 0)
    row["token_blocks_per_patch"] = row.get("token_blocks", 0.0) / p if p else float("nan")
    row["gflops_per_patch"] = row.get("block_flops", 0.0) / 1e9 / p if p else float("nan")
    for fate_name in ("exited", "pruned"):
        judged = row.get(f"{fate_name}_judged_patches", 0)
        row[f"{fate_name}_accuracy"] = row.get(f"{fate_name}_correct_patches", 0) / judged if judged else float("nan")
    return row
