"""The Python API's arguments checked against the types its functions declare.

Every public function of `tokenscope.api` and `tokenscope.plot` is wrapped by `checked`: a value of the
wrong type (`size="abc"`, `methods=5`, `load_trace(123)`, `plot.merge(None)`) is one `ConfigError`
naming the function, the argument, what it takes and what it got, never a TypeError from deep inside;
a single path where a list of paths is declared is taken as a list of one (`compare("x.png")` compares
one image, not its characters). Only simple annotations are checked (str, paths, numbers, bool, lists,
classes); anything richer is left to the function, which checks values itself.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import os
import types
import typing
from typing import Any, Callable, TypeVar

import numpy as np

from tokenscope.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
OWN_CHECKS = frozenset({"model"})
"""Arguments the functions check themselves, with a message that says what to pass instead (a torch
module where a Model goes: `ts.from_timm(...)`)."""
_NOT_CHECKED = object()


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = dict.fromkeys(_describe(a) for a in args if a is not type(None))
        return " or ".join(words) + (" or None" if type(None) in args else "")
    if origin in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if hint is os.PathLike or hint is os.PathLike[str]:
        return "a path"
    if isinstance(hint, type):
        return {"str": "a str", "int": "a whole number", "float": "a number", "bool": "True or False",
                "Path": "a path", "dict": "a dict"}.get(hint.__name__, f"a {hint.__name__}")
    return str(hint)


def _fits(value: Any, hint: Any) -> bool | object:
    """True or False when `hint` is simple enough to judge `value` by, else _NOT_CHECKED."""
    if hint is Any or hint is inspect.Parameter.empty:
        return _NOT_CHECKED
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        results = [_fits(value, a) for a in args]
        if any(r is True for r in results):
            return True
        return _NOT_CHECKED if any(r is _NOT_CHECKED for r in results) else False
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, os.PathLike) or hint is os.PathLike:
        return isinstance(value, (str, os.PathLike))
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        items = [_fits(v, args[0]) for v in value]
        return False if any(r is False for r in items) else True
    if origin is collections.abc.Iterable:
        if isinstance(value, (str, bytes)) and not (args and args[0] is str):
            return False
        if not isinstance(value, collections.abc.Iterable):
            return False
        if args and isinstance(value, (list, tuple)):  # a generator is not consumed to check it
            return not any(_fits(v, args[0]) is False for v in value)
        return True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and hint.__module__.startswith(("tokenscope", "torch", "numpy", "pathlib")):
        return isinstance(value, hint)
    return _NOT_CHECKED


def _wants_list_of_paths(hint: Any, value: Any) -> bool:
    """Whether `hint` takes a list whose items may be `value` (a path), and not `value` itself."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_wants_list_of_paths(a, value) for a in args) and not any(_fits(value, a) is True for a in args)
    if origin not in (list, tuple, collections.abc.Sequence, collections.abc.Iterable):
        return False
    return not args or _fits(value, args[0]) is not False


def checked(fn: F) -> F:
    """`fn` with its arguments checked against its annotations (see the module docstring)."""
    sig = inspect.signature(fn)
    hints: dict[str, Any] | None = None
    where = getattr(fn, "__qualname__", getattr(fn, "__name__", "function"))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal hints
        if hints is None:
            try:
                hints = typing.get_type_hints(fn)
            except Exception:  # an annotation this Python cannot evaluate: nothing is checked
                hints = {}
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}(): {exc}") from None
        for name, value in list(bound.arguments.items()):
            hint = hints.get(name)
            if hint is None or value is None and sig.parameters[name].default is None or name in OWN_CHECKS:
                continue
            if isinstance(value, (str, os.PathLike)) and _wants_list_of_paths(hint, value):
                value = bound.arguments[name] = [value]  # one path where a list is declared: a list of one
            if _fits(value, hint) is False:
                shown = repr(value).splitlines()[0] if repr(value) else ""
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise ConfigError(f"{where}({name}=...): expected {_describe(hint)}, got {type(value).__name__} "
                                  f"{shown}")
        return fn(*bound.args, **bound.kwargs)

    return wrapper  # type: ignore[return-value]
