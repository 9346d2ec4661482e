"""Errors a user can cause.

Every error that bad input, a wrong flag or a wrong file can trigger derives from
`TokenscopeError`. The CLI prints such an error as one line and exits non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TokenscopeError(Exception):
    """A problem the user can fix; the message says what to do."""

    exit_code = 2


class ImageError(TokenscopeError):
    """An input image (or label map) cannot be used."""

    exit_code = 3


class CheckpointError(TokenscopeError):
    """Weights are missing, unreadable, or do not fit the chosen model."""


class ConfigError(TokenscopeError):
    """An option or combination of options makes no sense."""


class RunFolderError(TokenscopeError):
    """A run folder or trace cannot be read or written."""


class DownloadError(TokenscopeError):
    """A file could not be downloaded, or what arrived is not the published file."""


class StorageError(TokenscopeError):
    """The disk refused a write: full, read-only, no permission, or the folder vanished."""

    exit_code = 3
