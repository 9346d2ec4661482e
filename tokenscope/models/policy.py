"""Merge policies: who decides which patches share a supertoken.

Every policy scores each aligned block at levels 1..4 (the probability that the block holds a
single class) and turns the scores into a `Partition` with the same top-down threshold rule,
so that policies differ only in their scores and can be compared fairly. Each policy is a
named module, which lets a forward hook observe its scores and partitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenscope.errors import ConfigError
from tokenscope.models.partition import (
    MAX_LEVEL,
    Partition,
    block_homogeneity,
    grid_partition,
    level_shape,
    partition_from_merges,
    quadtree_partition,
)

POLICY_NAMES = ("learned", "oracle", "uniform", "budget", "none")
NET_PATCH = 16
"""Pixels per patch the learned policy network's cells are laid out for."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PolicyOutput:
    """Per-level block scores (B, gh>>k, gw>>k) for k = 1..levels, and one partition per image."""

    scores: list[torch.Tensor]
    partitions: list[Partition]


def to_host(scores: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Every level's scores as float32 NumPy arrays, in one device-to-host copy (one synchronisation,
    not one per level)."""
    if not scores:
        return []
    flat = torch.cat([s.detach().float().reshape(s.shape[0], -1) for s in scores], dim=1).cpu().numpy()
    out, start = [], 0
    for s in scores:
        size = int(np.prod(s.shape[1:]))
        out.append(flat[:, start:start + size].reshape(s.shape))
        start += size
    return out


class Policy(nn.Module):
    """Base class: subclasses implement `score`; thresholds and partitioning are shared."""

    name = "base"

    def __init__(self, thresholds: Sequence[float] = (0.5,) * MAX_LEVEL, patch: int = 16) -> None:
        super().__init__()
        self.patch = patch
        self.thresholds: tuple[float, ...] = tuple(float(t) for t in thresholds)
        if len(self.thresholds) != MAX_LEVEL:
            raise ConfigError(f"expected {MAX_LEVEL} merge thresholds (levels 1-{MAX_LEVEL}), got {len(self.thresholds)}")

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        raise NotImplementedError

    def score_seeded(self, images: torch.Tensor, labels: torch.Tensor | None,
                     sample_seeds: Sequence[int]) -> list[torch.Tensor]:
        """`score` with per-image randomness; policies without randomness ignore the seeds."""
        return self.score(images, labels)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                sample_seeds: Sequence[int] | None = None, thresholds: Sequence[float] | None = None,
                budget: float | None = None) -> PolicyOutput:
        """`images` are RGB in [0, 1], (B, 3, H, W) with H, W multiples of the patch size.

        `sample_seeds` (one per image) make a policy's training-time randomness a function of
        the image alone, not of which batch or process it landed in (see OraclePolicy).
        `thresholds` are the operating point's (this policy's own when None): a value passed in,
        never set on the module, so one policy serves every operating point at once."""
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        scores = self.score(images, labels) if sample_seeds is None else self.score_seeded(images, labels, sample_seeds)
        host = to_host(scores)
        levels = self.thresholds if thresholds is None else tuple(float(t) for t in thresholds)
        partitions = [
            quadtree_partition([h[b] for h in host], levels, grid) for b in range(images.shape[0])
        ]
        return PolicyOutput(scores=scores, partitions=partitions)


class NoMergePolicy(Policy):
    """The plain 16x16 grid: every block scores 0, nothing merges."""

    name = "none"

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                sample_seeds: Sequence[int] | None = None, thresholds: Sequence[float] | None = None,
                budget: float | None = None) -> PolicyOutput:
        """The grid partition, built on the host without reading anything back from the device."""
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        return PolicyOutput(scores=self.score(images, labels), partitions=[grid_partition(grid) for _ in range(images.shape[0])])

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        b = images.shape[0]
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        return [images.new_zeros((b, *level_shape(grid, k))) for k in range(1, MAX_LEVEL + 1)]


class OraclePolicy(Policy):
    """Merge a block iff its ground-truth labels are a single class: the upper bound.

    In training mode each image withholds a random fraction (uniform in [0, 1]) of its one-class
    blocks, so an encoder trained on oracle partitions also sees those regions as smaller tokens,
    down to the plain grid, and stays accurate with and without merging.
    """

    name = "oracle"

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        if labels is None:
            raise ConfigError("policy 'oracle' needs a label map: pass --labels")
        homog = [h.to(images.dtype) for h in block_homogeneity(labels, MAX_LEVEL, self.patch)]
        if not self.training:
            return homog
        withhold = torch.rand(images.shape[0], 1, 1, device=images.device)
        return [h * (torch.rand_like(h) >= withhold) for h in homog]

    def score_seeded(self, images: torch.Tensor, labels: torch.Tensor | None,
                     sample_seeds: Sequence[int]) -> list[torch.Tensor]:
        """The same withholding, drawn per image from its own seed: an image is withheld alike in
        a batch of 8 on one process or a batch of 4 on each of two (distributed training)."""
        if labels is None:
            raise ConfigError("policy 'oracle' needs a label map: pass --labels")
        homog = [h.to(images.dtype) for h in block_homogeneity(labels, MAX_LEVEL, self.patch)]
        if not self.training:
            return homog
        keep = [torch.empty_like(h, device="cpu") for h in homog]
        for b, seed in enumerate(sample_seeds):
            g = torch.Generator().manual_seed(int(seed))
            withhold = torch.rand(1, generator=g)
            for k, h in zip(keep, homog):
                k[b] = (torch.rand(h.shape[1:], generator=g) >= withhold).to(k.dtype)
        return [h * k.to(h.device) for h, k in zip(homog, keep)]


class UniformPolicy(Policy):
    """Training-free: a block scores exp(-sigma / tau), sigma being the largest per-channel
    standard deviation of its pixels (RGB in [0, 1]). Flat regions such as sky merge."""

    name = "uniform"

    def __init__(self, thresholds: Sequence[float] = (0.5,) * MAX_LEVEL, patch: int = 16, tau: float = 0.05) -> None:
        super().__init__(thresholds, patch)
        self.tau = tau

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        x = images.float()
        m1 = F.avg_pool2d(x, self.patch)
        m2 = F.avg_pool2d(x * x, self.patch)
        out = []
        for k in range(1, MAX_LEVEL + 1):
            s = 1 << k
            gh, gw = m1.shape[-2] >> k, m1.shape[-1] >> k
            if gh == 0 or gw == 0:
                out.append(x.new_zeros((x.shape[0], gh, gw)))
                continue
            a1 = F.avg_pool2d(m1[..., : gh * s, : gw * s], s)
            a2 = F.avg_pool2d(m2[..., : gh * s, : gw * s], s)
            sigma = (a2 - a1 * a1).clamp_min(0).sqrt().amax(dim=1)
            out.append(torch.exp(-sigma / self.tau))
        return out


def budget_partition(scores: Sequence[np.ndarray], grid: tuple[int, int], reduction: float) -> Partition:
    """The first partition with at most patches / `reduction` tokens, merging greedily bottom-up.

    Starting from the plain grid, the highest-scoring mergeable block is merged next; a block of
    level k >= 2 becomes mergeable once its four children are merged. Every merge removes three
    tokens, so the count lands within three tokens below the target (or at the limit where
    everything that fits is merged), whatever the scale of the scores.
    """
    import heapq

    target = (grid[0] * grid[1]) / reduction
    merged = [np.zeros(level_shape(grid, k), dtype=bool) for k in range(1, len(scores) + 1)]
    heap = [(-float(scores[0][i, j]), 1, i, j) for i, j in zip(*np.nonzero(np.ones(merged[0].shape, bool)))]
    heapq.heapify(heap)
    tokens = grid[0] * grid[1]
    while tokens > target and heap:
        _, k, i, j = heapq.heappop(heap)
        merged[k - 1][i, j] = True
        tokens -= 3
        if k < len(scores):
            pi, pj = i >> 1, j >> 1
            parent = merged[k]
            if pi < parent.shape[0] and pj < parent.shape[1] and merged[k - 1][2 * pi:2 * pi + 2, 2 * pj:2 * pj + 2].all():
                heapq.heappush(heap, (-float(scores[k][pi, pj]), k + 1, pi, pj))
    return partition_from_merges(grid, merged)


class BudgetPolicy(UniformPolicy):
    """A fixed token budget: the most uniform blocks merge first (uniform-policy scores) until the
    image has `reduction`x fewer tokens than 16x16 patching. For speed studies without training."""

    name = "budget"

    def __init__(self, reduction: float = 2.5, patch: int = 16, tau: float = 0.05) -> None:
        super().__init__(patch=patch, tau=tau)
        self.reduction = reduction

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                sample_seeds: Sequence[int] | None = None, thresholds: Sequence[float] | None = None,
                budget: float | None = None) -> PolicyOutput:
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        scores = self.score(images, labels)  # deterministic: no per-image randomness to seed
        host = to_host(scores)
        reduction = self.reduction if budget is None else float(budget)
        parts = [budget_partition([h[b] for h in host], grid, reduction) for b in range(images.shape[0])]
        return PolicyOutput(scores=scores, partitions=parts)


def _conv_bn_act(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def fold_batch_norm(stage: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv + BatchNorm stage's kernel and bias with the norm's running statistics folded in, for
    inference: one convolution instead of a convolution and then a normalisation pass over its whole
    output (the demo's policy at 512 px on 2 CPU threads: 8 images 30 ms instead of 66)."""
    conv, bn = stage[0], stage[1]
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), bias


