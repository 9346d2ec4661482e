"""`tokenscope train` and `tokenscope evaluate`: fit a STEP model, then measure what it does."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tokenscope import dist
from tokenscope.analysis.evaluate import EvalResult, OperatingPoint, Progress, evaluate
from tokenscope.data.classes import SEGMENTER_PROTOCOL, dataset_classes
from tokenscope.data.datasets import SegmentationDataset, SyntheticDataset, open_dataset, parse_seeds
from tokenscope.data.windows import resolve_windows
from tokenscope.errors import ConfigError
from tokenscope.models.checkpoints import LoadedModel, checkpoint_paths, load_checkpoint, save_checkpoint
from tokenscope.models.resolve import build_model, load_published, new_model
from tokenscope.models.decoders import DECODERS
from tokenscope.models.methods.facts import facts_of
from tokenscope.models.methods.point import resolve
from tokenscope.models.published import PUBLISHED
from tokenscope.models.registry import StepConfig, resolve_config
from tokenscope.models.methods.base import Plan
from tokenscope.models.step_vit import ReductionSetting, StepViT
from tokenscope.storage import check_writable, output_lock, writing
from tokenscope.models.runtime import resolve_device
from tokenscope.train.trainer import Trainer, TrainProgress, TrainSettings, TrainState


@dataclass
class DataOptions:
    kind: str = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    train_seeds: str = "0:2000"
    val_seeds: str = "900000:900100"
    size: int = 512


def training_data(d: DataOptions) -> SegmentationDataset:
    if d.kind == "synthetic":
        return SyntheticDataset(parse_seeds(d.train_seeds), d.size, d.size)
    return open_dataset(d.kind, d.root, d.train_split)


def validation_data(d: DataOptions) -> SegmentationDataset:
    if d.kind == "synthetic":
        return open_dataset("synthetic", seeds=d.val_seeds, size=d.size)
    return open_dataset(d.kind, d.root, d.val_split)


def step_and_baseline(policy: str, exits: bool, saved: ReductionSetting) -> list[OperatingPoint]:
    """The model's operating point ("step") and the same weights without reduction. The step point
    is the model's whole setting (`saved`) at `policy`/`exits`, so its in-network merging stays on
    and a ToMe or ALGM model (policy none, no exits) is not mistaken for the plain one."""
    return [OperatingPoint("step", policy, exits, setting=replace(saved, policy=policy, exits=exits)),
            OperatingPoint("baseline", "none", False)]


@dataclass
class TrainResult:
    checkpoint: Path
    state: TrainState
    evaluation: EvalResult | None
    metrics: dict[str, Any]


def train_model(model: str, out: str | Path, data: DataOptions, settings: TrainSettings, device: str = "auto",
                backbone_weights: str | None = None, resume: bool = False, evaluate_after: bool = True,
                progress: TrainProgress | None = None, eval_progress: Progress | None = None,
                decoder: str | None = None, keep_per_class: int | None = None, overwrite: bool = False) -> TrainResult:
    """Train `model` (a registry name) on `data`; checkpoint to `out` (NAME.json + NAME.safetensors).

    `decoder` (linear or mask) chooses the decoder of a new model; a fine-tuned one keeps its own.
    An existing checkpoint at `out` is continued with `resume`, replaced with `overwrite` (the old
    files kept beside it as NAME.backup-STAMP.*), and otherwise refused: training never silently
    replaces a model. The checkpoint is held (a file lock) from that check to the last write, so two
    trainings with one --out cannot both believe they wrote it."""
    settings.check()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes; it holds the lock
        return _train_model(model, out, data, settings, device, backbone_weights, resume, evaluate_after, progress,
                            eval_progress, decoder, keep_per_class, overwrite)
    with output_lock(checkpoint_paths(out)[1], "checkpoint"):
        return _train_model(model, out, data, settings, device, backbone_weights, resume, evaluate_after, progress,
                            eval_progress, decoder, keep_per_class, overwrite)


def _train_model(model: str, out: str | Path, data: DataOptions, settings: TrainSettings, device: str,
                 backbone_weights: str | None, resume: bool, evaluate_after: bool, progress: TrainProgress | None,
                 eval_progress: Progress | None, decoder: str | None, keep_per_class: int | None,
                 overwrite: bool) -> TrainResult:
    protect_checkpoint(out, resume, overwrite)
    dev = resolve_device(device)
    train_set = training_data(data)
    torch.manual_seed(settings.seed)
    if settings.init:
        if decoder is not None:
            raise ConfigError("--decoder builds a new model; with --init the checkpoint's decoder is kept")
        net = initial_checkpoint(settings.init, train_set, backbone_weights)
    else:
        cfg = resolve_config(model)
        if decoder is not None:
            if decoder not in DECODERS:
                raise ConfigError(f"--decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
            cfg = cfg.replace(decoder=decoder)
        if cfg.num_classes != train_set.num_classes or (train_set.class_names and cfg.class_names != train_set.class_names):
            cfg = StepConfig(**{**cfg.to_dict(), "num_classes": train_set.num_classes, "class_names": train_set.class_names,
                                "class_colours": cfg.class_colours if cfg.num_classes == train_set.num_classes else ()})
        if data.kind in SEGMENTER_PROTOCOL:
            # the checkpoint carries its data set's palette and evaluation protocol, as imported ones do
            window, stride, short = SEGMENTER_PROTOCOL[data.kind]
            cfg = cfg.replace(dataset=data.kind, class_colours=dataset_classes(data.kind, cfg.num_classes).palette,
                              window=window, stride=stride, resize_short=short)
        net = new_model(cfg, backbone_weights)
    refuse_eomt(net)
    plan = training_plan(settings.method, net)
    if keep_per_class is not None:  # train (exit-aware steps) and ship with DToP's context rule
        net.cfg = net.cfg.replace(keep_per_class=keep_per_class)
    loaded = LoadedModel(net, net.cfg, {}, "training", "training")
    trainer = Trainer(loaded, train_set, settings, out, dev, cache=data.kind == "synthetic",
                      setting=with_training_plan(net.default_setting(), plan, settings.method))
    if resume:
        trainer.resume()
    state = trainer.fit(progress)
    metrics: dict[str, Any] = {}
    evaluation = None
    if evaluate_after:
        final = load_checkpoint(out)
        final.model.to(dev)
        # a model trained with a method is evaluated with it
        final.setting = with_training_plan(final.model.default_setting(), plan, settings.method).to(dev)
        cfg = final.config
        windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, None, None, None)
        policy = "none" if plan is not None and plan.policy == "none" else "learned"
        exits = plan is None or plan.exits
        evaluation = evaluate(final, validation_data(data), step_and_baseline(policy, exits, final.setting),
                              dev, eval_progress,
                              windows=windows)
        metrics = {k: v.as_dict(final.config.class_names) for k, v in evaluation.variants.items()}
        meta = {**final.metadata, "evaluation": {"data": data.__dict__, "thresholds": {
            "merge": list(final.setting.merge_thresholds), "exit": final.setting.exit_threshold}, "variants": metrics}}
        if trainer.ctx.is_writer:
            save_checkpoint(final.model, out, trained=final.trained, metadata=meta)
        dist.barrier(trainer.ctx, "evaluated checkpoint written")
    return TrainResult(Path(out), state, evaluation, metrics)


def protect_checkpoint(out: str | Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to write over an existing checkpoint unless resuming or told to overwrite; with
    `overwrite`, move the old files aside first (returned). Also refuses an unwritable folder now,
    before any training step."""
    tensors, meta = checkpoint_paths(out)
    state = tensors.with_suffix(".train.pt")
    existing = [p for p in (meta, tensors, state) if os.path.lexists(p)]  # a dangling link counts too
    check_writable(tensors.parent)
    if resume:
        if overwrite:
            raise ConfigError("--resume continues the checkpoint at --out and --overwrite replaces it; give one")
        return []
    if not existing:
        return []
    if not overwrite:
        raise ConfigError(f"{existing[0]} exists (a checkpoint); --resume continues it, --overwrite replaces it "
                          "(keeping the old files as a backup), or choose another --out")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for p in existing:
        backup = p.with_name(p.name.replace(meta.stem, f"{meta.stem}.backup-{stamp}", 1))
        with writing(backup):
            os.replace(p, backup)
        moved.append(backup)
    return moved


