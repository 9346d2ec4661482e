"""Forward hooks that watch a StepViT and collect, per image, what happened to its tokens.

The model does not know it is observed: the Recorder hooks the active policy (partition and
scores), every block (how many tokens enter), every exit gate (which tokens leave), every step of
a method (which tokens merge into which, which are pruned or exit, inside or after their block) and the
model itself (final token logits, and who ended in whom). It knows decisions by their type
(models/steps.py), never by the method that made them, so a plug-in is recorded like a built-in. During the forward pass only device tensors are kept; they are
copied to the host once per forward call, when the model returns. Detaching the hooks leaves the
model exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tokenscope.models.partition import Partition
from tokenscope.models.policy import PolicyOutput
from tokenscope.models.step_vit import ReductionSetting, StepOutput, StepViT
from tokenscope.models.steps import ExitDecision, MergeDecision, PruneDecision
from tokenscope.trace.trace import resolve_chains


@dataclass
class ImageRecord:
    """Host-side record of one image's pass, assembled from hook observations."""

    partition: Partition
    policy_scores: list[np.ndarray]
    block_tokens_in: np.ndarray
    """(depth,) patch-derived tokens entering each block, read from the blocks' inputs."""
    gate_tokens_in: dict[int, int]
    exit_block: np.ndarray
    """(T,) from the gates' decisions: the gate's block for exited tokens, depth otherwise."""
    model_exit_block: np.ndarray
    """(T,) as the model itself reported it; must equal `exit_block`."""
    confidence: np.ndarray
    predicted: np.ndarray
    held_at: np.ndarray | None = None
    """(T,) the first gate that held the token back under the keep-per-class rule (0 = none)."""
    merged_at: np.ndarray | None = None
    """(T,) with in-network merging: the block inside which the token merged into another (0 = never)."""
    merged_into: np.ndarray | None = None
    """(T,) the token it merged into (-1 = none)."""
    block_tokens_mid: np.ndarray | None = None
    """(depth,) tokens left for each block's MLP after merging inside it."""
    matching_flops: int = 0
    """FLOPs of the mergers' similarity products."""
    owner: np.ndarray | None = None
    """(T,) the token each token finally belongs to, from the merges the merger hooks saw."""
    model_owner: np.ndarray | None = None
    """(T,) the same as the model itself reported it; must equal `owner`."""
    pruned_at: np.ndarray | None = None
    """(T,) with pruning steps: the block at which a step pruned the token (0 = never)."""
    model_pruned: np.ndarray | None = None
    """(T,) which tokens the model itself reported as pruned; must agree with `pruned_at`."""
    scoring_flops: int = 0
    """FLOPs the pruning steps said their decisions took."""
    exit_flops: int = 0
    """FLOPs a method's exit steps took (the model's gates are counted per token by the cost model)."""


class _Call:
    """Observations of one forward call, still on the device."""

    def __init__(self, depth: int) -> None:
        self.policy: PolicyOutput | None = None
        self.block_counts: list[torch.Tensor | None] = [None] * depth
        self.gates: list[ExitDecision] = []
        """The model's gates' decisions."""
        self.exits: list[ExitDecision] = []
        """A method's exit steps' decisions."""
        self.merges: list[MergeDecision] = []
        self.prunes: list[tuple[PruneDecision, bool]] = []
        """Each pruning decision, and whether it was made inside its block (before the MLP)."""


