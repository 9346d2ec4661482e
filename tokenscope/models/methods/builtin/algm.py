"""`algm`: local 2x2 window merging, then global merging (Norouzi et al., ALGM, CVPR 2024).

Decides as tue-mps/algm-segmenter's `local_merge.py` and `global_merge.py` (see
models/methods/merging.py): local merging in the first block, global merging in the middle one.
"""

from __future__ import annotations

from typing import Any

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting, on_off
from tokenscope.models.methods.builtin.tome import COUNT, ORDER
from tokenscope.models.methods.merging import MergingSpec, algm_blocks


def cosine(value: float | None) -> str | None:
    return None if value is None or -1.0 <= value <= 1.0 else "must be a cosine similarity in [-1, 1]"


def threshold_or_adaptive(text: str) -> float | None:
    return None if text.lower() == "adaptive" else float(text)


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    spec = MergingSpec("algm", algm_blocks(facts.depth), threshold=float(values["threshold"]),
                       global_threshold=values["global"], prop_attn=values["prop"], order=values["order"],
                       count=values["count"])
    return spec.plan()


METHOD = Method(
    name="algm", kind="merge", plan=plan,
    settings=(Setting("threshold", float, 0.88, "local merging: mean cosine similarity a 2x2 window needs (ALGM's "
                      "public ViT-S/B setting)", cosine),
              Setting("global", threshold_or_adaptive, None, "global merging: a fixed similarity, or `adaptive` "
                      "(the reference's mean + std / block)", cosine, type="number or adaptive"),
              Setting("prop", on_off, False, "size-weighted attention after merging (the reference has none)"),
              ORDER, COUNT),
    summary="ALGM: similar 2x2 windows merge in block 1, then similar tokens anywhere in the middle block",
    ladder=("algm:threshold=0.95", "algm:threshold=0.88", "algm:threshold=0.8"),
    search=tuple(f"algm:threshold={t}" for t in (0.8, 0.85, 0.88, 0.92, 0.95)),
    reference=Reference(paper="Norouzi et al., ALGM: Adaptive Local-then-Global Token Merging for Efficient "
                              "Semantic Segmentation with Plain Vision Transformers, CVPR 2024",
                        repository="tue-mps/algm-segmenter",
                        files=("algm/algm/local_merge.py", "algm/algm/global_merge.py"),
                        differences="decided per image with padding; other depths scale the middle block"),
)
