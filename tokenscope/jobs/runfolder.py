"""Run folders: fresh, never overwritten, and never half-written where a reader could see it.

Layout of a run: `<out>/<kind>-YYYYmmdd-HHMMSS[-n]/` holding one sub-folder per image, written
as `.partial-<name>/` and renamed when complete, and a `run.json` manifest written last
(atomically). A folder without `run.json` is an interrupted run; readers skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
from contextlib import contextmanager

import cv2
import numpy as np

from tokenscope.errors import RunFolderError

if TYPE_CHECKING:  # the frame sink's processes write folders, never tables: they need not load pandas
    import pandas as pd

MANIFEST = "run.json"
PARTIAL_PREFIX = ".partial-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def publish(tmp: str | Path, path: Path) -> None:
    """Give a finished temporary file normal permissions and move it into place atomically."""
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def new_run_dir(root: str | os.PathLike[str], kind: str = "run") -> Path:
    """Create and return a new, empty run folder under `root` (never reuses an existing one)."""
    base = Path(root)
    if base.exists() and not base.is_dir():
        raise RunFolderError(f"--out {base} is a file, not a folder")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create output folder {base} ({exc.strerror or exc})") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        cand = base / (f"{kind}-{stamp}" if n == 1 else f"{kind}-{stamp}-{n}")
        try:
            cand.mkdir()
            return cand
        except FileExistsError:
            continue
        except OSError as exc:
            raise RunFolderError(f"cannot create run folder in {base} ({exc.strerror or exc})") from None
    raise RunFolderError(f"too many runs named {kind}-{stamp} in {base}")


def unique_name(stem: str, taken: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... so two images with one stem never share a folder."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in stem).lstrip(".") or "image"
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
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, run_dir / name)


def write_json_atomic(path: Path, obj: Any) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2, default=_json_default)
    publish(f.name, path)


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
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        f.write(text)
    publish(f.name, path)


def fresh_file(path: Path) -> Path:
    """`path`, or `stem-2.suffix`, `stem-3.suffix`, ... whichever does not exist yet."""
    cand, n = path, 2
    while cand.exists():
        cand, n = path.with_name(f"{path.stem}-{n}{path.suffix}"), n + 1
    return cand


def write_table(df: pd.DataFrame, path: Path) -> None:
    """CSV or Parquet by suffix, via a temporary file and a rename."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=path.suffix, delete=False) as f:
        tmp = f.name
    try:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    """PNG (or JPEG at quality 95, by suffix) from an RGB uint8 array (OpenCV writes BGR)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RunFolderError(f"cannot encode {path.name}")
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=path.suffix, delete=False) as f:
        f.write(buf.tobytes())
    publish(f.name, path)


def read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise RunFolderError(f"{path}: missing or unreadable")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir}: no {MANIFEST}; not a tokenscope run folder") from None
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{run_dir / MANIFEST}: unreadable ({exc})") from None


def _complete(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / MANIFEST).read_text()).get("status", "complete") == "complete"
    except (OSError, ValueError):
        return False


def latest_run(root: str | os.PathLike[str], kind: str = "run") -> Path:
    """The newest finished run folder of `kind` under `root`."""
    base = Path(root)
    runs = sorted((p for p in base.glob(f"{kind}-*") if p.is_dir() and _complete(p)),
                  key=lambda p: ((p / MANIFEST).stat().st_mtime, p.name))
    if not runs:
        raise RunFolderError(f"no finished {kind} folders in {base}; run `tokenscope {kind} IMAGE` first or pass a run folder")
    return runs[-1]
