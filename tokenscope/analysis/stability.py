"""Frame-to-frame stability of where the tokens go, and the tails of per-image distributions.

Between consecutive frames of a clip, the share of patches whose superpatch level, exit block or
predicted class changed (a still clip gives exactly zero). Tails: percentiles of latency, tokens
and GFLOPs over a run's images or frames (numpy's linear percentiles), with the worst ones named,
because the mean that papers report hides what decides whether a deployment holds its frame rate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tokenscope.trace.trace import Trace

PERCENTILES = (50, 90, 95, 99)
TAIL_COLUMNS = {"forward_ms": "latency_ms", "tokens": "tokens", "mean_tokens": "tokens_per_block", "gflops": "gflops"}


def patch_state(trace: Trace) -> dict[str, np.ndarray]:
    """Per patch: the level of its token, the block its token left at, the class it ends with."""
    return {"level": trace.per_patch(trace.token_level), "exit": trace.per_patch(trace.token_exit_block),
            "class": trace.per_patch(trace.token_class)}  # a merged token already reports its group's class


def frame_changes(prev: Trace, cur: Trace) -> dict[str, float]:
    """Share of patches whose level, exit block or predicted class differs between two frames."""
    a, b = patch_state(prev), patch_state(cur)
    if a["level"].shape != b["level"].shape:
        return {f"{k}_change": float("nan") for k in a}
    return {f"{k}_change": float(np.mean(a[k] != b[k])) for k in a}


def spread(values: np.ndarray, percentiles: tuple[int, ...] = PERCENTILES) -> dict[str, float]:
    """pXX of `values` (numpy's linear percentiles; `percentiles` must hold 50 and 99), their
    max, and p99 over p50 (NaN when p50 is 0): the one summary every tail in tokenscope gives."""
    row = {f"p{q}": float(np.percentile(values, q)) for q in percentiles}
    row["max"] = float(np.max(values))
    row["p99_over_p50"] = row["p99"] / row["p50"] if row["p50"] else float("nan")
    return row


def tails(images: pd.DataFrame, name_column: str = "image", worst: int = 3) -> dict[str, Any]:
    """p50/p90/p95/p99/max (and mean) of latency, tokens and GFLOPs, with the `worst` rows named."""
    out: dict[str, Any] = {}
    for column, label in TAIL_COLUMNS.items():
        if column not in images.columns or images[column].dropna().empty:
            continue
        values = images[column].to_numpy(dtype=np.float64)
        keep = ~np.isnan(values)
        row: dict[str, Any] = {**spread(values[keep]), "mean": float(values[keep].mean())}
        order = np.argsort(-np.where(keep, values, -np.inf), kind="stable")[:worst]
        row["worst"] = [{"name": str(images[name_column].iloc[i]), "value": float(values[i])} for i in order if keep[i]]
        out[label] = row
    return out
