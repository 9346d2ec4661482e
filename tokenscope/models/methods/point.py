"""One operating point: a method (or `A+B`) with its settings, as one value with one text form.

`tome:r=16`, `step:merge=0.5:exit=0.95`, `dtop+tome:r=0.05`, `./norm_prune.py:frac=0.3`.
Settings follow the name after colons; in a combination each goes to the part that declares it
(a setting two parts declare is refused: name it once per part by writing the parts apart).
`parse_point` reads the text once at the edge (CLI, API, operating-point files), `resolve` finds
the methods and checks every setting, and `ResolvedPoint.plan` turns it into what the encoder runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from tokenscope.errors import ConfigError
from tokenscope.models.methods.base import IN_BLOCK_KINDS, Method, ModelFacts, Plan, compose
from tokenscope.models.methods.registry import PluginError, find_method, is_external
from tokenscope.models.steps import ExitDecision, MergeDecision, PruneDecision, TokenView


@dataclass(frozen=True)
class OperatingPoint:
    """A parsed operating point: method names (one, or the parts of `A+B`) and `key=value` settings."""

    names: tuple[str, ...]
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        """The canonical text: names joined by `+`, then `:key=value` in the order given."""
        return ":".join(["+".join(self.names), *(f"{k}={v}" for k, v in self.settings)])


def parse_point(text: str) -> OperatingPoint:
    """`step`, `tome:r=16`, `dtop+tome`, `./rule.py:frac=0.2`: one line per mistake."""
    raw = str(text).strip()
    if not raw:
        raise ConfigError("an operating point needs a method name, e.g. step or tome:r=16")
    head, *items = [t.strip() for t in _split_settings(raw)]
    if any(not n.strip() for n in head.split("+")) and head.strip():
        raise ConfigError(f"method {text!r}: a combination joins method names with '+', e.g. dtop+tome "
                          "(an empty name stands on one side)")
    names = tuple(n.strip() if is_external(n.strip()) else n.strip().lower() for n in head.split("+") if n.strip())
    if not names:
        raise ConfigError(f"method {text!r}: no method name before the settings")
    settings = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"method {text!r}: settings are key=value after a colon, e.g. tome:r=16")
        settings.append((key.strip().lower(), value.strip()))
    return OperatingPoint(names, tuple(settings))


def external_names(text: str) -> list[str]:
    """The method files and modules an operating point names, read from its text alone (nothing is
    imported): what a data file (run.json, an operating-point file) must never make tokenscope run."""
    try:
        return [n for n in parse_point(text).names if is_external(n)]
    except ConfigError:
        return []


def _split_settings(raw: str) -> list[str]:
    """Split at the colons that start settings (a Windows drive letter `C:\\` is not one)."""
    parts = raw.split(":")
    if len(parts) > 1 and len(parts[0]) == 1 and parts[1].startswith(("\\", "/")):
        parts = [parts[0] + ":" + parts[1], *parts[2:]]
    return parts


@dataclass(frozen=True)
class ResolvedPoint:
    """An operating point whose methods were found and whose settings were all read and checked."""

    point: OperatingPoint
    parts: tuple[tuple[Method, tuple[tuple[str, Any], ...]], ...]

    @property
    def text(self) -> str:
        return self.point.text

    @property
    def label(self) -> str:
        """The text with each part's declared name (a method file shows as its method's name)."""
        names = "+".join(m.name for m, _ in self.parts)
        return ":".join([names, *(f"{k}={v}" for k, v in self.point.settings)])

    @property
    def name(self) -> str:
        return "+".join(m.name for m, _ in self.parts)

    @property
    def first(self) -> Method:
        return self.parts[0][0]

    def value(self, key: str) -> Any:
        for _, values in self.parts:
            for k, v in values:
                if k == key:
                    return v
        return None

    def given(self, key: str) -> bool:
        return any(k == key for k, _ in self.point.settings)

    def plan(self, facts: ModelFacts) -> Plan:
        """What the encoder runs for this point on a model with `facts` (a plug-in's failure there
        is one line naming it)."""
        plans = []
        for method, values in self.parts:
            try:
                plan = method.plan(dict(values), facts)
            except ConfigError:
                raise
            except (Exception, SystemExit) as exc:
                raise ConfigError(f"method {method.name} ({method.source}) failed to plan {self.text!r}: "
                                  f"{type(exc).__name__}: {exc}") from None
            if not isinstance(plan, Plan):
                raise ConfigError(f"method {method.name} ({method.source}) returned {type(plan).__name__} from plan(); "
                                  "it must return a Plan (docs/methods-api.md)")
            if not method.source.startswith("built-in"):
                plan = replace(plan, steps=tuple(replace(st, module=GuardedStep(st.module, method)) for st in plan.steps))
            plans.append((method, plan))
        return compose(self.text, plans)

    def spelled(self, points: Sequence[str]) -> list[str]:
        """A method's own operating points (its ladder, its search grid) spelled the way it was named
        here: `norm_prune:frac=0.1` stays so for an installed plug-in and becomes
        `./rule.py:frac=0.1` for a method file, so every point resolves to the same method."""
        name, spelling = self.first.name, self.point.names[0]
        return [spelling + p[len(name):] if p == name or p.startswith(name + ":") else p for p in points]

    def provenance(self) -> list[dict[str, str]]:
        """Where each part's method came from, for run.json: name, source and sha256 of its file."""
        return [{"name": m.name, "source": m.source, "digest": m.digest} for m, _ in self.parts]


