"""The method interface: what one token-reduction method declares and what it asks of the encoder.

A method is one module that defines `METHOD = Method(...)` (or a subclass instance). It declares

- its `name` and a one-line `summary`;
- typed `settings` (`Setting`: name, type, default, help, check), read from the operating point's
  text (`tome:r=16`) and validated where they are declared, with one-line errors naming them;
- its `ladder` (three operating points, mildest first, for `sweep --methods NAME`) and its `search`
  grid (for `tune --method NAME`);
- the `reference` it follows (repository, files, paper, and how tokenscope differs);
- `plan(values, facts)`: what it does in a forward pass, as a `Plan`: how tokens enter (a policy
  name, or a policy module it brings), whether the model's trained exit gates act, `steps` inside
  or after blocks (models/steps.py: merge, prune or exit decisions of the method's own, carried out
  by the encoder) and, optionally, a `reconstruction` of the full token grid for the decoder.

`ModelFacts` is all a method may know of the model: its depth, gates, prefix tokens, trained
parts and the user's shared options. A method never holds the model, so the model never knows
which method runs; the recorder sees every decision through the steps' named modules.
Built-ins (models/methods/builtin/) and plug-ins (entry-point group `tokenscope.methods`, or a
file named on the command line) are the same kind of object; see models/methods/registry.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch.nn as nn

from tokenscope.errors import ConfigError
from tokenscope.models.steps import Step

KINDS = ("baseline", "entry", "exit", "merge", "prune", "composite")
"""What a method is about: the plain model, how tokens enter, exits, in-network merging, pruning."""


def on_off(value: str) -> bool:
    """`on`/`off` (also 1/0, true/false, yes/no) as a bool."""
    if value.lower() in ("on", "1", "true", "yes"):
        return True
    if value.lower() in ("off", "0", "false", "no"):
        return False
    raise ValueError(value)


TYPE_NAMES: dict[Callable[[str], Any], str] = {float: "number", int: "whole number", str: "text", on_off: "on/off"}


@dataclass(frozen=True)
class Setting:
    """One typed setting of a method: `key=value` after its name in an operating point."""

    name: str
    parse: Callable[[str], Any]
    """Text -> value (float, int, on_off, str, or the method's own); ValueError means invalid."""
    default: Any
    """Its value when not given; None means "the model's own" or "the user's shared option"."""
    help: str
    check: Callable[[Any], str | None] | None = None
    """Value -> None when acceptable, else what is wrong (said after the setting's name)."""
    choices: tuple[str, ...] = ()
    type: str = ""
    """What a valid value looks like, for help and errors, when `parse` is the method's own."""

    @property
    def type_name(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        return self.type or TYPE_NAMES.get(self.parse, "value")

    def read(self, text: str, label: str) -> Any:
        """The value of `text`, or one line naming the operating point and this setting."""
        try:
            value = self.parse(text)
        except (TypeError, ValueError):
            raise ConfigError(f"method {label!r}: {self.name}={text!r} is not a valid {self.type_name}") from None
        except (Exception, SystemExit) as exc:  # a plug-in's parser failing in its own way: one line still
            raise ConfigError(f"method {label!r}: reading {self.name}={text!r} failed ({type(exc).__name__}: {exc})") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"method {label!r}: {self.name}={text!r} must be a finite number")
        if self.choices and value not in self.choices:
            raise ConfigError(f"method {label!r}: {self.name} is one of {', '.join(self.choices)}, not {text!r}")
        try:
            problem = self.check(value) if self.check is not None else None
        except (Exception, SystemExit) as exc:
            raise ConfigError(f"method {label!r}: checking {self.name}={text!r} failed ({type(exc).__name__}: {exc})") from None
        if problem:
            raise ConfigError(f"method {label!r}: {self.name}={text} {problem}")
        return value

    @property
    def default_text(self) -> str:
        """The default as written on a command line; `auto` when the model or the method decides."""
        if self.default is None:
            return "auto"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return str(self.default)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type_name, "default": self.default, "help": self.help}


@dataclass(frozen=True)
class Reference:
    """The public code a method decides as, and where tokenscope's version differs."""

    paper: str
    repository: str = ""
    files: tuple[str, ...] = ()
    differences: str = ""

    def describe(self) -> dict[str, Any]:
        return {"paper": self.paper, "repository": self.repository, "files": list(self.files),
                "differences": self.differences}


@dataclass(frozen=True)
class ModelFacts:
    """What a method may know of the model it plans for (never the model itself)."""

    name: str
    depth: int
    exit_after: tuple[int, ...]
    num_prefix_tokens: int
    class_token: bool
    patch: int
    trained: Mapping[str, bool]
    """Which parts were trained: `policy` (the dCTS network), `exits` (the gates)."""
    model_policy: str
    """The model's own entry policy (learned when its policy was trained, else uniform)."""
    policy: str
    """The policy the user's shared options choose (--policy, --budget), else the model's own."""
    merge_thresholds: tuple[float, ...]
    exit_threshold: float
    keep_per_class: int | None
    """The user's --keep-per-class, None when not given."""
    model_keep_per_class: int
    policies: Mapping[str, nn.Module] = field(default_factory=dict)
    """The model's policy modules, for a method whose own policy scores with one of them (CTS)."""


