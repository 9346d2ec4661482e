"""Tables from traces: one row per token, one row per block, one summary per image.

Pure functions of a Trace (never of a model), so they work on saved runs as well as live ones.
Blocks are numbered from 1 as in the papers ("exit after block 8"); `exit_block` = depth means
the token went through every block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tokenscope.models.partition import MAX_LEVEL
from tokenscope.trace.fates import EXITED, FATES, fate_totals, patch_cost, token_fates
from tokenscope.trace.trace import Trace


def tokens_columns(trace: Trace) -> dict[str, np.ndarray]:
    """The columns of `tokens_table`, as arrays: a run's token table joins those of all its
    traces at once (a DataFrame per trace, copied again to add the image, cost a run of 240
    video frames a fifth of a second)."""
    m = trace.meta
    side = trace.token_side
    classes, where = np.unique(trace.token_class, return_inverse=True)
    fates = token_fates(trace)
    blocks, flops = patch_cost(trace)
    tok = trace.token_of_patch.ravel()
    return {
        "token": np.arange(trace.num_tokens),
        "level": trace.token_level.astype(int),
        "row": trace.token_row,
        "col": trace.token_col,
        "side": side,
        "patches": side**2,
        "exit_block": trace.token_exit_block.astype(int),
        "fate": fates.names(),
        "fate_block": fates.block.astype(int),
        "fate_place": fates.labels(),
        "final_token": fates.final.astype(int),
        "exited_early": fates.kind == EXITED,
        "token_blocks": np.bincount(tok, weights=blocks.ravel(), minlength=trace.num_tokens),
        "gflops": np.bincount(tok, weights=flops.ravel(), minlength=trace.num_tokens) / 1e9,
        "confidence": trace.token_confidence.astype(float),
        "class": trace.token_class,
        "class_name": np.array([m.class_name(int(c)) for c in classes], dtype=object)[where.reshape(-1)],
        "merged_at": (trace.token_merged_at if trace.token_merged_at is not None
                      else np.zeros(trace.num_tokens)).astype(int),
        "merged_into": (trace.token_merged_into if trace.token_merged_into is not None
                        else np.full(trace.num_tokens, -1)).astype(int),
        "pruned_at": (trace.token_pruned_at if trace.token_pruned_at is not None
                      else np.zeros(trace.num_tokens)).astype(int),
    }


def tokens_table(trace: Trace) -> pd.DataFrame:
    """One row per (super)token: where it sits, how big it is, its fate (merged / pruned / exited /
    reached_end, with the block or gate), what it cost (token-blocks and block GFLOPs of its patches, as
    trace/fates.py shares them) and what it said."""
    return pd.DataFrame(tokens_columns(trace))


def joined_tokens_table(parts: list[tuple[str, dict[str, np.ndarray]]]) -> pd.DataFrame:
    """The token tables of many traces, `(image, tokens_columns(trace))` each, one under the
    other with an `image` column last."""
    names = list(parts[0][1]) if parts else []
    columns = {k: np.concatenate([cols[k] for _, cols in parts]) for k in names}
    columns["image"] = np.repeat(np.array([n for n, _ in parts], dtype=object), [len(cols["token"]) for _, cols in parts])
    return pd.DataFrame(columns)


def level_block_matrix(trace: Trace) -> np.ndarray:
    """(depth, MAX_LEVEL + 1): tokens of each superpatch level entering each block."""
    depth = trace.meta.depth
    out = np.zeros((depth, MAX_LEVEL + 1), dtype=np.int64)
    for b in range(depth):
        alive = trace.entering(b + 1)
        out[b] = np.bincount(trace.token_level[alive].astype(np.int64), minlength=MAX_LEVEL + 1)[: MAX_LEVEL + 1]
    return out


def exit_level_matrix(trace: Trace) -> tuple[list[str], np.ndarray]:
    """Where tokens leave (`gate K` when exits are on, `pruned K` for a pruning step at block K, then `end`) and the
    tokens of each level leaving at each (a merged group counts once)."""
    pruned = trace.token_pruned_at if trace.token_pruned_at is not None else np.zeros(trace.num_tokens, np.int64)
    prune_blocks = sorted(int(b) for b in np.unique(pruned[pruned > 0]))
    gates = trace.meta.exit_after if trace.meta.exits else ()
    points = ([(f"gate {g}", (trace.token_exit_block == g) & (pruned == 0)) for g in gates]
              + [(f"pruned\n{b}", pruned == b) for b in prune_blocks]
              + [("end", trace.token_exit_block == trace.meta.depth)])
    mat = np.zeros((len(points), MAX_LEVEL + 1), dtype=np.int64)
    for i, (_, where) in enumerate(points):
        sel = where & trace.survivors
        mat[i] = np.bincount(trace.token_level[sel].astype(np.int64), minlength=MAX_LEVEL + 1)[: MAX_LEVEL + 1]
    return [label for label, _ in points], mat


def blocks_table(trace: Trace) -> pd.DataFrame:
    """One row per encoder block: tokens in (by level), tokens leaving at a gate after it, FLOPs."""
    depth = trace.meta.depth
    gates = set(trace.meta.exit_after)
    by_level = level_block_matrix(trace)
    fates = token_fates(trace)
    exited = np.bincount(fates.block[fates.kind == EXITED].astype(np.int64), minlength=depth + 1)[1:]
    df = pd.DataFrame({
        "block": np.arange(1, depth + 1),
        "tokens_in": trace.block_tokens_in.astype(int),
        "merged_in_block": trace.merges_per_block(),
        "pruned_at_block": trace.pruned_per_block(),
        "gate_after": [b in gates for b in range(1, depth + 1)],
        "exited_after": exited,
        "flops": trace.block_flops.astype(np.int64),
    })
    for k in range(MAX_LEVEL + 1):
        df[f"tokens_in_level{k}"] = by_level[:, k]
    return df


def summary(trace: Trace) -> dict[str, Any]:
    """The numbers a user asks first: how many tokens, how much reduction, how many left early."""
    m = trace.meta
    fates = token_fates(trace)
    totals = fate_totals(trace, fates)
    per_level = np.bincount(trace.token_level.astype(np.int64), minlength=MAX_LEVEL + 1)[: MAX_LEVEL + 1]
    flops = m.flops
    total, base = flops.get("total", 0), flops.get("baseline_total", 0)
    return {
        "image": m.source,
        "input_hw": list(m.input_hw),
        "grid": list(m.grid),
        "model": m.model,
        "method": m.method_name,
        "policy": m.policy,
        "exits": m.exits,
        "merging": dict(m.merging),
        "pruning": dict(m.pruning),
        "merge_thresholds": list(m.merge_thresholds),
        "exit_threshold": m.exit_threshold,
        "patches": trace.num_patches,
        "tokens": trace.num_tokens,
        "reduction": trace.reduction,
        "mean_tokens_per_block": trace.mean_tokens_per_block,
        "tokens_per_level": {str(k): int(v) for k, v in enumerate(per_level)},
        **{f"{kind}_tokens": totals[f"tokens_{kind}"] for kind in FATES},
        **{f"{kind}_pct": 100.0 * totals[f"tokens_{kind}"] / trace.num_tokens for kind in FATES},
        **{f"{kind}_patch_pct": 100.0 * totals[f"patches_{kind}"] / trace.num_patches for kind in FATES},
        "exited_early_tokens": totals["tokens_exited"],
        "exited_early_pct": 100.0 * totals["tokens_exited"] / trace.num_tokens,
        "exited_early_patch_pct": 100.0 * totals["patches_exited"] / trace.num_patches,
        "exits_per_gate": {str(k): int(np.sum((fates.kind == EXITED) & (fates.block == k))) for k in m.exit_after},
        "gflops": total / 1e9,
        "baseline_gflops": base / 1e9,
        "flop_reduction": base / total if total else float("nan"),
        "policy_gflops": flops.get("policy", 0) / 1e9,
        "forward_s": m.timings.get("forward_s", float("nan")),
        "weights": m.weights,
        "device": m.device,
    }
