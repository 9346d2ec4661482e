"""`step`: dCTS supertokens and early exits together (Proust et al., STEP, 2025).

Tokens enter as the model's dCTS partition (its learned policy, or the training-free uniform one,
or `--policy`); after the gate blocks, tokens whose top-1 probability reaches the exit threshold
leave with the gate's prediction. `budget=2.5` replaces the thresholds by exactly that token
reduction per image.
"""

from __future__ import annotations

from typing import Any

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting
from tokenscope.models.policy import parse_thresholds


def at_least_one(value: float) -> str | None:
    return None if 1.0 <= value <= 1e6 else "must be a token reduction factor of at least 1 (e.g. 2.5)"


def probability(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 else "must be between 0 and 1"


def non_negative(value: int) -> str | None:
    return None if 0 <= value <= 1_000_000 else "must be 0 (off) or a positive count"


MERGE = Setting("merge", str, None, "dCTS merge threshold, one for every level or four comma-free as 0.9/0.8/0.7/0.6 "
                "(default: the model's own)")
BUDGET = Setting("budget", float, None, "exactly this token reduction per image instead of thresholds (e.g. 2.5)",
                 at_least_one)
EXIT = Setting("exit", float, None, "exit threshold: top-1 probability a token needs to leave (default: the model's)",
               probability)
KEEP = Setting("keep", int, None, "tokens of each class held back at every gate as context (DToP's rule; 0 = off)",
               non_negative)


def entry(values: dict[str, Any], facts: ModelFacts) -> dict[str, Any]:
    """The dCTS part of a plan: thresholds, or the budget policy when a budget is given."""
    merge = values.get("merge")
    thresholds = None if merge is None else parse_thresholds(str(merge).replace("/", ","), facts.merge_thresholds)
    budget = values.get("budget")
    return {"policy": "budget" if budget is not None else None, "merge_thresholds": thresholds, "budget": budget}


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    return Plan(exits=True, exit_threshold=values["exit"], keep_per_class=values["keep"], **entry(values, facts))


METHOD = Method(
    name="step", kind="composite", plan=plan, settings=(MERGE, EXIT, KEEP, BUDGET),
    summary="dCTS supertokens (2x2 to 16x16 patches share a token) and early exits at the gate blocks",
    ladder=("step:merge=0.7:exit=0.99", "step:merge=0.5:exit=0.95", "step:merge=0.3:exit=0.9"),
    search=tuple(f"step:merge={m}:exit={e}" for m in (0.3, 0.5, 0.7, 0.9) for e in (0.8, 0.9, 0.95, 0.99)),
    reference=Reference(paper="Proust et al., STEP: SuperToken and Early-Pruning, 2025; arXiv 2509.14165",
                        differences="the dCTS policy and gates are tokenscope's own implementation of the papers"),
)
