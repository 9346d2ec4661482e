"""Methods from the command line: run, compare --methods, sweep --methods, heatmap of old and new traces."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
from test_cli import _runs, invoke

from tokenscope.trace.trace import Trace

V1_RUN = Path(__file__).parent / "data" / "run_v1"


def test_a_version_1_trace_written_before_merging_existed_still_loads_and_renders(tmp_path: Path) -> None:
    run = tmp_path / "run_v1"
    shutil.copytree(V1_RUN, run)
    doc = json.loads((run / "street_5000001" / "trace.json").read_text())
    assert doc["version"] == 1 and "method" not in doc["meta"]
    trace = Trace.load(run / "street_5000001")
    trace.assert_consistent()
    assert not trace.has_merges and trace.meta.method_name == "step"
    assert (trace.cover_at(5) == trace.token_of_patch).all()
    r = invoke("heatmap", run, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    (hm,) = sorted(run.glob("heatmaps-*"))
    assert {p.name for p in (hm / "street_5000001").iterdir()} == {
        "merge.png", "exit.png", "confidence.png", "segmentation.png", "groups_b01.png", "histogram.png"}
    r = invoke("report", run)
    assert r.exit_code == 0, r.output


def test_run_with_tome_writes_a_version_2_trace_and_group_pictures(tmp_path: Path, image_files: dict[str, Path],
                                                                   tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    r = invoke("run", image_files["scene"], "--weights", tiny_checkpoint, "--device", "cpu", "--method", "tome:r=4",
               "--out", out)
    assert r.exit_code == 0, r.output
    (run,) = _runs(out)
    doc = json.loads((run / "scene" / "trace.json").read_text())
    assert doc["version"] == 2 and doc["meta"]["method"] == "tome:r=4" and doc["meta"]["merging"]["r"] == 4
    trace = Trace.load(run / "scene")
    assert trace.merges_per_block().tolist() == [4, 4, 4]
    groups = sorted(p.name for p in (run / "scene").glob("groups_b*.png"))
    assert groups == ["groups_b02.png", "groups_b03.png", "groups_b04.png"]
    tokens = pd.read_csv(run / "scene" / "tokens.csv")
    assert (tokens["merged_at"] > 0).sum() == 12
    assert "method tome:r=4" in r.output
    r = invoke("report", run)
    assert r.exit_code == 0, r.output
    r = invoke("heatmap", run, "--kind", "groups", "--blocks", "1,3", "--out", out)
    assert r.exit_code == 0, r.output
    (hm,) = sorted(run.glob("heatmaps-*"))
    assert sorted(p.name for p in (hm / "scene").iterdir()) == ["groups_b01.png", "groups_b03.png"]
    r = invoke("heatmap", run, "--kind", "groups", "--blocks", "9", "--out", out)
    assert r.exit_code != 0 and "blocks" in r.output


def test_compare_methods_gives_one_row_per_method_and_a_figure(tmp_path: Path, image_files: dict[str, Path],
                                                              tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    r = invoke("compare", image_files["scene"], "--labels", image_files["labels"], "--weights", tiny_checkpoint,
               "--device", "cpu", "--methods", "step,tome:r=3,cts:groups=4,dtop,algm", "--exit-threshold", "0.3",
               "--repeats", "1", "--warmup", "0", "--out", out)
    assert r.exit_code == 0, r.output
    (run,) = _runs(out, "compare")
    df = pd.read_csv(run / "methods.csv")
    per_image = df[df["image"] != "ALL"]
    assert list(per_image["method"]) == ["baseline", "step", "tome:r=3", "cts:groups=4", "dtop", "algm"]
    rules = per_image.set_index("method")["merge_rules"].fillna("")
    assert rules["tome:r=3"] == rules["algm"] == "order=reference count=batch" and rules["step"] == ""
    overall = df[df["image"] == "ALL"].set_index("method")
    assert overall.loc["baseline", "flop_reduction"] == 1.0 and overall.loc["baseline", "agreement"] == 1.0
    assert overall.loc["tome:r=3", "merged"] == 9 and overall.loc["cts:groups=4", "tokens"] == 48 - 12
    assert overall.loc["tome:r=3", "gflops"] < overall.loc["baseline", "gflops"]
    assert "miou" in overall.columns
    assert (run / "scene" / "methods.png").is_file()
    for folder in ("baseline", "step", "tome_r3", "cts_groups4", "dtop", "algm"):
        Trace.load(run / "scene" / folder).assert_consistent()
    blocks = pd.read_csv(run / "tokens_per_block.csv")
    assert blocks["tome:r=3_merged"].tolist() == [3, 3, 3]


def test_compare_methods_refuses_a_bad_method_before_writing_anything(tmp_path: Path, image_files: dict[str, Path],
                                                                      tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    r = invoke("compare", image_files["scene"], "--weights", tiny_checkpoint, "--device", "cpu",
               "--methods", "step,tomee", "--out", out)
    assert r.exit_code != 0 and "unknown method 'tomee'" in r.output
    assert len([ln for ln in r.output.splitlines() if "error" in ln]) == 1
    assert not out.exists() or not list(out.iterdir())


def test_sweep_methods_puts_every_method_on_one_pareto_plot(tmp_path: Path, tiny_checkpoint: Path) -> None:
    r = invoke("sweep", "--weights", tiny_checkpoint, "--methods", "dtop,tome,cts:groups=3", "--seeds", "10:12",
               "--scene-size", "64", "--device", "cpu", "--out", tmp_path, "--ignore-class-mismatch")
    assert r.exit_code == 0, r.output
    assert "class mismatch ignored" in r.output  # the 4-class tiny model on the 8 synthetic classes: said
    (folder,) = list(tmp_path.glob("sweep-*"))
    df = pd.read_csv(folder / "sweep.csv")
    assert list(df["point"]) == ["baseline", "dtop:exit=0.99", "dtop:exit=0.95", "dtop:exit=0.9", "tome:r=0.03",
                                 "tome:r=0.05", "tome:r=0.08", "cts:groups=3"]
    assert list(df["method"].unique()) == ["vit", "dtop", "tome", "cts"]
    base = df[df["is_baseline"]].iloc[0]
    assert base["block_token_reduction"] == 1.0
    tome = df[df["method"] == "tome"]["block_token_reduction"].tolist()  # r = 2% of 16 tokens rounds to 0
    assert tome[0] == 1.0 and tome[1] > 1 and tome[2] >= tome[1]
    assert (folder / "pareto_gflops_64.png").is_file() and (folder / "pareto_throughput_64.png").is_file()
