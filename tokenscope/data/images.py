"""Loading and validating images and label maps, and preparing them for a ViT (any patch size).

Everything a user can point tokenscope at passes through here, so every way a file can be
unusable (missing, empty, truncated, not an image, odd channel counts or bit depths, too big)
ends as one `ImageError` that names the file and says what to do.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from tokenscope.errors import ConfigError, ImageError

PATCH = 16
MAX_SIDE = 4096
"""Largest side (after `--size`) that tokenscope will push through a model."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IGNORE_INDEX = 255
PAD_RGB = (0.485, 0.456, 0.406)
"""Padding colour: the ImageNet mean, i.e. zero after the usual normalisation."""


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the model, and what is needed to map outputs back to it.

    `tensor_rgb` is float32 (3, H_pad, W_pad) in [0, 1]; `display` is the uint8 RGB image at
    the processed size (after `--size`, before padding), on which overlays are drawn.
    """

    source: str
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    tensor_rgb: np.ndarray
    display: np.ndarray
    labels: np.ndarray | None = None
    """int32 (H_pad, W_pad) label map, padded with IGNORE_INDEX, when one was given."""
    patch: int = PATCH
    """Patch side in pixels: the padding multiple."""

    @property
    def grid(self) -> tuple[int, int]:
        return self.padded_hw[0] // self.patch, self.padded_hw[1] // self.patch


MAX_PIXELS = 200_000_000
"""The largest image decoded (about 14,000 x 14,000): a 30,000 x 30,000 PNG is under a megabyte on disk
and 10 GB in memory, so the size in its header is checked before any pixel is decoded."""
MAX_FILE_BYTES = 2 * 2**30


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a folder, expected an {what} file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever, a device never ends
        raise ImageError(f"{path}: not a regular file (a pipe or device), expected an {what} file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{path}: {st.st_size} bytes, more than an {what} file tokenscope reads ({MAX_FILE_BYTES})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(f"{path}: file is empty")
    return data


def _header(path: Path, data: bytes) -> tuple[tuple[int, int] | None, int]:
    """((width, height) from the file's header, or None when PIL cannot tell), and its EXIF orientation
    (1 = as stored), read without decoding a pixel."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib brings Pillow
        return None, 1
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = (int(im.size[0]), int(im.size[1]))
            try:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            except Exception:  # a damaged EXIF block: the pixels are still the pixels
                orientation = 1
            return size, orientation
    except Image.DecompressionBombError:  # PIL's own limit (about 179 M pixels): larger than ours too
        return (MAX_PIXELS + 1, 1), 1
    except Exception:  # not a format PIL knows (OpenCV may): no header check
        return None, 1


def frame_count(path: Path) -> int:
    """How many frames or pages a file holds (an animated GIF/WebP, a multi-page TIFF), read from its
    header; 1 when it holds one or the format is not known. Only the first is ever decoded, and the
    run says so."""
    try:
        from PIL import Image

        if not path.is_file():
            return 1
        with Image.open(path) as im:
            return max(1, int(getattr(im, "n_frames", 1)))
    except Exception:  # noqa: BLE001 - unreadable files get their own one-line error when they are decoded
        return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn pixels stored sideways upright, as EXIF orientation 2-8 says (what a photo viewer shows)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1, :],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1, :]}
    op = ops.get(int(orientation))
    return np.ascontiguousarray(op(img)) if op is not None else img


def _check_not_truncated(path: Path, data: bytes) -> None:
    """Reject truncated PNG/JPEG files, which OpenCV would otherwise decode half-grey."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-64:]:
            raise ImageError(f"{path}: PNG file is truncated (no IEND chunk); re-export or re-download it")
    elif data[:3] == b"\xff\xd8\xff":
        if b"\xff\xd9" not in data[-1024:]:
            raise ImageError(f"{path}: JPEG file is truncated (no end-of-image marker); re-export or re-download it")


def _decode(path: Path, data: bytes, flags: int) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        raise ImageError(f"{path}: cannot be decoded ({msg}); is it too large or damaged?") from None
    if img is None or img.size == 0:
        raise ImageError(f"{path}: not a readable image (OpenCV cannot decode it)")
    return img


def _read_image_file(p: Path, what: str) -> np.ndarray:
    """Bytes -> integrity check -> decoded array, channels untouched, single channel squeezed."""
    data = _read_bytes(p, what)
    _check_not_truncated(p, data)
    size, orientation = _header(p, data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        shown = f"{size[0]}x{size[1]} pixels" if size[1] > 1 else "more pixels than PIL opens"
        raise ImageError(f"{p}: {shown}, more than tokenscope decodes ({MAX_PIXELS:,} pixels); downscale it first")
    img = _decode(p, data, cv2.IMREAD_UNCHANGED)
    img = apply_orientation(img, orientation)  # the same turn for an image and its label map
    return img[:, :, 0] if img.ndim == 3 and img.shape[2] == 1 else img


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image as float32 RGB in [0, 1], shape (H, W, 3).

    Grayscale is replicated to three channels, alpha is dropped, 16-bit and float images are
    rescaled, so every model sees the same kind of input whatever the file held.
    """
    p = Path(path)
    img = _read_image_file(p, "image")
    if img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return rgb_from_array(img, str(p))


