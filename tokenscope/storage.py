"""Where every file write goes: atomically, cleaned up on failure, and one clear line when the
disk says no.

A file is written to a temporary name in its own folder and renamed over its target only when
complete, so a reader never sees half a file; on any failure the temporary file is removed. An
operating-system refusal (a full disk or quota, a read-only or vanished folder, no permission)
becomes a `StorageError` naming the path and what to do, with exit code 3, instead of a
traceback. Fresh output folders are registered when made, so a command that fails before it
marks one complete (`run.json` present) can take away what it left: no empty or half-filled
`compare-*` folder stays behind, while a run folder that has its `run.json` stays, for `--resume`.

This module is a leaf (standard library only), so every layer may write through it.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from tokenscope.errors import StorageError

MANIFEST = "run.json"
HINTS = {
    errno.ENOSPC: "the disk is full: free some space (a run then finishes with --resume) or choose another --out",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another --out",
    errno.EROFS: "the folder is read-only: choose another --out",
    errno.EACCES: "no permission to write there: choose another --out",
    errno.EPERM: "no permission to write there: choose another --out",
    errno.ENOENT: "the folder vanished while writing: make sure it exists and try again",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another --out",
    errno.EIO: "the device reported an I/O error: check the disk",
    errno.EEXIST: "something is already there (a file, or a link to nowhere): choose another --out",
    errno.ENAMETOOLONG: "a file or folder name is too long: choose a shorter --out or rename the input",
    errno.EISDIR: "a folder is in the way of a file: choose another --out",
    errno.EFBIG: "the file grew past the size this process may write (ulimit -f): raise the limit or write less",
    errno.ELOOP: "the path goes round a loop of symbolic links: choose another --out",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n) and try again",
    errno.ENXIO: "the path is not a file that can be read (a device or a pipe with no writer)",
}
_created: list[Path] = []


def is_storage_error(exc: BaseException) -> bool:
    """Any refusal by the operating system (an OSError with an errno): every one is one line."""
    return isinstance(exc, OSError) and exc.errno is not None


def storage_error(exc: OSError, path: str | os.PathLike[str] | None = None, verb: str = "write") -> StorageError:
    """The one-line error for an OS refusal to write `path` (or the file the exception names);
    `verb` "use" where it is not known whether the file was being read or written."""
    where = path if path is not None else (exc.filename or "?")
    code = exc.errno or 0
    name = errno.errorcode.get(code, str(code))
    hint = HINTS.get(code, f"the system said {name}; check the path and try again")
    if in_cache_home(where):  # the cache is not an --out: its place is chosen by TOKENSCOPE_HOME
        hint = hint.replace("choose another --out", "point TOKENSCOPE_HOME at another folder")
    return StorageError(f"cannot {verb} {where}: {exc.strerror or exc} ({hint})")


def in_cache_home(path: str | os.PathLike[str]) -> bool:
    """Whether `path` lies in the folder TOKENSCOPE_HOME names (when it names one)."""
    home = os.environ.get("TOKENSCOPE_HOME")
    if not home:
        return False
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(Path(home).expanduser()))
    except (OSError, ValueError):
        return False


MAX_TEXT_BYTES = 64 * 2**20
"""The largest JSON/YAML/text file tokenscope reads back (a run.json of 100,000 images is a few MB)."""


def read_regular_text(path: str | os.PathLike[str], what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The text of `path`, refused in one line (a `StorageError`) when it is not a regular file (a FIFO
    would block the read forever, a device never ends) or is larger than `limit`."""
    import stat

    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise storage_error(exc, p, "read") from None
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(f"cannot read {p}: not a regular file (a pipe, device or folder); name a {what} file")
    if st.st_size > limit:
        raise StorageError(f"cannot read {p}: {st.st_size} bytes is more than a {what} file can be ({limit} at most)")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise storage_error(exc, p, "read") from None
    if len(data) > limit:
        raise StorageError(f"cannot read {p}: larger than a {what} file can be ({limit} bytes at most)")
    return data.decode("utf-8", errors="replace")


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OS refusal inside the block into a StorageError naming `path`."""
    try:
        yield
    except OSError as exc:
        if is_storage_error(exc):
            raise storage_error(exc, path) from None
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()
"""Read once at import: the umask is process-wide, so setting it to read it while another thread
creates a file could give that file the wrong permissions."""


def _write_then_place(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], mode: str,
                      file_mode: int | None, place: Callable[[str, Path], None]) -> Path:
    """`write(file)` into a temporary file beside `path`, then `place(tmp, target)` it; the temporary
    file is removed whatever goes wrong."""
    target = Path(path)
    tmp: str | None = None
    with writing(target):
        try:
            kw: dict[str, Any] = {"encoding": "utf-8"} if "b" not in mode else {}
            with tempfile.NamedTemporaryFile(mode, dir=target.parent, suffix=".tmp", delete=False,
                                             prefix=f".{target.name}.", **kw) as f:
                tmp = f.name
                write(f)
            os.chmod(tmp, FILE_MODE if file_mode is None else file_mode)
            place(tmp, target)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    return target


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], mode: str = "w",
                 file_mode: int | None = None) -> Path:
    """`write(file)` into a temporary file beside `path`, then rename it over `path`; the temporary
    file is removed whatever goes wrong. Returns `path`."""
    return _write_then_place(path, write, mode, file_mode, os.replace)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Refuse, before any work, an output folder that cannot take a file (read-only, no permission,
    a file in the way). A folder that does not exist yet is judged by the nearest one that does
    (nothing is created here)."""
    d = Path(folder).absolute()
    probe_dir = d
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    with writing(d):
        if not probe_dir.is_dir():
            raise StorageError(f"cannot write into {d}: {probe_dir} is a file, not a folder (choose another --out)")
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".tokenscope-write-check-")
        os.close(fd)
        os.unlink(probe)


