"""The points where a token-reduction method acts inside the encoder, and what it may decide there.

A method contributes *steps*: small named modules the encoder calls at one place of one block,
`inside` (between attention and MLP, where ToMe, ALGM and EViT act: the step sees the attention's
queries and keys) or `after` (once the block is done, where a pruning rule or an exit head acts).
A step only decides; the encoder carries the decision out, the same way for every method:

- `MergeDecision`: which slots are averaged into which (weighted by token size);
- `PruneDecision`: which slots leave the sequence here. A pruned token keeps the features it had
  when pruned, and the decoder predicts it from them at the end (DToP's reassembly); optional
  `fused` tokens (EViT's) join the sequence as extra tokens that are never image tokens;
- `ExitDecision`: which slots leave here *with a prediction of the step's own* (logits over the
  model's classes), final for them: an early exit, accounted as one (the model's trained gates
  decide the same way, through the same path).

Steps are modules an operating point (a ReductionSetting) carries, not parts of the model: the
recorder hooks them, so a forward hook sees every decision while the model stays unaware of being
observed. Every tensor here covers the image-token slots only: class, registers and fused tokens
sit in front of them and no step can merge or prune those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tokenscope.models.slots import scatter_tokens

PLACES = ("inside", "after")
KINDS = ("merge", "prune", "exit")


@dataclass
class Layout:
    """Where each slot's token lies on the patch grid, for steps that only join neighbours."""

    grid_ids: torch.Tensor
    """(B, gh, gw) trace token of every patch (the policy's partition)."""
    single: torch.Tensor
    """(B, T) whether a trace token covers exactly one patch."""
    owner: torch.Tensor
    """(B, T + 1) the trace token that currently stands for each one (itself unless merged)."""
    initial: torch.Tensor
    """(B,) tokens each image entered the encoder with (for counts given as a fraction)."""
    num_prefix: int = 0
    """Tokens in front of the slots (class, distillation, registers, fused): they count in the
    reference's alternation of ToMe's sets A and B."""
    class_token: bool = False
    """Whether the model has a class token."""


@dataclass
class TokenView:
    """What a step sees at its point: the image-token slots and, inside a block, the attention."""

    block: int
    """1-based block the step belongs to."""
    x: torch.Tensor
    """(B, N, D) features of the image-token slots (after the attention residual when inside)."""
    token_ids: torch.Tensor
    """(B, N) trace token in each slot, -1 for padding."""
    valid: torch.Tensor
    """(B, N) real tokens."""
    sizes: torch.Tensor
    """(B, N) how many tokens each slot stands for (1 until something merges)."""
    layout: Layout
    prefix: torch.Tensor
    """(B, P, D) the tokens in front of the slots (class token first when there is one)."""
    keys: torch.Tensor | None = None
    """Inside only: (B, H, P + N, Dh) the attention's keys per head, prefix included."""
    queries: torch.Tensor | None = None
    """Inside only: (B, H, P + N, Dh) the attention's queries per head."""
    attn_mask: torch.Tensor | None = None
    """Inside only: the key mask the attention used (bool, or additive with sizes)."""
    scale: float = 1.0
    """Inside only: the attention's logit scale (1 / sqrt(Dh) for timm's)."""
    class_index: int | None = 0
    """Where the class token sits in `prefix` (after a head's queries, if any); None without one."""
    host_counts: tuple[int, ...] | None = None
    """Per image, the real tokens in the slots, known on the host (no device read needed)."""
    host_initial: tuple[int, ...] | None = None
    """Per image, the tokens it entered the encoder with, known on the host."""
    num_classes: int = 0
    """Classes of the model's predictions: the width of an exit step's logits."""

    @property
    def mean_keys(self) -> torch.Tensor:
        """(B, N, Dh) the slots' keys averaged over heads (ToMe's similarity metric)."""
        assert self.keys is not None, "keys exist only for steps inside a block"
        return self.keys.mean(dim=1)[:, self.prefix.shape[1]:]


@dataclass
class MergeDecision:
    """What one merging step decided for the slots that reached it (all (B, N), N = sequence slots).

    `token_ids` names the trace token in each slot (-1 = padding); a slot with `merged` set is
    averaged into slot `into` (which is never itself merged in the same step).
    """

    block: int
    kind: str
    token_ids: torch.Tensor
    valid: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor
    matching_flops: torch.Tensor
    """(B,) FLOPs of the similarity products this decision took, per image (2 per multiply-add)."""
    order: torch.Tensor | None = None
    """(B, N) sort key of the slots that stay: the sequence order after the merge (the
    reference's concatenation order); None keeps the current order."""
    counts_after: tuple[int, ...] | None = None
    """Per image, the real tokens left after the merge, when the method knows them on the host (a count
    fixed for the batch): the encoder then compacts without reading the device (no synchronisation)."""
    values: torch.Tensor | None = None
    """(B, N, D) the features the slots that stay take, when the method computes them itself (soft
    clustering's centres); None: each target becomes the size-weighted mean of what merged into it."""
    restore: object = None
    """What the method's reconstruction needs from this step (see `ReconstructionView`); the encoder
    keeps it for the end of the pass and never reads it."""