@dataclass(frozen=True)
class Plan:
    """What one operating point asks of the encoder. Fields left None keep the user's shared
    options (--policy, --exit-threshold, ...) or the model's own."""

    policy: str | None = None
    """How tokens enter: a name in the model's policies (`none`: the plain grid), or None for the
    user's / model's own (dCTS's learned or uniform policy)."""
    policy_module: nn.Module | None = None
    """A policy the method brings, installed under `policy` (CTS's)."""
    exits: bool = False
    exit_threshold: float | None = None
    keep_per_class: int | None = None
    merge_thresholds: tuple[float, ...] | None = None
    budget: float | None = None
    steps: tuple[Step, ...] = ()
    size_weighted: bool = False
    """Proportional attention once a merge made a token stand for several (ToMe's)."""
    reconstruction: nn.Module | None = None
    """How reduced tokens become the decoder's grid again: `module(ReconstructionView) -> (B, T, D)`
    features of every trace token (Expedit's). None: a merged token takes its group's prediction."""
    record: dict[str, Any] = field(default_factory=dict, hash=False)
    """What traces record of the steps: `merging` and/or `pruning` dicts with a `blocks` list."""


class Method:
    """A token-reduction method (see the module docstring). Subclass it or build one directly."""

    def __init__(self, name: str, summary: str, kind: str, plan: Callable[[dict[str, Any], ModelFacts], Plan],
                 settings: Sequence[Setting] = (), ladder: Sequence[str] = (), search: Sequence[str] = (),
                 reference: Reference | None = None, searches: Mapping[str, Sequence[str]] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"method {name!r}: kind is one of {', '.join(KINDS)}, not {kind!r}")
        self.name = name
        self.summary = summary
        self.kind = kind
        self._plan = plan
        self.settings = tuple(settings)
        self.ladder = tuple(ladder)
        self.search = tuple(search) or self.ladder
        self.searches = {k: tuple(v) for k, v in (searches or {}).items()}
        """Other named grids for `tune --method KEY` (dCTS's token budget: `budget`)."""
        self.reference = reference
        self.source = "built-in"
        """Where it was found (set by the registry): built-in, entry point, file or module."""
        self.digest = ""
        """sha256 of the file that defines it (set by the registry), recorded in run.json."""

    def setting(self, name: str) -> Setting | None:
        return next((s for s in self.settings if s.name == name), None)

    def values(self, given: Sequence[tuple[str, str]], label: str) -> dict[str, Any]:
        """Every setting's value: the given ones read and checked, the others their defaults."""
        out = {s.name: s.default for s in self.settings}
        seen: set[str] = set()
        for key, text in given:
            setting = self.setting(key)
            if setting is None:
                known = ", ".join(s.name for s in self.settings) or "none"
                raise ConfigError(f"method {label!r}: unknown setting {key!r} for {self.name}; known: {known}")
            if key in seen:
                raise ConfigError(f"method {label!r}: {key} is given twice; give each setting once")
            seen.add(key)
            out[key] = setting.read(text, label)
        return out

    def plan(self, values: dict[str, Any], facts: ModelFacts) -> Plan:
        return self._plan(values, facts)

    def describe(self) -> dict[str, Any]:
        """The entry `tokenscope methods --json` prints."""
        return {"name": self.name, "kind": self.kind, "summary": self.summary,
                "settings": [s.describe() for s in self.settings], "ladder": list(self.ladder),
                "search": list(self.search), "reference": None if self.reference is None else self.reference.describe(),
                "source": self.source, "digest": self.digest}


IN_BLOCK_KINDS = ("merge", "prune")
"""Kinds that only act inside or after blocks, so they can follow another method after `+`."""


def compose(label: str, parts: Sequence[tuple[Method, Plan]]) -> Plan:
    """The plans of `A+B[+C]` as one: A decides how tokens enter and whether they exit, every
    later part (a merging or pruning method) adds its steps.

    Refused in one line: a later part that is not about merging or pruning, or two parts that act
    inside the same block (one inside step per block: the attention's queries and keys are its)."""
    (first, head), rest = parts[0], parts[1:]
    if first.kind == "baseline" and rest:
        raise ConfigError(f"method {label!r}: {first.name} is the unreduced model; name the other parts alone")
    steps = list(head.steps)
    record = dict(head.record)
    weighted = head.size_weighted
    reconstruction = head.reconstruction
    for method, plan in rest:
        if method.kind not in IN_BLOCK_KINDS:
            raise ConfigError(f"method {label!r}: {method.name} decides how tokens enter or exit, so it goes first "
                              f"(e.g. {method.name}+tome); after '+' come merging or pruning methods")
        clash = sorted({s.block for s in steps if s.place == "inside"} & {s.block for s in plan.steps
                                                                            if s.place == "inside"})
        if clash:
            raise ConfigError(f"method {label!r}: two of its parts act inside block {clash[0]}; "
                              "one method may act inside a block")
        for key, value in plan.record.items():
            if key in record:
                raise ConfigError(f"method {label!r}: two of its parts record {key!r}; combine methods that do "
                                  "different things (one merging, one pruning)")
            record[key] = value
        if plan.reconstruction is not None:
            if reconstruction is not None:
                raise ConfigError(f"method {label!r}: two of its parts reconstruct the token grid; one may")
            reconstruction = plan.reconstruction
        steps.extend(plan.steps)
        weighted = weighted or plan.size_weighted
    return replace(head, steps=tuple(steps), size_weighted=weighted, record=record, reconstruction=reconstruction)
