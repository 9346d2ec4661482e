"""Reading an mmsegmentation config file without executing it.

mmsegmentation configs are Python files (`model = dict(backbone=dict(...), ...)`). tokenscope never
runs them: the file is parsed with `ast` and only literal values are taken: numbers, strings,
tuples, lists, `dict(...)` calls with literal arguments, and names bound to such values earlier in
the same file. Values inherited from `_base_` files that are not beside it stay unknown, and the
importer falls back to what the weights themselves show.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

_UNKNOWN = object()


def _value(node: ast.AST, names: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_value(e, names) for e in node.elts]
        return _UNKNOWN if any(i is _UNKNOWN for i in items) else (tuple(items) if isinstance(node, ast.Tuple) else items)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            key = _value(k, names) if k is not None else _UNKNOWN
            if isinstance(key, str):
                out[key] = _value(v, names)
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {kw.arg: _value(kw.value, names) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.Name):
        return names.get(node.id, _UNKNOWN)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        v = _value(node.operand, names)
        return -v if isinstance(v, (int, float)) else _UNKNOWN
    return _UNKNOWN


def parse_config_text(text: str) -> dict[str, Any]:
    """Top-level assignments of a config, literal parts only (unknown parts are left out)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, MemoryError, RecursionError, ValueError):  # not a config we can read: nothing known
        return {}
    names: dict[str, Any] = {}
    sizes: dict[int, int] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _value(stmt.value, names)
            # names may refer to names: `a1 = dict(p=a0, q=a0)` sixty times is 2**60 values once expanded
            names[stmt.targets[0].id] = value if _expanded_size(value, sizes) <= MAX_NODES else _UNKNOWN
    return {k: _strip(v) for k, v in names.items() if v is not _UNKNOWN}


MAX_NODES = 100_000
"""The most values a config's name may stand for once its references are expanded (real configs: a few
hundred); a name built to grow past it is left unknown, so nothing walks it."""


def _expanded_size(v: Any, sizes: dict[int, int]) -> int:
    """Values `v` stands for with every shared part counted each time it appears, computed once per
    object (linear in the file, whatever the expansion)."""
    if not isinstance(v, (dict, list, tuple)):
        return 1
    key = id(v)
    if key not in sizes:
        children = v.values() if isinstance(v, dict) else v
        sizes[key] = min(1 + sum(_expanded_size(c, sizes) for c in children), MAX_NODES + 1)
    return sizes[key]


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip(x) for k, x in v.items() if x is not _UNKNOWN}
    return v


def read_config_file(path: str | Path) -> dict[str, Any]:
    return parse_config_text(Path(path).read_text(errors="replace"))


def find(cfg: Any, *path: str) -> Any:
    """cfg[path[0]][path[1]]..., or None where any step is missing."""
    cur = cfg
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def search(cfg: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in nested dicts (depth first), or None."""
    if isinstance(cfg, dict):
        if key in cfg:
            return cfg[key]
        for v in cfg.values():
            found = search(v, key)
            if found is not None:
                return found
    elif isinstance(cfg, list):
        for v in cfg:
            found = search(v, key)
            if found is not None:
                return found
    return None
