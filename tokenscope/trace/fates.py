"""Every token's fate, computed once from a trace: the one account every table, figure and the API read.

A token (one per supertoken or patch of the policy's partition) has exactly one fate:

| fate | block | meaning |
|---|---|---|
| `merged` | k | merged into another token inside block k (`into` names it); its patches go on in that token |
| `pruned` | k | a pruning step removed it inside or after block k; the decoder predicted its patches from its features then |
| `exited` | g | it left at the exit gate after block g with the gate's prediction |
| `reached_end` | depth | it went through every block to the final decoder |

A patch's fate is that of the token the policy put it in, so the fates of any set of patches (a class,
a level, an image) add up to that set: the invariant `assert_fates_cover` checks. A merged token's
patches also have a *final* fate, that of the token their merge chain ended in (`final_kind`).

Cost per patch (`patch_cost`): each block's work is shared over the tokens it ran on, and each token's
share over the patches it covered then (merged groups cover more). Attention and MLP are counted as the
two halves of a block, as `Trace.tokens_in_block` does, so the patches' token-blocks add up to the
trace's and their FLOPs to its block FLOPs: per-class cost is a split of the measured total, never a
second estimate. FLOPs of a block are shared equally over its tokens (attention's quadratic part too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenscope.trace.trace import Trace, TraceInconsistency

FATES = ("merged", "pruned", "exited", "reached_end")
MERGED, PRUNED, EXITED, REACHED_END = range(4)


@dataclass(frozen=True)
class TokenFates:
    """(T,) arrays, one entry per token of the policy's partition."""

    kind: np.ndarray
    """int8 index into FATES."""
    block: np.ndarray
    """int16: the block of the merge or prune, the gate's block for an exit, depth for reached_end."""
    into: np.ndarray
    """int32: the token it merged into (-1 unless merged)."""
    final: np.ndarray
    """int64: the token its merge chain ended in (itself unless merged)."""
    depth: int

    @property
    def final_kind(self) -> np.ndarray:
        """(T,) the fate of the token each token ended in (a merged token's group's fate)."""
        return self.kind[self.final]

    def names(self) -> np.ndarray:
        """(T,) the fate of every token by name."""
        return np.asarray(FATES, dtype=object)[self.kind]

    def labels(self) -> np.ndarray:
        """(T,) the fate with its place, as in column headers: merged_b3, pruned_b7, exited_gate4, reached_end."""
        return np.array([fate_column(int(k), int(b), self.depth) for k, b in zip(self.kind, self.block)], dtype=object)

    def places(self) -> list[tuple[int, int]]:
        """The (fate, block) pairs that occur, in the order of a token's life: by block, then fate."""
        pairs = {(int(k), int(b)) for k, b in zip(self.kind, self.block)}
        return sorted(pairs, key=lambda p: (p[1], p[0]))


def fate_column(kind: int, block: int, depth: int) -> str:
    """Column header of one fate at one place: merged_b3, pruned_b7, exited_gate4, reached_end."""
    if kind == REACHED_END:
        return "reached_end"
    if kind == EXITED:
        return f"exited_gate{block}"
    return f"{FATES[kind]}_b{block}"


def token_fates(trace: Trace) -> TokenFates:
    """Each token's one fate (see the module docstring). Merging wins over everything that happened
    to the group afterwards: the token itself stopped being a token at its merge."""
    t, depth = trace.num_tokens, trace.meta.depth
    kind = np.full(t, REACHED_END, dtype=np.int8)
    block = trace.token_exit_block.astype(np.int16).copy()
    kind[trace.token_exit_block < depth] = EXITED
    if trace.token_pruned_at is not None:
        pruned = trace.token_pruned_at > 0
        kind[pruned] = PRUNED
        block[pruned] = trace.token_pruned_at[pruned]
    into = np.full(t, -1, dtype=np.int32)
    if trace.token_merged_at is not None and trace.token_merged_into is not None:
        merged = trace.token_merged_at > 0
        kind[merged] = MERGED
        block[merged] = trace.token_merged_at[merged]
        into[merged] = trace.token_merged_into[merged]
    return TokenFates(kind=kind, block=block, into=into, final=trace.final_owner().astype(np.int64), depth=depth)