class GuardedStep(nn.Module):
    """A plug-in's step, run so that it cannot hurt: its failure, or a decision the encoder could not
    carry out faithfully, is one line naming the method, where it came from, the block and the field
    (a built-in's bug still raises with its traceback). Checked: the decision's type, block, the shape
    and dtype of every field, that its token ids and valid slots are the ones it was shown, that merges
    go into another real slot that is not itself merged away, that fused tokens have the sequence's
    width and finite values. The step is shown copies of the tokens, keys and masks, so nothing it
    writes can reach the encoder: a step decides, the encoder carries out. One host synchronisation
    and one copy of what it sees per call, for plug-ins only."""

    def __init__(self, inner: nn.Module, method: Method) -> None:
        super().__init__()
        self.inner = inner
        self.method_name, self.method_source = method.name, method.source

    def forward(self, view: TokenView) -> MergeDecision | PruneDecision | ExitDecision:
        where = f"method {self.method_name} ({self.method_source}), block {view.block}"
        copy = replace(view, **{name: getattr(view, name).clone() for name in
                                ("x", "token_ids", "valid", "sizes", "prefix", "keys", "queries", "attn_mask")
                                if isinstance(getattr(view, name), torch.Tensor)})
        try:
            with FlopCounterMode(display=False) as counter:
                dec = self.inner(copy)
        except (Exception, SystemExit) as exc:
            raise PluginError(f"{where} failed: {type(exc).__name__}: {exc}") from None
        check_decision(dec, view, where)
        # the decision's own cost, as torch's counter sees it, declared or not: every command then counts a
        # plug-in's scoring the same way (compare's counted forward and run's traces agree)
        spent = torch.full((view.valid.shape[0],), counter.get_total_flops() // max(view.valid.shape[0], 1),
                           dtype=torch.long, device=view.valid.device)
        if isinstance(dec, MergeDecision):
            return replace(dec, matching_flops=spent)
        return replace(dec, scoring_flops=spent)


