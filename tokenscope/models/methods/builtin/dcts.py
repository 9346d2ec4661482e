"""`dcts`: dynamic CTS supertokens alone, no exits (the first half of STEP)."""

from __future__ import annotations

from typing import Any

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference
from tokenscope.models.methods.builtin.step import BUDGET, MERGE, entry


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    return Plan(exits=False, **entry(values, facts))


METHOD = Method(
    name="dcts", kind="entry", plan=plan, settings=(MERGE, BUDGET),
    summary="dCTS supertokens: a policy lets uniform 2x2..16x16 patch blocks share one token; no exits",
    ladder=("dcts:merge=0.7", "dcts:merge=0.5", "dcts:merge=0.3"),
    search=tuple(f"dcts:merge={m}" for m in (0.3, 0.5, 0.7, 0.9, 1.01)),
    searches={"budget": tuple(f"dcts:budget={b}" for b in (1.5, 2.0, 2.5, 3.0, 4.0))},
    reference=Reference(paper="Proust et al., STEP, 2025 (dCTS); arXiv 2509.14165"),
)
