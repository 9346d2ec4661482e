"""Run a model on prepared images under a Recorder and assemble one checked Trace per image."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from tokenscope.data.images import PreparedImage, patch_majority_labels
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.cost import CostModel, cost_model, measure_flops
from tokenscope.models.partition import grid_partition
from tokenscope.models.runtime import Stopwatch, inference, synchronize
from tokenscope.models.step_vit import ReductionSetting, StepOutput
from tokenscope.trace.recorder import ImageRecord, Recorder
from tokenscope.trace.trace import Trace, TraceMeta


def images_to_tensor(images: list[PreparedImage], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack same-sized prepared images (and their label maps, if all have one)."""
    shapes = {im.padded_hw for im in images}
    if len(shapes) != 1:
        raise ValueError(f"a batch needs one padded size, got {sorted(shapes)}")
    x = torch.from_numpy(np.stack([im.tensor_rgb for im in images])).to(device)
    labels = None
    if all(im.labels is not None for im in images):
        labels = torch.from_numpy(np.stack([im.labels for im in images])).to(device)  # type: ignore[misc]
    return x, labels


def merging_meta(setting: ReductionSetting) -> dict[str, object]:
    """An operating point's in-network merging settings, as a trace records them (empty when off): the
    method's own record, and the blocks its merging steps act in, taken from the steps themselves (a
    method never has to list them)."""
    steps = [s for s in setting.steps if s.does == "merge"]
    if not steps:
        return {}
    record = dict(setting.record.get("merging") or {})
    record.setdefault("kind", setting.method.split(":")[0] or "merge")
    record["blocks"] = sorted({s.block for s in steps})
    if setting.reconstruction is not None:  # merged tokens are rebuilt, each with its own prediction
        record["reconstructed"] = True
    return record


def pruning_meta(setting: ReductionSetting) -> dict[str, object]:
    """Where an operating point's pruning steps act, as a trace records them (empty without pruning):
    the method's own record plus the `inside` and `after` blocks of its steps."""
    steps = [s for s in setting.steps if s.does == "prune"]
    if not steps:
        return {}
    record = dict(setting.record.get("pruning") or {})
    record["inside"] = sorted({s.block for s in steps if s.place == "inside"})
    record["after"] = sorted({s.block for s in steps if s.place == "after"})
    return record


def _row(out: StepOutput, i: int) -> StepOutput:
    """Image i of a batch's output, as a batch of one (for per-image label maps)."""
    masks = None if out.masks is None else (out.masks[0][i:i + 1], out.masks[1][i:i + 1])
    return dataclasses.replace(out, patch_logits=out.patch_logits[i:i + 1], masks=masks)


def baseline_flops(cost: CostModel, num_patches: int) -> int:
    """FLOPs of the same network with plain patching and no exits (no policy to run)."""
    return cost.total(num_patches, [num_patches] * len(cost.blocks), [], num_patches)