def rgb_from_array(img: np.ndarray, source: str = "image") -> np.ndarray:
    """An RGB(A) or grayscale array (H, W[, C]) of 8/16-bit or float values as float32 RGB in [0, 1].

    The one normalisation for files, numpy arrays, PIL images and tensors alike.
    """
    p = source
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise ImageError(f"{p}: unsupported layout {img.shape}; expected grayscale, RGB or RGBA (H, W[, C])")
    if img.dtype == np.bool_:
        img = img.astype(np.uint8) * 255
    if img.dtype == np.uint8:
        out = img.astype(np.float32) / 255.0
    elif img.dtype == np.uint16:
        out = img.astype(np.float32) / 65535.0
    elif img.dtype in (np.float16, np.float32, np.float64):
        finite = img[np.isfinite(img)]
        if finite.size == 0:
            raise ImageError(f"{p}: float image holds no finite values")
        lo, hi = float(finite.min()), float(finite.max())
        if lo < 0 or hi > 1:  # not already in [0, 1]: stretch the finite range onto it
            img = (img - lo) / (hi - lo if hi > lo else 1.0)
        out = np.nan_to_num(img).astype(np.float32)
    else:
        raise ImageError(f"{p}: unsupported pixel type {img.dtype}; expected 8-bit, 16-bit or float")
    h, w = out.shape[:2]
    if h < 1 or w < 1:
        raise ImageError(f"{p}: image has no pixels")
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0))


def as_rgb(image: object) -> tuple[np.ndarray, str]:
    """(float32 RGB in [0, 1], source name) from a path, a numpy array, a PIL image or a tensor.

    Tensors may live on any device and be (C, H, W) or (H, W, C), 8-bit or float; a (C, H, W)
    tensor is recognised by C in 1, 3, 4 with C the smallest side.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image), str(image)
    if hasattr(image, "getbands") and hasattr(image, "convert"):  # a PIL image, without importing PIL
        mode = image.mode  # type: ignore[attr-defined]
        arr = np.asarray(image.convert("RGB") if mode not in ("L", "I;16", "RGB", "RGBA", "F") else image)
        return rgb_from_array(arr, f"<PIL {mode} image>"), f"<PIL {mode} image>"
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # a torch tensor
        arr = image.detach().cpu().numpy()  # type: ignore[attr-defined]
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[0] < min(arr.shape[1:]):
            arr = arr.transpose(1, 2, 0)
        return rgb_from_array(arr, "<tensor>"), "<tensor>"
    if isinstance(image, np.ndarray):
        return rgb_from_array(image, "<array>"), "<array>"
    raise ImageError(f"cannot use a {type(image).__name__} as an image: pass a path, a numpy array, a PIL image or a tensor")


def load_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label map (one integer class id per pixel) as int32 (H, W).

    Colour-coded label images are refused: their colours are not class ids, and guessing a
    palette would silently produce wrong statistics.
    """
    p = Path(path)
    lab = _read_image_file(p, "label map")
    if lab.ndim != 2:
        if lab.ndim == 3 and lab.shape[2] in (3, 4) and np.all(lab[:, :, 0] == lab[:, :, 1]) and np.all(lab[:, :, 1] == lab[:, :, 2]):
            lab = lab[:, :, 0]
        else:
            raise ImageError(f"{p}: label map must be single-channel class ids, got {lab.shape[2]} different channels")
    if lab.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{p}: label map must be 8- or 16-bit integers, got {lab.dtype}")
    return lab.astype(np.int32)


def resized_hw(hw: tuple[int, int], long_side: int | None) -> tuple[int, int]:
    """Size after resizing the long side to `long_side` (aspect kept), or unchanged."""
    h, w = hw
    if long_side is None:
        return h, w
    scale = long_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def check_size(size: int | None, patch: int = PATCH, what: str = "--size") -> None:
    """The one size rule of every command: at least one patch, at most MAX_SIDE pixels a side.

    Commands call it before they create any output, so a bad value leaves nothing behind.
    """
    if size is None:
        return
    if size < patch:
        raise ConfigError(f"{what} {size} is smaller than one {patch}-pixel patch")
    if size > MAX_SIDE:
        raise ConfigError(f"{what} {size} is larger than the {MAX_SIDE} px limit on an image side")


