"""`dtop`: early exits on the plain grid (Tang et al., DToP, ICCV 2023).

As DToP's public code: the gates' threshold (0.95 by default, the model's own), and of the
tokens that qualify, the 5 most confident of each class stay in the sequence as context.
"""

from __future__ import annotations

from typing import Any

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference
from tokenscope.models.methods.builtin.step import EXIT, KEEP

DTOP_KEEP_PER_CLASS = 5
"""DToP's public code keeps the 5 most confident qualifying tokens of each class at every gate."""


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    keep = values["keep"]
    if keep is None:
        keep = facts.keep_per_class if facts.keep_per_class is not None else DTOP_KEEP_PER_CLASS
    return Plan(policy="none", exits=True, exit_threshold=values["exit"], keep_per_class=keep)


METHOD = Method(
    name="dtop", kind="exit", plan=plan, settings=(EXIT, KEEP),
    summary="early exits on the plain grid; the 5 most confident tokens of each class stay as context",
    ladder=("dtop:exit=0.99", "dtop:exit=0.95", "dtop:exit=0.9"),
    search=tuple(f"dtop:exit={e}" for e in (0.8, 0.9, 0.95, 0.99)),
    reference=Reference(paper="Tang et al., Dynamic Token Pruning in Plain Vision Transformers for Semantic "
                              "Segmentation, ICCV 2023", repository="zbwxp/Dynamic-Token-Pruning",
                        files=("segmentation/mmseg/models/backbones/vit_dtop.py",),
                        differences="the gates are the model's exit heads (trained by tokenscope train)"),
)
