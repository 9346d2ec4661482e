"""Data set layouts and their label conventions, and the synthetic scene generator."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tokenscope.data.datasets import ADE20KDataset, CityscapesDataset, FolderDataset, open_dataset, parse_seeds
from tokenscope.data.synthetic import CLASSES, ROAD, SKY, synthetic_scene
from tokenscope.errors import ConfigError


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), arr)


def test_synthetic_scenes_are_deterministic_and_varied() -> None:
    a, b, c = synthetic_scene(5, 128, 192), synthetic_scene(5, 128, 192), synthetic_scene(6, 128, 192)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert a.image.dtype == np.float32 and 0 <= a.image.min() and a.image.max() <= 1
    assert a.labels.shape == (128, 192)


def test_synthetic_scenes_have_large_uniform_regions_and_small_objects() -> None:
    seen = set()
    for s in range(30):
        lab = synthetic_scene(s, 256, 256).labels
        seen |= set(np.unique(lab).tolist())
        assert (lab == SKY).mean() > 0.05 and (lab == ROAD).mean() > 0.05
    assert seen == set(range(len(CLASSES)))


def test_folder_layout(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "a.jpg", np.zeros((20, 30, 3), np.uint8))
    _write(tmp_path / "masks" / "a.png", np.full((20, 30), 4, np.uint8))
    _write(tmp_path / "images" / "b.png", np.zeros((20, 30, 3), np.uint8))  # no mask: skipped
    ds = FolderDataset(tmp_path)
    assert len(ds) == 1 and ds.num_classes == 5 and ds[0].labels.max() == 4


def test_ade20k_shifts_labels_and_ignores_other(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    lab = np.array([[0, 1, 150]], np.uint8).repeat(4, 0)
    _write(root / "images" / "validation" / "ADE_val_1.jpg", np.zeros((4, 3, 3), np.uint8))
    _write(root / "annotations" / "validation" / "ADE_val_1.png", lab)
    ds = ADE20KDataset(tmp_path, "val")
    assert ds.num_classes == 150
    assert ds[0].labels[0].tolist() == [255, 0, 149]


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path: Path) -> None:
    raw = np.array([[7, 26, 0, 23]], np.uint8).repeat(2, 0)
    _write(tmp_path / "leftImg8bit" / "val" / "ulm" / "ulm_1_2_leftImg8bit.png", np.zeros((2, 4, 3), np.uint8))
    _write(tmp_path / "gtFine" / "val" / "ulm" / "ulm_1_2_gtFine_labelIds.png", raw)
    ds = CityscapesDataset(tmp_path, "val")
    assert ds[0].labels[0].tolist() == [0, 13, 255, 10] and ds[0].name == "ulm_1_2"
    _write(tmp_path / "gtFine" / "val" / "ulm" / "ulm_1_2_gtFine_labelTrainIds.png", np.full((2, 4), 5, np.uint8))
    assert CityscapesDataset(tmp_path, "val")[0].labels.max() == 5  # train ids win, used as they are


def test_bad_dataset_requests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown data set"):
        open_dataset("imagenet", tmp_path)
    with pytest.raises(ConfigError, match="needs a root"):
        open_dataset("folder")
    with pytest.raises(ConfigError, match=r"not in the cache \(looked in .*data/ade20k\); run `tokenscope data fetch"):
        open_dataset("ade20k")
    with pytest.raises(ConfigError, match="ADEChallengeData2016"):
        open_dataset("ade20k", tmp_path)
    with pytest.raises(ConfigError, match="empty range"):
        parse_seeds("5:5")
    assert list(parse_seeds("3")) == [0, 1, 2]
