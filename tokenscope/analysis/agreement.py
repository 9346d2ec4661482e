"""Early decisions against the unreduced model, and fates against class boundaries.

**Agreement** (`agreement_counts`): for every patch of a reduced trace, whether its final label (the
prediction of the token it ended in: a gate's for an exit, the decoder's for a pruned or merged token)
equals the label the unreduced model gives that patch on the same image (a paired baseline trace,
which `compare` writes beside every method). It measures how often an early decision changes the
answer of the network being reduced, not whether either is right: no ground truth enters it.

**Boundaries** (`boundary_counts`): every patch's chessboard distance, in patches, to the nearest
patch with a 4-neighbour of another class (0 = on a boundary), from the ground truth when the trace
has patch labels, else from the unreduced prediction when a baseline trace is given, else from the
trace's own prediction (`source` says which); merge, prune and exit rates against that distance.

Both return per-image counts keyed by group, so a data set's rates are pooled sums with a bootstrap
interval over images (`uncertainty.ratio_intervals`).
"""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np

from tokenscope.analysis.fate_counts import patch_classes
from tokenscope.data.images import IGNORE_INDEX
from tokenscope.trace.fates import FATES, TokenFates, token_fates
from tokenscope.trace.trace import Trace

DISTANCE_BINS = ((0, 0), (1, 1), (2, 2), (3, 3), (4, 7), (8, 1 << 30))
"""Distance to the nearest class boundary, in patches: 0 (on it), 1, 2, 3, 4-7, 8 and more (or no boundary)."""


def distance_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}+" if hi >= 1 << 30 else f"{lo}-{hi}"


def patch_labels_of(trace: Trace) -> np.ndarray:
    """(gh, gw) the label every patch ends with: the prediction of the token its patch's group ended in."""
    return trace.per_patch(trace.token_class).astype(np.int64)


def agreement_counts(trace: Trace, baseline: Trace, fates: TokenFates | None = None) -> Counter:
    """Patches and patches whose final label differs from the unreduced model's, keyed by
    ("place", merged_b3 | pruned_b7 | exited_gate4 | reached_end), ("fate", name), ("class", id) and
    ("level", k): `counter[(key, "patches")]`, `counter[(key, "differs")]`."""
    if baseline.token_of_patch.shape != trace.token_of_patch.shape:
        raise ValueError(f"{trace.meta.source}: the baseline trace has grid {baseline.token_of_patch.shape}, the "
                         f"method's {trace.token_of_patch.shape}: they are not of the same input")
    fates = fates or token_fates(trace)
    tok = trace.token_of_patch.ravel()
    differs = (patch_labels_of(trace) != patch_labels_of(baseline)).ravel()
    classes, _ = patch_classes(trace)
    groups = {"place": fates.labels()[tok], "fate": fates.names()[tok], "class": classes,
              "level": trace.token_level.astype(np.int64)[tok]}
    out: Counter = Counter()
    for by, keys in groups.items():
        for key in np.unique(keys):
            if by == "place" and key == "reached_end":  # the fate row says it already
                continue
            sel = keys == key
            k = (by, key.item() if hasattr(key, "item") else key)
            out[(k, "patches")] += int(sel.sum())
            out[(k, "differs")] += int(differs[sel].sum())
    return out


def boundary_distance(classes: np.ndarray) -> np.ndarray:
    """(gh, gw) int: chessboard distance in patches to the nearest boundary patch (one with a 4-neighbour
    of another class); a map with one class has no boundary (every patch gets a large distance)."""
    c = np.asarray(classes)
    edge = np.zeros(c.shape, dtype=bool)
    vertical = c[1:, :] != c[:-1, :]
    horizontal = c[:, 1:] != c[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    if not edge.any():
        return np.full(c.shape, 1 << 30, dtype=np.int64)
    dist = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_C, 3)
    return np.rint(dist).astype(np.int64)


def boundary_source(trace: Trace, baseline: Trace | None) -> tuple[np.ndarray, str]:
    """(gh, gw) the classes boundaries are drawn from, and which they are."""
    if trace.patch_labels is not None:
        return trace.patch_labels.astype(np.int64), "ground truth"
    if baseline is not None and baseline.token_of_patch.shape == trace.token_of_patch.shape:
        return patch_labels_of(baseline), "unreduced prediction"
    return patch_labels_of(trace), "own prediction"


def boundary_counts(trace: Trace, baseline: Trace | None = None, fates: TokenFates | None = None) -> tuple[Counter, str]:
    """Patches per (distance bin, fate), `counter[(bin label, fate)]`, and `counter[(bin label, "patches")]`;
    ignored ground-truth patches are left out. Also the source of the classes."""
    fates = fates or token_fates(trace)
    classes, source = boundary_source(trace, baseline)
    dist = boundary_distance(classes).ravel()
    keep = classes.ravel() != IGNORE_INDEX if source == "ground truth" else np.ones(dist.size, dtype=bool)
    kind = fates.kind[trace.token_of_patch.ravel()].astype(np.int64)
    out: Counter = Counter()
    for lo, hi in DISTANCE_BINS:
        sel = keep & (dist >= lo) & (dist <= hi)
        label = distance_label(lo, hi)
        out[(label, "patches")] += int(sel.sum())
        counts = np.bincount(kind[sel], minlength=len(FATES))
        for i, name in enumerate(FATES):
            out[(label, name)] += int(counts[i])
    return out, source
