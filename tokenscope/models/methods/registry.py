"""Where methods come from: the built-ins, installed plug-ins, and files or modules named by the user.

- Built-ins: every module of `tokenscope/models/methods/builtin/` that defines `METHOD`. Adding a
  file there adds a method; no table lists them.
- Plug-ins: an installed distribution declares, in its pyproject.toml,
  `[project.entry-points."tokenscope.methods"] NAME = "package.module:METHOD"`.
- A file or module named in an operating point: `./my_rule.py`, `path/to/my_rule.py:frac=0.3`
  or `package.module` (anything with a `/`, a `.py` ending or a dot is not a method name).

Each is the same kind of object (base.Method), checked the same way when found: a plug-in that
fails to import, defines no METHOD, or declares a bad name is one line naming it and where it
came from, never a traceback. A built-in name cannot be taken over by a plug-in.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

from tokenscope.errors import ConfigError
from tokenscope.models.methods.base import Method

ENTRY_POINT_GROUP = "tokenscope.methods"
BUILTIN_PACKAGE = "tokenscope.models.methods.builtin"
NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class PluginError(ConfigError):
    """A method from outside the package could not be used (said in one line, naming it)."""


def is_external(name: str) -> bool:
    """Whether an operating point names a file or module rather than a registered method."""
    return "/" in name or "\\" in name or name.endswith(".py") or "." in name


def digest_of(path: str | Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def _method_of(module: ModuleType | Any, where: str) -> Method:
    """The METHOD a module (or an entry point's object) defines, checked."""
    obj = getattr(module, "METHOD", module) if isinstance(module, ModuleType) else module
    if isinstance(obj, type) and issubclass(obj, Method):
        obj = obj()  # a Method subclass: its instance
    elif callable(obj) and not isinstance(obj, Method):
        try:
            obj = obj()  # a factory returning a Method
        except (Exception, SystemExit) as exc:  # a plug-in's own bug: one line, naming it
            raise PluginError(f"{where}: building its method failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, Method):
        raise PluginError(f"{where}: defines no tokenscope method (expected METHOD = Method(...), "
                          "see docs/methods-api.md)")
    if not isinstance(obj.name, str) or not NAME.match(obj.name):
        raise PluginError(f"{where}: method name {obj.name!r} must be lower-case letters, digits, '_' or '-', "
                          "starting with a letter")
    return obj


def _origin(module: ModuleType) -> str | None:
    return getattr(module, "__file__", None)


@lru_cache(maxsize=1)
def builtin_methods() -> dict[str, Method]:
    """Every built-in method by name, in file order (vit, step, ... as the folder sorts)."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    out: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
        if not hasattr(module, "METHOD"):
            continue
        method = _method_of(module, f"built-in {info.name}")
        method.source = f"built-in ({BUILTIN_PACKAGE}.{info.name})"
        method.digest = digest_of(_origin(module))
        out[method.name] = method
    return out


BUILTIN_ORDER = ("vit", "step", "dcts", "dtop", "cts", "tome", "algm")
"""How built-ins are listed (the rest follow alphabetically): the baseline, STEP's own, then others."""


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Method:
    dist = getattr(ep, "dist", None)
    owner = f" from {dist.name} {dist.version}" if dist is not None else ""
    where = f"method plug-in {ep.name!r} (entry point {ep.value}{owner})"
    try:
        obj = ep.load()
    except (Exception, SystemExit) as exc:  # whatever the plug-in raises on import
        raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}") from None
    method = _method_of(obj, where)
    if method.name != ep.name:
        raise PluginError(f"{where} defines a method named {method.name!r}; the entry point's name must be the "
                          "method's")
    module = sys.modules.get(ep.module)
    method.source = f"entry point {ep.name} = {ep.value}{owner}"
    method.digest = digest_of(_origin(module) if module is not None else None)
    return method


_FILE_METHODS: dict[tuple[str, str], Method] = {}
"""Method files already loaded, by (resolved path, sha256 of their bytes): a sweep resolves the
same file once per operating point, and an edited file is loaded again."""


def load_external(spec: str) -> Method:
    """The method a file (`path/to/rule.py`) or module (`package.module`) defines."""
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise PluginError(f"method file {spec}: no such file")
        key = (str(path.resolve()), digest_of(path))
        if key in _FILE_METHODS:
            return _FILE_METHODS[key]
        name = f"tokenscope_user_method_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        where = f"method file {spec}"
        try:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise PluginError(f"{where}: not a Python file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        except PluginError:
            raise
        except (Exception, SystemExit) as exc:
            sys.modules.pop(name, None)
            raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}") from None
        method = _method_of(module, where)
        if method.name in builtin_methods():  # a file named on the command line may not pass for a built-in
            raise PluginError(f"{where} defines a method named {method.name!r}, a built-in method's name; "
                              "give it a name of its own")
        method.source = f"file {path.resolve()}"
        method.digest = key[1]
        _FILE_METHODS[key] = method
        return method
    where = f"method module {spec}"
    try:
        module = importlib.import_module(spec)
    except (Exception, SystemExit) as exc:
        raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}") from None
    method = _method_of(module, where)
    if method.name in builtin_methods():
        raise PluginError(f"{where} defines a method named {method.name!r}, a built-in method's name; "
                          "give it a name of its own")
    method.source = f"module {spec}"
    method.digest = digest_of(_origin(module))
    return method


def find_method(name: str) -> Method:
    """The method called `name` (built-in first, then installed plug-ins), or one line saying
    which exist. Only the plug-in asked for is imported, so a broken one elsewhere does not matter."""
    if is_external(name):
        return load_external(name)
    builtins = builtin_methods()
    if name in builtins:
        return builtins[name]
    for ep in _entry_points():
        if ep.name == name:
            return _load_entry_point(ep)
    known = ", ".join(list_names())
    raise ConfigError(f"unknown method {name!r}; choose one of {known}, a combination such as step+tome, "
                      "or a method file (./my_method.py); `tokenscope methods` lists them")


def list_names() -> list[str]:
    builtins = builtin_methods()
    names = [n for n in BUILTIN_ORDER if n in builtins] + sorted(n for n in builtins if n not in BUILTIN_ORDER)
    return names + [ep.name for ep in _entry_points() if ep.name not in builtins]


@dataclass
class Listing:
    """Everything `tokenscope methods` shows: the usable methods and the plug-ins that are not."""

    methods: list[Method]
    problems: list[str]


def all_methods() -> Listing:
    """Built-ins, then every installed plug-in (each loaded; a broken one becomes a problem line)."""
    builtins = builtin_methods()
    methods = [builtins[n] for n in list_names() if n in builtins]
    problems: list[str] = []
    for ep in _entry_points():
        if ep.name in builtins:
            problems.append(f"method plug-in {ep.name!r} ({ep.value}) is ignored: {ep.name} is a built-in method")
            continue
        try:
            methods.append(_load_entry_point(ep))
        except PluginError as exc:
            problems.append(str(exc))
    return Listing(methods, problems)
