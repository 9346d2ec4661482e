"""Early decisions against the unreduced model, fates against class boundaries, and reduction against size:
the analyses a paper on token reduction asks, read from the traces and tables tokenscope wrote."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import tokenscope as ts
from tokenscope.analysis.agreement import agreement_counts, boundary_counts, boundary_distance
from tokenscope.analysis.uncertainty import draws, ratio_intervals
from tokenscope.cli import app
from tokenscope.trace.fates import FATES, token_fates

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_images" / "street_5000001.png"
LABELS = ROOT / "sample_images" / "labels"


def test_boundary_distance_counts_patches_to_the_nearest_class_edge() -> None:
    classes = np.zeros((4, 6), dtype=np.int64)
    classes[:, 3:] = 1
    assert boundary_distance(classes)[0].tolist() == [2, 1, 0, 0, 1, 2]
    assert (boundary_distance(np.zeros((3, 3), np.int64)) > 100).all()  # one class: no boundary anywhere


def test_ratio_intervals_pool_over_images_with_the_shared_draws() -> None:
    rng = np.random.default_rng(3)
    totals = rng.integers(5, 50, size=(7, 2)).astype(float)
    hits = np.floor(totals * rng.random((7, 2)))
    ivs = ratio_intervals(hits, totals, resamples=200)
    assert ivs[0].value == pytest.approx(hits[:, 0].sum() / totals[:, 0].sum())
    idx = draws(7, 200)
    direct = np.array([hits[i, 1].sum() / totals[i, 1].sum() for i in idx])
    assert ivs[1].low == pytest.approx(np.quantile(direct, 0.025)) and ivs[1].high == pytest.approx(np.quantile(direct, 0.975))
    one = ratio_intervals(hits[:1], totals[:1])
    assert np.isnan(one[0].low)  # one image: no interval


def test_agreement_counts_the_patches_whose_early_label_differs_from_the_unreduced_model() -> None:
    model = ts.load_model("demo")
    base = ts.trace(ts.load_model("demo", method="vit"), IMAGE, size=128)
    step = ts.trace(model, IMAGE, size=128)
    same = agreement_counts(base, base)
    assert same[(("fate", "reached_end"), "differs")] == 0 and same[(("fate", "reached_end"), "patches")] == base.num_patches
    counts = agreement_counts(step, base)
    fates = token_fates(step)
    exited = fates.kind[step.token_of_patch] == FATES.index("exited")
    ours = step.per_patch(step.token_class) != base.per_patch(base.token_class)
    assert counts[(("fate", "exited"), "patches")] == int(exited.sum())
    assert counts[(("fate", "exited"), "differs")] == int((ours & exited).sum())
    assert sum(counts[(("fate", f), "patches")] for f in FATES) == step.num_patches
    flipped = dataclasses.replace(step, token_class=(step.token_class + 1) % step.meta.num_classes)
    every = agreement_counts(flipped, base)
    assert every[(("fate", "exited"), "differs")] == int(exited.sum())  # every exited label changed: all differ


def test_boundary_counts_cover_every_labelled_patch_once() -> None:
    t = ts.trace(ts.load_model("demo", method="evit"), IMAGE, labels=LABELS / IMAGE.name, size=128)
    counts, source = boundary_counts(t)
    assert source == "ground truth"
    labelled = int((t.patch_labels != 255).sum())
    bins = {k for k, what in counts if what == "patches"}
    assert sum(counts[(b, "patches")] for b in bins) == labelled
    assert sum(counts[(b, f)] for b in bins for f in FATES) == labelled


@pytest.fixture(scope="module")
def compare_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    r = CliRunner().invoke(app, ["compare", str(IMAGE), str(ROOT / "sample_images" / "street_5000002.png"),
                                 "--labels", str(LABELS), "--methods", "step,tome,evit", "--size", "128",
                                 "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return next(out.glob("compare-*"))


def test_table_kind_agreement_reads_a_compare_folder(compare_folder: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["table", str(compare_folder), "--kind", "agreement", "--format", "csv"])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln and not ln.startswith("#")]
    rows = pd.DataFrame([ln.split(",", 3) for ln in lines[1:]], columns=lines[0].split(",", 3))
    decided = set(rows["decided"])
    assert {"exited at gate 4", "pruned in block 4", "merged in block 1"} <= decided
    assert "not accuracy" in r.output  # the note says what agreement measures
    assert int(rows[(rows["method"] == "step") & (rows["decided"] == "exited")]["patches"].iloc[0]) > 0


def test_table_kind_boundary_and_its_figure(compare_folder: Path, tmp_path: Path) -> None:
    fig = tmp_path / "boundary.pdf"
    r = CliRunner().invoke(app, ["table", str(compare_folder), "--kind", "boundary", "--figure", str(fig)])
    assert r.exit_code == 0, r.output
    assert "| step | 0 |" in r.output and "exited (%) [95% CI]" in r.output and "pruned (%) [95% CI]" in r.output
    assert fig.is_file() and fig.read_bytes()[:4] == b"%PDF"
    again = CliRunner().invoke(app, ["table", str(compare_folder), "--kind", "boundary", "--figure", str(fig)])
    assert again.exit_code != 0 and "exists" in again.output  # never over an existing file


def test_agreement_needs_the_unreduced_traces_of_a_compare_folder(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "128", "--device", "cpu", "--no-figures",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    run = next(tmp_path.glob("run-*"))
    r = CliRunner().invoke(app, ["table", str(run), "--kind", "agreement"])
    assert r.exit_code != 0 and "compare" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["table", str(run), "--kind", "boundary"])
    assert r.exit_code == 0 and "own prediction" in r.output  # no labels, no baseline: said so


def test_a_two_size_sweep_compares_each_size_with_its_own_unreduced_model(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["sweep", "--methods", "tome:r=2", "--seeds", "100000:100002", "--sizes", "64,128",
                                 "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    sweep = next(tmp_path.glob("sweep-*"))
    assert (sweep / "scaling.png").is_file()
    df = pd.read_csv(sweep / "sweep.csv")
    assert sorted(df[df["is_baseline"]]["size"]) == [64, 128]
    t = CliRunner().invoke(app, ["table", str(sweep), "--format", "csv"])
    assert t.exit_code == 0, t.output
    lines = [ln for ln in t.output.splitlines() if ln and not ln.startswith("#")]
    table = pd.read_csv(pd.io.common.StringIO("\n".join(lines)))
    for size in (64, 128):
        base = float(df[(df["size"] == size) & df["is_baseline"]]["gflops_per_image"].iloc[0])
        point = df[(df["size"] == size) & ~df["is_baseline"]].iloc[0]
        shown = table[(table["size (px)"] == size) & (table["method"] != "vit")]["FLOP reduction (x)"].iloc[0]
        assert shown == pytest.approx(base / point["gflops_per_image"], abs=0.006)
