"""Bad options leave nothing behind; damaged run folders are named image by image, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenscope.cli import app

IMAGES = ["sample_images/street_5000001.png", "sample_images/street_5000002.png", "sample_images/street_5000003.png"]


@pytest.mark.parametrize("args", [["run", IMAGES[0], "--size", "0"], ["run", IMAGES[0], "--size", "9000"],
                                  ["run", "--dataset", "synthetic", "--seeds", "0:2", "--scene-size", "8"],
                                  ["compare", IMAGES[0], "--size", "5"], ["sweep", "--sizes", "0", "--seeds", "0:2"]])
def test_an_invalid_option_leaves_no_output_folder(tmp_path: Path, args: list[str]) -> None:
    res = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "out")])
    assert res.exit_code in (2, 3), res.output
    assert "error:" in res.output and "Traceback" not in res.output
    assert not any((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("args,message", [(["--size", "100000"], "4096 px limit"), (["--size", "4096", "--batch", "16"], "Mpx"),
                                          (["--size", "100"], "multiple of the 16-pixel patch")])
def test_bench_refuses_shapes_that_cannot_run_in_one_line(args: list[str], message: str) -> None:
    res = CliRunner().invoke(app, ["bench", "--model", "vitb", "--random-init", "--device", "cpu", *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_heatmap_names_each_damaged_image_and_renders_the_others(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["run", *IMAGES, "--device", "cpu", "--out", str(tmp_path), "--no-animation", "--no-figures"])
    assert res.exit_code == 0, res.output
    run = next(tmp_path.glob("run-*"))
    npz = run / "street_5000001" / "trace.npz"
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])  # truncated
    meta = run / "street_5000002" / "trace.json"
    doc = json.loads(meta.read_text())
    doc["version"] = 99
    meta.write_text(json.dumps(doc))  # from a future tokenscope
    res = runner.invoke(app, ["heatmap", str(run), "--kind", "merge"])
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 2
    assert any("street_5000001" in line and "damaged" in line for line in lines)
    assert any("street_5000002" in line and "version 99" in line for line in lines)
    rendered = list(run.glob("heatmaps-*/*/merge.png"))
    assert [p.parent.name for p in rendered] == ["street_5000003"]
    (run / "street_5000003" / "trace.npz").unlink()  # missing file
    res = runner.invoke(app, ["heatmap", str(run)])
    assert res.exit_code == 3 and "street_5000003/trace.npz: missing" in res.output
