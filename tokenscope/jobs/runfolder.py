"""Run folders: fresh, never overwritten, and never half-written where a reader could see it.

Layout of a run: `<out>/<kind>-YYYYmmdd-HHMMSS[-n]/` holding one sub-folder per image, written
as `.partial-<name>/` and renamed when complete, and a `run.json` manifest written last
(atomically). A folder without `run.json` is an interrupted run; readers skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from contextlib import contextmanager

import cv2
import numpy as np

from tokenscope.errors import RunFolderError, TokenscopeError
from tokenscope.schema import read_json
from tokenscope.render.manifest import read_manifest as _read_checked
from tokenscope.storage import atomic_write, storage_error, text_of, track_folder, writing

if TYPE_CHECKING:  # the frame sink's processes write folders, never tables: they need not load pandas
    import pandas as pd

MANIFEST = "run.json"
PARTIAL_PREFIX = ".partial-"


def new_run_dir(root: str | os.PathLike[str], kind: str = "run") -> Path:
    """Create and return a new, empty run folder under `root` (never reuses an existing one)."""
    base = Path(root)
    if base.exists() and not base.is_dir():
        raise RunFolderError(f"--out {base} is a file, not a folder")
    if os.path.islink(base) and not base.exists():
        raise RunFolderError(f"--out {base} is a symbolic link to nothing (or a loop of links): choose another --out")
    with writing(base):
        base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        cand = base / (f"{kind}-{stamp}" if n == 1 else f"{kind}-{stamp}-{n}")
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise storage_error(exc, cand) from None
        return track_folder(cand)
    raise RunFolderError(f"too many runs named {kind}-{stamp} in {base}")


RESERVED_NAMES = frozenset({
    "tables", "figures", "summary.json", "run.json", "explorer.html", "explorer-served.html", "explorer_data",
    "report.html", "compare.csv", "methods.csv", "tokens_per_block.csv", "sweep.csv", "frames.csv", "clips",
    "windows.json", "lock", "scaling.png"})
"""Names a run, compare or sweep folder uses for itself: an image named `tables.png` or `explorer_data.png`
must never get a folder of that name (its files would be written over, or the explorer's export would
replace it)."""


def is_reserved(name: str) -> bool:
    low = name.lower()
    return low in RESERVED_NAMES or low.startswith(("heatmaps-", "explorer", "report", "pareto_"))


def check_no_links(run_dir: Path) -> None:
    """Refuse a run folder holding a symbolic link where tokenscope writes (`tables/`, `figures/`,
    `summary.json`, an image folder...): its files would be written wherever the link points."""
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError as exc:
        raise storage_error(exc, run_dir, "read") from None
    for entry in entries:
        if entry.is_symlink():
            raise RunFolderError(f"{entry} is a symbolic link, and tokenscope never writes through a link inside a "
                                 "run folder (its files would land wherever it points): remove it, then run again")


def unique_name(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... so two images with one stem never share a folder; a stem that
    is one of the folder's own names (`tables`, `run.json`, ...) becomes `stem-image`."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem).lstrip(".") or "image"
    safe = safe[:120]  # a name the file system takes, whatever the input's length
    if is_reserved(safe):
        safe = f"{safe}-image"
    name, n = safe, 2
    while name in taken:
        name, n = f"{safe}-{n}", n + 1
    taken.add(name)
    return name


@contextmanager
def image_folder(run_dir: Path, name: str) -> Iterator[Path]:
    """Yield a partial folder to write into; it becomes `run_dir/name` only if the block succeeds."""
    partial = run_dir / f"{PARTIAL_PREFIX}{name}"
    if partial.exists():
        shutil.rmtree(partial)
    with writing(partial):
        partial.mkdir()
    try:
        with writing(partial):
            yield partial
            os.replace(partial, run_dir / name)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON (standard: NaN and infinities are refused, never written as bare tokens) via storage."""
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True)
    atomic_write(path, lambda f: f.write(_standard_json(text, obj)))


def _standard_json(text: str, obj: Any) -> str:
    """`text` when it is standard JSON; else the same document with NaN/inf as null."""
    if "NaN" not in text and "Infinity" not in text:
        return text
    return json.dumps(_finite(obj), indent=2, default=_json_default)


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not np.isfinite(o):
        return None
    if isinstance(o, np.floating) and not np.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def fresh_file(path: Path) -> Path:
    """`path`, or `stem-2.suffix`, `stem-3.suffix`, ... whichever does not exist yet."""
    cand, n = path, 2
    while cand.exists():
        cand, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return cand


def _encodable(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with text that cannot be written as UTF-8 (a file name holding a byte that is not UTF-8 arrives
    as a lone surrogate) shown with a replacement character; `df` itself when there is none."""
    fixed = None
    for col in df.columns:
        if df[col].dtype != object:
            continue
        values = df[col].map(lambda v: text_of(v) if isinstance(v, str) else v)
        if not values.equals(df[col]):
            fixed = df.copy() if fixed is None else fixed
            fixed[col] = values
    return df if fixed is None else fixed


def write_table(df: pd.DataFrame, path: Path) -> None:
    """CSV or Parquet by suffix, via a temporary file and a rename."""
    df = _encodable(df)
    if path.suffix == ".parquet":
        atomic_write(path, lambda f: df.to_parquet(f, index=False), mode="wb")
    else:
        atomic_write(path, lambda f: df.to_csv(f, index=False))


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    """PNG (or JPEG at quality 95, by suffix) from an RGB uint8 array (OpenCV writes BGR)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RunFolderError(f"cannot encode {path.name}")
    atomic_write(path, lambda f: f.write(buf.tobytes()), mode="wb")


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise RunFolderError(f"{path}: missing or unreadable")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


LOCK = ".lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder for this process (an OS file lock, freed however the process ends);
    a second holder gets one line saying the folder is busy."""
    import fcntl

    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such run folder")
    with writing(run_dir / LOCK):
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(f"{run_dir} is busy: another tokenscope process is working on it (wait for it, "
                                 "or stop it first)") from None
        yield
    finally:
        os.close(fd)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run folder's checked run.json (see render/manifest.py)."""
    return _read_checked(run_dir)


def _complete(run_dir: Path) -> bool:
    try:
        return read_json(run_dir / MANIFEST, MANIFEST).get("status", "complete") == "complete"
    except (OSError, TokenscopeError):
        return False


def latest_run(root: str | os.PathLike[str], kind: str = "run") -> Path:
    """The newest finished run folder of `kind` under `root`."""
    base = Path(root)
    runs = sorted((p for p in base.glob(f"{kind}-*") if p.is_dir() and _complete(p)),
                  key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))
    if not runs:
        raise RunFolderError(f"no finished {kind} folders in {base}; run `tokenscope {kind} IMAGE` first or pass a run folder")
    return runs[-1]