class Recorder:
    """Context manager: `with Recorder(model, setting) as rec: model(x, setting=setting)`, then
    `rec.pop_records()`. The setting names the modules a method brings (its steps, a policy of its
    own); they are hooked beside the model's own, so every decision is seen."""

    def __init__(self, model: StepViT, setting: ReductionSetting | None = None) -> None:
        self.model = model
        self.setting = model.default_setting() if setting is None else setting
        self._handles: list[Any] = []
        self._call: _Call | None = None
        self._records: list[ImageRecord] = []

    # ---- attach / detach -----------------------------------------------------------------
    def attach(self) -> "Recorder":
        if self._handles:
            return self
        m = self.model
        self._handles.append(m.register_forward_pre_hook(self._on_start))
        self._handles.append(m.register_forward_hook(self._on_end))
        for policy in [*m.policies.values(), *(module for _, module in self.setting.policies)]:
            self._handles.append(policy.register_forward_hook(self._on_policy))
        for i, block in enumerate(m.blocks):
            self._handles.append(block.register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
        for gate in m.gates.values():
            self._handles.append(gate.register_forward_hook(self._on_gate))
        for step in self.setting.steps:
            self._handles.append(step.module.register_forward_hook(self._step_hook(step.place)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._call = None

    def __enter__(self) -> "Recorder":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def pop_records(self) -> list[ImageRecord]:
        """Records of every image seen since the last call, in order."""
        out, self._records = self._records, []
        return out

    # ---- hooks ---------------------------------------------------------------------------
    def _on_start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._call = _Call(self.model.depth)

    def _on_policy(self, module: nn.Module, args: tuple[Any, ...], output: PolicyOutput) -> None:
        if self._call is not None:
            self._call.policy = output

    def _block_hook(self, index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._call is None:
                return
            x = args[0] if args else kwargs["x"]
            mask = kwargs.get("attn_mask")
            p = int(kwargs.get("num_prefix", self.model.num_prefix_tokens))
            if mask is None:
                counts = torch.full((x.shape[0],), x.shape[1] - p, dtype=torch.long, device=x.device)
            elif mask.dtype == torch.bool:
                counts = mask[:, 0, 0, p:].sum(dim=-1)
            else:  # proportional attention: an additive mask, -inf on padding
                counts = torch.isfinite(mask[:, 0, 0, p:]).sum(dim=-1)
            self._call.block_counts[index] = counts

        return hook

    def _on_gate(self, module: nn.Module, args: tuple[Any, ...], output: ExitDecision) -> None:
        if self._call is not None:
            self._call.gates.append(output)

    def _step_hook(self, place: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._call is None:
                return
            if isinstance(output, MergeDecision):
                self._call.merges.append(output)
            elif isinstance(output, PruneDecision):
                self._call.prunes.append((output, place == "inside"))
            elif isinstance(output, ExitDecision):
                self._call.exits.append(output)

        return hook

    def _on_end(self, module: nn.Module, args: tuple[Any, ...], output: StepOutput) -> None:
        call, self._call = self._call, None
        if call is None or call.policy is None:
            return
        self._records.extend(_to_host(call, output, self.model.depth))


def _to_host(call: _Call, out: StepOutput, depth: int) -> list[ImageRecord]:
    """One device-to-host copy per kind of observation, then split per image."""
    b = len(out.partitions)
    counts = np.stack([c.cpu().numpy() if c is not None else np.zeros(b, dtype=np.int64) for c in call.block_counts], axis=1)
    probs = torch.softmax(out.token_logits.float(), dim=-1)
    conf, pred = (t.cpu().numpy() for t in probs.max(dim=-1))
    model_exit = out.exit_block.cpu().numpy()
    scores = [s.detach().float().cpu().numpy() for s in call.policy.scores] if call.policy is not None else []
    gates = [(g.after_block, (g.exits & g.valid).cpu().numpy(), g.token_ids.cpu().numpy(),
              g.token_ids.ge(0).sum(dim=1).cpu().numpy(), None if g.held is None else g.held.cpu().numpy(), gate)
             for decisions, gate in ((call.gates, True), (call.exits, False)) for g in decisions]
    gates.sort(key=lambda g: g[0])  # in block order; at one block the model's gate acts before a method's steps
    exit_costs = [None if d.scoring_flops is None else d.scoring_flops.cpu().numpy() for d in call.exits]
    any_held = any(h is not None and h.any() for *_, h, _ in gates)
    merges = [(m.block, m.merged.cpu().numpy(), m.token_ids.cpu().numpy(), m.into.cpu().numpy(),
               m.matching_flops.cpu().numpy()) for m in call.merges]
    owners = out.token_owner.cpu().numpy() if out.token_owner is not None else None
    prunes = [(d.block, inside, (d.pruned & d.valid).cpu().numpy(), d.token_ids.cpu().numpy(),
               None if d.scoring_flops is None else d.scoring_flops.cpu().numpy()) for d, inside in call.prunes]
    model_pruned = out.token_pruned.cpu().numpy() if out.token_pruned is not None else None
    records = []
    for i, part in enumerate(out.partitions):
        t = part.num_tokens
        exit_block = np.full(t, depth, dtype=np.int64)
        held_at = np.zeros(t, dtype=np.int64) if any_held else None
        gate_in: dict[int, int] = {}
        for after, exits, ids, entered, held, gate in gates:
            exit_block[ids[i][exits[i]]] = after
            if gate:
                gate_in[after] = int(entered[i])
            if held_at is not None and held is not None:
                tokens = ids[i][held[i]]
                held_at[tokens[held_at[tokens] == 0]] = after  # the first gate that held it back
        merged_at = merged_into = mid = final = pruned_at = None
        matching = scoring = 0
        if model_pruned is not None:
            pruned_at = np.zeros(t, dtype=np.int64)
            mid = counts[i].astype(np.int64).copy()
            for block, inside, pruned, ids, flops in prunes:
                gone = ids[i][pruned[i]]
                pruned_at[gone] = block
                exit_block[gone] = block
                if inside:
                    mid[block - 1] -= len(gone)
                scoring += 0 if flops is None else int(flops[i])
        if owners is not None:
            merged_at = np.zeros(t, dtype=np.int64)
            merged_into = np.full(t, -1, dtype=np.int64)
            mid = counts[i].astype(np.int64).copy() if mid is None else mid
            for block, merged, ids, into, flops in merges:
                src = ids[i][merged[i]]
                merged_at[src] = block
                merged_into[src] = ids[i][into[i][merged[i]]]
                mid[block - 1] -= len(src)
                matching += int(flops[i])
            final = resolve_chains(np.where(merged_into >= 0, merged_into, np.arange(t)))  # merge chains followed
            exit_block = exit_block[final]
        records.append(ImageRecord(
            partition=part,
            policy_scores=[s[i] for s in scores],
            block_tokens_in=counts[i].astype(np.int64),
            gate_tokens_in=gate_in,
            exit_block=exit_block,
            model_exit_block=model_exit[i, :t].astype(np.int64),
            confidence=conf[i, :t],
            predicted=pred[i, :t],
            held_at=held_at,
            merged_at=merged_at,
            merged_into=merged_into,
            block_tokens_mid=mid,
            matching_flops=matching,
            owner=final,
            model_owner=None if owners is None else owners[i, :t].astype(np.int64),
            pruned_at=pruned_at,
            scoring_flops=scoring,
            exit_flops=sum(int(c[i]) for c in exit_costs if c is not None),
            model_pruned=None if model_pruned is None else model_pruned[i, :t],
        ))
    return records