@dataclass
class TraceCapture:
    """Turns images into traces with one loaded model on one device.

    Policy FLOPs are measured with torch's counter once per policy and input size and cached;
    everything else is computed from the recorded token counts with the analytic cost model.
    """

    loaded: LoadedModel
    device: torch.device
    setting: ReductionSetting | None = None
    """The operating point every forward of this capture runs (None: the one the command resolved,
    `loaded.setting`, else the model's own)."""
    amp: bool = False
    _policy_flops: dict[tuple[str, tuple[int, int]], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cost = cost_model(self.loaded.model)
        if self.setting is None:
            self.setting = self.loaded.setting if self.loaded.setting is not None else self.loaded.model.default_setting()

    def at(self, setting: ReductionSetting) -> "TraceCapture":
        """The same capture for another operating point (the cost model and policy FLOPs cache shared)."""
        other = copy.copy(self)
        other.setting = setting
        return other

    def policy_flops(self, x: torch.Tensor, labels: torch.Tensor | None) -> int:
        policy = self.loaded.model.policy_of(self.setting)
        key = (self.setting.policy, (int(x.shape[-2]), int(x.shape[-1])))
        if key not in self._policy_flops:
            with inference(self.device, self.amp):
                total, _, _ = measure_flops(lambda: policy.score(x[:1], None if labels is None else labels[:1]))
            self._policy_flops[key] = total
        return self._policy_flops[key]

    def __call__(self, images: list[PreparedImage]) -> list[Trace]:
        return self.run(images)[0]

    def run(self, images: list[PreparedImage]) -> tuple[list[Trace], torch.Tensor]:
        """Traces of a batch and its logits for stitching, float32 on the CPU: un-merged patch logits
        (B, C, gh, gw), or a mask head's per-pixel scores (B, C, H, W) at the padded size."""
        model = self.loaded.model
        x, labels = images_to_tensor(images, self.device)
        with inference(self.device, self.amp), Recorder(model, self.setting) as rec:
            synchronize(self.device)
            with Stopwatch(self.device) as watch:  # CUDA events on a GPU
                out = model(x, labels, setting=self.setting)
            forward_s = watch.seconds
            records = rec.pop_records()
            pad = images[0].padded_hw  # one padded size per batch (images_to_tensor)
            logits = model.pixel_logits(out, pad)  # a mask head's per-pixel scores are computed once, here
            maps = [model.label_maps(_row(out, i), pad, im.input_hw, logits[i:i + 1])[0].cpu().numpy()
                    for i, im in enumerate(images)]
            logits = logits.float().cpu()
        policy_flops = self.policy_flops(x, labels)
        traces = [self._trace(im, rec_, lm, policy_flops, forward_s, len(images))
                  for im, rec_, lm in zip(images, records, maps)]
        return traces, logits

    def _trace(self, im: PreparedImage, rec: ImageRecord, label_map: np.ndarray, policy_flops: int,
               forward_s: float, batch: int) -> Trace:
        if not np.array_equal(rec.exit_block, rec.model_exit_block):
            raise AssertionError(f"{im.source}: exits seen by the gate hooks differ from the model's own record")
        if rec.model_owner is not None and not np.array_equal(rec.owner, rec.model_owner):
            raise AssertionError(f"{im.source}: merges seen by the merger hooks differ from the model's own record")
        if rec.model_pruned is not None and not np.array_equal(rec.pruned_at > 0, rec.model_pruned):
            raise AssertionError(f"{im.source}: prunes seen by the step hooks differ from the model's own record")
        model, cfg, part, setting = self.loaded.model, self.loaded.config, rec.partition, self.setting
        mid = None if rec.block_tokens_mid is None else rec.block_tokens_mid.tolist()
        block_flops = self.cost.block_flops(rec.block_tokens_in.tolist(), mid)
        gate_in = [rec.gate_tokens_in.get(k, 0) for k in model.exit_after]
        if setting.reconstruction is not None and rec.merged_at is not None:  # every token rebuilt and decoded
            final = int(np.sum(rec.exit_block == model.depth))
        else:
            alive = np.arange(part.num_tokens) if rec.merged_into is None else np.nonzero(rec.merged_into < 0)[0]
            final = int(np.sum(rec.exit_block[alive] == model.depth))  # a merged group is decoded once
            if rec.pruned_at is not None:  # pruned tokens are decoded from the features they had then
                final += int(np.sum(rec.pruned_at[alive] > 0))
        flops = {
            "policy": policy_flops,
            "embed": part.num_tokens * self.cost.embed_per_token,
            "blocks": int(sum(block_flops)),
            "gates": int(sum(gate_in)) * self.cost.gate_per_token,
            "decoder": self.cost.decoder.flops(self.cost.decoder_tokens(part.num_tokens, final, part.grid[0] * part.grid[1])),
        }
        if rec.merged_at is not None:
            flops["merging"] = int(rec.matching_flops)
        if rec.pruned_at is not None:
            flops["pruning"] = int(rec.scoring_flops)
        if setting.exit_steps:
            flops["exiting"] = int(rec.exit_flops)
        flops["total"] = int(sum(flops.values()))
        flops["baseline_total"] = baseline_flops(self.cost, grid_partition(part.grid).num_tokens)
        meta = TraceMeta(
            source=im.source, original_hw=im.original_hw, input_hw=im.input_hw, padded_hw=im.padded_hw,
            grid=part.grid, model=cfg.name, arch=cfg.arch, depth=model.depth,
            num_prefix_tokens=model.num_prefix_tokens,
            exit_after=tuple(sorted(set(model.exit_after) | {st.block for st in setting.exit_steps})),
            exit_threshold=setting.exit_threshold if model.gates else float("nan"),
            merge_thresholds=setting.merge_thresholds, policy=setting.policy,
            exits=setting.exits or bool(setting.exit_steps),
            weights=self.loaded.weights_id, keep_per_class=setting.keep_per_class if setting.exits and model.gates else 0,
            method=setting.method, merging=merging_meta(setting), pruning=pruning_meta(setting),
            queries=int(getattr(model.decoder, "num_queries", 0)), queries_join_at=model.joins_at,
            num_classes=cfg.num_classes, class_names=cfg.class_names, class_colours=cfg.class_colours,
            device=str(self.device),
            flops=flops, timings={"forward_s": forward_s / batch, "batch": float(batch)},
        )
        trace = Trace(
            meta=meta, token_of_patch=part.token_of_patch, token_level=part.level, token_row=part.row,
            token_col=part.col, token_exit_block=rec.exit_block, token_confidence=rec.confidence,
            token_class=rec.predicted, block_tokens_in=rec.block_tokens_in, block_flops=np.asarray(block_flops),
            label_map=label_map, policy_scores=rec.policy_scores,
            patch_labels=None if im.labels is None else patch_majority_labels(im.labels, model.patch_size),
            token_held_at=rec.held_at, token_merged_at=rec.merged_at, token_merged_into=rec.merged_into,
            block_tokens_mid=rec.block_tokens_mid, token_pruned_at=rec.pruned_at,
        )
        trace.assert_consistent()
        return trace