def track_folder(folder: Path) -> Path:
    """Note a fresh output folder, so a failure before it is complete can take it away again."""
    _created.append(Path(folder))
    return folder


def forget_folder(folder: Path) -> None:
    """A folder that is complete (or was handed over) is no longer this process's to remove."""
    _created[:] = [p for p in _created if p != Path(folder)]


def resumable_folders() -> list[Path]:
    """The fresh folders this process made that already hold their manifest (an interrupted run that
    `--resume` finishes), newest last."""
    return [p for p in _created if (p / MANIFEST).is_file()]


def discard_incomplete() -> list[Path]:
    """Remove the fresh folders this process made that never got their manifest; return them.
    A folder with `run.json` (an interrupted run, resumable) is kept."""
    removed = []
    for folder in reversed(_created):
        if folder.is_dir() and not (folder / MANIFEST).exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    _created.clear()
    return removed


def write_exclusive(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], mode: str = "w",
                    file_mode: int | None = None) -> Path:
    """Like `atomic_write`, but `path` must not exist: the complete file is linked into place, which
    fails if anything (a file, a dangling link) is there by then, so of two processes writing one
    `--out` at once exactly one succeeds and the other gets one line. Nothing is ever overwritten."""
    return _write_then_place(path, write, mode, file_mode, _link_new)


def _link_new(tmp: str, target: Path) -> None:
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise StorageError(f"cannot write {target}: it appeared while this command ran (another process "
                           "wrote it); nothing was overwritten, choose another --out") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)  # no hard links here
        with open(fd, "wb") as out, open(tmp, "rb") as src:
            shutil.copyfileobj(src, out)


@contextmanager
def output_lock(target: str | os.PathLike[str], what: str = "output") -> Iterator[None]:
    """Hold `target` for this process from the check that it is free to its last write (an OS file lock
    on `.NAME.lock` beside it, freed however the process ends): a second process writing the same
    `--out` at once gets one line instead of both believing they wrote it."""
    import fcntl

    t = Path(target)
    lock = t.with_name(f".{t.name}.lock")
    with writing(lock):
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(f"{t} is being written by another tokenscope process (the same --out); wait for it "
                               f"or choose another --out for this {what}") from None
        yield
    finally:
        os.close(fd)


def text_of(name: Any) -> str:
    """A file name as text any writer takes: a byte that is not UTF-8 (a lone surrogate once decoded)
    becomes a replacement character. For tables and figures; files are still opened by their own name."""
    s = str(name)
    if any("\ud800" <= ch <= "\udfff" for ch in s):
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return s


def resolved_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str | None:
    """`path` with every symbolic link resolved, or None when that leads out of `root` (itself resolved):
    the one test of "inside the run folder" for everything that reads files to hand them on."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real if real == real_root or real.startswith(real_root + os.sep) else None