def patch_cost(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(gh, gw) token-blocks and (gh, gw) block FLOPs of every patch: each block half's work shared
    over the tokens that ran it, each token's share over the patches it covered then. They sum to
    `trace.tokens_in_block().sum()` and to `trace.block_flops.sum()` (blocks that ran no token aside)."""
    depth, t = trace.meta.depth, trace.num_tokens
    tok = trace.token_of_patch.ravel().astype(np.int64)
    blocks = np.zeros(tok.size, dtype=np.float64)
    flops = np.zeros(tok.size, dtype=np.float64)
    inside = set(int(k) for k in trace.meta.pruning.get("inside", ())) if trace.token_pruned_at is not None else set()
    pruned_at = trace.token_pruned_at.astype(np.int64) if trace.token_pruned_at is not None else np.zeros(t, np.int64)
    per_token = trace.block_flops.astype(np.float64) / np.maximum(trace.tokens_in_block(), 1e-12)
    merged_at = trace.token_merged_at.astype(np.int64) if trace.token_merged_at is not None else np.zeros(t, np.int64)
    owner = trace.owner_before(1)
    for b in range(1, depth + 1):
        entering = trace.entering(b)
        after = trace.owner_before(b + 1)
        mid = entering & (merged_at != b) & ~((pruned_at == b) & (b in inside))
        for group, alive in ((owner, entering), (after, mid)):
            rep = group[tok]
            live = alive[rep]
            area = np.bincount(rep[live], minlength=t).astype(np.float64)
            share = np.zeros(tok.size, dtype=np.float64)
            share[live] = 0.5 / area[rep[live]]
            blocks += share
            flops += share * per_token[b - 1]
        owner = after
    shape = trace.token_of_patch.shape
    return blocks.reshape(shape), flops.reshape(shape)


def assert_fates_cover(trace: Trace, fates: TokenFates | None = None) -> None:
    """The fate invariant: every patch has exactly one fate, and the patches of every class (its
    ground truth when the trace has patch labels, else its prediction) in each fate add up to its
    patches; the tokens' fates add up to the tokens. Raises TraceInconsistency."""
    fates = fates or token_fates(trace)
    t = trace.num_tokens
    if fates.kind.shape != (t,) or not np.all((fates.kind >= 0) & (fates.kind < len(FATES))):
        raise TraceInconsistency(f"{trace.meta.source}: a token has no fate")
    patch_kind = fates.kind[trace.token_of_patch].ravel()
    classes = (trace.patch_labels if trace.patch_labels is not None else trace.per_patch(trace.token_class)).ravel()
    for c in np.unique(classes):
        sel = classes == c
        per_fate = np.bincount(patch_kind[sel].astype(np.int64), minlength=len(FATES))
        if int(per_fate.sum()) != int(sel.sum()):
            raise TraceInconsistency(f"{trace.meta.source}: class {int(c)}'s fates cover {int(per_fate.sum())} "
                                     f"of its {int(sel.sum())} patches")
    if int(np.bincount(fates.kind.astype(np.int64), minlength=len(FATES)).sum()) != t:
        raise TraceInconsistency(f"{trace.meta.source}: the tokens' fates do not add up to the tokens")
    merged = fates.kind == MERGED
    if np.any(merged & (fates.into < 0)) or np.any(~merged & (fates.into >= 0)):
        raise TraceInconsistency(f"{trace.meta.source}: a merged token does not name the token it joined")
    if np.any(fates.kind[fates.final] == MERGED):
        raise TraceInconsistency(f"{trace.meta.source}: a merge chain ends in a token that merged away")
    blocks, flops = patch_cost(trace)
    if not np.isclose(blocks.sum(), trace.tokens_in_block().sum(), rtol=1e-9, atol=1e-6):
        raise TraceInconsistency(f"{trace.meta.source}: the patches' token-blocks {blocks.sum():.3f} differ from "
                                 f"the trace's {trace.tokens_in_block().sum():.3f}")


def fate_totals(trace: Trace, fates: TokenFates | None = None) -> dict[str, int]:
    """Tokens and patches in each fate: `tokens_merged`, ..., `patches_reached_end` (each set adds up to
    the trace's tokens, and to its patches)."""
    fates = fates or token_fates(trace)
    kind = fates.kind.astype(np.int64)
    tokens = np.bincount(kind, minlength=len(FATES))
    patches = np.bincount(kind, weights=trace.token_patches.astype(np.float64), minlength=len(FATES))
    out = {f"tokens_{name}": int(tokens[i]) for i, name in enumerate(FATES)}
    out.update({f"patches_{name}": int(round(patches[i])) for i, name in enumerate(FATES)})
    return out


def fate_percentages(totals: dict[str, int], tokens: int) -> dict[str, float]:
    """`merged_pct`, `pruned_pct`, `exited_pct` (and `exited_early_pct`, its earlier name: gate exits
    only) of `tokens`, from `fate_totals` summed over any set of traces."""
    out = {f"{kind}_pct": 100.0 * totals.get(f"tokens_{kind}", 0) / max(tokens, 1) for kind in FATES}
    out["exited_early_pct"] = out["exited_pct"]
    return out
