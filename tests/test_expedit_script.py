"""scripts/reproduce_expedit_table.sh end to end, offline: a tiny Segmenter release (the official
layout, mask decoder) imported from its checkpoint, scored on a small labelled folder with reduction
off, Hourglass, ToMe and EViT, and the table printed beside Expedit's published figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from segmenter_reference import CLASSES, segmenter_state, write_segmenter_release

ROOT = Path(__file__).resolve().parents[1]


def _folder_dataset(root: Path, n: int = 3, side: int = 64) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((side, side), np.uint8)
        mask[:, side // 2:] = 1 + i % (CLASSES - 1)  # two regions per image
        image = (mask[..., None] * 40 + rng.integers(0, 30, (side, side, 3))).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"s{i}.png"), image)
        cv2.imwrite(str(root / "masks" / f"s{i}.png"), mask)
    return root


def test_the_expedit_script_runs_end_to_end_on_a_tiny_segmenter(tmp_path: Path) -> None:
    checkpoint = write_segmenter_release(tmp_path / "release", segmenter_state("mask"), "mask")
    data = _folder_dataset(tmp_path / "data")
    env = {**os.environ, "TOKENSCOPE_OFFLINE": "1", "TOKENSCOPE_HOME": str(tmp_path / "home"),
           "TS": f"{sys.executable} -m tokenscope", "PY": sys.executable, "DEVICE": "cpu", "OUT": str(tmp_path / "out"),
           "MODEL_ARGS": f"--weights {checkpoint}", "DATA_ARGS": f"--data folder --data-root {data} --window 0"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_expedit_table.sh")], capture_output=True, text=True,
                       env=env, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    sweep = pd.read_csv(tmp_path / "out" / "sweep.csv")
    assert list(sweep["method"]) == ["vit", "hourglass", "tome", "evit"]
    assert (sweep["images"] == 3).all() and sweep["miou"].between(0, 1).all()
    base = float(sweep.loc[sweep["method"] == "vit", "gflops_per_image"].iloc[0])
    assert (sweep.loc[sweep["method"] != "vit", "gflops_per_image"] < base).all()  # each one does less work
    table = r.stdout
    assert "| vit | reduction off | 51.82 | 659 |" in table and "| hourglass | hourglass:side=0.7 | 51.56 | 444 |" in table
    assert "| tome | tome:r=0.05 |  |  |" in table and "not published for Segmenter ViT-L" in table
