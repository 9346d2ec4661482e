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
"""

from __future__ import annotations

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

    @property
    def fixes_policy(self) -> bool:
        return self.policy != "default"


def parse_method(text: str) -> Method:
    """`step`, `tome`, `dtop+tome`, ... (see the module table)."""
    name = str(text).strip().lower()
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
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods names a method twice: {','.join(names)}")
    return methods
