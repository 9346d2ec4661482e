"""Image loading: every odd file either loads sensibly or fails with one clear ImageError."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tokenscope.data.images import PAD_RGB, load_image, load_label_map, load_prepared, prepare_image
from tokenscope.errors import ImageError


def test_grayscale_rgba_and_16bit_load_as_rgb01(tmp_path: Path) -> None:
    gray = (np.arange(20 * 30) % 256).astype(np.uint8).reshape(20, 30)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    rgba = np.dstack([np.full((20, 30), v, np.uint8) for v in (10, 20, 30, 40)])  # BGRA on disk
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    deep = np.full((20, 30, 3), 65535, np.uint16)
    deep[..., 0] = 0
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    g = load_image(tmp_path / "g.png")
    assert g.shape == (20, 30, 3) and np.allclose(g[..., 0], gray / 255.0) and np.allclose(g[..., 0], g[..., 2])
    a = load_image(tmp_path / "a.png")
    assert np.allclose(a[0, 0], np.array([30, 20, 10]) / 255.0)  # RGB order, alpha dropped
    d = load_image(tmp_path / "d.png")
    assert d.dtype == np.float32 and np.allclose(d[0, 0], [1.0, 1.0, 0.0])


def test_odd_sizes_are_padded_and_remember_the_input_size() -> None:
    img = np.random.default_rng(0).random((37, 50, 3)).astype(np.float32)
    p = prepare_image(img, "x")
    assert p.input_hw == (37, 50) and p.padded_hw == (48, 64) and p.grid == (3, 4)
    assert np.allclose(p.tensor_rgb[:, :37, :50], img.transpose(2, 0, 1))
    assert np.allclose(p.tensor_rgb[:, 40, 60], PAD_RGB)


def test_size_resizes_the_long_side_and_labels_by_nearest() -> None:
    img = np.zeros((100, 200, 3), np.float32)
    lab = np.zeros((100, 200), np.int32)
    lab[:, 100:] = 7
    p = prepare_image(img, "x", size=64, labels=lab)
    assert p.input_hw == (32, 64)
    assert set(np.unique(p.labels[:32, :64]).tolist()) == {0, 7}
    assert np.all(p.labels[32:] == 255)


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"this is not an image at all", "not a readable image"),
])
def test_unreadable_files_give_one_line_errors(tmp_path: Path, content: bytes, message: str) -> None:
    f = tmp_path / "bad.png"
    f.write_bytes(content)
    with pytest.raises(ImageError, match=message) as exc:
        load_image(f)
    assert "\n" not in str(exc.value) and str(f) in str(exc.value)


def test_truncated_png_and_jpeg_are_refused(tmp_path: Path) -> None:
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    for ext in (".png", ".jpg"):
        ok, buf = cv2.imencode(ext, img)
        f = tmp_path / f"cut{ext}"
        f.write_bytes(buf.tobytes()[: len(buf) // 2])
        with pytest.raises(ImageError, match="truncated"):
            load_image(f)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_huge_images_need_size(tmp_path: Path) -> None:
    big = np.zeros((10, 5000, 3), np.float32)
    with pytest.raises(ImageError, match="--size"):
        prepare_image(big, "big.png")
    assert prepare_image(big, "big.png", size=1000).input_hw == (2, 1000)


def test_label_maps_must_be_class_ids(tmp_path: Path) -> None:
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 5
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    with pytest.raises(ImageError, match="single-channel"):
        load_label_map(tmp_path / "c.png")
    cv2.imwrite(str(tmp_path / "ok.png"), np.full((16, 16), 3, np.uint8))
    assert load_label_map(tmp_path / "ok.png").max() == 3


def test_label_map_size_must_match(tmp_path: Path, image_files: dict[str, Path]) -> None:
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageError, match="must match"):
        load_prepared(image_files["scene"], labels_path=tmp_path / "small.png")
