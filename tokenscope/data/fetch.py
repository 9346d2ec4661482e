"""Data sets by name in the cache: fetch (download, verify, unpack atomically), find, list.

`tokenscope data fetch ade20k` downloads the official ADE20K scene-parsing archive through the
one downloader (resume, lock, hash check), unpacks it into a hidden folder beside its final place
and renames it into `$TOKENSCOPE_HOME/data/ade20k/` only when complete, so a data folder that
exists is whole. From then on `--data ade20k` without `--data-root` finds it. Cityscapes and
Pascal Context need an account or a conversion tool: for them `fetch` says what to download,
from where and where to put it.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenscope.data.download import DownloadProgress, cache_root, download, file_lock
from tokenscope.errors import ConfigError, DownloadError


@dataclass(frozen=True)
class DataSource:
    """Where a data set comes from and what its unpacked tree looks like."""

    name: str
    url: str
    """The archive's published address; empty when it cannot be downloaded without an account."""
    algorithm: str
    digest: str
    top: str
    """The folder the archive unpacks to (inside `data/NAME/`)."""
    size: str
    manual: str = ""
    """For data sets that cannot be fetched automatically: what to download and where to put it."""
    max_bytes: int | None = None
    """A bound just above the published archive's size: a server sending more is refused, not stored."""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


SOURCES: dict[str, DataSource] = {s.name: s for s in (
    DataSource("ade20k", "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip", "sha1",
               "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7", "ADEChallengeData2016", "923 MB",
               max_bytes=1_000_000_000),
    DataSource("cityscapes", "", "", "", "", "11 GB", manual=(
        "Cityscapes needs an account: register at https://www.cityscapes-dataset.com, download "
        "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, and unpack both into {dest} so that it holds "
        "leftImg8bit/ and gtFine/ (labelIds are mapped to train ids on the fly; *_labelTrainIds.png are used "
        "when present). Then --data cityscapes finds it.")),
    DataSource("pascal_context", "", "", "", "", "2 GB", manual=(
        "Pascal Context needs the VOC2010 images and the 59-class context labels converted with the Detail "
        "API: download VOCtrainval_03-May-2010.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2010/, "
        "convert trainval_merged.json with mmsegmentation's tools/dataset_converters/pascal_context.py, "
        "and put the result in {dest} so that it holds JPEGImages/, SegmentationClassContext/ and "
        "ImageSets/SegmentationContext/{{train,val}}.txt. Then --data pascal_context finds it.")),
)}


def data_home() -> Path:
    return cache_root() / "data"


def dataset_dir(name: str) -> Path:
    """Where data set `name` lives in the cache."""
    return data_home() / name


def lookup(name: str) -> DataSource:
    if name not in SOURCES:
        raise ConfigError(f"no data set named {name!r} to fetch; known: {', '.join(SOURCES)}")
    return SOURCES[name]


def cached_root(name: str) -> Path:
    """The cached tree of `name`, or a one-line error saying where it was looked for and what to do."""
    dest = dataset_dir(name)
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    how = f"`tokenscope data fetch {name}`" if SOURCES.get(name, None) and SOURCES[name].url else \
        f"`tokenscope data fetch {name}` (it says how to get it)"
    raise ConfigError(f"data set {name!r} is not in the cache (looked in {dest}); run {how} or pass --data-root")


def check_url(url: str) -> None:
    """A mirror's address must be an http(s) or file URL with a place to fetch from."""
    from urllib.parse import urlparse

    parts = urlparse(url)
    if parts.scheme not in ("http", "https", "file") or (parts.scheme != "file" and not parts.netloc) or not parts.path:
        raise ConfigError(f"--url {url!r}: expected an http://, https:// or file:// address of the archive")


def fetch(name: str, progress: DownloadProgress | None = None, url: str | None = None,
          keep_archive: bool = False, offline: bool | None = None) -> Path:
    """Download, verify and unpack data set `name` into the cache; returns its folder.

    `url` overrides the published address (a mirror: the archive must still match the published
    digest). A data set already unpacked is returned as it is. Data sets that need an account
    raise a ConfigError holding the instructions.
    """
    source = lookup(name)
    dest = dataset_dir(name)
    if not source.url:
        raise ConfigError(source.manual.format(dest=dest))
    if (dest / source.top).is_dir():
        return dest
    archive = cache_root() / "downloads" / source.filename
    if url is not None:
        check_url(url)
    download(url or source.url, archive, source.algorithm, source.digest, progress, offline=offline,
             max_bytes=source.max_bytes)
    with file_lock(dest):
        if not (dest / source.top).is_dir():
            _unpack(archive, dest, source.top)
    if not keep_archive and archive.exists():
        archive.unlink()
    return dest


def _unpack(archive: Path, dest: Path, top: str) -> None:
    """Unpack into a hidden sibling folder, check the expected top folder, then rename into place."""
    work = dest.with_name(f".{dest.name}.unpacking-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        try:
            with zipfile.ZipFile(archive) as z:
                bad = [n for n in z.namelist() if n.startswith("/") or ".." in Path(n).parts]
                if bad:
                    raise DownloadError(f"{archive}: refuses to unpack paths outside its folder ({bad[0]})")
                z.extractall(work)
        except zipfile.BadZipFile:
            archive.unlink()
            raise DownloadError(f"{archive}: not a readable zip archive (deleted; fetch again)") from None
        except OSError as exc:
            raise DownloadError(f"cannot unpack {archive} into {dest.parent} ({exc.strerror or exc})") from None
        if not (work / top).is_dir():
            raise DownloadError(f"{archive}: expected a folder {top}/ inside, found {sorted(p.name for p in work.iterdir())[:5]}")
        if dest.exists():
            shutil.rmtree(dest)  # an empty or partial folder a user made; the archive is the truth
        os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def listing() -> list[dict[str, object]]:
    """Every known data set: whether it is cached, where, and its size on disk."""
    rows = []
    for name, source in SOURCES.items():
        dest = dataset_dir(name)
        cached = dest.is_dir() and any(dest.iterdir())
        rows.append({"name": name, "cached": cached, "path": str(dest), "bytes": folder_size(dest) if cached else 0,
                     "download": source.size if source.url else f"manual ({source.size})"})
    return rows
