"""Segmenter's sliding-window protocol: geometry, stitching, scores and the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import functools

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from segmenter_reference import CLASSES, segmenter_state, write_segmenter_release
from typer.testing import CliRunner

from tokenscope.analysis.evaluate import OperatingPoint, evaluate
from tokenscope.analysis.metrics import confusion, mean_iou
from tokenscope.cli import app
from tokenscope.data.datasets import FolderDataset
from tokenscope.data.windows import WindowSpec, plan_windows, resolve_windows, window_anchors
from tokenscope.errors import ConfigError
from tokenscope.models.resolve import build_model
from tokenscope.trace.trace import Trace


@pytest.mark.parametrize("length,window,stride", [(64, 64, 48), (100, 64, 48), (683, 512, 480), (2048, 768, 512), (40, 64, 32)])
def test_windows_cover_every_pixel_and_end_flush_with_the_far_edge(length: int, window: int, stride: int) -> None:
    anchors = window_anchors(length, window, stride)
    covered = np.zeros(length, dtype=int)
    for a in anchors:
        covered[a:a + window] += 1
    assert covered.min() >= 1
    assert anchors[0] == 0 and anchors == sorted(set(anchors))
    assert anchors[-1] + min(window, length) == length
    assert all(b - a <= stride for a, b in zip(anchors, anchors[1:]))


def test_window_options_are_checked_before_anything_runs() -> None:
    assert resolve_windows(512, 512, 512, None, None, None) == WindowSpec(512, 512, 512)
    assert resolve_windows(512, 512, 512, 256, None, None) == WindowSpec(256, 224, 256)
    assert resolve_windows(0, 0, 0, None, None, 384) is None
    assert resolve_windows(512, 480, 512, 0, None, 384) is None
    with pytest.raises(ConfigError, match="exclude"):
        resolve_windows(512, 480, 512, None, None, 384)
    with pytest.raises(ConfigError, match="stride"):
        resolve_windows(64, 48, 64, None, 100, None)
    with pytest.raises(ConfigError, match="--stride applies"):
        resolve_windows(0, 0, 0, None, 16, None)
    with pytest.raises(ConfigError, match="--window 7 is smaller than two 16-px patches; use at least 32"):
        resolve_windows(0, 0, 0, 7, None, None)
    assert resolve_windows(0, 0, 0, 16, 16, None, patch=8) == WindowSpec(16, 16, 16)  # two 8-px patches
    plan = plan_windows((96, 150), 64, 48, 64)
    assert plan.resized_hw == (64, 100) and plan.boxes == ((0, 0, 64, 64), (0, 36, 64, 64))


def _folder_dataset(root: Path, n: int = 3, hw: tuple[int, int] = (96, 150)) -> FolderDataset:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        lab = np.zeros(hw, np.uint8)
        for c in range(1, CLASSES):
            y, x = rng.integers(0, hw[0] - 30), rng.integers(0, hw[1] - 40)
            lab[y:y + 30, x:x + 40] = c
        colours = rng.integers(0, 255, size=(CLASSES, 3))
        img = colours[lab].astype(np.uint8) + rng.integers(0, 20, size=(*hw, 3)).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"im{i}.png"), img[:, :, ::-1])
        cv2.imwrite(str(root / "masks" / f"im{i}.png"), lab)
    return FolderDataset(root, num_classes=CLASSES)


def _reference_sliding_window(model: torch.nn.Module, rgb: np.ndarray, window: int, stride: int, short: int) -> np.ndarray:
    """Segmenter's inference written out plainly: resize, windows one by one, average, resize back, arg-max."""
    h0, w0 = rgb.shape[:2]
    scale = short / min(h0, w0)
    h, w = round(h0 * scale), round(w0 * scale)
    im = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    x = torch.from_numpy(im.transpose(2, 0, 1).copy())[None]
    ys = [a for a in range(0, h, stride) if a < h - window] + [h - window]
    xs = [a for a in range(0, w, stride) if a < w - window] + [w - window]
    total = torch.zeros(1, CLASSES, h, w)
    count = torch.zeros(1, 1, h, w)
    with torch.no_grad():
        for y in ys:
            for xx in xs:
                logits = model(x[:, :, y:y + window, xx:xx + window]).patch_logits
                total[:, :, y:y + window, xx:xx + window] += F.interpolate(logits, size=(window, window), mode="bilinear",
                                                                           align_corners=False)
                count[:, :, y:y + window, xx:xx + window] += 1
    return F.interpolate(total / count, size=(h0, w0), mode="bilinear", align_corners=False)[0].argmax(0).numpy()


