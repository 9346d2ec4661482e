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
from tokenscope.models.checkpoints import LoadedModel, build_model
from tokenscope.models.methods.cts import parse_groups
from tokenscope.models.methods.merging import COUNTS, ORDERS, MergingSpec, algm_blocks
from tokenscope.models.methods.spec import Method, parse_method
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
    """Token-reduction method (step, dcts, dtop, cts, tome, algm, X+tome, X+algm; see
    models/methods/spec.py). None: policy and exits alone decide, as before methods existed."""
    tome_r: float | None = None
    """ToMe: tokens merged per block; a count (16) or a fraction of the image's tokens (0.05)."""
    algm_threshold: float | None = None
    """ALGM's local merging threshold (mean cosine similarity of a 2x2 window)."""
    algm_global_threshold: float | None = None
    """ALGM's global merging: a fixed similarity threshold instead of its adaptive rule."""
    prop_attn: bool | None = None
    """Size-weighted (proportional) attention after merging; default on for ToMe, off for ALGM."""
    cts_groups: str | None = None
    """CTS: 2x2 groups shared per image, a count (300) or a fraction of all groups (0.4)."""
    merge_order: str | None = None
    """ToMe/ALGM: `reference` (default: the sequence order the public code leaves after each
    merge) or `spatial` (tokens keep raster order: tokenscope's earlier rule)."""
    merge_count: str | None = None
    """ToMe/ALGM: `batch` (default: one count for the batch, as the public code) or `per-image`."""
    class_map: str | None = None
    """A file mapping the data's class ids (or names) to the model's (see data/classspace.py)."""
    ignore_class_mismatch: bool = False
    """Score even when the model's classes are not the data's (recorded and printed beside every mIoU)."""


MERGE_SETTINGS = ("tome_r", "algm_threshold", "algm_global_threshold", "prop_attn", "merge_order", "merge_count")
"""ModelOptions fields that only in-network merging (tome, algm) reads."""
MAX_TOME_R = 100_000
"""More tokens than any image has (a 16k x 16k image at patch 16 has 1M patches; r is per block)."""
DEFAULT_TOME_R = 0.05
"""Default ToMe r: 5% of the image's tokens per block (ToMe's r=16 of 197 is 8% on ViT-B/224)."""
DEFAULT_ALGM_THRESHOLD = 0.88
"""ALGM's public threshold for ViT-S/B Segmenter on ADE20K (its models use 0.88-0.955)."""
DTOP_KEEP_PER_CLASS = 5
"""DToP's public code keeps the 5 most confident qualifying tokens of each class at every gate."""
DEFAULT_CTS_GROUPS = "0.4"
"""CTS's Segmenter setting shares about 40% of the 2x2 groups (103 of 256 at 512 px)."""


def _merge_settings_given(opts: ModelOptions) -> bool:
    return any(getattr(opts, f) is not None for f in MERGE_SETTINGS)


def merging_spec(method: Method, opts: ModelOptions, depth: int) -> MergingSpec | None:
    """The in-network merging a method runs, with the user's settings or the published defaults."""
    if method.merging is None:
        if _merge_settings_given(opts):
            raise ConfigError(f"ToMe/ALGM settings (r, threshold, global, prop, order, count) apply to methods with tome or algm, "
                              f"not {method.name!r}")
        return None
    rules = {"order": opts.merge_order or "reference", "count": opts.merge_count or "batch"}
    if rules["order"] not in ORDERS:
        raise ConfigError(f"merge order must be one of {', '.join(ORDERS)} (e.g. tome:order=spatial), got {opts.merge_order!r}")
    if rules["count"] not in COUNTS:
        raise ConfigError(f"merge count must be one of {', '.join(COUNTS)} (e.g. tome:count=per-image), "
                          f"got {opts.merge_count!r}")
    if method.merging == "tome":
        r = DEFAULT_TOME_R if opts.tome_r is None else float(opts.tome_r)
        if not math.isfinite(r) or not 0 <= r <= MAX_TOME_R or (r >= 1 and r != int(r)):
            raise ConfigError(f"ToMe's r is a whole count per block (at most {MAX_TOME_R}) or a fraction below 1, "
                              f"got {opts.tome_r}")
        return MergingSpec("tome", tuple(range(1, depth + 1)), r=r,
                           prop_attn=True if opts.prop_attn is None else opts.prop_attn, **rules)
    threshold = DEFAULT_ALGM_THRESHOLD if opts.algm_threshold is None else float(opts.algm_threshold)
    for name, value in (("threshold", threshold), ("global", opts.algm_global_threshold)):
        if value is not None and not (math.isfinite(value) and -1.0 <= value <= 1.0):
            raise ConfigError(f"ALGM's {name} is a cosine similarity in [-1, 1], got {value}")
    return MergingSpec("algm", algm_blocks(depth), threshold=threshold, global_threshold=opts.algm_global_threshold,
                       prop_attn=False if opts.prop_attn is None else opts.prop_attn, **rules)