@dataclass
class PruneDecision:
    """What one pruning step decided: `pruned` (B, N) slots leave the sequence at this point."""

    block: int
    kind: str
    token_ids: torch.Tensor
    valid: torch.Tensor
    pruned: torch.Tensor
    fused: torch.Tensor | None = None
    """(B, F, D) extra tokens that join the sequence in front of the slots (EViT's fused token);
    they take part in attention but are never image tokens."""
    order: torch.Tensor | None = None
    """(B, N) sort key of the slots that stay (e.g. by attention, as the reference orders them);
    None keeps the current order."""
    scoring_flops: torch.Tensor | None = None
    """(B,) FLOPs the decision itself took, per image."""
    counts_after: tuple[int, ...] | None = None
    """Per image, the real tokens staying in the slots, when the method knows them on the host: the encoder
    then compacts without reading the device (no synchronisation)."""


@dataclass
class ExitDecision:
    """What one exit step (or one of the model's gates) decided: `exits` (B, N) slots leave the
    sequence here and `logits` (B, N, C) become their final prediction. `logits` covers every slot
    the step saw (a gate classifies them all; deep supervision trains on that)."""

    block: int
    kind: str
    token_ids: torch.Tensor
    valid: torch.Tensor
    exits: torch.Tensor
    logits: torch.Tensor
    held: torch.Tensor | None = None
    """(B, N) tokens that qualified but were held back in the sequence as context (DToP's rule)."""
    scoring_flops: torch.Tensor | None = None
    """(B,) FLOPs the decision itself took, per image (a plug-in's: what torch's counter counted)."""

    @property
    def after_block(self) -> int:
        return self.block

    @property
    def confidence(self) -> torch.Tensor:
        """(B, N) top-1 probability of each slot's logits."""
        return torch.softmax(self.logits.float(), dim=-1).amax(dim=-1)

    @property
    def predicted(self) -> torch.Tensor:
        """(B, N) top-1 class of each slot's logits."""
        return self.logits.argmax(dim=-1)


Decision = MergeDecision | PruneDecision | ExitDecision


@dataclass
class ReconstructionView:
    """What a method's reconstruction sees at the end of the encoder, before the decoder: how the
    reduced tokens become the decoder's grid again (Expedit's token reconstruction). Without one,
    every token takes the prediction of the token it was merged into (a copy)."""

    tokens: torch.Tensor
    """(B, T, D) normalised features by trace token id: the final ones of every token that reached the
    end, and those a pruned or exited token had when it left (zeros for tokens merged away)."""
    reached: torch.Tensor
    """(B, T) which trace tokens reached the end as tokens of their own (not merged, exited, pruned)."""
    restores: tuple[tuple[int, object], ...]
    """(block, restore) of every merging step that left one, in the order they acted."""



def apply_merge(x: torch.Tensor, sizes: torch.Tensor, owner: torch.Tensor, dec: MergeDecision
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size-weighted average of every merged slot into its target; new sizes and owner map.

    Slots untouched by a merge keep their features bit for bit. `owner` (B, T + 1) maps every
    trace token to the token now standing for it; a merged token's followers move with it.
    """
    b, n, d = x.shape
    target = torch.where(dec.merged, dec.into, torch.arange(n, device=x.device).expand(b, n))
    w = sizes.to(torch.float32).unsqueeze(-1)
    acc = torch.zeros((b, n, d), dtype=torch.float32, device=x.device).scatter_add_(
        1, target.unsqueeze(-1).expand(-1, -1, d), x.float() * w)
    size_acc = torch.zeros_like(sizes, dtype=torch.float32).scatter_add_(1, target, sizes.float())
    hit = torch.zeros((b, n + 1), dtype=torch.bool, device=x.device)  # + a spare slot
    scatter_tokens(hit, dec.merged, dec.into, dec.merged)
    is_target = hit[:, :n] & ~dec.merged
    averaged = (acc / size_acc.clamp_min(1e-6).unsqueeze(-1)).to(x.dtype)
    x = torch.where(is_target.unsqueeze(-1), averaged, x)
    if dec.values is not None:  # the method's own features for every slot that stays
        x = torch.where((~dec.merged & dec.valid).unsqueeze(-1), dec.values.to(x.dtype), x)
    sizes = torch.where(is_target, size_acc.to(sizes.dtype), sizes)
    t = owner.shape[1] - 1
    remap = torch.arange(t + 1, device=x.device).expand(b, t + 1).clone()  # slot t is the spare
    scatter_tokens(remap, dec.token_ids.gather(1, dec.into), dec.token_ids, dec.merged)
    remap[:, t] = t
    return x, sizes, remap.gather(1, owner)


@dataclass(frozen=True)
class Step:
    """One step of a plan: `module(view) -> Decision` called at `place` of 1-based `block`."""

    block: int
    place: str
    module: nn.Module
    name: str
    """Its name (unique within a plan), e.g. `tome_3`."""
    does: str = "merge"
    """What its decisions may do: `merge` (MergeDecision), `prune` (PruneDecision) or `exit`
    (ExitDecision; placed `after` a block)."""

    def __post_init__(self) -> None:
        if self.place not in PLACES:
            raise ValueError(f"a step acts {' or '.join(PLACES)} a block, not {self.place!r}")
        if self.does not in KINDS:
            raise ValueError(f"a step does {' or '.join(KINDS)}, not {self.does!r}")
        if self.does == "exit" and self.place != "after":
            raise ValueError("an exit step acts after its block (tokens leave once the block is done)")