def training_plan(method: str, net: StepViT) -> Plan | None:
    """The plan a `train --method` run trains with (None for STEP alone): a method that acts inside
    or after blocks (tome, algm, a pruning method, or X+tome ...), at its defaults or the settings
    given. Methods that only choose how tokens enter or exit are what train does without --method."""
    if not method:
        return None
    point = resolve(method)
    plan = point.plan(facts_of(net, {"policy": True, "exits": True}, "learned"))
    if not plan.steps or plan.policy_module is not None:
        raise ConfigError(f"train --method takes a merging method (or one that prunes inside the encoder: tome, algm, "
                          f"X+tome ...), not {method!r}; STEP, dcts and dtop are what train does without --method")
    return plan


def with_training_plan(setting: ReductionSetting, plan: Plan | None, method: str) -> ReductionSetting:
    """`setting` with a training plan's steps (unchanged without a plan): the value training and the
    evaluation after it pass to every forward."""
    if plan is None:
        return setting
    return replace(setting, steps=plan.steps, size_weighted=plan.size_weighted, record=dict(plan.record),
                   method=method or "")


def refuse_eomt(net: StepViT) -> None:
    """EoMT's head is trained with its own mask-classification loss (Hungarian matching), not here."""
    if getattr(net.decoder, "inside_encoder", False):
        raise ConfigError("tokenscope does not train EoMT models (their mask-classification loss with Hungarian "
                          "matching is EoMT's own); run, compare, sweep and bench them as they are")