def load_model(opts: ModelOptions, have_labels: bool = False,
               loaded: LoadedModel | None = None) -> tuple[LoadedModel, torch.device]:
    """Build, configure and move the model; refuse combinations that would mislead.

    A learned policy or learned exits on weights where that part was never trained would show
    noise as if it were a finding, so it is refused unless the user chose random weights. With
    `loaded`, that model is re-configured to `opts` instead of being built again.
    """
    method = parse_method(opts.method) if opts.method is not None else None
    if method is not None and method.settings:  # inline settings are the more specific: they win
        opts = replace(opts, **method.option_values())  # type: ignore[arg-type]
    device = resolve_device(opts.device)
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
    if opts.cts_groups is not None:
        parse_groups(opts.cts_groups)
    if loaded is None:
        loaded = build_model(opts.model, opts.weights, opts.random_init, opts.seed, opts.num_classes)
    policy = opts.policy or ("budget" if opts.budget is not None else loaded.default_policy())
    exits = loaded.default_exits() if opts.exits is None else opts.exits == "learned"
    if method is not None:
        policy, exits = _method_policy_and_exits(method, opts, policy)
    if opts.budget is not None and policy != "budget":
        raise ConfigError(f"--budget applies to --policy budget, not {policy!r}")
    untrained = opts.random_init is False
    if policy == "learned" and untrained and not loaded.trained.get("policy"):
        raise ConfigError(f"the learned policy of {loaded.source} was never trained; use --policy uniform, oracle or none")
    if exits and untrained and not loaded.trained.get("exits"):
        raise ConfigError(f"the exit gates of {loaded.source} were never trained; use --exits none, or a method "
                          "without exits (dcts, cts, tome, algm)")
    if policy == "oracle" and not have_labels:
        raise ConfigError("policy 'oracle' merges by ground truth: pass --labels (a label map or a folder of them)")
    cfg = loaded.config
    thresholds = parse_thresholds(opts.merge_threshold, cfg.merge_thresholds)
    spec = merging_spec(method, opts, loaded.model.depth) if method is not None else None
    if method is None and _merge_settings_given(opts):
        raise ConfigError("ToMe/ALGM settings need --method tome, algm or X+tome / X+algm")
    if opts.cts_groups is not None and policy != "cts":
        raise ConfigError("--cts-groups applies to --method cts (or cts+tome / cts+algm)")
    loaded.model.configure(policy=policy, merge_thresholds=thresholds,
                           exit_threshold=opts.exit_threshold if opts.exit_threshold is not None else cfg.exit_threshold,
                           exits=exits, budget=opts.budget,
                           keep_per_class=_keep_per_class(method, opts, cfg.keep_per_class),
                           cts_groups=parse_groups(opts.cts_groups or DEFAULT_CTS_GROUPS),
                           cts_source=loaded.default_policy())
    loaded.model.set_merging(spec)
    loaded.model.method = method.label if method is not None else ""
    loaded.model.to(device).eval()
    return loaded, device


def _keep_per_class(method: Method | None, opts: ModelOptions, model_default: int) -> int:
    """The user's K, else DToP's 5 for the dtop methods (as its public code), else the model's own."""
    if opts.keep_per_class is not None:
        return opts.keep_per_class
    if method is not None and method.name.split("+")[0] == "dtop":
        return DTOP_KEEP_PER_CLASS
    return model_default


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
    """The operating point `label` (a method, with inline settings if any) means on `loaded`.

    The user's shared options (thresholds, keep-per-class) apply where the method leaves them
    open; --policy/--exits only to methods that do not fix them. The model is left configured
    at this point; callers take the settings of several methods and `apply` them in turn.
    """
    method = parse_method(label)
    o = replace(opts, method=label, policy=None if method.fixes_policy else opts.policy, exits=None, cts_groups=None,
                **{f: None for f in MERGE_SETTINGS})  # type: ignore[arg-type]
    load_model(o, have_labels=have_labels, loaded=loaded)
    return loaded.model.setting()


def _method_policy_and_exits(method: Method, opts: ModelOptions, default_policy: str) -> tuple[str, bool]:
    """A method fixes what it is about; --policy / --exits may only refine what it leaves open."""
    if method.fixes_policy:
        if opts.policy is not None and opts.policy != method.policy:
            hint = "dcts" + (f"+{method.merging}" if method.merging else "")
            raise ConfigError(f"--method {method.name} decides the tokens itself (policy {method.policy!r}); for "
                              f"--policy {opts.policy} use --method {hint}")
        policy = method.policy
    else:
        policy = default_policy
    wanted = None if opts.exits is None else opts.exits == "learned"
    if wanted is not None and wanted != method.exits:
        raise ConfigError(f"--method {method.name} runs {'with' if method.exits else 'without'} exits; "
                          f"drop --exits {opts.exits} or pick a method that {'has' if wanted else 'has no'} exits "
                          f"({'step, dtop' if wanted else 'dcts, cts, tome, algm'})")
    return policy, method.exits