def check_decision(dec: Any, view: TokenView, where: str) -> None:
    """Refuse, in one PluginError naming `where` and the field, a decision the encoder cannot carry out."""
    if not isinstance(dec, (MergeDecision, PruneDecision, ExitDecision)):
        raise PluginError(f"{where} returned {type(dec).__name__}; a step returns a PruneDecision, a MergeDecision "
                          "or an ExitDecision")
    b, n = view.valid.shape
    shape = (b, n)

    def tensor(name: str, value: Any, dims: tuple[int, ...], kind: str) -> torch.Tensor:
        """`value` as a tensor of shape `dims` and `kind` (bool, int, float or number), on the tokens' device."""
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != dims:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise PluginError(f"{where}: its decision's {name} must be a tensor of shape {dims}, got {got}")
        is_bool, is_float = value.dtype == torch.bool, value.dtype.is_floating_point
        ok = {"bool": is_bool, "int": not is_bool and not is_float, "float": is_float, "number": not is_bool}[kind]
        if not ok:
            want = {"bool": "bool", "int": "an integer type", "float": "floating-point", "number": "numeric"}[kind]
            raise PluginError(f"{where}: its decision's {name} must be {want}, got {value.dtype}")
        if value.device != view.valid.device:
            raise PluginError(f"{where}: its decision's {name} is on {value.device}, the tokens on {view.valid.device}")
        return value

    if dec.block != view.block:
        raise PluginError(f"{where}: its decision says block {dec.block!r}; it was called in block {view.block}")
    ids = tensor("token_ids", dec.token_ids, shape, "int")
    valid = tensor("valid", dec.valid, shape, "bool")
    problems: list[tuple[str, torch.Tensor]] = [
        ("token_ids are not the slots' token ids it was shown (view.token_ids)", (ids != view.token_ids).any()),
        ("valid is not the valid mask it was shown (view.valid)", (valid != view.valid).any())]
    if getattr(dec, "order", None) is not None:
        tensor("order", dec.order, shape, "number")
    if isinstance(dec, ExitDecision):
        leaving = tensor("exits", dec.exits, shape, "bool")
        logits = tensor("logits", dec.logits, (b, n, view.num_classes), "float")
        problems += [("exits a padding slot (exits must lie inside valid)", (leaving & ~view.valid).any()),
                     ("logits hold NaN or infinite values for tokens that exit",
                      (leaving.unsqueeze(-1) & ~torch.isfinite(logits)).any())]
        if dec.held is not None:
            held = tensor("held", dec.held, shape, "bool")
            problems.append(("holds back a token it also lets exit (held and exits overlap)", (held & leaving).any()))
        if dec.scoring_flops is not None:
            tensor("scoring_flops", dec.scoring_flops, (b,), "number")
    elif isinstance(dec, MergeDecision):
        merged = tensor("merged", dec.merged, shape, "bool")
        leaving = merged
        into = tensor("into", dec.into, shape, "int")
        tensor("matching_flops", dec.matching_flops, (b,), "number")
        inside = (into >= 0) & (into < n)
        safe = into.clamp(0, max(n - 1, 0))
        target_merged = merged.gather(1, safe) if n else merged
        target_valid = view.valid.gather(1, safe) if n else view.valid
        own = torch.arange(n, device=into.device).expand(b, n)
        problems += [
            ("merges a padding slot (merged must lie inside valid)", (merged & ~view.valid).any()),
            ("merges into a slot outside 0..N-1 (into)", (merged & ~inside).any()),
            ("merges a slot into itself (into)", (merged & (into == own)).any()),
            ("merges into a padding slot (into)", (merged & ~target_valid).any()),
            ("merges into a slot that is itself merged away in the same step", (merged & target_merged).any())]
    else:
        leaving = tensor("pruned", dec.pruned, shape, "bool")
        if dec.scoring_flops is not None:
            tensor("scoring_flops", dec.scoring_flops, (b,), "number")
        if dec.fused is not None:
            width = view.x.shape[-1]
            if not isinstance(dec.fused, torch.Tensor) or dec.fused.dim() != 3 or tuple(dec.fused.shape[::2]) != (b, width):
                got = tuple(dec.fused.shape) if isinstance(dec.fused, torch.Tensor) else type(dec.fused).__name__
                raise PluginError(f"{where}: its decision's fused tokens must be a tensor (B={b}, F, D={width}), got {got}")
            tensor("fused", dec.fused, tuple(dec.fused.shape), "float")
            problems.append(("fused tokens hold NaN or infinite values", ~torch.isfinite(dec.fused).all()))
    if getattr(dec, "counts_after", None) is not None:  # a host-side promise the encoder would trust: held to the decision
        if not isinstance(dec.counts_after, (tuple, list)) or len(dec.counts_after) != b:
            raise PluginError(f"{where}: its decision's counts_after must be {b} whole numbers, one per image")
        promised = torch.tensor([int(c) for c in dec.counts_after], device=valid.device)
        problems.append(("counts_after is not the real tokens left after it", (promised != (view.valid & ~leaving).sum(1)).any()))
    flags = torch.stack([p.reshape(()) for _, p in problems]).cpu().tolist()  # the one synchronisation
    for (what, _), bad in zip(problems, flags):
        if bad:
            raise PluginError(f"{where}: its decision {what}")


def resolve(point: OperatingPoint | str) -> ResolvedPoint:
    """Find every part's method and read every setting, or refuse in one line."""
    op = parse_point(point) if isinstance(point, str) else point
    methods = [find_method(n) for n in op.names]
    check_combination(op.text, methods)
    owners: dict[str, list[int]] = {}
    for i, m in enumerate(methods):
        for s in m.settings:
            owners.setdefault(s.name, []).append(i)
    given: list[list[tuple[str, str]]] = [[] for _ in methods]
    for key, value in op.settings:
        where = owners.get(key, [])
        if not where:
            known = sorted(owners) or ["none"]
            raise ConfigError(f"method {op.text!r}: unknown setting {key!r}; {'+'.join(m.name for m in methods)} "
                              f"take {', '.join(known)}")
        if len(where) > 1:
            raise ConfigError(f"method {op.text!r}: {key} is a setting of {' and '.join(methods[i].name for i in where)}; "
                              "in a combination a setting must belong to one part")
        given[where[0]].append((key, value))
    parts = tuple((m, tuple(m.values(g, op.text).items())) for m, g in zip(methods, given))
    return ResolvedPoint(op, parts)


def check_combination(label: str, methods: list[Method]) -> None:
    """`A+B+...`: A decides how tokens enter and exit, the rest merge or prune inside blocks."""
    if len(methods) > 1 and methods[0].kind == "baseline":
        raise ConfigError(f"method {label!r}: {methods[0].name} is the unreduced model; name the other parts alone")
    for m in methods[1:]:
        if m.kind not in IN_BLOCK_KINDS:
            raise ConfigError(f"method {label!r}: {m.name} decides how tokens enter or exit, so it goes first "
                              f"(e.g. {m.name}+tome); after '+' come merging or pruning methods")


def resolve_list(text: str) -> list[ResolvedPoint]:
    """A comma-separated list, each operating point once, in the order given."""
    points = [resolve(t) for t in str(text).split(",") if t.strip()]
    if not points:
        raise ConfigError("--methods needs at least one method, e.g. step,tome,cts,dtop")
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods names an operating point twice: {','.join(labels)}")
    return points
