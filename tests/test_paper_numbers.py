"""Numbers a paper can use: every model sweepable, no mIoU over mismatched classes without a word,
intervals on every mIoU and change, vector figures and tables."""

from __future__ import annotations

import json
import re
import runpy
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from segmenter_reference import segmenter_state, write_segmenter_release
from tokenscope.cli import app
from tokenscope.data.classspace import class_space
from tokenscope.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: object) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _ade_tree(root: Path, n: int = 4, seed: int = 0) -> Path:
    """An ADEChallengeData2016 layout: images/validation/*.jpg with annotations/validation/*.png
    (0 = other, 1..150 = classes), small blocky scenes so merging has something to merge."""
    rng = np.random.default_rng(seed)
    base = root / "ADEChallengeData2016"
    for sub in ("images", "annotations"):
        (base / sub / "validation").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lab = np.zeros((64, 96), np.uint8)
        img = np.zeros((64, 96, 3), np.uint8)
        for k, (y, x) in enumerate(((0, 0), (0, 48), (32, 0), (32, 48))):
            cls = int(rng.integers(1, 151))
            lab[y:y + 32, x:x + 48] = cls
            img[y:y + 32, x:x + 48] = rng.integers(0, 255, 3)
        img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(base / "images" / "validation" / f"ADE_val_{i:08d}.jpg"), img)
        cv2.imwrite(str(base / "annotations" / "validation" / f"ADE_val_{i:08d}.png"), lab)
    return root


@pytest.fixture
def imported(tmp_path: Path) -> Path:
    """A tiny Segmenter release for ADE20K's 150 classes (no exit gates, no policy: as published)."""
    return write_segmenter_release(tmp_path / "segmenter", segmenter_state("linear", classes=150), "linear")


def _script_methods() -> str:
    text = (ROOT / "scripts" / "reproduce_published.sh").read_text()
    return re.search(r"methods=\$\{METHODS:-([^}]+)\}", text).group(1)  # type: ignore[union-attr]


