"""The STEP segmenter: a timm ViT whose tokens a method may reduce, read like timm's forward.

`forward` is `embed -> blocks -> decode`. `embed` runs the active policy (how tokens enter:
the plain grid, supertokens of a learned or training-free policy, a method's own ...) and
embeds the tokens; every block is an `EncoderBlock` called as one module (a method's step may act
inside it, between attention and MLP); after a block the exit gates and a method's steps act;
`decode` reassembles every token (survivors, exited, pruned) for the decoder and un-merges.
What a method does is a value passed to `forward` (a ReductionSetting: which policy, its
thresholds, exits, which steps at which block), resolved once by the caller: the model holds no
operating point and never changes state from one to the next, so no method is named here and
two settings can be run alternately on one model. Every decision goes through a module hooks can
observe (`policies.*` or the setting's own policy, `embed`, `blocks.i`, `gates.<after_block>`, each
step's module, `decoder`); the model itself never records or writes anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.errors import ConfigError
from tokenscope.models.decoders import build_decoder
from tokenscope.models.encoder_block import EncoderBlock, is_plain_block
from tokenscope.models.eomt import pixel_scores
from tokenscope.models.exits import ExitGate
from tokenscope.models.attention import size_weighted_mask
from tokenscope.models.partition import MAX_LEVEL, Partition
from tokenscope.models.policy import (
    BudgetPolicy,
    LearnedPolicy,
    NoMergePolicy,
    OraclePolicy,
    PolicyNet,
    UniformPolicy,
)
from tokenscope.models.registry import StepConfig
from tokenscope.models.rotary import (
    merge_positions,
    patch_positions,
    rotary_embedding,
    rotary_module,
    token_positions,
)
from tokenscope.models.sequence import (Packing, attention_dtype, attention_mask, by_owner, compact, pool_to_tokens,
                                        token_grid, unmerge)
from tokenscope.models.slots import scatter_tokens
from tokenscope.models.steps import (
    ExitDecision,
    Layout,
    MergeDecision,
    PruneDecision,
    ReconstructionView,
    Step,
    TokenView,
    apply_merge,
)
from tokenscope.models.superpatch import SuperpatchEmbed


@dataclass
class StepOutput:
    """Predictions of one batch.

    `patch_logits` (B, C, gh, gw) are the un-merged logits of every patch; `token_logits`
    (B, T, C) the final logits of every token (its gate's if it exited); `exit_block` (B, T)
    how many blocks each token went through (depth = all; -1 for padding slots).
    """

    patch_logits: torch.Tensor
    token_logits: torch.Tensor
    exit_block: torch.Tensor
    partitions: list[Partition]
    aux_patch_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per gate (keyed by its block), patch logits from every token: deep supervision."""
    aux_policy_logits: list[torch.Tensor] = field(default_factory=list)
    """The learned policy's merge logits per level, for training it beside the segmenter."""
    token_owner: torch.Tensor | None = None
    """(B, T) with in-network merging: the token whose prediction each token finally shares
    (itself unless it was merged into another); None without merging."""
    token_pruned: torch.Tensor | None = None
    """(B, T) with pruning steps: tokens a step removed (their prediction is the decoder's, from
    the features they had then); None without pruning."""
    masks: tuple[torch.Tensor, torch.Tensor] | None = None
    """A mask head's (mask logits (B, Q, h, w), class logits (B, Q, C + 1)), for per-pixel scores at
    the input size (`StepViT.label_maps`); None for per-token decoders."""


@dataclass(frozen=True)
class ReductionSetting:
    """Everything that decides which tokens a forward pass keeps: one operating point, as a value.

    It is resolved once at the edge (jobs/setup.py: the method, its settings and the user's shared
    options folded in) and passed to every forward, so commands that run several operating points
    on one model (baseline and STEP, a method comparison, a sweep) just pass another value: no
    part of one (a method's steps, its policy) can leak into the next.
    """

    policy: str
    exits: bool
    merge_thresholds: tuple[float, ...]
    exit_threshold: float
    keep_per_class: int
    budget: float
    method: str
    """The operating point's text (`name:key=value`), for traces; empty when no method was named."""
    steps: tuple[Step, ...] = ()
    """What the method does inside or after blocks (merge, prune), in order."""
    policies: tuple[tuple[str, nn.Module], ...] = ()
    """Policies the method brings (installed under `policies.<name>`)."""
    size_weighted: bool = False
    """Proportional attention once a merge made a token stand for several."""
    record: dict[str, Any] = field(default_factory=dict, hash=False)
    """What traces record of the method's steps (`merging`, `pruning`)."""
    reconstruction: nn.Module | None = None
    """How the reduced tokens become the decoder's full grid (models/steps.py `ReconstructionView`);
    None: every merged token takes the prediction of the token it merged into."""

    def plain(self) -> "ReductionSetting":
        """This setting without any reduction: plain grid, no exits, no steps (`vit`)."""
        return dataclasses.replace(self, policy="none", exits=False, steps=(), policies=(), size_weighted=False,
                                   record={}, method="vit", reconstruction=None)

    def to(self, device: torch.device | str) -> "ReductionSetting":
        """The same setting with the modules it brings (steps, a policy) on `device`."""
        for step in self.steps:
            step.module.to(device)
        for _, module in self.policies:
            module.to(device)
        if self.reconstruction is not None:
            self.reconstruction.to(device)
        return self

    @property
    def merging(self) -> bool:
        return any(s.does == "merge" for s in self.steps)

    @property
    def exit_steps(self) -> tuple[Step, ...]:
        """The method's own exit steps (the model's gates act through `exits`)."""
        return tuple(s for s in self.steps if s.does == "exit")

    @property
    def pruning(self) -> bool:
        return any(s.does == "prune" for s in self.steps)

    def describe(self) -> dict[str, Any]:
        """The setting as plain JSON values (steps by block, place, name and kind; no modules)."""
        return {"policy": self.policy, "exits": self.exits, "merge_thresholds": list(self.merge_thresholds),
                "exit_threshold": self.exit_threshold, "keep_per_class": self.keep_per_class, "budget": self.budget,
                "method": self.method, "size_weighted": self.size_weighted, "record": dict(self.record),
                "steps": [{"block": s.block, "place": s.place, "name": s.name, "does": s.does} for s in self.steps],
                "policies": [name for name, _ in self.policies],
                "reconstruction": None if self.reconstruction is None else type(self.reconstruction).__name__}


@dataclass
class _Sequence:
    """The encoder's running state during one forward pass, passed explicitly from step to step."""

    x: torch.Tensor
    """(B, P + N, D) tokens in front (class, registers, fused), then the image-token slots."""
    p: int
    ids: torch.Tensor
    valid: torch.Tensor
    counts: list[int]
    sizes: torch.Tensor
    token_logits: torch.Tensor
    exit_block: torch.Tensor
    grid_ids: torch.Tensor
    partitions: list[Partition]
    all_valid: torch.Tensor
    owner: torch.Tensor | None = None
    context: torch.Tensor | None = None
    pruned: torch.Tensor | None = None
    weighted: bool = False
    mask: torch.Tensor | None = None
    layout: Layout | None = None
    aux: dict[int, torch.Tensor] = field(default_factory=dict)
    positions: torch.Tensor | None = None
    """(B, T + 1, 2) each trace token's rotary position (models/rotary.py), for backbones with RoPE."""
    queries: int = 0
    """Queries of a head inside the encoder, at the very front once they joined."""
    setting: ReductionSetting | None = None
    """The operating point this pass runs."""
    restores: list[tuple[int, object]] = field(default_factory=list)
    """What merging steps left for the setting's reconstruction, by block."""
    packing: Packing | None = None
    """Where the real tokens of the padded batch are, kept while the lengths stay (see `_packing`)."""

    @property
    def t_max(self) -> int:
        return self.token_logits.shape[1] - 1


class StepViT(nn.Module):
    """STEP encoder-decoder built from a timm VisionTransformer's parts."""

    def __init__(self, cfg: StepConfig, vit: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        if vit is None:
            vit = create_backbone(cfg)
        check_backbone(vit, cfg.arch)
        if cfg.norm_eps > 0:
            for m in vit.modules():
                if isinstance(m, nn.LayerNorm):
                    m.eps = cfg.norm_eps
        dim = int(vit.embed_dim)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.rope = rotary_module(vit)
        """timm's rotary module of a RoPE backbone (DINOv3): it turns each token's position into angles."""
        self.embed = SuperpatchEmbed(vit.patch_embed, vit.pos_embed, vit.patch_embed.grid_size,
                                     self.num_prefix_tokens, bool(vit.no_embed_class), cfg.pos_resize)
        self.cls_token = vit.cls_token
        self.dist_token = getattr(vit, "dist_token", None)  # DeiT's distillation token, after the class token
        self.reg_token = vit.reg_token
        self.norm_pre = vit.norm_pre
        self.blocks = nn.ModuleList([EncoderBlock(b) for b in vit.blocks])
        self.norm = vit.norm
        depth = len(self.blocks)
        for k in cfg.exit_after:
            if not 1 <= k < depth:
                raise ConfigError(f"exit gate after block {k} is outside 1..{depth - 1} for {cfg.name}")
        self.gates = nn.ModuleDict({str(k): ExitGate(dim, cfg.num_classes, k, cfg.exit_threshold, cfg.keep_per_class)
                                    for k in sorted(cfg.exit_after)})
        try:
            self.decoder = build_decoder(cfg.decoder, dim, cfg.num_classes, cfg.decoder_layers, cfg.decoder_heads,
                                         cfg.decoder_norm_eps, cfg.queries, cfg.query_blocks, depth,
                                         int(vit.patch_embed.patch_size[0]))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        join = self.joins_at
        late = [k for k in cfg.exit_after if join and k >= join]
        if late:
            raise ConfigError(f"exit gates after blocks {late} sit inside the query blocks ({join}..{depth}) of "
                              f"{cfg.name}; gates go before them")
        patch = self.embed.patch
        self.policies = nn.ModuleDict({
            "learned": LearnedPolicy(PolicyNet(cfg.policy_backbone), cfg.merge_thresholds, patch=patch),
            "oracle": OraclePolicy(cfg.merge_thresholds, patch=patch),
            "uniform": UniformPolicy(cfg.merge_thresholds, patch=patch, tau=cfg.uniform_tau),
            "budget": BudgetPolicy(patch=patch, tau=cfg.uniform_tau),
            "none": NoMergePolicy(cfg.merge_thresholds, patch=patch),
        })
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def patch_size(self) -> int:
        """Side of one patch in pixels (8, 14, 16, ...): superpatch levels count in patches."""
        return int(self.embed.patch)

    @property
    def joins_at(self) -> int:
        """1-based block before which a head inside the encoder (EoMT's queries) joins; 0 = none."""
        return int(getattr(self.decoder, "joins_at", 0))

    @property
    def exit_after(self) -> tuple[int, ...]:
        return tuple(sorted(int(k) for k in self.gates))

    def default_setting(self) -> ReductionSetting:
        """The model's own operating point, from its config alone: the learned policy with its merge
        thresholds and the gates with their threshold. A value computed afresh, never stored."""
        cfg = self.cfg
        return ReductionSetting("learned", True, tuple(float(t) for t in cfg.merge_thresholds), float(cfg.exit_threshold),
                                int(cfg.keep_per_class), float(self.policies["budget"].reduction), "")

    def policy_of(self, setting: ReductionSetting) -> nn.Module:
        """The policy module a setting lets tokens enter by: one it brings, else one of the model's."""
        brought = dict(setting.policies)
        if setting.policy in brought:
            return brought[setting.policy]
        if setting.policy not in self.policies:
            raise ConfigError(f"unknown policy {setting.policy!r}; choose one of {', '.join(self.policies)}")
        return self.policies[setting.policy]

    def check_setting(self, setting: ReductionSetting) -> None:
        """Refuse a setting this model cannot run (what `install` checked once), in one line."""
        if len(setting.merge_thresholds) != MAX_LEVEL:
            raise ConfigError(f"expected {MAX_LEVEL} merge thresholds, got {len(setting.merge_thresholds)}")
        if setting.keep_per_class < 0:
            raise ConfigError(f"--keep-per-class must be >= 0, got {setting.keep_per_class}")
        if not setting.budget >= 1.0:
            raise ConfigError(f"--budget is a token reduction factor >= 1 (e.g. 2.5), got {setting.budget}")
        if self.gates and not (0.0 <= setting.exit_threshold <= 1.0 + 1e-9 or setting.exit_threshold == float("inf")):
            raise ConfigError(f"exit threshold must be in [0, 1] (or above 1 to disable), got {setting.exit_threshold}")
        steps = setting.steps
        bad = sorted({s.block for s in steps if not 1 <= s.block <= self.depth})
        if bad:
            raise ConfigError(f"steps in blocks {bad} are outside 1..{self.depth} for {self.cfg.name}")
        inside = [s.block for s in steps if s.place == "inside"]
        if len(inside) != len(set(inside)):
            raise ConfigError(f"two steps act inside block {max(inside, key=inside.count)}; one method may act "
                              "inside a block (the attention's queries and keys are its)")
        late = sorted({s.block for s in setting.exit_steps if self.joins_at and s.block >= self.joins_at})
        if late:
            raise ConfigError(f"exit steps after blocks {late} sit inside the query blocks ({self.joins_at}..{self.depth}) "
                              f"of {self.cfg.name}; tokens may exit before them")
        names = [s.name for s in steps]
        if len(names) != len(set(names)):
            raise ConfigError(f"two steps are named {max(names, key=names.count)!r}; step names must differ")
        self.policy_of(setting)

    def compile_blocks(self) -> "StepViT":
        """torch.compile each encoder block in place, with dynamic shapes since token counts vary
        per image and per gate. Optional: hooks still see the blocks, outputs stay the same."""
        for block in self.blocks:
            block.compile(dynamic=True)
        return self

    def prefix_tokens(self, batch: int, pos_prefix: torch.Tensor | None) -> torch.Tensor | None:
        parts = []
        if self.cls_token is not None:
            parts.append(self.cls_token.expand(batch, -1, -1))
        if self.dist_token is not None:
            parts.append(self.dist_token.expand(batch, -1, -1))
        if self.reg_token is not None:
            parts.append(self.reg_token.expand(batch, -1, -1))
        if not parts:
            return None
        prefix = torch.cat(parts, dim=1)
        return prefix + pos_prefix if pos_prefix is not None else prefix

    def label_maps(self, out: StepOutput, padded_hw: tuple[int, int], input_hw: tuple[int, int],
                   pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Label maps (B, h, w) at the input size: a mask head's per-pixel scores (EoMT's order:
        masks upsampled, then sigmoid times class probabilities; `pixels` when `pixel_logits`
        already computed them), else the patch logits upsampled."""
        if out.masks is None:
            return segment(out.patch_logits, padded_hw, input_hw)
        h, w = input_hw
        scores = pixel_scores(*out.masks, padded_hw) if pixels is None else pixels
        return scores[..., :h, :w].argmax(dim=1)

    def pixel_logits(self, out: StepOutput, padded_hw: tuple[int, int]) -> torch.Tensor:
        """Per-pixel class scores (B, C, H, W) at the padded size for a mask head, else the patch
        logits (B, C, gh, gw): what sliding windows average."""
        return out.patch_logits if out.masks is None else pixel_scores(*out.masks, padded_hw)

    def _decode_masks(self, seq: _Sequence, images: torch.Tensor) -> StepOutput:
        """A head inside the encoder: every image token reassembled on the patch grid (survivors as
        they ended, exited and pruned ones as they left, merged ones un-merged), queries in front."""
        t_max, owner = seq.t_max, seq.owner
        assert seq.context is not None
        if max(seq.counts) > 0:
            scatter_tokens(seq.context, seq.x[:, seq.p:], seq.ids, seq.valid)
        feats = self.norm(by_owner(seq.context, owner)[:, :t_max])
        rebuilt = self._reconstruct(seq)
        if rebuilt is not None:
            reached = by_owner(seq.exit_block, owner)[:, :t_max] == self.depth
            feats = torch.where(reached.unsqueeze(-1), rebuilt.to(feats.dtype), feats)
        grid = unmerge(feats, seq.grid_ids)
        mask_logits, class_logits = self.decoder.masks(self.norm(seq.x[:, :seq.queries]), grid)
        gh, gw = grid.shape[-2:]
        scores = pixel_scores(mask_logits, class_logits, tuple(mask_logits.shape[-2:]))
        patch_scores = F.adaptive_avg_pool2d(scores, (gh, gw))
        cover = seq.grid_ids if owner is None else owner.gather(1, seq.grid_ids.flatten(1)).view_as(seq.grid_ids)
        token_scores = by_owner(pool_to_tokens(patch_scores, cover, t_max), None if owner is None else owner[:, :t_max])
        exit_block = by_owner(seq.exit_block, owner)[:, :t_max]
        return StepOutput(patch_scores.clamp_min(1e-12).log(), token_scores.clamp_min(1e-12).log(), exit_block,
                          seq.partitions, seq.aux, [], None if owner is None else owner[:, :t_max],
                          None if seq.pruned is None else seq.pruned[:, :t_max], (mask_logits, class_logits))

    # ---- the forward pass: embed -> blocks -> decode ----------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, return_aux: bool = False,
                sample_seeds: Sequence[int] | None = None, setting: ReductionSetting | None = None) -> StepOutput:
        """`images`: RGB in [0, 1], (B, 3, H, W), H and W multiples of the patch size; `setting`: the
        operating point (the model's own, `default_setting()`, when None).

        With `return_aux`, every gate also classifies all of its tokens for deep supervision and
        the learned policy scores the image (its training target comes from the labels), so one
        forward holds every trained part, as DistributedDataParallel needs; `sample_seeds`
        (training) make the policy's randomness per image (see Policy.forward).
        """
        setting = self.default_setting() if setting is None else setting
        self.check_setting(setting)
        seq = self.embed_tokens(images, labels, sample_seeds, setting)
        inside = {s.block: s for s in setting.steps if s.place == "inside"}
        join = self.joins_at
        for i, block in enumerate(self.blocks):
            k = i + 1
            if k == join:
                self._join_queries(seq)
            if max(seq.counts) == 0 and not seq.queries:
                break
            seq.mask = self._attention_mask(seq)
            step = inside.get(k)
            between = None if step is None else (lambda x, q, keys, step=step: self._between(seq, step, x, q, keys))
            rope = None if seq.positions is None else rotary_embedding(self.rope, seq.positions, seq.ids)
            seq.x = block(seq.x, attn_mask=seq.mask, num_prefix=seq.p, between=between, rope=rope,
                          packing=self._packing(seq))
            self._after_block(seq, k, return_aux)
        return self.decode(seq, images, return_aux)

    def embed_tokens(self, images: torch.Tensor, labels: torch.Tensor | None,
                     sample_seeds: Sequence[int] | None, setting: ReductionSetting) -> _Sequence:
        """Policy -> partitions -> supertoken embeddings behind the prefix tokens, and the buffers
        every token's outcome is written into (each with a spare slot, see scatter_tokens)."""
        b = images.shape[0]
        policy = self.policy_of(setting)
        if any(policy is m for m in self.policies.values()):  # the model's own: the setting's thresholds
            out = policy(images, labels, sample_seeds, thresholds=setting.merge_thresholds, budget=setting.budget)
        else:  # a method's own policy decides by its own settings
            out = policy(images, labels, sample_seeds)
        partitions = out.partitions
        emb, pos_prefix = self.embed((images - self.pixel_mean).div_(self.pixel_std), partitions)  # one new tensor, not two
        x, ids, valid = emb.tokens, emb.token_ids, emb.valid
        prefix = self.prefix_tokens(b, pos_prefix)
        p = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = self.norm_pre(x)
        t_max = ids.shape[1]
        exit_block = torch.where(valid, torch.full_like(ids, self.depth), torch.full_like(ids, -1))
        merging, pruning = setting.merging, setting.pruning
        seq = _Sequence(
            x=x, p=p, ids=ids, valid=valid, counts=[part.num_tokens for part in partitions],
            sizes=valid.to(torch.float32), token_logits=x.new_zeros((b, t_max + 1, self.decoder.num_classes)),
            exit_block=torch.cat([exit_block, exit_block.new_full((b, 1), -1)], dim=1),
            grid_ids=token_grid(partitions, images.device), partitions=partitions, all_valid=valid, setting=setting)
        if merging:
            seq.owner = torch.arange(t_max + 1, device=images.device).expand(b, -1).clone()
        if pruning:
            seq.pruned = torch.zeros((b, t_max + 1), dtype=torch.bool, device=images.device)
        if self.decoder.needs_context or pruning:
            seq.context = x.new_zeros((b, t_max + 1, x.shape[-1]))
        if self.rope is not None:
            grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
            seq.positions = token_positions(partitions, patch_positions(self.rope, grid, images.device))
        return seq

    def _join_queries(self, seq: _Sequence) -> None:
        """A head inside the encoder (EoMT) puts its queries in front: protected tokens from here on."""
        queries = self.decoder.query_tokens(seq.x.shape[0], seq.x.dtype)
        seq.x = torch.cat([queries, seq.x], dim=1)
        seq.p += queries.shape[1]
        seq.queries = queries.shape[1]

    def _attention_mask(self, seq: _Sequence) -> torch.Tensor | None:
        if seq.weighted:
            return size_weighted_mask(seq.valid, seq.sizes, seq.p, attention_dtype(seq.x))
        return attention_mask(seq.valid, seq.p) if min(seq.counts) < seq.x.shape[1] - seq.p else None

    def _packing(self, seq: _Sequence) -> Packing | None:
        """The batch's packing when its images have different lengths: from the host counts the encoder
        keeps (no device read), and reused from block to block until a step or gate changes them."""
        if seq.mask is None:
            return None
        lengths = tuple(seq.p + c for c in seq.counts)
        if seq.packing is None or seq.packing.lengths != lengths or seq.packing.width != seq.x.shape[1]:
            seq.packing = Packing.of(seq.counts, seq.p, seq.x.shape[1])
        return seq.packing

    def _layout(self, seq: _Sequence) -> Layout:
        if seq.layout is None:
            t_max = seq.t_max
            single = np.stack([np.pad(part.level == 0, (0, t_max - part.num_tokens)) for part in seq.partitions])
            owner = seq.owner if seq.owner is not None else torch.arange(t_max + 1, device=seq.x.device).expand(
                seq.x.shape[0], -1)
            seq.layout = Layout(seq.grid_ids, torch.from_numpy(single).to(seq.x.device), owner,
                                torch.tensor([part.num_tokens for part in seq.partitions], device=seq.x.device),
                                self.num_prefix_tokens, self.cls_token is not None)
        owner = seq.owner if seq.owner is not None else seq.layout.owner
        return dataclasses.replace(seq.layout, owner=owner, num_prefix=seq.p)

    def _view(self, seq: _Sequence, block: int, x: torch.Tensor, q: torch.Tensor | None = None,
              keys: torch.Tensor | None = None) -> TokenView:
        scale = float(getattr(self.blocks[block - 1].attn, "scale", 1.0))
        return TokenView(block, x[:, seq.p:], seq.ids, seq.valid, seq.sizes, self._layout(seq), x[:, :seq.p],
                         keys=keys, queries=q, attn_mask=seq.mask if q is not None else None, scale=scale,
                         class_index=seq.queries if self.cls_token is not None else None,
                         host_counts=tuple(seq.counts), host_initial=tuple(p.num_tokens for p in seq.partitions),
                         num_classes=int(self.decoder.num_classes))

    @torch.compiler.disable
    def _between(self, seq: _Sequence, step: Step, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor
                 ) -> torch.Tensor:
        """A step inside a block: it decides on the tokens after attention, the encoder carries it out.
        Left out of torch.compile (host-side bookkeeping, data-dependent shapes): a compiled block runs
        its attention and MLP compiled and calls this in between."""
        return self._carry_out(seq, x, step.module(self._view(seq, step.block, x, q, keys)), step)

    def _carry_out(self, seq: _Sequence, x: torch.Tensor, dec: MergeDecision | PruneDecision, step: Step
                   ) -> torch.Tensor:
        p = seq.p
        if isinstance(dec, MergeDecision) and step.does == "merge" and seq.owner is not None:
            if dec.restore is not None:
                seq.restores.append((step.block, dec.restore))
            if seq.positions is not None:  # a merged token sits at its group's size-weighted mean position
                seq.positions = merge_positions(seq.positions, seq.ids, seq.sizes, dec.merged & seq.valid, dec.into,
                                                seq.valid)
            patch_part, seq.sizes, seq.owner = apply_merge(x[:, p:], seq.sizes, seq.owner, dec)
            before = sum(seq.counts)
            patch_part, seq.ids, seq.valid, seq.counts, sizes = compact(patch_part, seq.ids, seq.valid & ~dec.merged,
                                                                        seq.sizes, dec.order, dec.counts_after)
            seq.sizes = sizes  # type: ignore[assignment]
            seq.weighted = seq.weighted or (seq.setting.size_weighted and sum(seq.counts) < before)
            return torch.cat([x[:, :p], patch_part], dim=1)
        if isinstance(dec, PruneDecision) and step.does == "prune" and seq.pruned is not None:
            gone = dec.pruned & seq.valid
            scatter_tokens(seq.exit_block, torch.full_like(seq.ids, step.block), seq.ids, gone)
            scatter_tokens(seq.pruned, gone, seq.ids, gone)
            assert seq.context is not None
            scatter_tokens(seq.context, x[:, p:], seq.ids, gone)
            patch_part, seq.ids, seq.valid, seq.counts, sizes = compact(x[:, p:], seq.ids, seq.valid & ~gone,
                                                                        seq.sizes, dec.order, dec.counts_after)
            seq.sizes = sizes  # type: ignore[assignment]
            front = x[:, :p]
            if dec.fused is not None and dec.fused.shape[1] > 0:
                front = torch.cat([front, dec.fused.to(x.dtype)], dim=1)
                seq.p += dec.fused.shape[1]
            return torch.cat([front, patch_part], dim=1)
        if isinstance(dec, ExitDecision) and step.does == "exit":
            return self._exit(seq, x, dec)
        raise ConfigError(f"step {step.name!r} in block {step.block} returned {type(dec).__name__}, which its "
                          f"declared kind ({step.does}) does not allow; a step returns "
                          "a MergeDecision, a PruneDecision or an ExitDecision (models/steps.py)")

    def _after_block(self, seq: _Sequence, k: int, return_aux: bool) -> None:
        """After block k: the model's gate (when the setting's exits are on, or for deep supervision),
        then the steps placed after it, in order. Gates and exit steps leave through one path."""
        gate = self.gates[str(k)] if str(k) in self.gates else None
        if gate is not None and (seq.setting.exits or return_aux) and max(seq.counts) > 0:
            setting = seq.setting
            dec = gate(seq.x[:, seq.p:], seq.ids, seq.valid, allow_exit=setting.exits,
                       threshold=setting.exit_threshold, keep_per_class=setting.keep_per_class)
            if return_aux:
                full = dec.logits.new_zeros((seq.x.shape[0], seq.t_max + 1, seq.token_logits.shape[-1]))
                scatter_tokens(full, dec.logits, seq.ids, seq.valid)
                seq.aux[k] = unmerge(by_owner(full, seq.owner)[:, :seq.t_max], seq.grid_ids)
            if setting.exits:
                seq.x = self._exit(seq, seq.x, dec)
        for step in seq.setting.steps:
            if step.place == "after" and step.block == k and max(seq.counts) > 0:
                seq.x = self._carry_out(seq, seq.x, step.module(self._view(seq, k, seq.x)), step)

    def _exit(self, seq: _Sequence, x: torch.Tensor, dec: ExitDecision) -> torch.Tensor:
        """Tokens leave with the decision's logits as their final prediction (a gate's or a step's)."""
        p = seq.p
        gone = dec.exits & seq.valid
        scatter_tokens(seq.token_logits, dec.logits.to(seq.token_logits.dtype), seq.ids, gone)
        scatter_tokens(seq.exit_block, torch.full_like(seq.ids, dec.block), seq.ids, gone)
        if seq.context is not None:
            scatter_tokens(seq.context, x[:, p:], seq.ids, gone)
        patch_part, seq.ids, seq.valid, seq.counts, sizes = compact(x[:, p:], seq.ids, seq.valid & ~gone, seq.sizes)
        seq.sizes = sizes  # type: ignore[assignment]
        return torch.cat([x[:, :p], patch_part], dim=1)

    def _reconstruct(self, seq: _Sequence) -> torch.Tensor | None:
        """(B, T, D) normalised features of every trace token from the setting's reconstruction, or None
        (no reconstruction, or nothing merged). It sees the tokens that reached the end by trace id and
        what its merging steps left; a wrong shape or a failure is one line."""
        recon = seq.setting.reconstruction
        if recon is None or seq.owner is None:
            return None
        b, t_max, p = seq.x.shape[0], seq.t_max, seq.p
        final = self.norm(seq.x)[:, p:]
        tokens = final.new_zeros((b, t_max + 1, final.shape[-1]))
        reached = torch.zeros((b, t_max + 1), dtype=torch.bool, device=final.device)
        if max(seq.counts) > 0:
            scatter_tokens(tokens, final, seq.ids, seq.valid)
            scatter_tokens(reached, seq.valid, seq.ids, seq.valid)
        tokens, reached = tokens[:, :t_max], reached[:, :t_max]
        if seq.context is not None:  # tokens that left (pruned, exited) as they were when they left
            left = self.norm(seq.context[:, :t_max]).to(tokens.dtype)
            tokens = torch.where(reached.unsqueeze(-1), tokens, left)
        out = recon(ReconstructionView(tokens, reached, tuple(seq.restores)))
        want = (b, t_max, final.shape[-1])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or not out.dtype.is_floating_point:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"the reconstruction of {seq.setting.method or 'this method'} returned {got}; it must "
                              f"return floating-point features of every token, shape {want}")
        return out

    def decode(self, seq: _Sequence, images: torch.Tensor, return_aux: bool = False) -> StepOutput:
        """Every token's logits: the decoder's for those that reached the end or were pruned (from the
        features they had then), the gate's for those that exited; then un-merged to the patches.
        A decoder that `needs_context` (the mask transformer) receives every token at once."""
        if getattr(self.decoder, "inside_encoder", False):
            return self._decode_masks(seq, images)
        t_max, owner, p = seq.t_max, seq.owner, seq.p
        token_logits = seq.token_logits
        exit_block = by_owner(seq.exit_block, owner)  # every token takes what the token standing for it ended with
        pruned = None if seq.pruned is None else by_owner(seq.pruned, owner)[:, :t_max]
        rebuilt = self._reconstruct(seq)
        if rebuilt is not None or self.decoder.needs_context:
            # every token decoded at once: a method's rebuilt features for the tokens whose group reached the
            # end, the features it had when it left for the others (all of them without a reconstruction)
            reached_end = exit_block[:, :t_max] == self.depth
            if seq.context is not None and max(seq.counts) > 0:
                scatter_tokens(seq.context, seq.x[:, p:], seq.ids, seq.valid)
            kept = None if seq.context is None else self.norm(by_owner(seq.context, owner)[:, :t_max])
            if rebuilt is None:
                assert kept is not None  # a decoder that needs context has one
                features = kept
            else:
                features = rebuilt if kept is None else torch.where(reached_end.unsqueeze(-1), rebuilt,
                                                                     kept.to(rebuilt.dtype))
            decoded = self.decoder(features, seq.all_valid)
            from_decoder = reached_end if pruned is None else reached_end | pruned
            token_logits = by_owner(token_logits, owner)
            token_logits = torch.cat([torch.where(from_decoder.unsqueeze(-1), decoded.to(token_logits.dtype),
                                                  token_logits[:, :t_max]), token_logits[:, t_max:]], dim=1)
        else:
            if max(seq.counts) > 0:
                final = self.decoder(self.norm(seq.x)[:, p:], seq.valid)
                scatter_tokens(token_logits, final, seq.ids, seq.valid)
            if seq.pruned is not None and seq.context is not None:
                left = seq.pruned[:, :t_max]
                decoded = self.decoder(self.norm(seq.context[:, :t_max]), left)
                token_logits = torch.cat([torch.where(left.unsqueeze(-1), decoded.to(token_logits.dtype),
                                                      token_logits[:, :t_max]), token_logits[:, t_max:]], dim=1)
            token_logits = by_owner(token_logits, owner)
        token_logits, exit_block = token_logits[:, :t_max], exit_block[:, :t_max]
        policy_logits = self.policies["learned"].logits(images) if return_aux else []
        return StepOutput(unmerge(token_logits, seq.grid_ids), token_logits, exit_block, seq.partitions, seq.aux,
                          policy_logits, None if owner is None else owner[:, :t_max],
                          None if seq.pruned is None else seq.pruned[:, :t_max])


def create_backbone(cfg: StepConfig) -> nn.Module:
    """A randomly initialised timm ViT for `cfg` (weights are loaded separately)."""
    try:
        return timm.create_model(cfg.arch, pretrained=False, num_classes=0, img_size=cfg.img_size, **cfg.timm_kwargs)
    except Exception as exc:  # timm raises many types for unsupported kwargs
        raise ConfigError(f"cannot build timm model {cfg.arch!r} ({exc})") from None


def check_backbone(vit: nn.Module, arch: str) -> None:
    """Refuse backbones this encoder cannot drive, with a message rather than a crash later."""
    rotary = rotary_module(vit)
    if getattr(vit, "rope", None) is not None and rotary is None:
        raise ConfigError(f"{arch} places tokens by a rotary position embedding tokenscope cannot place supertokens "
                          f"with ({type(vit.rope).__name__}); DINOv3's (timm's vit_*_dinov3) and learned position "
                          "tables (DINOv2, AugReg, DeiT, ...) are supported")
    needed = ("patch_embed", "blocks", "norm", "embed_dim", "num_prefix_tokens", "no_embed_class", "norm_pre")
    missing = [a for a in needed if not hasattr(vit, a)]
    if missing:
        raise ConfigError(f"{arch} is not a plain timm VisionTransformer (missing {', '.join(missing)})")
    if rotary is None and getattr(vit, "pos_embed", None) is None:
        raise ConfigError(f"{arch} has neither a position table nor a rotary position embedding tokenscope can use")
    if not all(is_plain_block(b) for b in vit.blocks):
        raise ConfigError(f"{arch}'s blocks are not timm's pre-norm Block (norm1, attn, ls1, mlp, ...); tokenscope "
                          "needs one")
    proj = getattr(vit.patch_embed, "proj", None)
    square = isinstance(proj, nn.Conv2d) and proj.kernel_size[0] == proj.kernel_size[1]
    if not square or tuple(proj.kernel_size) != tuple(proj.stride) or tuple(proj.padding) != (0, 0):
        raise ConfigError(f"{arch} does not use a square conv patch embedding (kernel == stride); tokenscope needs one")


def segment(patch_logits: torch.Tensor, padded_hw: tuple[int, int], input_hw: tuple[int, int],
            class_chunk: int = 32) -> torch.Tensor:
    """Label map (B, h, w): bilinear upsampling of patch logits to the padded size, cropped back.

    Classes are upsampled in chunks with a running max, so 150 classes at 1024 px do not
    need a (150, 1024, 1024) float buffer.
    """
    h, w = input_hw
    best_val: torch.Tensor | None = None
    best_idx: torch.Tensor | None = None
    for c0 in range(0, patch_logits.shape[1], class_chunk):
        up = F.interpolate(patch_logits[:, c0:c0 + class_chunk].float(), size=padded_hw, mode="bilinear",
                           align_corners=False)[..., :h, :w]
        val, idx = up.max(dim=1)
        idx = idx + c0
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
    assert best_idx is not None
    return best_idx