def padded_hw(hw: tuple[int, int], multiple: int = PATCH) -> tuple[int, int]:
    h, w = hw
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def prepare_image(
    rgb: np.ndarray,
    source: str,
    size: int | None = None,
    labels: np.ndarray | None = None,
    max_side: int = MAX_SIDE,
    patch: int = PATCH,
) -> PreparedImage:
    """Resize (optional), check the size limit, and pad to a multiple of the patch size.

    Padding goes to the bottom and right so that patch (0, 0) stays at the image origin and
    outputs can be cropped back by slicing.
    """
    if size is not None and size < patch:
        raise ImageError(f"--size {size} is smaller than one {patch}-pixel patch")
    original = rgb.shape[:2]
    h, w = resized_hw(original, size)
    if max(h, w) > max_side:
        raise ImageError(
            f"{source}: image is {original[1]}x{original[0]} px, larger than the {max_side} px limit; "
            f"pass --size N (e.g. --size 1024) to resize its long side"
        )
    if (h, w) != original:
        interp = cv2.INTER_AREA if h < original[0] else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (w, h), interpolation=interp)
    if labels is not None:
        if labels.shape != original:
            raise ImageError(
                f"{source}: label map is {labels.shape[1]}x{labels.shape[0]} but the image is "
                f"{original[1]}x{original[0]}; they must match"
            )
        if (h, w) != original:
            labels = cv2.resize(labels.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    ph, pw = padded_hw((h, w), patch)
    padded = np.empty((ph, pw, 3), dtype=np.float32)
    padded[:] = np.asarray(PAD_RGB, dtype=np.float32)
    padded[:h, :w] = rgb
    padded_labels = None
    if labels is not None:
        padded_labels = np.full((ph, pw), IGNORE_INDEX, dtype=np.int32)
        padded_labels[:h, :w] = labels
    display = (np.clip(rgb, 0, 1) * 255.0 + 0.5).astype(np.uint8)
    return PreparedImage(
        source=source,
        original_hw=(int(original[0]), int(original[1])),
        input_hw=(h, w),
        padded_hw=(ph, pw),
        tensor_rgb=np.ascontiguousarray(padded.transpose(2, 0, 1)),
        display=display,
        labels=padded_labels,
        patch=patch,
    )


def load_prepared(
    path: str | os.PathLike[str],
    size: int | None = None,
    labels_path: str | os.PathLike[str] | None = None,
    patch: int = PATCH,
    convert_labels: Callable[[np.ndarray, str], np.ndarray] | None = None,
) -> PreparedImage:
    """Load, validate and prepare one image (and its label map, if given; `convert_labels(raw,
    source)` turns its values into the model's class ids, or refuses them)."""
    rgb = load_image(path)
    labels = load_label_map(labels_path) if labels_path is not None else None
    if labels is not None and convert_labels is not None:
        labels = convert_labels(labels, str(labels_path))
    return prepare_image(rgb, str(path), size=size, labels=labels, patch=patch)


def find_images(paths: list[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders into the image files they hold (sorted); files are kept as given.

    A file with an unknown suffix is kept, so that loading it reports why it is unusable.
    """
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    return found


def find_label_for(image: Path, labels: Path) -> Path:
    """The label map for `image`: `labels` itself if a file, else the same stem inside it."""
    if labels.is_file():
        return labels
    if labels.is_dir():
        for suffix in (".png", ".tif", ".tiff", ".bmp"):
            cand = labels / (image.stem + suffix)
            if cand.exists():
                return cand
        raise ImageError(f"{image}: no label map named {image.stem}.png in {labels}")
    raise ImageError(f"{labels}: no such label file or folder")


def patch_majority_labels(labels: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Majority class of each patch of a padded label map, ignoring IGNORE_INDEX (int32 (gh, gw);
    IGNORE_INDEX where a patch holds no labelled pixel). Classes must be below 255."""
    ph, pw = labels.shape
    gh, gw = ph // patch, pw // patch
    lab = np.clip(labels[: gh * patch, : gw * patch], 0, IGNORE_INDEX).astype(np.int64)
    blocks = lab.reshape(gh, patch, gw, patch).transpose(0, 2, 1, 3).reshape(gh * gw, patch * patch)
    codes = blocks + (np.arange(gh * gw, dtype=np.int64) * 256)[:, None]
    counts = np.bincount(codes.ravel(), minlength=gh * gw * 256).reshape(gh * gw, 256)
    counts[:, IGNORE_INDEX] = 0
    out = counts.argmax(axis=1).astype(np.int32)
    out[counts.max(axis=1) == 0] = IGNORE_INDEX
    return out.reshape(gh, gw)