def test_sliding_window_miou_equals_a_plain_reference(tmp_path: Path) -> None:
    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("mask", seed=7), "mask", window=64, stride=48)
    loaded = build_model("demo", weights=str(ckpt))
    model = functools.partial(loaded.model, setting=loaded.model.default_setting().plain())
    ds = _folder_dataset(tmp_path / "data")
    spec = resolve_windows(loaded.config.window, loaded.config.stride, loaded.config.resize_short, None, None, None)
    assert spec == WindowSpec(64, 48, 64)
    result = evaluate(loaded, ds, [OperatingPoint("baseline", "none", False)], torch.device("cpu"), windows=spec)
    conf = np.zeros((CLASSES, CLASSES), dtype=np.int64)
    for i in range(len(ds)):
        s = ds[i]
        conf += confusion(_reference_sliding_window(model, s.image, 64, 48, 64), s.labels, CLASSES)
    scores = result.variants["baseline"]
    assert scores.windows == 2 * len(ds) and scores.images == len(ds)
    assert np.array_equal(scores.confusion, conf)
    assert scores.miou == mean_iou(conf)


def test_windowed_run_writes_one_trace_per_window_and_counts_windows(tmp_path: Path) -> None:
    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("mask", seed=8), "mask", window=64, stride=48)
    ds_root = tmp_path / "data"
    _folder_dataset(ds_root, n=2)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(ds_root / "images"), "--weights", str(ckpt), "--labels",
                                   str(ds_root / "masks"), "--policy", "uniform", "--exits", "none", "--device", "cpu",
                                   "--out", str(out), "--no-animation"])
    assert res.exit_code == 0, res.output
    run = next(out.glob("run-*"))
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["windows"] == {"window": 64, "stride": 48, "resize_short": 64}
    for name in ("im0", "im1"):
        folder = run / name
        plan = json.loads((folder / "windows.json").read_text())
        assert len(plan["boxes"]) == 2 and plan["resized_hw"] == [64, 100]
        for k in range(2):
            trace = Trace.load(folder / f"w{k:02d}")
            trace.assert_consistent()  # every patch of the window accounted for exactly once
            assert trace.meta.grid == (4, 4) and trace.num_patches == 16
        assert (folder / "segmentation.png").is_file() and (folder / "eval.json").is_file()
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["windows"] == 2 and summary["patches"] == 32
    images = pd.read_csv(run / "tables" / "images.csv")
    assert sorted(images["image"]) == ["im0/w00", "im0/w01", "im1/w00", "im1/w01"]
    totals = json.loads((run / "summary.json").read_text())
    assert totals["images"] == 2 and totals["windows"] == 4 and totals["patches"] == 64
    assert 0.0 <= totals["step_miou"] <= 1.0 and "baseline_miou" in totals
    from tokenscope.render.explorer import image_payload  # the explorer shows each window over its own crop

    panels = image_payload(run / "im0", "run", [])["panels"]
    assert [p["name"] for p in panels] == ["im0, window 0", "im0, window 1"]
    assert [p["box"] for p in panels] == plan["boxes"] and all(p["whole"] == [64, 100] for p in panels)
    assert all(p["grid"] == [4, 4] for p in panels)
    res = CliRunner().invoke(app, ["heatmap", str(run), "--kind", "merge"])
    assert res.exit_code == 0, res.output
    assert len(list(run.glob("heatmaps-*/im0/w01/merge.png"))) == 1