def test_reproduce_published_steps_run_offline_on_an_imported_segmenter_checkpoint(
        tmp_path: Path, imported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The script's sweep (its own operating points) on an imported model without trained gates,
    then the published-table printer reading what it wrote: end to end, nothing downloaded."""
    tree = _ade_tree(tmp_path / "ade")
    out = tmp_path / "sweeps"
    r = invoke("sweep", "--weights", imported, "--data", "ade20k", "--root", tree, "--split", "val",
               "--methods", _script_methods(), "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    (folder,) = out.glob("sweep-*")
    results = tmp_path / "published"
    results.mkdir()
    shutil.copy(folder / "sweep.csv", results / "segmenter-vit-t-mask-ade20k.csv")
    import pandas as pd

    df = pd.read_csv(results / "segmenter-vit-t-mask-ade20k.csv")
    assert set(df["point"]) == {"baseline", *_script_methods().split(",")}
    assert (df["images"] == 4).all() and (df["exited_early_pct"] == 0).all()
    assert (df["size"] == 0).all() and (folder / "pareto_gflops_native.png").is_file()  # each image at its own size
    capsys.readouterr()
    runpy.run_path(str(ROOT / "benchmarks" / "published_table.py"), run_name="__not_main__")["main"](str(results))
    printed = capsys.readouterr().out
    for point in ("algm:threshold=0.88", "cts:groups=0.4", "tome:r=0.05"):
        row = next(ln for ln in printed.splitlines() if ln.startswith("| segmenter-vit-t-mask-ade20k | " + point))
        assert f"{100 * float(df[df['point'] == point]['miou'].iloc[0]):.2f}" in row
    assert "not measured yet" in printed  # the other models' rows say so rather than a number


def test_evaluate_and_tune_take_run_model_options_on_an_imported_model(tmp_path: Path, imported: Path) -> None:
    tree = _ade_tree(tmp_path / "ade")
    js = tmp_path / "eval.json"
    r = invoke("evaluate", "--weights", imported, "--method", "tome", "--data", "ade20k", "--root", tree,
               "--window", "0", "--device", "cpu", "--json", js)
    assert r.exit_code == 0, r.output
    doc = json.loads(js.read_text())
    tome = doc["variants"]["step"]
    assert tome["miou_ci"]["images"] == 4 and tome["miou_ci"]["seed"] == 0
    assert tome["miou_ci"]["low"] <= tome["miou"] <= tome["miou_ci"]["high"]
    assert "miou_change_ci" in tome and doc["class_space"]["agree"] is True
    base = doc["variants"]["baseline"]  # evaluate runs ToMe itself, not the plain model under its name
    assert tome["mean_tokens_per_block"] < base["mean_tokens_per_block"] and tome["gflops_per_image"] < base["gflops_per_image"]
    r = invoke("evaluate", "--weights", imported, "--method", "step", "--data", "ade20k", "--root", tree, "--device", "cpu")
    assert r.exit_code != 0 and "never trained" in r.output and "tome, algm" in r.output
    r = invoke("tune", "--weights", imported, "--method", "tome", "--max-gflops", "1000", "--max-miou-drop", "100",
               "--data", "ade20k", "--root", tree, "--calib-split", "val", "--held-split", "val", "--device", "cpu",
               "--out", tmp_path / "op.json")
    assert r.exit_code == 0, r.output
    op = json.loads((tmp_path / "op.json").read_text())
    held = op["held_out"]
    assert held["miou_ci"]["images"] == 4 and "value" in held["change_ci"] and op["class_space"]["agree"] is True


def test_a_data_set_whose_classes_are_not_the_models_is_refused_or_said_beside_every_miou(tmp_path: Path) -> None:
    tree = _ade_tree(tmp_path / "ade", n=3)
    out = tmp_path / "out"
    r = invoke("run", "--dataset", "ade20k", "--root", tree, "--out", out, "--device", "cpu", "--no-figures")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "class spaces differ: demo predicts 8 classes (sky" in r.output and "ade20k has 150 (wall" in r.output
    assert "--class-map" in r.output and "--ignore-class-mismatch" in r.output
    assert not out.exists()  # refused before the run folder
    r = invoke("run", "--dataset", "ade20k", "--root", tree, "--out", out, "--device", "cpu", "--no-figures",
               "--ignore-class-mismatch")
    assert r.exit_code == 0, r.output
    assert "class mismatch ignored" in r.output
    (run,) = out.glob("run-*")
    manifest = json.loads((run / "run.json").read_text())
    assert any("class spaces differ" in w for w in manifest["warnings"])
    assert manifest["class_space"]["ignore_mismatch"] is True and manifest["class_space"]["agree"] is False
    summary = json.loads((run / "summary.json").read_text())
    assert summary["class_space"]["condition"].startswith("class spaces differ")
    assert summary["step_miou_ci"]["images"] == 3
    r = invoke("view", run)
    assert r.exit_code == 0, r.output
    assert "class spaces differ" in (run / "explorer.html").read_text()
    for cmd in (["evaluate", "--data", "ade20k", "--root", tree],
                ["sweep", "--data", "ade20k", "--root", tree, "--methods", "tome"],
                ["tune", "--data", "ade20k", "--root", tree, "--calib-split", "val", "--max-gflops", "9",
                 "--out", tmp_path / "op.json"]):
        r = invoke(*cmd, "--device", "cpu")
        assert r.exit_code == 2 and "class spaces differ" in r.output, (cmd, r.output)


def _label(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


@pytest.mark.parametrize("case", ["out_of_range", "sixteen_bit", "ade_annotation", "three_channel_grey"])
def test_label_maps_with_values_the_model_cannot_predict_are_refused_before_any_work(tmp_path: Path, case: str) -> None:
    h = w = 512  # the sample image's size
    labels = {
        "out_of_range": np.full((h, w), 200, np.uint8),
        "sixteen_bit": (np.arange(h * w).reshape(h, w) % 1801).astype(np.uint16),
        "ade_annotation": np.random.default_rng(0).integers(0, 151, (h, w)).astype(np.uint8),
        "three_channel_grey": np.repeat(np.full((h, w, 1), 9, np.uint8), 3, axis=2),
    }[case]
    lab = _label(tmp_path / "labels" / "street_5000001.png", labels)
    out = tmp_path / "out"
    for cmd in (["run", ROOT / "sample_images" / "street_5000001.png"],
                ["compare", ROOT / "sample_images" / "street_5000001.png", "--repeats", "1"],
                ["compare", ROOT / "sample_images" / "street_5000001.png", "--methods", "step,tome", "--repeats", "1"]):
        r = invoke(*cmd, "--labels", lab, "--out", out, "--device", "cpu")
        assert r.exit_code == 2, r.output
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "lie outside the 8 classes of demo" in errors[0] and "Traceback" not in r.output
        assert not out.exists()
    r = invoke("run", ROOT / "sample_images" / "street_5000001.png", "--labels", lab, "--out", out, "--device", "cpu",
               "--no-figures", "--ignore-class-mismatch")
    assert r.exit_code == 0 and "class mismatch ignored" in r.output, r.output


def test_a_colour_label_map_is_refused(tmp_path: Path) -> None:
    colour = np.zeros((512, 512, 3), np.uint8)
    colour[..., 0] = 3
    colour[..., 2] = 5
    lab = _label(tmp_path / "colour.png", colour)
    r = invoke("run", ROOT / "sample_images" / "street_5000001.png", "--labels", lab, "--out", tmp_path / "o",
               "--device", "cpu")
    assert r.exit_code != 0 and "single-channel" in r.output and "Traceback" not in r.output


def test_a_class_map_maps_labels_and_is_recorded_and_said(tmp_path: Path) -> None:
    import pandas as pd

    image, labels = ROOT / "sample_images" / "street_5000001.png", ROOT / "sample_images" / "labels"
    plain = invoke("run", image, "--labels", labels, "--out", tmp_path / "a", "--device", "cpu", "--no-figures")
    identity = tmp_path / "identity.csv"
    identity.write_text("data_id,model_id\n" + "".join(f"{i},{i}\n" for i in range(8)))
    mapped = invoke("run", image, "--labels", labels, "--out", tmp_path / "b", "--device", "cpu", "--no-figures",
                    "--class-map", identity)
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    miou = lambda out: json.loads(next((tmp_path / out).glob("run-*/summary.json")).read_text())["step_miou"]  # noqa: E731
    assert miou("a") == pytest.approx(miou("b"))
    assert "classes mapped by identity.csv" in mapped.output
    only_road = tmp_path / "road.json"  # by name; every other class is ignored
    only_road.write_text(json.dumps({"road": "road"}))
    r = invoke("run", image, "--labels", labels, "--out", tmp_path / "c", "--device", "cpu", "--no-figures",
               "--class-map", only_road)
    assert r.exit_code == 0, r.output
    summary = json.loads(next((tmp_path / "c").glob("run-*/summary.json")).read_text())
    assert summary["class_space"]["class_map"] == str(only_road)
    classes = pd.read_csv(next((tmp_path / "c").glob("run-*/tables/classes.csv")))
    assert set(classes["class"]) <= {3, 255}  # only road's pixels (class 3 of the demo) are scored
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": 99}))
    r = invoke("run", image, "--labels", labels, "--out", tmp_path / "d", "--device", "cpu", "--class-map", bad)
    assert r.exit_code == 2 and "the model class 99 is out of range (0-7 or 255)" in r.output
    assert not (tmp_path / "d").exists()


def test_same_count_different_names_is_a_mismatch_and_names_agree_up_to_spelling() -> None:
    with pytest.raises(ConfigError, match="class 1 is 'road' for the model, 'building' for the data"):
        class_space("m", ("sky", "road"), 2, "d", ("sky", "building"), 2)
    assert class_space("m", ("Traffic_Light", "sky"), 2, "d", ("traffic light", "Sky"), 2).condition == ""
    with pytest.raises(ConfigError, match="labels reach class 9, m predicts only 4"):
        class_space("m", (), 4, "folder", (), 10)
    waived = class_space("m", ("sky", "road"), 2, "d", ("sky", "building"), 2, ignore_mismatch=True)
    assert waived.tag == "class mismatch ignored" and "class 1 is 'road'" in waived.condition


def test_sweep_writes_vector_figures_with_interval_bars_and_a_latex_table(tmp_path: Path) -> None:
    import matplotlib.collections

    import tokenscope as ts

    r = invoke("sweep", "--methods", "step,tome:r=0.05", "--seeds", "10:14", "--scene-size", "128", "--device", "cpu",
               "--out", tmp_path, "--format", "pdf", "--no-titles")
    assert r.exit_code == 0, r.output
    (folder,) = tmp_path.glob("sweep-*")
    pdfs = sorted(folder.glob("*.pdf"))
    assert [p.name for p in pdfs] == ["pareto_gflops_128.pdf", "pareto_throughput_128.pdf"]
    assert all(p.read_bytes().startswith(b"%PDF") for p in pdfs) and not list(folder.glob("*.png"))
    import pandas as pd

    df = pd.read_csv(folder / "sweep.csv")
    assert ((df["miou_low"] <= df["miou"] + 1e-12) & (df["miou"] <= df["miou_high"] + 1e-12)).all()
    assert (df["images"] == 4).all() and df.loc[df["is_baseline"], "miou_change"].abs().max() == 0
    fig = ts.plot.pareto(folder)
    bars = [c for ax in fig.axes for c in ax.collections if isinstance(c, matplotlib.collections.LineCollection)]
    assert bars, "the mIoU intervals are drawn as error bars"
    latex = invoke("table", folder, "--format", "latex")
    assert latex.exit_code == 0, latex.output
    assert "\\begin{tabular}" in latex.output and "GFLOPs per image" in latex.output and "[95\\% CI]" in latex.output
    assert "pooled over 4 images" in latex.output
    md = ts.table(folder)
    assert md.splitlines()[0].startswith("| method | operating point") and "step" in md
    for bad in (["--format", "jpeg"], ["--dpi", "5"]):
        r = invoke("sweep", "--methods", "tome", "--seeds", "1:2", "--scene-size", "64", "--out", tmp_path / "x", *bad)
        assert r.exit_code == 2 and not (tmp_path / "x").exists()
    r = invoke("table", folder, "--kind", "classes")
    assert r.exit_code == 2 and "run folders" in r.output


def test_run_writes_its_data_set_figures_as_vector_files_beside_the_pngs(tmp_path: Path) -> None:
    r = invoke("run", ROOT / "sample_images" / "street_5000001.png", ROOT / "sample_images" / "street_5000002.png",
               "--out", tmp_path, "--no-animation", "--device", "cpu", "--format", "svg", "--no-titles")
    assert r.exit_code == 0, r.output
    figs = next(tmp_path.glob("run-*")) / "figures"
    svgs = sorted(p.stem for p in figs.glob("*.svg"))
    assert svgs == sorted(p.stem for p in figs.glob("*.png")) and "token_flow" in svgs
    assert "<svg" in (figs / "token_flow.svg").read_text()[:500]
    assert json.loads((next(tmp_path.glob("run-*")) / "run.json").read_text())["request"]["figure_format"] == "svg"


def test_a_plain_comparison_tabulates_its_totals_and_interval(tmp_path: Path) -> None:
    r = invoke("compare", ROOT / "sample_images" / "street_5000001.png", ROOT / "sample_images" / "street_5000002.png",
               "--labels", ROOT / "sample_images" / "labels", "--repeats", "1", "--out", tmp_path, "--device", "cpu")
    assert r.exit_code == 0, r.output
    text = invoke("table", next(tmp_path.glob("compare-*")), "--format", "csv").output
    header, vit, step = text.splitlines()[:3]
    assert "GFLOPs (total, 2 images)" in header and vit.startswith("vit,") and step.startswith("step,")
    overall = json.loads((next(tmp_path.glob("compare-*")) / "run.json").read_text())["overall"]
    assert f"{overall['step_gflops']:.2f}" in step and f"{100 * overall['miou_change_ci']['value']:+.2f}" in step
