"""`vit`: the unreduced model, the reference every reduction is measured against."""

from __future__ import annotations

from typing import Any

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    return Plan(policy="none", exits=False)


METHOD = Method(
    name="vit", kind="baseline", plan=plan,
    summary="the unreduced model: the plain patch grid, no exits, nothing merged or pruned",
    reference=Reference(paper="Strudel et al., Segmenter, ICCV 2021", repository="rstrudel/segmenter"),
)
