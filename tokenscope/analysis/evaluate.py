"""Data-set evaluation of operating points of one model: accuracy and where the tokens went.

Every variant (e.g. full STEP and the same weights without reduction) sees every image; the
numbers come from the same checked traces that `run` writes: mIoU from label maps accumulated
over the data set, token reduction and early exits from the partitions and exit blocks, FLOPs
from the per-image FLOP accounting (2 per multiply-add, policy included).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pandas as pd
import torch

from tokenscope import dist
from tokenscope.analysis.metrics import confusion, iou_per_class, mean_iou
from tokenscope.analysis.stability import tails
from tokenscope.analysis.uncertainty import Interval, miou_change_interval, miou_interval
from tokenscope.analysis.uncertainty import class_counts as counts_of
from tokenscope.data.classspace import ClassSpace, dataset_space
from tokenscope.analysis.windowed import predict
from tokenscope.data.datasets import SegmentationDataset
from tokenscope.data.images import prepare_image
from tokenscope.data.windows import WindowSpec
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.methods.registry import PluginError
from tokenscope.models.step_vit import ReductionSetting
from tokenscope.trace.capture import TraceCapture

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class OperatingPoint:
    """A policy and exit setting of one model; thresholds left None keep the model's own.

    `setting` (a whole ReductionSetting, e.g. one method's) wins over the other fields when given.
    A point with policy none and no exits is the plain baseline: it also runs without any method's
    steps; otherwise the model's own steps (merging, pruning), if any, stay on.
    """

    name: str
    policy: str
    exits: bool
    merge_thresholds: tuple[float, ...] | None = None
    exit_threshold: float | None = None
    setting: ReductionSetting | None = None

    def resolve(self, saved: ReductionSetting) -> ReductionSetting:
        """The full setting this point means, given the command's own (`saved`)."""
        if self.setting is not None:
            return self.setting
        plain = self.policy == "none" and not self.exits
        return replace(saved, policy=self.policy, exits=self.exits,
                       merge_thresholds=self.merge_thresholds or saved.merge_thresholds,
                       exit_threshold=saved.exit_threshold if self.exit_threshold is None else self.exit_threshold,
                       steps=() if plain else saved.steps, size_weighted=False if plain else saved.size_weighted,
                       record={} if plain else saved.record, method="vit" if plain else saved.method)


@dataclass
class VariantScores:
    """Totals for one operating point over a data set."""

    name: str
    confusion: np.ndarray
    patches: int = 0
    tokens: int = 0
    exited_tokens: int = 0
    exited_patches: int = 0
    pruned_tokens: int = 0
    merged_tokens: int = 0
    flops: int = 0
    images: int = 0
    windows: int = 0
    """Forward passes: one per image, or one per sliding window."""
    forward_s: float = 0.0
    block_tokens: float = 0.0
    """Tokens summed over blocks and images: what FLOPs follow, for every method alike."""
    groups: int = 0
    """Tokens that exited or reached the end (a group merged inside the encoder counts once)."""
    depth: int = 0
    per_image: list[tuple[str, float, int, float]] = field(default_factory=list)
    """(image, latency ms, tokens in, GFLOPs) of every image: the distributions behind the means."""
    class_counts: list[np.ndarray] = field(default_factory=list)
    """(3, C) intersection / target / predicted pixels per class of every image, in the order of
    `per_image`: what the bootstrap intervals resample."""

    COUNTS = ("patches", "tokens", "exited_tokens", "exited_patches", "pruned_tokens", "merged_tokens", "flops", "images",
              "windows", "forward_s", "block_tokens", "groups")

    def add_up(self, ctx: dist.Context) -> None:
        """Sum the totals of every rank into this one (a no-op in a single process)."""
        if not ctx.active:
            return
        self.per_image = [row for rank_rows in dist.gather(ctx, self.per_image) for row in rank_rows]
        self.class_counts = [c for rank_rows in dist.gather(ctx, self.class_counts) for c in rank_rows]
        self.confusion = dist.all_reduce_sum(ctx, self.confusion)
        totals = dist.all_reduce_sum(ctx, np.array([float(getattr(self, k)) for k in self.COUNTS]))
        for k, v in zip(self.COUNTS, totals):
            setattr(self, k, float(v) if k in ("forward_s", "block_tokens") else int(round(v)))

    @property
    def miou(self) -> float:
        return mean_iou(self.confusion)

    def miou_interval(self) -> Interval:
        """mIoU with its 95% bootstrap interval over the images."""
        return miou_interval(self.class_counts)

    def miou_change(self, reference: "VariantScores") -> Interval:
        """mIoU minus the reference's on the same images, with a paired 95% bootstrap interval."""
        return miou_change_interval(self.class_counts, reference.class_counts)

    @property
    def reduction(self) -> float:
        return self.patches / max(self.tokens, 1)

    @property
    def exited_pct(self) -> float:
        """Tokens that left at an exit gate, % of the tokens (pruned and merged ones are counted apart)."""
        return 100.0 * self.exited_tokens / max(self.tokens, 1)

    @property
    def pruned_pct(self) -> float:
        return 100.0 * self.pruned_tokens / max(self.tokens, 1)

    @property
    def merged_pct(self) -> float:
        return 100.0 * self.merged_tokens / max(self.tokens, 1)

    @property
    def exited_patch_pct(self) -> float:
        return 100.0 * self.exited_patches / max(self.patches, 1)

    @property
    def mean_tokens_per_block(self) -> float:
        """Tokens an average block works on per forward pass (image or window)."""
        return self.block_tokens / max(self.windows * self.depth, 1)

    @property
    def block_token_reduction(self) -> float:
        """Patches over mean tokens per block: the token reduction that exits and merges count in."""
        return self.patches / max(self.windows, 1) / max(self.mean_tokens_per_block, 1e-9)

    @property
    def gflops_per_image(self) -> float:
        return self.flops / 1e9 / max(self.images, 1)

    def tails(self) -> dict[str, object]:
        """Percentiles of latency, tokens and GFLOPs over the images (see analysis/stability.py)."""
        return tails(pd.DataFrame(self.per_image, columns=["image", "forward_ms", "tokens", "gflops"]))

    def as_dict(self, class_names: tuple[str, ...] = ()) -> dict[str, object]:
        ious = iou_per_class(self.confusion)
        return {
            "variant": self.name, "images": self.images, "windows": self.windows, "miou": self.miou,
            "miou_ci": self.miou_interval().as_dict(), "patches": self.patches,
            "tokens": self.tokens, "token_reduction": self.reduction, "exited_early_pct": self.exited_pct,
            "exited_pct": self.exited_pct, "pruned_pct": self.pruned_pct, "merged_pct": self.merged_pct,
            "exited_early_patch_pct": self.exited_patch_pct, "gflops_per_image": self.gflops_per_image,
            "forward_ms_per_image": 1e3 * self.forward_s / max(self.images, 1),
            "mean_tokens_per_block": self.mean_tokens_per_block, "block_token_reduction": self.block_token_reduction,
            "tails": self.tails(),
            "iou_per_class": {(class_names[c] if c < len(class_names) else str(c)): (None if np.isnan(v) else float(v))
                              for c, v in enumerate(ious)},
        }


@dataclass
class EvalResult:
    variants: dict[str, VariantScores] = field(default_factory=dict)
    class_space: ClassSpace | None = None
    """How the data's labels were matched to the model's classes (its `condition` goes beside every mIoU)."""
    failed: dict[str, str] = field(default_factory=dict)
    """Operating points whose plug-in failed (name -> its one line); their scores are left out."""


def evaluate(loaded: LoadedModel, dataset: SegmentationDataset, points: list[OperatingPoint], device: torch.device,
             progress: Progress | None = None, amp: bool = False, size: int | None = None,
             windows: WindowSpec | None = None, data_label: str = "the data set", class_map: str | None = None,
             ignore_class_mismatch: bool = False) -> EvalResult:
    """Run every operating point on every sample, each forward given its point's setting.

    A point whose plug-in fails is recorded in `EvalResult.failed` and left out from then on, while
    the others go on (in one process; under torchrun the failure stops the job on every rank).

    An unlabelled data set (`images`) is scored against the unreduced model's own predictions, so
    mIoU then says how much of the plain network's output a reduction keeps.

    With `windows`, each image is scored with the sliding-window protocol (size must be None).
    The data's classes must be the model's (checked before any image, so a mismatch costs
    nothing) unless `class_map` (a file) maps them or `ignore_class_mismatch` waives the check;
    either is in `EvalResult.class_space.condition`, for printing beside every mIoU.
    """
    model = loaded.model
    cfg = loaded.config
    space = dataset_space(cfg.name, cfg.class_names, cfg.num_classes, dataset, data_label, class_map,
                          ignore_class_mismatch)
    own = loaded.setting if loaded.setting is not None else model.default_setting()
    c = loaded.config.num_classes
    result = EvalResult({p.name: VariantScores(p.name, np.zeros((c, c), dtype=np.int64)) for p in points}, space)
    captures = {p.name: TraceCapture(loaded, device, p.resolve(own), amp=amp) for p in points}
    ctx = dist.context(device.type)  # under torchrun each rank scores its share, then counts are added
    mine = ctx.shard(range(len(dataset)))
    unlabelled = bool(getattr(dataset, "unlabelled", False))
    plain = next(iter(captures.values())).at(own.plain())  # without labels, the reference for every point
    for n, i in enumerate(mine):
        sample = dataset[i]
        if progress:
            progress(n, len(mine), sample.name)
        labels = None if sample.labels is None else space.labels(sample.labels, sample.name)
        prepared = prepare_image(sample.image, sample.name, size=size, labels=labels, patch=model.patch_size)
        reference = None
        if unlabelled:
            reference = predict(plain, prepared, windows).label_map
        for p in points:
            if p.name in result.failed:
                continue
            try:
                pred = predict(captures[p.name], prepared, windows)
            except PluginError as exc:
                if ctx.active or p.setting is None:
                    raise
                result.failed[p.name] = str(exc)
                continue
            s = result.variants[p.name]
            truth = pred.labels if reference is None else reference
            image_conf = confusion(pred.label_map, truth, c)  # type: ignore[arg-type]
            s.confusion += image_conf
            s.class_counts.append(counts_of(image_conf))
            s.patches += pred.patches
            s.tokens += pred.tokens
            fates = pred.fate_totals()
            s.exited_tokens += fates["tokens_exited"]
            s.exited_patches += fates["patches_exited"]
            s.pruned_tokens += fates["tokens_pruned"]
            s.merged_tokens += fates["tokens_merged"]
            s.flops += pred.flops
            s.forward_s += pred.forward_s
            s.windows += len(pred.traces)
            s.block_tokens += pred.block_tokens
            s.groups += pred.groups
            s.per_image.append((sample.name, 1e3 * pred.forward_s, int(pred.tokens), pred.flops / 1e9))
            s.depth = model.depth
            s.images += 1
    if progress:
        progress(len(mine), len(mine), "")
    for name in result.failed:  # a point that failed part-way is not scored over fewer images
        result.variants.pop(name, None)
    for scores in result.variants.values():
        scores.add_up(ctx)
    return result
