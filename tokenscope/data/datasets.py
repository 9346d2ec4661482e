"""Segmentation data sets: image + integer label map pairs, with each layout's label conventions.

- `folder`: `ROOT/images/NAME.{png,jpg,...}` + `ROOT/masks/NAME.png` (class ids; 255 = ignore).
- `images`: `ROOT/*.{png,jpg,...}` without labels (accuracy against the unreduced model's predictions).
- `ade20k`: `ADEChallengeData2016/{images,annotations}/{training,validation}/`; annotation 0 means
  "other" and is ignored, classes 1..150 become 0..149 (the usual "reduce zero label" shift).
- `cityscapes`: `leftImg8bit/{split}/{city}/*_leftImg8bit.png` with `gtFine/{split}/{city}/`
  `*_gtFine_labelTrainIds.png` (19 classes, 255 = ignore), or `*_gtFine_labelIds.png` mapped to
  train ids with the official table.
- `synthetic`: generated street scenes (tokenscope.data.synthetic), one per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tokenscope.data.classes import dataset_classes
from tokenscope.data.fetch import cached_root
from tokenscope.data.images import IGNORE_INDEX, IMAGE_SUFFIXES, load_image, load_label_map
from tokenscope.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from tokenscope.data.synthetic import synthetic_scene
from tokenscope.errors import ConfigError

DATASET_KINDS = ("folder", "images", "ade20k", "cityscapes", "pascal_context", "synthetic")
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                          25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


@dataclass(frozen=True)
class Sample:
    """One image (float32 RGB in [0, 1], (H, W, 3)) with its int32 label map (H, W), or None for
    an unlabelled image (the `images` data set)."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None


class SegmentationDataset:
    """A sized, indexable collection of samples; subclasses say where pairs come from."""

    num_classes: int = 0
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        raise NotImplementedError

    def name(self, i: int) -> str:
        return self[i].name


class PairedFiles(SegmentationDataset):
    """Image files with label files, converted by `convert_labels`."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int, class_names: tuple[str, ...] = (),
                 unpaired: Sequence[Path] = ()) -> None:
        if not pairs:
            raise ConfigError("the data set holds no image/label pairs")
        self.pairs = list(pairs)
        self.unpaired = list(unpaired)
        """Images whose label file is missing (left out of the pairs; `data check` names them)."""
        self.num_classes = num_classes
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, i: int) -> str:
        return self.pairs[i][0].stem

    def convert_labels(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def __getitem__(self, i: int) -> Sample:
        img_path, lab_path = self.pairs[i]
        return Sample(img_path.stem, load_image(img_path), self.convert_labels(load_label_map(lab_path)))


class FolderDataset(PairedFiles):
    """`ROOT/images/*` with `ROOT/masks/<same stem>.png`."""

    def __init__(self, root: str | Path, num_classes: int | None = None) -> None:
        root = Path(root)
        images, masks = root / "images", root / "masks"
        if not images.is_dir() or not masks.is_dir():
            raise ConfigError(f"{root}: a folder data set needs images/ and masks/ inside")
        pairs, unpaired = [], []
        for img in sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            mask = masks / (img.stem + ".png")
            if mask.exists():
                pairs.append((img, mask))
            else:
                unpaired.append(img)
        if num_classes is None:
            seen = [load_label_map(m) for _, m in pairs[:50]]
            num_classes = int(max((int(s[s != IGNORE_INDEX].max(initial=0)) for s in seen), default=0)) + 1
        super().__init__(pairs, num_classes, unpaired=unpaired)


class ImageFolder(SegmentationDataset):
    """`ROOT/*` image files without labels: accuracy is then measured against the unreduced
    model's own predictions (evaluate, tune)."""

    unlabelled = True

    def __init__(self, root: str | Path) -> None:
        self.files = sorted(p for p in Path(root).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ConfigError(f"{root}: no image files in this folder")

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i].stem

    def __getitem__(self, i: int) -> Sample:
        return Sample(self.files[i].stem, load_image(self.files[i]), None)


class ADE20KDataset(PairedFiles):
    """ADE20K SceneParsing (ADEChallengeData2016); label 0 (other) -> ignore, 1..150 -> 0..149."""

    def __init__(self, root: str | Path, split: str = "validation") -> None:
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        split = {"train": "training", "val": "validation"}.get(split, split)
        images, annots = root / "images" / split, root / "annotations" / split
        if not images.is_dir() or not annots.is_dir():
            raise ConfigError(f"{root}: expected images/{split} and annotations/{split} (ADEChallengeData2016 layout)")
        found = sorted(images.glob("*.jpg"))
        pairs = [(p, annots / (p.stem + ".png")) for p in found if (annots / (p.stem + ".png")).exists()]
        unpaired = [p for p in found if not (annots / (p.stem + ".png")).exists()]
        super().__init__(pairs, 150, dataset_classes("ade20k").names, unpaired)

    def convert_labels(self, raw: np.ndarray) -> np.ndarray:
        out = raw.astype(np.int32) - 1
        out[raw == 0] = IGNORE_INDEX
        return out


