"""`tokenscope tune`: the cheapest operating point within an accuracy limit, reported on held-out images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import invoke

from tokenscope.trace.trace import Trace

FAST = ["--scene-size", "64", "--calib-seeds", "200000:200003", "--held-seeds", "300000:300003", "--device", "cpu",
        "--method", "dtop"]


def test_tune_chooses_the_cheapest_qualifying_point_and_reports_the_held_out_images_honestly(tmp_path: Path) -> None:
    op = tmp_path / "op.json"
    r = invoke("tune", "--out", op, "--max-gflops", "1000", "--max-miou-drop", "100", *FAST)
    assert r.exit_code == 0, r.output
    doc = json.loads(op.read_text())
    assert doc["format"] == "tokenscope-operating-point" and doc["method"].startswith("dtop:exit=")
    assert doc["held_out"]["met"] is True and "chosen: " in r.output
    assert doc["method"] == "dtop:exit=0.8"  # every point qualifies: the most eager exit is the cheapest
    # the held-out numbers are what evaluate measures for that point on those images
    js = tmp_path / "eval.json"
    r = invoke("evaluate", "--operating-point", op, "--seeds", "300000:300003", "--size", "64", "--device", "cpu",
               "--json", js)
    assert r.exit_code == 0, r.output
    step = json.loads(js.read_text())["variants"]["step"]
    assert 100 * step["miou"] == pytest.approx(doc["held_out"]["miou"]) and step["gflops_per_image"] == pytest.approx(doc["held_out"]["gflops"])
    # run and bench take the same file; traces record the method
    r = invoke("run", Path(__file__).resolve().parents[1] / "sample_images" / "street_5000001.png", "--size", "128",
               "--operating-point", op, "--device", "cpu", "--no-animation", "--out", tmp_path / "runs")
    assert r.exit_code == 0, r.output
    (folder,) = [p for p in next((tmp_path / "runs").glob("run-*")).iterdir() if (p / "trace.json").exists()]
    assert Trace.load(folder).meta.method == doc["method"]
    r = invoke("tune", "--out", op, "--max-gflops", "1000", *FAST)
    assert r.exit_code != 0 and "never overwrites" in r.output  # the first file is kept


def test_a_target_no_point_meets_is_said_so_with_exit_code_4_and_nothing_written(tmp_path: Path) -> None:
    op = tmp_path / "op.json"
    r = invoke("tune", "--out", op, "--max-gflops", "0.0001", *FAST)
    assert r.exit_code == 4 and "no operating point meets the target" in r.output
    assert not op.exists()
    r = invoke("tune", "--out", op, *FAST)
    assert r.exit_code == 2 and "needs a target" in r.output


def test_operating_point_files_are_checked_and_exclude_method(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    sample = Path(__file__).resolve().parents[1] / "sample_images" / "street_5000001.png"
    r = invoke("run", sample, "--operating-point", bad, "--device", "cpu", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not a tokenscope operating point" in r.output
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"format": "tokenscope-operating-point", "version": 1, "method": "dtop:exit=0.9"}))
    r = invoke("run", sample, "--operating-point", good, "--method", "tome", "--device", "cpu", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not both" in r.output


def test_without_labels_tune_scores_against_the_unreduced_models_own_predictions(tmp_path: Path) -> None:
    import cv2
    import numpy as np

    from tokenscope.data.synthetic import synthetic_scene

    for split, seeds in (("train", range(3)), ("val", range(10, 13))):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        for s in seeds:
            rgb = (np.clip(synthetic_scene(s, 64, 64).image, 0, 1) * 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / "imgs" / split / f"s{s}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    op = tmp_path / "op.json"
    r = invoke("tune", "--out", op, "--max-gflops", "1000", "--max-miou-drop", "100", "--data", "images",
               "--data-root", tmp_path / "imgs", "--method", "dtop", "--device", "cpu")
    assert r.exit_code == 0, r.output
    doc = json.loads(op.read_text())
    assert doc["calibration"]["miou"] == pytest.approx(100 - doc["calibration"]["miou_drop"])  # the unreduced model is 100
    js = tmp_path / "e.json"
    r = invoke("evaluate", "--data", "images", "--data-root", tmp_path / "imgs" / "val", "--method", "vit", "--device",
               "cpu", "--json", js)
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["variants"]["baseline"]["miou"] == pytest.approx(1.0)


def test_tune_can_search_a_forced_token_budget(tmp_path: Path) -> None:
    op = tmp_path / "op.json"
    fast = [a for a in FAST if a not in ("--method", "dtop")]
    r = invoke("tune", "--out", op, "--max-gflops", "1000", "--max-miou-drop", "100", "--method", "budget", *fast)
    assert r.exit_code == 0, r.output
    doc = json.loads(op.read_text())
    assert doc["method"].startswith("dcts:budget=") and doc["held_out"]["met"] is True
    js = tmp_path / "e.json"
    r = invoke("evaluate", "--operating-point", op, "--seeds", "300000:300003", "--size", "64", "--device", "cpu",
               "--json", js)
    assert r.exit_code == 0 and json.loads(js.read_text())["variants"]["step"]["token_reduction"] > 1.0
