"""The public interface for writing a token-reduction method (see docs/methods-api.md).

A method is one module defining `METHOD = Method(...)`; it is found through the entry-point group
`tokenscope.methods` of an installed distribution, or named on the command line as a file
(`--method ./my_rule.py:frac=0.3`). Everything a method needs is importable from here, so a
plug-in never reaches into tokenscope's internals.
"""

from __future__ import annotations

from tokenscope.models.attention import query_attention
from tokenscope.models.methods.base import Method, ModelFacts, Plan, Reference, Setting, on_off
from tokenscope.models.methods.registry import ENTRY_POINT_GROUP
from tokenscope.models.steps import ExitDecision, Layout, MergeDecision, PruneDecision, ReconstructionView, Step, TokenView

__all__ = ["ENTRY_POINT_GROUP", "ExitDecision", "Layout", "MergeDecision", "Method", "ModelFacts", "Plan", "PruneDecision", "ReconstructionView", "Reference",
           "Setting", "Step", "TokenView", "on_off", "query_attention"]
