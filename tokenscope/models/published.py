"""Published Segmenter and EoMT checkpoints by name, fetched once into a local cache and converted.

`--model segmenter-vit-l-mask-ade20k` means: look in the cache (`$TOKENSCOPE_HOME/models/NAME/`,
default `~/.cache/tokenscope`); if the converted checkpoint is not there, download the file from
its published address, check its SHA-256, convert it with the Segmenter importer, and keep both.
Only this path touches the network, and only for a name that is not cached yet, through the one
downloader (tokenscope.data.download: resume, lock, hash check, offline mode). A download that
fails or does not match its hash leaves nothing in the cache but, when interrupted, the bytes it
got (`.part`), which the next try resumes from.

The weights are mmsegmentation's releases of the Segmenter models (the Segmenter authors' own
links are reported dead). mmsegmentation publishes the first 8 hex digits of each file's SHA-256
in its file name; that prefix is what is checked (enough to catch a corrupt or wrong file, not a
deliberate collision), and the full digest of the file actually used is recorded in the converted
checkpoint's metadata.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tokenscope.data.download import DownloadProgress, cache_root, check_digest, download
from tokenscope.errors import CheckpointError, DownloadError

MMSEG = "https://download.openmmlab.com/mmsegmentation/v0.5/segmenter"
BACKBONES = {"ViT-Ti/16": (192, 12, 16), "ViT-S/16": (384, 12, 16), "ViT-B/16": (768, 12, 16), "ViT-L/16": (1024, 24, 16),
             "DINOv2-L/16+reg4": (1024, 24, 16)}
EOMT = "https://huggingface.co/tue-mps"


@dataclass(frozen=True)
class PublishedModel:
    """A trained Segmenter checkpoint that can be fetched by name."""

    name: str
    backbone: str
    dataset: str
    decoder: str
    crop: int
    miou: float
    """Published single-scale mIoU (%) on the data set's validation split."""
    url: str
    sha256: str
    """Full hex digest, or the published prefix of it (at least 8 digits)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Facts from the model's config that the weights file alone does not carry."""
    reference: str = "mmsegmentation configs/segmenter/metafile.yaml"
    family: str = "segmenter"
    """Which importer reads the file: `segmenter` (Segmenter / mmsegmentation) or `eomt`."""
    queries: int = 0
    query_blocks: int = 0
    approx_bytes: int = 0
    """The file's size when its publisher does not state it: an estimate from the parameter count."""

    @property
    def hf_id(self) -> str:
        """`hf:ORG/NAME` of the model's Hugging Face repository ("" for files hosted elsewhere)."""
        prefix = "https://huggingface.co/"
        return "hf:" + self.url[len(prefix):].split("/resolve/")[0] if self.url.startswith(prefix) else ""

    @property
    def digest_note(self) -> str:
        return "sha256 prefix published" if self.sha256 else "no published digest: its sha256 is recorded at download"

    @property
    def architecture(self) -> tuple[int, int, int]:
        """(width, depth, patch) of the backbone."""
        return BACKBONES[self.backbone]

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def classes(self) -> int:
        return {"ade20k": 150, "cityscapes": 19, "pascal_context": 60}.get(self.dataset, 0)


def _ade(name: str, backbone: str, decoder: str, crop: int, miou: float, folder: str, stamp: str, digest: str) -> PublishedModel:
    return PublishedModel(
        name=name, backbone=backbone, dataset="ade20k", decoder=decoder, crop=crop, miou=miou,
        url=f"{MMSEG}/{folder}/{folder}_{stamp}-{digest}.pth", sha256=digest,
        overrides={"dataset": "ade20k", "window": crop, "stride": crop - 32, "resize_short": crop,
                   "pixel_mean": (0.5, 0.5, 0.5), "pixel_std": (0.5, 0.5, 0.5)},
    )


