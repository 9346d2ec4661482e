"""From command-line choices to a configured model on a device: shared by every command."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from tokenscope.data.classspace import ClassSpace, class_space, dataset_space
from tokenscope.data.images import find_label_for, load_label_map
from tokenscope.errors import ConfigError, TokenscopeError
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.resolve import build_model
from tokenscope.models.methods.base import Plan
from tokenscope.models.methods.facts import facts_of, with_plan
from tokenscope.models.methods.point import ResolvedPoint, resolve
from tokenscope.models.policy import POLICY_NAMES, parse_thresholds
from tokenscope.models.runtime import resolve_device
from tokenscope.models.step_vit import ReductionSetting

EXIT_MODES = ("learned", "none")


@dataclass
class ModelOptions:
    """What the user asked for; `None` means "the model's own default"."""

    model: str = "demo"
    weights: str | None = None
    random_init: bool = False
    policy: str | None = None
    merge_threshold: str | None = None
    exit_threshold: float | None = None
    exits: str | None = None
    device: str = "auto"
    seed: int = 0
    num_classes: int | None = None
    budget: float | None = None
    """Token reduction factor for the `budget` policy (implies it when no policy is named)."""
    amp: bool = True
    """bf16 autocast on CUDA (no effect on the CPU)."""
    keep_per_class: int | None = None
    """DToP's context rule at the exit gates (None = the model's own, normally 0 = off)."""
    method: str | None = None
    """The operating point: a method with its settings (`tome:r=16`, `step:exit=0.9`, `dtop+tome`,
    `./my_rule.py:frac=0.2`; see models/methods/). None: policy and exits alone decide."""
    class_map: str | None = None
    """A file mapping the data's class ids (or names) to the model's (see data/classspace.py)."""
    ignore_class_mismatch: bool = False
    """Score even when the model's classes are not the data's (recorded and printed beside every mIoU)."""
    backbone: str | None = None
    """The DINOv3 model (a folder or hf:ORG/NAME) an EoMT-DINOv3 release of deltas adds to."""


LEGACY_FLAGS = {"tome_r": "r", "algm_threshold": "threshold", "algm_global_threshold": "global",
                "prop_attn": "prop", "cts_groups": "groups", "merge_order": "order", "merge_count": "count"}
"""Per-method options of earlier versions, now settings of the operating point (`tome:r=16`)."""


def options_from_record(record: dict[str, object]) -> ModelOptions:
    """ModelOptions from a run folder's record; an earlier version's per-method options become the
    operating point's settings, so its runs replay as they ran."""
    d = dict(record)
    extra = []
    for key, setting in LEGACY_FLAGS.items():
        value = d.pop(key, None)
        if value is not None:
            if isinstance(value, bool):
                value = "on" if value else "off"
            extra.append(f"{setting}={value}")
    if extra and d.get("method"):
        d["method"] = ":".join([str(d["method"]), *extra])
    return ModelOptions(**d)  # type: ignore[arg-type]


def load_model(opts: ModelOptions, have_labels: bool = False, loaded: LoadedModel | None = None,
               shared: bool = False) -> tuple[LoadedModel, torch.device]:
    """Build the model, resolve the operating point `opts` name (once: `loaded.setting`, the value every
    forward of this command is given) and move both to the device. With `loaded`, that model is used
    instead of building one again."""
    device = resolve_device(opts.device)
    check_options(opts)
    if loaded is None:
        loaded = build_model(opts.model, opts.weights, opts.random_init, opts.seed, opts.num_classes, opts.backbone)
    setting = resolve_setting(loaded, opts, have_labels, shared)
    loaded.model.to(device).eval()
    loaded.setting = setting.to(device)
    return loaded, device


