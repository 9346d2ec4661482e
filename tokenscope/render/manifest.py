"""A folder's `run.json`, read and checked against its shape before anything uses it.

Every reader of run, compare and sweep folders (view, heatmap, report, table, `run --resume`)
comes through here, so a manifest that is valid JSON of the wrong shape (a list, `"images":
"oops"`, an image folder pointing outside the run) is one line naming the file and the field,
never an AttributeError three calls later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenscope.errors import RunFolderError
from tokenscope.schema import check_fields, read_json

MANIFEST = "run.json"
FIELD_TYPES: dict[str, Any] = {
    "kind": str, "status": str, "model": str, "request": dict, "summary": dict, "warnings": list[str], "images": list,
    "methods": list | None, "overall": dict | list, "class_space": dict | None,
}


def check_manifest(doc: Any, path: Path) -> dict[str, Any]:
    """`doc` if it has the shape of a manifest, else one RunFolderError naming the first bad field."""
    if not isinstance(doc, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got a {type(doc).__name__}")
    check_fields(doc, FIELD_TYPES, path)
    for i, entry in enumerate(doc.get("images", [])):
        if not isinstance(entry, dict):
            raise RunFolderError(f"{path}: images[{i}] must be an object, got {type(entry).__name__}")
        folder = entry.get("folder")
        if folder is not None and (not isinstance(folder, str) or not folder or "/" in folder or "\\" in folder
                                   or folder in (".", "..")):
            raise RunFolderError(f"{path}: images[{i}].folder must be a folder name inside the run, got {folder!r}")
        for key in ("source", "error"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise RunFolderError(f"{path}: images[{i}].{key} must be a string")
    for i, m in enumerate(doc.get("methods") or []):
        if not isinstance(m, str) or not m or "/" in m or "\\" in m or m in (".", "..") or len(m) > 1000:
            raise RunFolderError(f"{path}: methods[{i}] must be a method's name, got {str(m)[:80]!r}")
    return doc


def method_folder_name(method: str) -> str:
    """The folder a method's traces go in inside a compare image folder (`tome:r=16` -> `tome_r16`)."""
    return method.replace(":", "_").replace("=", "").replace("+", "-")


def read_manifest(folder: Path, what: str = "tokenscope run folder") -> dict[str, Any]:
    """The checked manifest of `folder`; one line when it is missing, unreadable or misshapen."""
    path = Path(folder) / MANIFEST
    try:
        doc = read_json(path, MANIFEST, kind=object)
    except FileNotFoundError:
        raise RunFolderError(f"{folder}: no {MANIFEST}; not a {what}") from None
    return check_manifest(doc, path)