PUBLISHED: dict[str, PublishedModel] = {m.name: m for m in (
    _ade("segmenter-vit-t-mask-ade20k", "ViT-Ti/16", "mask", 512, 39.99,
         "segmenter_vit-t_mask_8x1_512x512_160k_ade20k", "20220105_151706", "ffcf7509"),
    _ade("segmenter-vit-s-linear-ade20k", "ViT-S/16", "linear", 512, 45.75,
         "segmenter_vit-s_linear_8x1_512x512_160k_ade20k", "20220105_151713", "39658c46"),
    _ade("segmenter-vit-s-mask-ade20k", "ViT-S/16", "mask", 512, 46.19,
         "segmenter_vit-s_mask_8x1_512x512_160k_ade20k", "20220105_151706", "511bb103"),
    _ade("segmenter-vit-b-mask-ade20k", "ViT-B/16", "mask", 512, 49.60,
         "segmenter_vit-b_mask_8x1_512x512_160k_ade20k", "20220105_151706", "bc533b08"),
    # Trained and evaluated at 640 px (its config: img_size 640, slide 640/608, short side 640),
    # although mmsegmentation's file name says 512x512.
    _ade("segmenter-vit-l-mask-ade20k", "ViT-L/16", "mask", 640, 52.16,
         "segmenter_vit-l_mask_8x1_512x512_160k_ade20k", "20220105_162750", "7ef345be"),
)}
PUBLISHED.update({m.name: m for m in (
    PublishedModel(name="eomt-l-ade20k-512", backbone="DINOv2-L/16+reg4", dataset="ade20k", decoder="eomt", crop=512,
                   miou=58.4, url=f"{EOMT}/ade20k_semantic_eomt_large_512/resolve/main/pytorch_model.bin", sha256="",
                   overrides={"dataset": "ade20k"}, reference="tue-mps/eomt model_zoo/dinov2.md", family="eomt",
                   queries=100, query_blocks=4, approx_bytes=1_270_000_000),
    PublishedModel(name="eomt-l-cityscapes-1024", backbone="DINOv2-L/16+reg4", dataset="cityscapes", decoder="eomt",
                   crop=1024, miou=84.2, url=f"{EOMT}/cityscapes_semantic_eomt_large_1024/resolve/main/pytorch_model.bin",
                   sha256="", overrides={"dataset": "cityscapes"}, reference="tue-mps/eomt model_zoo/dinov2.md",
                   family="eomt", queries=100, query_blocks=4, approx_bytes=1_270_000_000),
)})
"""Named published models. mIoU: single scale, on the data set's validation split, as the publisher
reports it (mmsegmentation for Segmenter, EoMT's model zoo for EoMT). EoMT publishes no digest: the
sha256 of the file downloaded is recorded in the converted checkpoint's metadata."""


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def converted_path(name: str) -> Path:
    """Where the converted (tokenscope) checkpoint of a published model lives: `NAME.json`."""
    return model_dir(name) / f"{name}.json"


def download_path(entry: PublishedModel) -> Path:
    return model_dir(entry.name) / entry.filename


def lookup(name: str) -> PublishedModel:
    if name not in PUBLISHED:
        raise CheckpointError(f"no published model named {name!r}; `tokenscope models` lists them")
    return PUBLISHED[name]


def suggestions(backbone_hint: str) -> list[str]:
    """Published names whose backbone matches a short model name (vitl -> ViT-L/16 models)."""
    key = {"vitt": "ViT-Ti", "vits": "ViT-S", "vitb": "ViT-B", "vitl": "ViT-L"}.get(backbone_hint, "")
    return [f"{m.name} ({m.dataset}, {m.miou:.1f} mIoU)" for m in PUBLISHED.values() if key and m.backbone.startswith(key)]


def verify_file(path: Path, expected: str) -> str:
    """The file's SHA-256, checked against the published digest (or its prefix)."""
    try:
        return check_digest(path, "sha256", expected)
    except DownloadError as exc:
        raise CheckpointError(str(exc)) from None


def ensure_published(name: str, convert: Callable[[Path, Path, PublishedModel], None],
                     progress: DownloadProgress | None = None, timeout: float = 60.0, offline: bool | None = None) -> Path:
    """The converted checkpoint of published model `name`, downloading and converting on first use.

    `convert(downloaded_file, converted_json, entry)` writes the tokenscope checkpoint. A file the
    user placed at the download path by hand is checked against the hash and used as it is.
    """
    entry = lookup(name)
    out = converted_path(name)
    if out.is_file() and out.with_suffix(".safetensors").is_file():
        return out
    try:
        return _download_and_convert(entry, out, convert, progress, timeout, offline)
    finally:
        for folder in (model_dir(name), model_dir(name).parent):  # a failed first use leaves no trace
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _download_and_convert(entry: PublishedModel, out: Path, convert: Callable[[Path, Path, PublishedModel], None],
                          progress: DownloadProgress | None, timeout: float, offline: bool | None) -> Path:
    name = entry.name
    raw = download_path(entry)
    try:
        download(entry.url, raw, "sha256", entry.sha256, progress, timeout, offline=offline)
    except DownloadError as exc:
        hint = "" if str(exc).startswith("offline") else f"; fetch {entry.url} yourself and put it at {raw}"
        raise CheckpointError(f"cannot download {name} ({exc}){hint}") from None
    try:
        convert(raw, out, entry)
    except BaseException:
        for p in (out, out.with_suffix(".safetensors")):
            if p.exists():
                p.unlink()
        raise
    return out


def remove_cached(name: str) -> None:
    """Delete everything cached for `name` (used by tests and `models --forget`)."""
    shutil.rmtree(model_dir(name), ignore_errors=True)
