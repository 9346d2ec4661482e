"""Writing image folders in worker processes gives exactly the outputs of writing them inline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.jobs.writer import BackgroundWriter

TIMING = ("forward_ms", "forward_s")


def _run(out: Path, *flags: str) -> Path:
    res = CliRunner().invoke(app, ["run", "--dataset", "synthetic", "--seeds", "100000:100005", "--scene-size", "128",
                                   "--device", "cpu", "--out", str(out), *flags])
    assert res.exit_code == 0, res.output
    return next(out.glob("run-*"))


def test_worker_processes_write_the_same_run_as_inline_writing(tmp_path: Path) -> None:
    inline = _run(tmp_path / "inline", "--render-workers", "0", "--animation-limit", "2")
    pooled = _run(tmp_path / "pooled", "--render-workers", "2", "--animation-limit", "2")
    for name in ("images", "classes", "levels", "blocks"):
        a = pd.read_csv(inline / "tables" / f"{name}.csv")
        b = pd.read_csv(pooled / "tables" / f"{name}.csv")
        keep = [c for c in a.columns if c not in TIMING]
        pd.testing.assert_frame_equal(a[keep], b[keep])
    for run in (inline, pooled):
        folders = sorted(p for p in run.iterdir() if p.is_dir() and p.name.startswith("synthetic"))
        assert len(folders) == 5
        assert [f.name for f in folders if (f / "tokens.gif").is_file()] == [f.name for f in folders[:2]]
        assert all((f / "merge.png").is_file() and (f / "histogram.png").is_file() for f in folders)
        assert json.loads((run / "run.json").read_text())["animated_images"] == 2
        assert json.loads((run / "summary.json").read_text())["animated_images"] == 2


def test_a_failing_job_is_handed_back_not_lost() -> None:
    def boom(x: int) -> int:
        raise ValueError(f"bad {x}")

    with BackgroundWriter(0) as w:
        (key, result, exc), = w.submit("a", boom, 1)
    assert key == "a" and result is None and isinstance(exc, ValueError)
