"""One downloader for models and data sets: cache layout, resume, lock, hash check, offline mode.

A download goes to `TARGET.part` beside its target and becomes `TARGET` (one `os.replace`) only
when it is complete and its digest matches the published one, so a half-written or unverified
file is never used and never left where a later run would take it for complete. What it keeps:

- **resume**: an interrupted download leaves `TARGET.part`; the next try (automatic, up to
  `attempts`, or a later run) asks for the rest with an HTTP Range request and hashes the kept
  bytes instead of fetching them again; a server that ignores Range sends the whole file again;
- **one download per file**: an exclusive lock (fcntl, in the cache's `.locks/`) is held while fetching,
  so two processes, or all ranks of a torchrun job on one machine, download a file once; the
  others wait, then find it complete;
- **proxies**: urllib honours `http_proxy`, `https_proxy` and `no_proxy` as usual;
- **offline**: `offline=True` or `TOKENSCOPE_OFFLINE=1` fails at once, naming the URL and the path
  where the file should be put by hand (a file already there is checked and used).
Errors (404, time-outs, a full disk, a hash mismatch) are one-line `DownloadError`s.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tokenscope.errors import DownloadError, StorageError
from tokenscope.storage import in_cache_home

DownloadProgress = Callable[[int, int, str], None]
"""progress(bytes so far, total bytes or 0, file name)"""
CHUNK = 1 << 20
NAMES = {"sha256": "SHA-256", "sha1": "SHA-1"}


def _name(algorithm: str) -> str:
    return NAMES.get(algorithm, algorithm.upper())


def cache_root() -> Path:
    """`$TOKENSCOPE_HOME`, else `$XDG_CACHE_HOME/tokenscope`, else `~/.cache/tokenscope`."""
    if os.environ.get("TOKENSCOPE_HOME"):
        return Path(os.environ["TOKENSCOPE_HOME"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tokenscope"


def offline_mode() -> bool:
    """Whether `TOKENSCOPE_OFFLINE` asks for no network at all."""
    return os.environ.get("TOKENSCOPE_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_digest(path: Path, algorithm: str, expected: str) -> str:
    """The file's full digest, checked against the published one (or its published prefix)."""
    digest = file_digest(path, algorithm)
    if not digest.startswith(expected.lower()):
        raise DownloadError(f"{path}: {_name(algorithm)} {digest[:16]}... does not match the published "
                            f"{expected[:16]}...; delete it and fetch it again")
    return digest


def lock_path(target: Path) -> Path:
    """Where the lock of `target` lives: in the cache's `.locks/`, so that a failed download leaves
    its own folder empty (lock files are never deleted: deleting one would let two holders in)."""
    key = hashlib.sha1(str(Path(target).resolve()).encode()).hexdigest()[:16]
    return cache_root() / ".locks" / f"{Path(target).name}-{key}.lock"


@contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock for `target` (waits while another process holds it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download(url: str, target: Path, algorithm: str, expected: str, progress: DownloadProgress | None = None,
             timeout: float = 60.0, attempts: int = 3, offline: bool | None = None, max_bytes: int | None = None) -> str:
    """Make `target` the verified file at `url`; returns its full digest (`algorithm`: sha256, sha1).

    A file already at `target` (a finished download, or one placed by hand) is checked and used. With
    `max_bytes`, a response announcing or sending more than that is stopped and nothing is kept: an endless
    or wrong stream must not fill the disk.
    """
    target = Path(target)
    if target.is_file():
        return check_digest(target, algorithm, expected)
    blocked = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        where = "TOKENSCOPE_HOME" if in_cache_home(target) else "the cache folder"
        raise StorageError(f"cannot use {blocked}: it is a file, not a folder (point {where} at a folder)")
    if offline_mode() if offline is None else offline:
        raise DownloadError(f"offline: not downloading {url}; put the file at {target} "
                            f"({_name(algorithm)} {expected[:16]}...) and run again")
    with file_lock(target):
        if target.is_file():  # another process finished it while this one waited
            return check_digest(target, algorithm, expected)
        part = target.with_name(target.name + ".part")
        for attempt in range(1, attempts + 1):
            try:
                _fetch_rest(url, part, progress, timeout, target.name, max_bytes)
                break
            except _Interrupted as exc:
                if attempt == attempts:
                    raise DownloadError(f"{url}: {exc} after {attempts} tries; {part.stat().st_size if part.exists() else 0:,} "
                                        f"bytes kept in {part}, the next run resumes from there") from None
        digest = file_digest(part, algorithm)
        if not digest.startswith(expected.lower()):
            part.unlink()
            raise DownloadError(f"{url}: the downloaded file has {_name(algorithm)} {digest[:16]}..., expected "
                                f"{expected[:16]}...; it is damaged or not the published file (nothing was kept)")
        os.replace(part, target)
        return digest


class _TooLong(Exception):
    """More bytes arrived than the published file has."""


class _Interrupted(Exception):
    """The connection ended before the file did; what arrived is kept for the next try."""


def _fetch_rest(url: str, part: Path, progress: DownloadProgress | None, timeout: float, name: str,
                max_bytes: int | None = None) -> None:
    """Append the rest of the file at `url` to `part` (all of it when `part` is new)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the kept bytes are the whole file
            return
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            raise _Interrupted(f"timed out after {timeout:g} s") from None
        raise DownloadError(f"{url}: cannot connect ({exc.reason})") from None
    except (socket.timeout, TimeoutError):
        raise _Interrupted(f"timed out after {timeout:g} s") from None
    with response:
        resumed = have > 0 and response.status == 206
        if not resumed:
            have = 0  # a fresh download, or a server that ignored Range: start over
        length = int(response.headers.get("Content-Length") or 0)
        total = have + length if length else 0
        if max_bytes is not None and total > max_bytes:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: the server announces {total:,} bytes, more than the published file "
                                f"(at most {max_bytes:,}); it is not the published file (nothing was kept)")
        try:
            with open(part, "ab" if resumed else "wb") as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (socket.timeout, TimeoutError):
                        raise _Interrupted(f"timed out after {timeout:g} s") from None
                    except (ConnectionError, OSError, http.client.HTTPException) as exc:
                        raise _Interrupted(f"connection lost ({exc.__class__.__name__})") from None
                    if not chunk:
                        break
                    out.write(chunk)
                    have += len(chunk)
                    if max_bytes is not None and have > max_bytes:
                        raise _TooLong(have)
                    if progress:
                        progress(have, total, name)
        except _TooLong:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: the server sent more than {max_bytes:,} bytes, more than the published "
                                "file; it is not the published file (nothing was kept)") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                if not total:  # a stream of unknown length cannot be trusted to resume: give the space back
                    part.unlink(missing_ok=True)
                    raise DownloadError(f"disk full writing {part} after {have:,} bytes of a response of unknown "
                                        "length (nothing was kept); free space and run again") from None
                raise DownloadError(f"disk full writing {part} ({have:,} of {total:,} bytes); free space and run "
                                    "again to resume") from None
            raise
    if total and have < total:
        raise _Interrupted(f"connection closed after {have:,} of {total:,} bytes")
