"""From command-line choices to a configured model on a device: shared by every command."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenscope.errors import ConfigError
from tokenscope.models.checkpoints import LoadedModel, build_model
from tokenscope.models.policy import POLICY_NAMES, parse_thresholds
from tokenscope.models.runtime import resolve_device

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


def load_model(opts: ModelOptions, have_labels: bool = False,
               loaded: LoadedModel | None = None) -> tuple[LoadedModel, torch.device]:
    """Build, configure and move the model; refuse combinations that would mislead.

    A learned policy or learned exits on weights where that part was never trained would show
    noise as if it were a finding, so it is refused unless the user chose random weights. With
    `loaded`, that model is re-configured to `opts` instead of being built again.
    """
    device = resolve_device(opts.device)
    if opts.policy is not None and opts.policy not in POLICY_NAMES:
        raise ConfigError(f"unknown policy {opts.policy!r}; choose one of {', '.join(POLICY_NAMES)}")
    if opts.exits is not None and opts.exits not in EXIT_MODES:
        raise ConfigError(f"unknown exit mode {opts.exits!r}; choose one of {', '.join(EXIT_MODES)}")
    if opts.exit_threshold is not None and not (0.0 <= opts.exit_threshold <= 1.0):
        raise ConfigError(f"--exit-threshold must be between 0 and 1, got {opts.exit_threshold}")
    if loaded is None:
        loaded = build_model(opts.model, opts.weights, opts.random_init, opts.seed, opts.num_classes)
    policy = opts.policy or ("budget" if opts.budget is not None else loaded.default_policy())
    if opts.budget is not None and policy != "budget":
        raise ConfigError(f"--budget applies to --policy budget, not {policy!r}")
    exits = loaded.default_exits() if opts.exits is None else opts.exits == "learned"
    untrained = opts.random_init is False
    if policy == "learned" and untrained and not loaded.trained.get("policy"):
        raise ConfigError(f"the learned policy of {loaded.source} was never trained; use --policy uniform, oracle or none")
    if exits and untrained and not loaded.trained.get("exits"):
        raise ConfigError(f"the exit gates of {loaded.source} were never trained; use --exits none")
    if policy == "oracle" and not have_labels:
        raise ConfigError("policy 'oracle' merges by ground truth: pass --labels (a label map or a folder of them)")
    cfg = loaded.config
    thresholds = parse_thresholds(opts.merge_threshold, cfg.merge_thresholds)
    loaded.model.configure(policy=policy, merge_thresholds=thresholds,
                           exit_threshold=opts.exit_threshold if opts.exit_threshold is not None else cfg.exit_threshold,
                           exits=exits, budget=opts.budget,
                           keep_per_class=opts.keep_per_class if opts.keep_per_class is not None else cfg.keep_per_class)
    loaded.model.to(device).eval()
    return loaded, device
