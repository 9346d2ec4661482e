"""Method names -> what the model runs: which policy, exits on or off, which in-network merging.

| method | tokens enter as | exits | merging inside the encoder |
|---|---|---|---|
| `vit` | plain grid | no | no (the baseline) |
| `step` | dCTS supertokens | yes | no |
| `dcts` | dCTS supertokens | no | no |
| `dtop` | plain grid | yes | no |
| `cts` | K shared 2x2 groups | no | no |
| `tome` | plain grid | no | ToMe, r per block |
| `algm` | plain grid | no | ALGM, local then global |

`X+tome` and `X+algm` (X one of step, dcts, dtop, cts) run the merging on X's tokens: merging
composes with supertokens (a supertoken counts as one token) and with exits (a merged token
exits whole).

Settings may follow the name after colons, so one list can hold several operating points:
`tome:r=16`, `tome:r=0.05:prop=off`, `algm:threshold=0.92:global=adaptive`, `cts:groups=300`,
`step:exit=0.9`, `dcts:merge=0.7`. ToMe and ALGM decide as their public code by default;
`order=spatial` and `count=per-image` switch off the two reference rules that tokenscope once
did differently (see models/methods/merging.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenscope.errors import ConfigError

TOKEN_METHODS = {"vit": ("none", False), "step": ("default", True), "dcts": ("default", False),
                 "dtop": ("none", True), "cts": ("cts", False)}
MERGING_METHODS = {"tome": ("none", False), "algm": ("none", False)}
METHOD_NAMES = (*TOKEN_METHODS, *MERGING_METHODS)


@dataclass(frozen=True)
class Method:
    """A parsed method: `policy` is `default` (the model's or --policy), `none` or `cts`."""

    name: str
    policy: str
    exits: bool
    merging: str | None = None
    settings: tuple[tuple[str, str], ...] = ()
    """Inline settings (`tome:r=16` -> (("r", "16"),)), checked by `option_values`."""

    @property
    def label(self) -> str:
        """The name with its settings, as written: one operating point of one method."""
        return ":".join([self.name, *(f"{k}={v}" for k, v in self.settings)])

    def option_values(self) -> dict[str, object]:
        """Settings as ModelOptions fields: r -> tome_r, threshold -> algm_threshold, global ->
        algm_global_threshold, prop -> prop_attn, groups -> cts_groups, exit -> exit_threshold,
        merge -> merge_threshold, keep -> keep_per_class, order -> merge_order, count -> merge_count,
        budget -> budget (dcts/step: exactly that token reduction, `dcts:budget=2.5`)."""
        out: dict[str, object] = {}
        seen: set[str] = set()
        for key, value in self.settings:
            if key not in SETTINGS:
                raise ConfigError(f"method {self.label!r}: unknown setting {key!r}; known: {', '.join(SETTINGS)}")
            if key in seen:
                raise ConfigError(f"method {self.label!r}: {key} is given twice; give each setting once")
            seen.add(key)
            field, convert = SETTINGS[key]
            try:
                out[field] = convert(value)
            except ValueError:
                raise ConfigError(f"method {self.label!r}: {key}={value!r} is not a valid value") from None
            if isinstance(out[field], float) and not math.isfinite(out[field]):  # type: ignore[arg-type]
                raise ConfigError(f"method {self.label!r}: {key}={value!r} must be a finite number")
        return out

    @property
    def fixes_policy(self) -> bool:
        return self.policy != "default"


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "1", "true", "yes"):
        return True
    if value.lower() in ("off", "0", "false", "no"):
        return False
    raise ValueError(value)


def _global(value: str) -> float | None:
    return None if value.lower() == "adaptive" else float(value)


SETTINGS = {"r": ("tome_r", float), "threshold": ("algm_threshold", float), "global": ("algm_global_threshold", _global),
            "prop": ("prop_attn", _on_off), "groups": ("cts_groups", str), "exit": ("exit_threshold", float),
            "merge": ("merge_threshold", str), "keep": ("keep_per_class", int),
            "order": ("merge_order", str.lower), "count": ("merge_count", str.lower), "budget": ("budget", float)}


def parse_method(text: str) -> Method:
    """`step`, `tome`, `dtop+tome`, `tome:r=16`, ... (see the module docstring)."""
    name, *raw = [t.strip() for t in str(text).strip().split(":")]
    name = name.lower()
    settings = []
    for item in raw:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"method {text!r}: settings are key=value after a colon, e.g. tome:r=16")
        settings.append((key.strip().lower(), value.strip()))
    method = _parse_name(name, text)
    method = Method(method.name, method.policy, method.exits, method.merging, tuple(settings))
    method.option_values()  # refuse unknown keys and bad values now
    return method


def _parse_name(name: str, text: str) -> Method:
    parts = [p for p in name.split("+") if p]
    choices = f"{', '.join(METHOD_NAMES)}, or X+tome / X+algm with X in step, dcts, dtop, cts"
    if len(parts) == 1 and parts[0] in TOKEN_METHODS:
        policy, exits = TOKEN_METHODS[parts[0]]
        return Method(parts[0], policy, exits)
    if len(parts) == 1 and parts[0] in MERGING_METHODS:
        policy, exits = MERGING_METHODS[parts[0]]
        return Method(parts[0], policy, exits, parts[0])
    if len(parts) == 2 and parts[0] in TOKEN_METHODS and parts[0] != "vit" and parts[1] in MERGING_METHODS:
        policy, exits = TOKEN_METHODS[parts[0]]
        return Method(f"{parts[0]}+{parts[1]}", policy, exits, parts[1])
    raise ConfigError(f"unknown method {text!r}; choose one of {choices}")


def parse_methods(text: str) -> list[Method]:
    """A comma-separated list, each method once, in the order given."""
    methods = [parse_method(t) for t in str(text).split(",") if t.strip()]
    if not methods:
        raise ConfigError("--methods needs at least one method, e.g. step,tome,cts,dtop")
    names = [m.label for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods names an operating point twice: {','.join(names)}")
    return methods
