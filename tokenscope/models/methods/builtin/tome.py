"""`tome`: token merging by bipartite soft matching in every block (Bolya et al., ICLR 2023).

Decides as facebookresearch/ToMe's `tome/merge.py` (see models/methods/merging.py for the rules
and the two settings that bring back tokenscope's earlier ones).
"""

from __future__ import annotations

from typing import Any

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting, on_off
from tokenscope.models.methods.merging import COUNTS, ORDERS, MergingSpec

MAX_TOME_R = 100_000
"""More tokens than any image has (a 16k x 16k image at patch 16 has 1M patches; r is per block)."""


def tome_r(value: float) -> str | None:
    if 0 <= value <= MAX_TOME_R and (value < 1 or value == int(value)):
        return None
    return f"must be a whole count per block (at most {MAX_TOME_R}) or a fraction below 1"


ORDER = Setting("order", str.lower, "reference", "sequence order after a merge: the reference's, or `spatial` "
                "(raster order, tokenscope's earlier rule)", choices=ORDERS)
COUNT = Setting("count", str.lower, "batch", "one count for the batch (the reference) or `per-image`", choices=COUNTS)


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    spec = MergingSpec("tome", tuple(range(1, facts.depth + 1)), r=float(values["r"]), prop_attn=values["prop"],
                       order=values["order"], count=values["count"])
    return spec.plan()


METHOD = Method(
    name="tome", kind="merge", plan=plan,
    settings=(Setting("r", float, 0.05, "tokens merged per block: a count (16) or a fraction of the image's tokens "
                      "(0.05; ToMe's r=16 of 197 is 8% on ViT-B/224)", tome_r),
              Setting("prop", on_off, True, "size-weighted (proportional) attention after merging"),
              ORDER, COUNT),
    summary="ToMe: in every block the r most similar token pairs (by attention keys) merge",
    ladder=("tome:r=0.03", "tome:r=0.05", "tome:r=0.08"),
    search=tuple(f"tome:r={r}" for r in (0.01, 0.02, 0.03, 0.05, 0.08)),
    reference=Reference(paper="Bolya et al., Token Merging: Your ViT But Faster, ICLR 2023",
                        repository="facebookresearch/ToMe", files=("tome/merge.py", "tome/patch/timm.py"),
                        differences="decided per image with padding; r below 1 is a fraction of the image's tokens"),
)
