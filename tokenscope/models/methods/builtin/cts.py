"""`cts`: a fixed number of shared 2x2 groups (Lu et al., CTS, CVPR 2023).

The K best-scoring aligned 2x2 patch groups share one token each; the scores come from the
model's dCTS network (level-1 head) when it was trained, else from the training-free uniformity
score, so CTS and dCTS differ only in their decision rule.
"""

from __future__ import annotations

from typing import Any

from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting
from tokenscope.models.methods.cts import CTSPolicy, parse_groups


def groups(value: str) -> str | None:
    parse_groups(value)  # one line of its own when the value is not a count or a fraction
    return None


GROUPS = Setting("groups", str, "0.4", "2x2 groups shared per image: a count (300) or a fraction of all groups (0.4; "
                 "CTS's Segmenter setting shares about 40%)", groups)


def plan(values: dict[str, Any], facts: ModelFacts) -> Plan:
    sources = {k: facts.policies[k] for k in ("learned", "uniform") if k in facts.policies}
    policy = CTSPolicy(sources, patch=facts.patch, groups=parse_groups(values["groups"]), source=facts.model_policy)
    return Plan(policy="cts", policy_module=policy, exits=False)


METHOD = Method(
    name="cts", kind="entry", plan=plan, settings=(GROUPS,),
    summary="CTS: exactly K 2x2 patch groups share a token, the K best by the policy's score",
    ladder=("cts:groups=0.2", "cts:groups=0.4", "cts:groups=0.6"),
    search=tuple(f"cts:groups={g}" for g in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)),
    reference=Reference(paper="Lu et al., Content-aware Token Sharing for Efficient Semantic Segmentation with "
                              "Vision Transformers, CVPR 2023", repository="tue-mps/cts-segmenter",
                        files=("segm/model/policy_net.py",),
                        differences="scores from the model's dCTS level-1 head or the uniformity score"),
)
