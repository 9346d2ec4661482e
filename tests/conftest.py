"""Shared fixtures: tiny seeded models, small synthetic images, image files on disk."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from tokenscope.models.checkpoints import LoadedModel, save_checkpoint
from tokenscope.models.registry import StepConfig
from tokenscope.models.step_vit import ReductionSetting, StepViT

TINY = StepConfig(
    name="tiny", arch="vit_tiny_patch16_224", num_classes=4, exit_after=(1, 2),
    timm_kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2}, img_size=64,
    class_names=("sky", "road", "car", "tree"),
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own empty model and data cache, never the user's."""
    monkeypatch.setenv("TOKENSCOPE_HOME", str(tmp_path_factory.mktemp("tokenscope-home")))
    monkeypatch.delenv("TOKENSCOPE_OFFLINE", raising=False)


def make_tiny(seed: int = 0, cfg: StepConfig = TINY) -> StepViT:
    torch.manual_seed(seed)
    return StepViT(cfg).eval()


def setting(model: StepViT, base: ReductionSetting | None = None, **changes: Any) -> ReductionSetting:
    """An operating point of `model` as the value its forward takes: `base` (the model's own when None)
    with `changes` (policy=..., exits=..., exit_threshold=...), as the CLI resolves one."""
    return dataclasses.replace(model.default_setting() if base is None else base, **changes)


def merging(base: ReductionSetting, spec: Any) -> ReductionSetting:
    """`base` with a MergingSpec's steps (models/methods/merging.py), or without any when None."""
    if spec is None:
        return dataclasses.replace(base, steps=(), size_weighted=False, record={})
    return dataclasses.replace(base, steps=spec.steps(), size_weighted=spec.prop_attn, record={"merging": spec.record()})


def blocky_image(h: int = 96, w: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """RGB float image with flat regions (sky, road) and a noisy textured block, plus its labels."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    lab = np.zeros((h, w), np.int32)
    img[: h // 2] = (0.4, 0.6, 0.9)
    img[h // 2:] = (0.3, 0.3, 0.3)
    lab[h // 2:] = 1
    y0, x0 = h // 2 + 8, w // 2
    img[y0:y0 + 24, x0:x0 + 40] = rng.random((24, 40, 3))
    lab[y0:y0 + 24, x0:x0 + 40] = 2
    return img, lab


@pytest.fixture
def tiny_model() -> StepViT:
    return make_tiny()


@pytest.fixture
def tiny_loaded() -> LoadedModel:
    m = make_tiny()
    return LoadedModel(m, TINY, {"backbone": True, "decoder": True, "exits": True, "policy": True}, "test", "test")


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tokenscope checkpoint of the tiny model, marked fully trained, on disk."""
    path = tmp_path / "ckpt" / "tiny.json"
    save_checkpoint(make_tiny(), path, trained={"backbone": True, "decoder": True, "exits": True, "policy": True})
    return path


def write_rgb(path: Path, rgb01: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor((rgb01 * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def image_files(tmp_path: Path) -> dict[str, Path]:
    """A few small images and a label map on disk."""
    img, lab = blocky_image()
    files = {
        "scene": write_rgb(tmp_path / "imgs" / "scene.png", img),
        "odd": write_rgb(tmp_path / "imgs" / "odd.jpg", blocky_image(70, 101, seed=1)[0]),
    }
    files["labels"] = tmp_path / "labels" / "scene.png"
    files["labels"].parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(files["labels"]), lab.astype(np.uint8))
    return files


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the shipped sample with its labels at 96 px, for tests that copy and damage it."""
    from typer.testing import CliRunner

    from tokenscope.cli import app

    root = Path(__file__).resolve().parents[1] / "sample_images"
    out = tmp_path_factory.mktemp("labelled-run")
    r = CliRunner().invoke(app, ["run", str(root / "street_5000001.png"), "--labels", str(root / "labels"), "--size", "96",
                                 "--no-animation", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return next(out.glob("run-*"))