def initial_checkpoint(path: str, train_set: SegmentationDataset, backbone_weights: str | None) -> StepViT:
    """The model to continue training from (fine-tuning): a tokenscope checkpoint, a Segmenter or
    mmsegmentation checkpoint, or a published model's name (fetched once).

    Its architecture and classes come from the checkpoint, so they must fit the data."""
    if backbone_weights:
        raise ConfigError("--init and --backbone-weights both set the starting weights; give one")
    start = load_published(path) if path in PUBLISHED else build_model("demo", weights=path)
    refuse_eomt(start.model)
    if start.config.num_classes != train_set.num_classes:
        raise ConfigError(f"--init {path} predicts {start.config.num_classes} classes but the data has "
                          f"{train_set.num_classes}")
    return start.model


def evaluate_model(loaded: LoadedModel, device: torch.device, data: DataOptions, policy: str,
                   progress: Progress | None = None, window: int | None = None, stride: int | None = None,
                   amp: bool = True, class_map: str | None = None, ignore_class_mismatch: bool = False) -> EvalResult:
    """STEP (the model's policy and exit setting) against the same weights without reduction.

    Images are scored with the model's sliding-window protocol when it has one (`--window`);
    the data's classes must be the model's unless `class_map` maps them or the check is waived."""
    cfg = loaded.config
    windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, window, stride, None,
                              loaded.model.patch_size)
    own = loaded.setting if loaded.setting is not None else loaded.model.default_setting()
    points = step_and_baseline(policy, own.exits, own)
    return evaluate(loaded, validation_data(data), points, device, progress, amp=amp, windows=windows,
                    data_label=data.kind, class_map=class_map, ignore_class_mismatch=ignore_class_mismatch)
