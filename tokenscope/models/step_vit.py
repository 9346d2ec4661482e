"""The STEP segmenter: a timm ViT with supertokens (dCTS) and early-exit gates.

The forward pass reads as `policy -> embed -> blocks with gates -> decode -> un-merge`. Every
step that tokenscope shows is a named submodule (`policies.*`, `embed`, `blocks.i`,
`gates.<after_block>`, `decoder`), so hooks can observe it; the model itself never records
or writes anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.errors import ConfigError
from tokenscope.models.decoders import build_decoder
from tokenscope.models.exits import ExitGate, GateDecision
from tokenscope.models.methods.attention import attend, size_weighted_mask
from tokenscope.models.methods.cts import CTSPolicy
from tokenscope.models.methods.merging import MergeContext, MergeDecision, MergingSpec, apply_merge
from tokenscope.models.partition import MAX_LEVEL, Partition
from tokenscope.models.policy import (
    POLICY_NAMES,
    BudgetPolicy,
    LearnedPolicy,
    NoMergePolicy,
    OraclePolicy,
    PolicyNet,
    UniformPolicy,
)
from tokenscope.models.registry import StepConfig
from tokenscope.models.slots import scatter_tokens
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
    """The learned dCTS policy's merge logits per level, for training it beside the segmenter."""
    token_owner: torch.Tensor | None = None
    """(B, T) with in-network merging: the token whose prediction each token finally shares
    (itself unless it was merged into another); None without merging."""


@dataclass(frozen=True)
class ReductionSetting:
    """Everything that decides which tokens a forward pass keeps: one operating point.

    Commands that run several operating points on one loaded model (baseline and STEP, a
    method comparison, a sweep) take the setting, apply others, and put it back whole, so no
    part (merging, CTS's count) can leak from one operating point into the next.
    """

    policy: str
    exits: bool
    merge_thresholds: tuple[float, ...]
    exit_threshold: float
    keep_per_class: int
    budget: float
    cts_groups: float
    cts_source: str
    merging: MergingSpec | None
    method: str