def check_options(opts: ModelOptions) -> None:
    """The shared model options' own ranges, in one line each."""
    if opts.policy is not None and opts.policy not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {opts.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
    if opts.exits is not None and opts.exits not in EXIT_MODES:
        raise ConfigError(f"unknown exit mode {opts.exits!r}; choose one of {', '.join(EXIT_MODES)}")
    if opts.budget is not None and not (math.isfinite(opts.budget) and 1.0 <= opts.budget <= 1e6):
        raise ConfigError(f"--budget is a token reduction factor of at least 1 (e.g. 2.5), got {opts.budget}")
    if opts.keep_per_class is not None and not 0 <= opts.keep_per_class <= 1_000_000:
        raise ConfigError(f"--keep-per-class must be 0 (off) or a positive count, got {opts.keep_per_class}")
    if opts.exit_threshold is not None and not (0.0 <= opts.exit_threshold <= 1.0):
        raise ConfigError(f"--exit-threshold must be between 0 and 1, got {opts.exit_threshold}")


def resolve_setting(loaded: LoadedModel, opts: ModelOptions, have_labels: bool = False,
                    shared: bool = False) -> ReductionSetting:
    """The operating point `opts` mean on `loaded`, as one value; the model is not touched.

    A learned policy or learned exits on weights where that part was never trained would show
    noise as if it were a finding, so it is refused unless the user chose random weights.
    `shared`: the options are shared by several operating points (a comparison), so --policy
    applies to the methods that leave it open instead of contradicting those that fix it.
    """
    check_options(opts)
    point = resolve(opts.method) if opts.method is not None else None
    cfg, model = loaded.config, loaded.model
    thresholds = parse_thresholds(opts.merge_threshold, cfg.merge_thresholds)
    exit_threshold = opts.exit_threshold if opts.exit_threshold is not None else cfg.exit_threshold
    user_policy = opts.policy or ("budget" if opts.budget is not None else loaded.default_policy())
    keep = opts.keep_per_class if opts.keep_per_class is not None else cfg.keep_per_class
    own = model.default_setting()
    base = replace(own.plain(), policy=user_policy, exits=loaded.default_exits() if opts.exits is None else
                   opts.exits == "learned", merge_thresholds=thresholds, exit_threshold=exit_threshold,
                   keep_per_class=keep, budget=opts.budget if opts.budget is not None else own.budget,
                   method="")
    setting = base
    if point is not None:
        facts = facts_of(model, loaded.trained, loaded.default_policy(), user_policy, thresholds, exit_threshold,
                         opts.keep_per_class)
        plan = point.plan(facts)
        policy, exits = _policy_and_exits(point, plan, opts, user_policy, shared)
        setting = replace(with_plan(base, plan, point.text), policy=policy, exits=exits,
                          merge_thresholds=plan.merge_thresholds or thresholds,
                          exit_threshold=exit_threshold if plan.exit_threshold is None else plan.exit_threshold,
                          keep_per_class=keep if plan.keep_per_class is None else plan.keep_per_class,
                          budget=base.budget if plan.budget is None else plan.budget)
    if opts.budget is not None and setting.policy != "budget":
        raise ConfigError(f"--budget applies to --policy budget, not {setting.policy!r}")
    untrained = opts.random_init is False
    if setting.policy == "learned" and untrained and not loaded.trained.get("policy"):
        raise ConfigError(f"the learned policy of {loaded.source} was never trained; use --policy uniform, oracle or none")
    if setting.exits and untrained and not loaded.trained.get("exits"):
        raise ConfigError(f"the exit gates of {loaded.source} were never trained; use --exits none, or a method "
                          "without exits (dcts, cts, tome, algm)")
    if setting.policy == "oracle" and not have_labels:
        raise ConfigError("policy 'oracle' merges by ground truth: pass --labels (a label map or a folder of them)")
    model.check_setting(setting)
    return setting


def scoring_space(loaded: LoadedModel, opts: ModelOptions, dataset: object, data_label: str) -> ClassSpace:
    """The model's classes checked against a data set's, with the user's class map or waiver."""
    cfg = loaded.config
    return dataset_space(cfg.name, cfg.class_names, cfg.num_classes, dataset, data_label, opts.class_map,
                         opts.ignore_class_mismatch)


def label_file_space(loaded: LoadedModel, opts: ModelOptions, labels: str,
                     images: Sequence[Path] = ()) -> ClassSpace:
    """The class space of label files given by the user: the label maps of `images` are read now,
    so values the model cannot predict refuse the command before any work (a missing or
    unreadable label map stays that image's own error)."""
    cfg = loaded.config
    space = class_space(cfg.name, cfg.class_names, cfg.num_classes, f"label maps {labels}", (), None, opts.class_map,
                        opts.ignore_class_mismatch)
    for image in images:
        try:
            path = find_label_for(image, Path(labels))
            raw = load_label_map(path)
        except TokenscopeError:
            continue
        space.labels(raw, str(path))
    return space


def method_setting(loaded: LoadedModel, opts: ModelOptions, label: str, have_labels: bool = False) -> ReductionSetting:
    """The operating point `label` (a method, with inline settings if any) means on `loaded`, as a value.

    The user's shared options (thresholds, keep-per-class) apply where the method leaves them
    open; --policy only to methods that do not fix how tokens enter, --exits to none (each
    method says). Callers pass each method's setting to the forward; nothing is set on the model.
    """
    setting = resolve_setting(loaded, replace(opts, method=label, exits=None), have_labels=have_labels, shared=True)
    return setting.to(loaded.model.pixel_mean.device)


def _policy_and_exits(point: ResolvedPoint, plan: Plan, opts: ModelOptions, default_policy: str,
                      shared: bool) -> tuple[str, bool]:
    """A method fixes what it is about; --policy / --exits may only refine what it leaves open."""
    if plan.policy is not None:
        if opts.policy is not None and opts.policy != plan.policy and not shared:
            raise ConfigError(f"--method {point.text} decides how tokens enter itself (policy {plan.policy!r}); "
                              f"drop --policy {opts.policy}, or use a method that leaves it open (e.g. dcts"
                              f"{'+' + point.name.split('+', 1)[1] if '+' in point.name else ''})")
        policy = plan.policy
    else:
        policy = default_policy
    wanted = None if opts.exits is None else opts.exits == "learned"
    if wanted is not None and wanted != plan.exits:
        raise ConfigError(f"--method {point.text} runs {'with' if plan.exits else 'without'} exits; "
                          f"drop --exits {opts.exits} or pick a method that {'has' if wanted else 'has no'} exits "
                          f"({'step, dtop' if wanted else 'dcts, cts, tome, algm'})")
    return policy, plan.exits
