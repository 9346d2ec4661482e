"""One check for every file tokenscope reads back: run.json and what is under it (summary.json,
eval.json, trace.json, windows.json), checkpoint descriptions and operating points.

These files are data, never trusted: someone may send a run folder, edit a field by hand or fill a
file with a pipe. Every reader goes through `read_json` (a regular file, at most a bounded size,
JSON, the expected top-level kind) and `check_fields` (each named field has its declared type:
`int | None`, `list[float]`, ...), so a file of the wrong shape is one line naming the file and the
field, in the reader's own error class, never a TypeError three calls later.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from tokenscope.errors import RunFolderError, TokenscopeError
from tokenscope.storage import MAX_TEXT_BYTES, read_regular_text

Hints = dict[str, Any]

SUMMARY_FIELDS: Hints = {
    "tokens": float, "patches": float, "reduction": float, "gflops": float, "merged_pct": float, "pruned_pct": float,
    "exited_pct": float, "exited_early_pct": float, "class_source": str, "warnings": list[str],
}
"""The numbers a summary.json (a run's or an image's) is read back for; the rest is shown as it is."""


def read_json(path: str | os.PathLike[str], what: str, error: type[TokenscopeError] = RunFolderError,
              kind: type = dict, limit: int = MAX_TEXT_BYTES) -> Any:
    """The parsed JSON of `path`, of top-level `kind`; one `error` naming the file otherwise (missing
    files raise FileNotFoundError, for readers to whom a missing file means something)."""
    p = Path(path)
    try:
        text = read_regular_text(p, what, limit)
    except FileNotFoundError:
        raise
    except TokenscopeError as exc:
        raise error(str(exc)) from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise error(f"{p}: not readable as a {what} file ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(doc, kind):
        raise error(f"{p}: a {what} file holds a JSON {_json_name(kind)}, got a {_json_name(type(doc))}")
    return doc


def check_fields(doc: dict[str, Any], hints: Hints | type, where: Path | str, prefix: str = "",
                 error: type[TokenscopeError] = RunFolderError, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Each field of `doc` named in `hints` (a {name: annotation} map, or a dataclass whose annotations
    are used) has its declared type; fields not named are left to their reader."""
    types_of = typing.get_type_hints(hints) if isinstance(hints, type) else hints
    for key, value in doc.items():
        if key in skip or key not in types_of:
            continue
        if not has_type(value, types_of[key]):
            name = f"{prefix}.{key}" if prefix else key
            raise error(f"{where}: field {name!r} must be {describe(types_of[key])}, got "
                        f"{_json_name(type(value))} {str(value)[:60]!r}")


def has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a simple annotation (int, float, str, bool, list[...], dict[...], X | None,
    Any); numbers must be finite, and a bool is not a number."""
    if hint is Any:
        return True
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(has_type(value, a) for a in args)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        item = args[0] if args else Any
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (len(args) < 2 or all(
            has_type(k, args[0]) and has_type(v, args[1]) for k, v in value.items()))
    return True  # anything richer is checked where it is used


def describe(hint: Any) -> str:
    """An annotation in words a user of JSON understands ('a whole number or null')."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if origin in (list, tuple) or hint in (list, tuple):
        args = typing.get_args(hint)
        return "a list" + (f" of {_plural(describe(args[0]))}" if args and args[0] is not Any else "")
    if origin is dict or hint is dict:
        return "a JSON object"
    words = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text",
             type(None): "null", None: "null"}
    return words.get(hint, "a value")


def whole(value: Any, low: int, high: int) -> bool:
    """A whole number (not a bool) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def number(value: Any) -> bool:
    """A finite number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plural(words: str) -> str:
    return words.removeprefix("a ").removeprefix("an ") + ("s" if not words.endswith("null") else "")


def _json_name(kind: type) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)