class FoldedStages:
    """Every conv + BatchNorm + ReLU stage of a policy net with its norm folded (see fold_batch_norm),
    computed once per forward call and applied to each image of the batch."""

    def __init__(self, stages: Sequence[nn.Sequential]) -> None:
        self.kernels = {id(stage): fold_batch_norm(stage) for stage in stages}

    def __call__(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.kernels[id(stage)]
        conv = stage[0]
        return F.relu_(F.conv2d(x, weight, bias, conv.stride, conv.padding))


class MiniBackbone(nn.Module):
    """Five stride-2 convolutions to stride 32: a policy trunk cheap enough for CPU demos."""

    def __init__(self, widths: Sequence[int] = (16, 24, 32, 48, 64)) -> None:
        super().__init__()
        chans = [3, *widths]
        self.stages = nn.Sequential(*[_conv_bn_act(chans[i], chans[i + 1], 2) for i in range(len(widths))])
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


class TimmBackbone(nn.Module):
    """A timm CNN (e.g. efficientnet_lite0, as in CTS) cut at its stride-32 feature map."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(-1,))
        if self.net.feature_info.reduction()[-1] != 32:
            raise ConfigError(f"policy backbone {arch} does not end at stride 32")
        self.out_channels = self.net.feature_info.channels()[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


class PolicyNet(nn.Module):
    """dCTS scorer: stride-32 features give level-1 (32 px) cells; each further stride-2 step
    gives the next level's cells; one 1x1 head per level outputs a merge logit per cell."""

    def __init__(self, backbone: str = "mini", levels: int = MAX_LEVEL, width: int = 64) -> None:
        super().__init__()
        self.trunk: nn.Module = MiniBackbone() if backbone == "mini" else TimmBackbone(backbone)
        cin = self.trunk.out_channels  # type: ignore[attr-defined]
        self.reduce = _conv_bn_act(cin, width, 1)
        self.downs = nn.ModuleList([_conv_bn_act(width, width, 2) for _ in range(levels - 1)])
        self.heads = nn.ModuleList([nn.Conv2d(width, 1, 1) for _ in range(levels)])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, patch: int = 16) -> list[torch.Tensor]:
        """Merge logits per level, cropped to the blocks that fit inside the patch grid.

        At inference the batch norms are folded into their convolutions (FoldedStages), and on the CPU a
        batch is scored one image at a time: the convolutions' large batch activations cost more in fresh
        memory than they save (the demo's net at 512 px: 99 ms for a batch of 8, 33 ms for the 8 images
        in turn), and each image's scores then equal its own alone."""
        folded = None
        if not self.training and not torch.is_grad_enabled():
            stages = [*(self.trunk.stages if isinstance(self.trunk, MiniBackbone) else ()), self.reduce, *self.downs]
            folded = FoldedStages(stages)
        if images.shape[0] > 1 and images.device.type == "cpu" and not self.training:
            per_image = [self._logits(images[i:i + 1], patch, folded) for i in range(images.shape[0])]
            return [torch.cat(level) for level in zip(*per_image)]
        return self._logits(images, patch, folded)

    def _logits(self, images: torch.Tensor, patch: int, folded: FoldedStages | None) -> list[torch.Tensor]:
        def stage(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
            return seq(x) if folded is None else folded(seq, x)

        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        x = (images - self.mean).div_(self.std)
        if folded is not None and isinstance(self.trunk, MiniBackbone):
            for seq in self.trunk.stages:
                x = stage(seq, x)
        else:
            x = self.trunk(x)
        f = stage(self.reduce, x)
        logits = []
        for k, head in enumerate(self.heads, start=1):
            if k > 1:
                f = stage(self.downs[k - 2], f)
            gh, gw = level_shape(grid, k)
            logits.append(head(f)[:, 0, :gh, :gw])
        return logits


class LearnedPolicy(Policy):
    """dCTS: a small CNN predicts, per block, the probability that it is one class."""

    name = "learned"

    def __init__(self, net: PolicyNet, thresholds: Sequence[float] = (0.5,) * MAX_LEVEL, patch: int = 16) -> None:
        super().__init__(thresholds, patch)
        self.net = net

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        return [torch.sigmoid(lg.float()) for lg in self.logits(images)]

    def logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Merge logits per level (B, gh>>k, gw>>k), for scoring and for training the network."""
        if self.patch != NET_PATCH:
            # The CNN's cells are laid out for 16-px patches (one stride-32 cell per 2x2 patches):
            # other patch sizes are resampled so each patch again spans 16 px.
            gh, gw = images.shape[-2] // self.patch, images.shape[-1] // self.patch
            images = F.interpolate(images, size=(gh * NET_PATCH, gw * NET_PATCH), mode="bilinear", align_corners=False)
        return list(self.net(images, NET_PATCH))


def parse_thresholds(text: str | Sequence[float] | float | None, default: Sequence[float]) -> tuple[float, ...]:
    """`0.6` -> the same threshold for every level; `0.9,0.8,0.7,0.6` -> one per level 1..4."""
    if text is None:
        return tuple(default)
    if isinstance(text, (int, float)):
        vals = [float(text)]
    elif isinstance(text, str):
        try:
            vals = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"merge threshold {text!r} is not a number or a comma-separated list of 4 numbers") from None
    else:
        vals = [float(v) for v in text]
    if len(vals) == 1:
        vals = vals * MAX_LEVEL
    if len(vals) != MAX_LEVEL:
        raise ConfigError(f"merge threshold needs 1 or {MAX_LEVEL} values (levels 1-{MAX_LEVEL}), got {len(vals)}")
    if any(not np.isfinite(v) or v < 0 for v in vals):
        raise ConfigError(f"merge thresholds must be >= 0 (above 1 disables a level), got {vals}")
    return tuple(vals)
