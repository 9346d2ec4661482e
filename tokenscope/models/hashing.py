"""File digests: one SHA-256 reader for weights ids, download checks and import records."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Full SHA-256 of a file (hex), read in 1 MiB chunks so multi-GB checkpoints stream."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
