"""What a method may know of a model: its ModelFacts, read from a StepViT and the user's options."""

from __future__ import annotations

import dataclasses
from typing import Mapping

from tokenscope.models.methods.base import ModelFacts, Plan
from tokenscope.models.step_vit import ReductionSetting, StepViT


def facts_of(model: StepViT, trained: Mapping[str, bool], model_policy: str, policy: str | None = None,
             merge_thresholds: tuple[float, ...] | None = None, exit_threshold: float | None = None,
             keep_per_class: int | None = None) -> ModelFacts:
    """The facts of `model`; the user's shared options (None: not given) fill what they set."""
    cfg = model.cfg
    return ModelFacts(
        name=cfg.name, depth=model.depth, exit_after=model.exit_after, num_prefix_tokens=model.num_prefix_tokens,
        class_token=model.cls_token is not None, patch=model.patch_size, trained=dict(trained),
        model_policy=model_policy, policy=policy or model_policy,
        merge_thresholds=tuple(merge_thresholds or cfg.merge_thresholds),
        exit_threshold=float(cfg.exit_threshold if exit_threshold is None else exit_threshold),
        keep_per_class=keep_per_class, model_keep_per_class=int(cfg.keep_per_class),
        policies={k: v for k, v in model.policies.items()})


def with_plan(base: ReductionSetting, plan: Plan, method: str) -> ReductionSetting:
    """`base` with a plan's steps, brought policy and record (the rest is the caller's to resolve)."""
    brought = ((plan.policy, plan.policy_module),) if plan.policy_module is not None and plan.policy else ()
    return dataclasses.replace(base, steps=plan.steps, policies=brought, size_weighted=plan.size_weighted,
                               record=dict(plan.record), method=method, reconstruction=plan.reconstruction)