def attention_mask(valid: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Key-padding mask (B, 1, 1, P + N) for SDPA: True where a key may be attended."""
    prefix = valid.new_ones((valid.shape[0], num_prefix))
    return torch.cat([prefix, valid], dim=1)[:, None, None, :]


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype queries will have inside attention: autocast's (bf16) when it is on, else x's.
    An additive mask must match it on the CUDA kernels."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def compact(x: torch.Tensor, token_ids: torch.Tensor, keep: torch.Tensor, sizes: torch.Tensor | None = None,
            key: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], torch.Tensor | None]:
    """Remove the slots not in `keep`, per image, and shrink the padding to the longest image.

    The kept slots stay in their order, or, with `key` (B, N), are sorted by it: a merger's
    reference order after its merge.

    Returns the new tokens, ids, validity, per-image counts (a host list: one sync per gate or
    merge) and, when given, the token sizes in the new order.
    """
    counts = keep.sum(dim=1).tolist()
    n = max(counts)
    if key is None:
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]
    else:  # kept slots by their key, the others after them
        order = torch.argsort(torch.where(keep, key, key.new_full(key.shape, torch.iinfo(key.dtype).max)),
                              dim=1, stable=True)[:, :n]
    x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    valid = keep.gather(1, order)
    ids = torch.where(valid, token_ids.gather(1, order), torch.full_like(order, -1))
    if sizes is not None:
        sizes = torch.where(valid, sizes.gather(1, order), torch.zeros_like(order, dtype=sizes.dtype))
    return x, ids, valid, counts, sizes


def token_grid(partitions: Sequence[Partition], device: torch.device) -> torch.Tensor:
    """(B, gh, gw) long tensor: which token covers each patch, for `unmerge` and per-patch lookups."""
    return torch.from_numpy(np.stack([p.token_of_patch for p in partitions])).long().to(device)


def unmerge(token_values: torch.Tensor, token_of_patch: torch.Tensor) -> torch.Tensor:
    """Copy every token's values (B, T, C) to each patch it covers: (B, C, gh, gw)."""
    b, gh, gw = token_of_patch.shape
    idx = token_of_patch.reshape(b, gh * gw, 1).expand(-1, -1, token_values.shape[-1])
    return token_values.gather(1, idx).transpose(1, 2).reshape(b, -1, gh, gw)


def by_owner(values: torch.Tensor, owner: torch.Tensor | None) -> torch.Tensor:
    """values[b, owner[b, t]] for every token t (B, T[, C]): what the token standing for each one
    holds, after in-network merging; `values` itself without merging."""
    if owner is None:
        return values
    index = owner if values.ndim == 2 else owner.unsqueeze(-1).expand(-1, -1, values.shape[-1])
    return values.gather(1, index)


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
        self.embed = SuperpatchEmbed(vit.patch_embed, vit.pos_embed, vit.patch_embed.grid_size,
                                     self.num_prefix_tokens, bool(vit.no_embed_class), cfg.pos_resize)
        self.cls_token = vit.cls_token
        self.dist_token = getattr(vit, "dist_token", None)  # DeiT's distillation token, after the class token
        self.reg_token = vit.reg_token
        self.norm_pre = vit.norm_pre
        self.blocks = vit.blocks
        self.norm = vit.norm
        depth = len(self.blocks)
        for k in cfg.exit_after:
            if not 1 <= k < depth:
                raise ConfigError(f"exit gate after block {k} is outside 1..{depth - 1} for {cfg.name}")
        self.gates = nn.ModuleDict({str(k): ExitGate(dim, cfg.num_classes, k, cfg.exit_threshold, cfg.keep_per_class)
                                    for k in sorted(cfg.exit_after)})
        try:
            self.decoder = build_decoder(cfg.decoder, dim, cfg.num_classes, cfg.decoder_layers, cfg.decoder_heads,
                                         cfg.decoder_norm_eps)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        patch = self.embed.patch
        self.policies = nn.ModuleDict({
            "learned": LearnedPolicy(PolicyNet(cfg.policy_backbone), cfg.merge_thresholds, patch=patch),
            "oracle": OraclePolicy(cfg.merge_thresholds, patch=patch),
            "uniform": UniformPolicy(cfg.merge_thresholds, patch=patch, tau=cfg.uniform_tau),
            "budget": BudgetPolicy(patch=patch, tau=cfg.uniform_tau),
            "none": NoMergePolicy(cfg.merge_thresholds, patch=patch),
        })
        self.policies["cts"] = CTSPolicy({k: self.policies[k] for k in ("learned", "uniform")}, patch=patch)
        self.mergers = nn.ModuleDict()
        self.merging: MergingSpec | None = None
        self.method = ""
        """The method name this operating point amounts to, set by whoever configures it (for traces)."""
        self.active_policy = "learned"
        self.exits_enabled = True
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
    def exit_after(self) -> tuple[int, ...]:
        return tuple(sorted(int(k) for k in self.gates))

    @property
    def policy(self) -> nn.Module:
        return self.policies[self.active_policy]

    def configure(self, policy: str | None = None, merge_thresholds: Sequence[float] | None = None,
                  exit_threshold: float | None = None, exits: bool | None = None,
                  budget: float | None = None, keep_per_class: int | None = None,
                  cts_groups: float | None = None, cts_source: str | None = None) -> "StepViT":
        """Set the operating point (which policy, thresholds, exits on/off, token budget, tokens of
        each class held back at the gates, CTS's group count and score source) in place."""
        if cts_groups is not None:
            self.policies["cts"].groups = float(cts_groups)
        if cts_source is not None:
            if cts_source not in ("learned", "uniform"):
                raise ConfigError(f"CTS scores come from the learned or the uniform policy, not {cts_source!r}")
            self.policies["cts"].source = cts_source
        if keep_per_class is not None:
            if keep_per_class < 0:
                raise ConfigError(f"--keep-per-class must be >= 0, got {keep_per_class}")
            for g in self.gates.values():
                g.keep_per_class = int(keep_per_class)
        if budget is not None:
            if not budget >= 1.0:
                raise ConfigError(f"--budget is a token reduction factor >= 1 (e.g. 2.5), got {budget}")
            self.policies["budget"].reduction = float(budget)
        if policy is not None:
            if policy not in POLICY_NAMES:
                raise ConfigError(f"unknown policy {policy!r}; choose one of {', '.join(POLICY_NAMES)}")
            self.active_policy = policy
        if merge_thresholds is not None:
            if len(merge_thresholds) != MAX_LEVEL:
                raise ConfigError(f"expected {MAX_LEVEL} merge thresholds, got {len(merge_thresholds)}")
            for p in self.policies.values():
                p.thresholds = tuple(float(t) for t in merge_thresholds)
        if exit_threshold is not None:
            if not 0.0 <= exit_threshold <= 1.0 + 1e-9 and exit_threshold != float("inf"):
                raise ConfigError(f"exit threshold must be in [0, 1] (or above 1 to disable), got {exit_threshold}")
            for g in self.gates.values():
                g.threshold = float(exit_threshold)
        if exits is not None:
            self.exits_enabled = bool(exits)
        return self

    def setting(self) -> ReductionSetting:
        """The current operating point, to restore later with `apply`."""
        cts = self.policies["cts"]
        return ReductionSetting(self.active_policy, self.exits_enabled, self.merge_thresholds, self.exit_threshold,
                                self.keep_per_class, float(self.policies["budget"].reduction), float(cts.groups),
                                str(cts.source), self.merging, self.method)

    def plain(self) -> ReductionSetting:
        """The current setting without any reduction: plain grid, no exits, no merging (`vit`)."""
        return dataclasses.replace(self.setting(), policy="none", exits=False, merging=None, method="vit")

    def apply(self, setting: ReductionSetting) -> "StepViT":
        """Switch to an operating point taken with `setting` (or `plain`)."""
        self.configure(policy=setting.policy, merge_thresholds=setting.merge_thresholds,
                       exit_threshold=setting.exit_threshold if self.gates else None, exits=setting.exits,
                       budget=setting.budget, keep_per_class=setting.keep_per_class, cts_groups=setting.cts_groups,
                       cts_source=setting.cts_source)
        self.set_merging(setting.merging)
        self.method = setting.method
        return self

    def set_merging(self, spec: MergingSpec | None) -> "StepViT":
        """Turn in-network merging on (ToMe / ALGM, see models/methods/merging.py) or off."""
        if spec is not None:
            bad = [k for k in spec.blocks if not 1 <= k <= self.depth]
            if bad:
                raise ConfigError(f"merging blocks {bad} are outside 1..{self.depth} for {self.cfg.name}")
            if spec.kind == "tome" and spec.r < 0:
                raise ConfigError(f"--tome-r must be >= 0, got {spec.r}")
        if spec == self.merging:
            return self  # the same merging: keep its modules (and any hooks on them)
        self.merging = spec
        self.mergers = nn.ModuleDict({str(k): m for k, m in (spec.mergers() if spec else {}).items()})
        return self

    def compile_blocks(self) -> "StepViT":
        """torch.compile each encoder block in place, with dynamic shapes since token counts vary
        per image and per gate. Optional: hooks still see the blocks, outputs stay the same."""
        for block in self.blocks:
            block.compile(dynamic=True)
        return self

    @property
    def merge_thresholds(self) -> tuple[float, ...]:
        return tuple(self.policies["none"].thresholds)

    @property
    def keep_per_class(self) -> int:
        gates = list(self.gates.values())
        return int(gates[0].keep_per_class) if gates else 0

    @property
    def exit_threshold(self) -> float:
        gates = list(self.gates.values())
        return float(gates[0].threshold) if gates else float("nan")

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

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, return_aux: bool = False,
                sample_seeds: Sequence[int] | None = None) -> StepOutput:
        """`images`: RGB in [0, 1], (B, 3, H, W), H and W multiples of the patch size.

        With `return_aux`, every gate also classifies all of its tokens for deep supervision and
        the learned policy scores the image (its training target comes from the labels), so one
        forward holds every trained part, as DistributedDataParallel needs; `sample_seeds`
        (training) make the active policy's randomness per image (see Policy.forward).
        A decoder that `needs_context` (the mask transformer) receives every token at the end:
        the survivors with their final features, exited tokens with the features they left with.
        """
        b = images.shape[0]
        decision = self.policy(images, labels, sample_seeds)
        partitions = decision.partitions
        emb, pos_prefix = self.embed((images - self.pixel_mean) / self.pixel_std, partitions)
        x, ids, valid = emb.tokens, emb.token_ids, emb.valid
        all_valid = valid
        counts = [p.num_tokens for p in partitions]
        prefix = self.prefix_tokens(b, pos_prefix)
        p = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = self.norm_pre(x)
        t_max = ids.shape[1]
        num_classes = self.decoder.num_classes
        token_logits = x.new_zeros((b, t_max + 1, num_classes))  # + a spare slot, see scatter_tokens
        exit_block = torch.where(valid, torch.full_like(ids, self.depth), torch.full_like(ids, -1))
        exit_block = torch.cat([exit_block, exit_block.new_full((b, 1), -1)], dim=1)
        context = x.new_zeros((b, t_max + 1, x.shape[-1])) if self.decoder.needs_context else None
        aux: dict[int, torch.Tensor] = {}
        grid_ids = token_grid(partitions, images.device)
        merging = self.merging if len(self.mergers) else None
        sizes = valid.to(torch.float32) if merging else None
        owner = torch.arange(t_max + 1, device=images.device).expand(b, -1).clone() if merging else None
        layout = None  # where tokens lie, for mergers that only join neighbours
        if merging:
            single = np.stack([np.pad(part.level == 0, (0, t_max - part.num_tokens)) for part in partitions])
            layout = MergeContext(grid_ids, torch.from_numpy(single).to(images.device), owner,
                                  torch.tensor(counts, device=images.device), p, self.cls_token is not None)
        weighted = False  # proportional attention starts once a token stands for several
        for i, blk in enumerate(self.blocks):
            if max(counts) == 0:
                break
            if weighted:
                mask = size_weighted_mask(valid, sizes, p, attention_dtype(x))
            else:
                mask = attention_mask(valid, p) if min(counts) < x.shape[1] - p else None
            merger = self.mergers[str(i + 1)] if merging and str(i + 1) in self.mergers else None
            if merger is None:
                x = blk(x, attn_mask=mask)
            else:
                h, keys = attend(blk.attn, blk.norm1(x), mask)
                x = x + blk.drop_path1(blk.ls1(h))
                dec: MergeDecision = merger(x[:, p:], keys[:, p:], ids, valid, dataclasses.replace(layout, owner=owner))
                patch_part, sizes, owner = apply_merge(x[:, p:], sizes, owner, dec)
                before = sum(counts)
                patch_part, ids, valid, counts, sizes = compact(patch_part, ids, valid & ~dec.merged, sizes, dec.order)
                x = torch.cat([x[:, :p], patch_part], dim=1)
                x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
                weighted = weighted or (merging.prop_attn and sum(counts) < before)
            gate = self.gates[str(i + 1)] if str(i + 1) in self.gates else None
            if gate is None or not (self.exits_enabled or return_aux) or max(counts) == 0:
                continue
            dec_g: GateDecision = gate(x[:, p:], ids, valid, allow_exit=self.exits_enabled)
            if return_aux:
                full = dec_g.logits.new_zeros((b, t_max + 1, num_classes))
                scatter_tokens(full, dec_g.logits, ids, valid)
                aux[i + 1] = unmerge(by_owner(full, owner)[:, :t_max], grid_ids)
            if self.exits_enabled:
                scatter_tokens(token_logits, dec_g.logits, ids, dec_g.exits)
                scatter_tokens(exit_block, torch.full_like(ids, i + 1), ids, dec_g.exits)
                if context is not None:
                    scatter_tokens(context, x[:, p:], ids, dec_g.exits)
                patch_part, ids, valid, counts, sizes = compact(x[:, p:], ids, valid & ~dec_g.exits, sizes)
                x = torch.cat([x[:, :p], patch_part], dim=1)
        exit_block = by_owner(exit_block, owner)  # every token takes what the token standing for it ended with
        if context is not None:
            if max(counts) > 0:
                scatter_tokens(context, x[:, p:], ids, valid)
            decoded = self.decoder(self.norm(by_owner(context, owner)[:, :t_max]), all_valid)
            token_logits = by_owner(token_logits, owner)
            reached_end = (exit_block[:, :t_max] == self.depth).unsqueeze(-1)
            token_logits = torch.cat([torch.where(reached_end, decoded.to(token_logits.dtype), token_logits[:, :t_max]),
                                      token_logits[:, t_max:]], dim=1)
        else:
            if max(counts) > 0:
                final = self.decoder(self.norm(x)[:, p:], valid)
                scatter_tokens(token_logits, final, ids, valid)
            token_logits = by_owner(token_logits, owner)
        token_logits, exit_block = token_logits[:, :t_max], exit_block[:, :t_max]
        policy_logits = self.policies["learned"].logits(images) if return_aux else []
        return StepOutput(unmerge(token_logits, grid_ids), token_logits, exit_block, partitions, aux, policy_logits,
                          None if owner is None else owner[:, :t_max])


def create_backbone(cfg: StepConfig) -> nn.Module:
    """A randomly initialised timm ViT for `cfg` (weights are loaded separately)."""
    try:
        return timm.create_model(cfg.arch, pretrained=False, num_classes=0, img_size=cfg.img_size, **cfg.timm_kwargs)
    except Exception as exc:  # timm raises many types for unsupported kwargs
        raise ConfigError(f"cannot build timm model {cfg.arch!r} ({exc})") from None


def check_backbone(vit: nn.Module, arch: str) -> None:
    """Refuse backbones this encoder cannot drive, with a message rather than a crash later."""
    needed = ("patch_embed", "blocks", "norm", "embed_dim", "num_prefix_tokens", "no_embed_class", "norm_pre")
    missing = [a for a in needed if not hasattr(vit, a)]
    if missing:
        raise ConfigError(f"{arch} is not a plain timm VisionTransformer (missing {', '.join(missing)})")
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