class CityscapesDataset(PairedFiles):
    """Cityscapes fine annotations as 19 train ids (255 = ignore)."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = Path(root)
        images, gt = root / "leftImg8bit" / split, root / "gtFine" / split
        if not images.is_dir() or not gt.is_dir():
            raise ConfigError(f"{root}: expected leftImg8bit/{split} and gtFine/{split} (Cityscapes layout)")
        pairs, unpaired = [], []
        self._raw_ids: set[Path] = set()
        for img in sorted(images.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            train_ids = gt / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
            label_ids = gt / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if train_ids.exists():
                pairs.append((img, train_ids))
            elif label_ids.exists():
                pairs.append((img, label_ids))
                self._raw_ids.add(label_ids)
            else:
                unpaired.append(img)
        super().__init__(pairs, 19, dataset_classes("cityscapes").names, unpaired)
        self._lut = np.full(256, IGNORE_INDEX, dtype=np.int32)
        for k, v in CITYSCAPES_ID_TO_TRAIN.items():
            self._lut[k] = v

    def __getitem__(self, i: int) -> Sample:
        img_path, lab_path = self.pairs[i]
        raw = load_label_map(lab_path)
        labels = self._lut[np.clip(raw, 0, 255)] if lab_path in self._raw_ids else raw
        return Sample(img_path.name[: -len("_leftImg8bit.png")], load_image(img_path), labels)


class PascalContextDataset(PairedFiles):
    """Pascal Context as mmsegmentation prepares it: `VOC2010/JPEGImages/*.jpg`,
    `VOC2010/SegmentationClassContext/*.png` (0 = background, 1..59; 255 = ignore) and the split
    lists in `VOC2010/ImageSets/SegmentationContext/{train,val}.txt`. 60 classes with background."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        root = Path(root)
        for sub in ("VOCdevkit/VOC2010", "VOC2010"):
            if (root / sub).is_dir():
                root = root / sub
                break
        listing = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        images, masks = root / "JPEGImages", root / "SegmentationClassContext"
        if not listing.is_file() or not images.is_dir() or not masks.is_dir():
            raise ConfigError(f"{root}: expected JPEGImages/, SegmentationClassContext/ and "
                              f"ImageSets/SegmentationContext/{split}.txt (Pascal Context layout)")
        stems = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        pairs = [(images / f"{s}.jpg", masks / f"{s}.png") for s in stems if (masks / f"{s}.png").exists()]
        unpaired = [images / f"{s}.jpg" for s in stems if not (masks / f"{s}.png").exists()]
        super().__init__(pairs, 60, dataset_classes("pascal_context").names, unpaired)


class SyntheticDataset(SegmentationDataset):
    """Generated scenes for `seeds` at one size; scenes are cached after the first use."""

    num_classes = len(SYNTHETIC_CLASSES)
    class_names = SYNTHETIC_CLASSES

    def __init__(self, seeds: Sequence[int], height: int = 512, width: int = 512, cache: bool = False) -> None:
        self.seeds = list(seeds)
        self.height, self.width = height, width
        self._cache: dict[int, Sample] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.seeds)

    def name(self, i: int) -> str:
        return f"synthetic-{self.seeds[i]:06d}"

    def __getitem__(self, i: int) -> Sample:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        scene = synthetic_scene(self.seeds[i], self.height, self.width)
        sample = Sample(self.name(i), scene.image, scene.labels)
        if self._cache is not None:
            self._cache[i] = sample
        return sample


def parse_seeds(text: str) -> range:
    """`1000:1200` -> seeds 1000..1199; `200` -> 0..199."""
    try:
        if ":" in text:
            a, b = (int(v) for v in text.split(":", 1))
        else:
            a, b = 0, int(text)
    except ValueError:
        raise ConfigError(f"seeds {text!r}: expected N or START:STOP") from None
    if b <= a:
        raise ConfigError(f"seeds {text!r}: empty range")
    return range(a, b)


def open_dataset(kind: str, root: str | Path | None = None, split: str = "val", seeds: str = "0:100",
                 size: int = 512) -> SegmentationDataset:
    """The data set of `kind` (see module docstring); `root` for files, `seeds`/`size` for synthetic."""
    if kind not in DATASET_KINDS:
        raise ConfigError(f"unknown data set {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    if kind == "synthetic":
        return SyntheticDataset(parse_seeds(seeds), size, size)
    if root is None:
        if kind in ("folder", "images"):
            raise ConfigError(f"data set {kind!r} needs a root folder (--data-root)")
        root = cached_root(kind)  # fetched with `tokenscope data fetch`
    if not Path(root).is_dir():
        raise ConfigError(f"{root}: no such data folder")
    if kind == "folder":
        return FolderDataset(root)
    if kind == "images":
        return ImageFolder(root)
    if kind == "ade20k":
        return ADE20KDataset(root, split)
    if kind == "pascal_context":
        return PascalContextDataset(root, split)
    return CityscapesDataset(root, split)
