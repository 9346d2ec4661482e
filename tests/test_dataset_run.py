"""Data-set runs: tables that re-derive from the traces, resuming, sweeps, reports, animations."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY, make_tiny
from tokenscope.cli import app
from tokenscope.data.synthetic import CLASSES
from tokenscope.jobs.run import RunRequest, run_job
from tokenscope.jobs.setup import ModelOptions
from tokenscope.models.checkpoints import save_checkpoint
from tokenscope.models.registry import StepConfig
from tokenscope.trace.trace import Trace

CFG8 = StepConfig(**{**TINY.to_dict(), "num_classes": len(CLASSES), "class_names": CLASSES})


@pytest.fixture
def ckpt8(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt8" / "m.json"
    save_checkpoint(make_tiny(0, CFG8), path, trained={"backbone": True, "decoder": True, "exits": True, "policy": True})
    return path


def _request(ckpt: Path, **kw) -> RunRequest:
    opts = ModelOptions(model="x", weights=str(ckpt), device="cpu", policy="oracle", exit_threshold=0.3)
    return RunRequest(dataset="synthetic", seeds="500:505", dataset_size=96, model=asdict(opts), **kw)


def _rederive_classes(run: Path, names: list[str]) -> dict[int, dict[str, int]]:
    """Per-class totals counted directly from the traces, independently of the aggregation code."""
    acc: dict[int, dict[str, int]] = {}
    for n in names:
        t = Trace.load(run / n)
        for i in range(t.num_patches):
            r, c = divmod(i, t.meta.grid[1])
            cls = int(t.patch_labels[r, c])
            lvl = int(t.token_level[t.token_of_patch[r, c]])
            acc.setdefault(cls, {}).setdefault(f"patches_level{lvl}", 0)
            acc[cls][f"patches_level{lvl}"] += 1
            own = t.token_of_patch[r, c]  # STEP: a patch's fate is its token's exit gate or the end
            fate = "reached_end" if t.token_exit_block[own] == t.meta.depth else "exited"
            for key in (f"patches_{fate}", *([f"patches_exited_gate{t.token_exit_block[own]}"] if fate == "exited" else [])):
                acc[cls][key] = acc[cls].get(key, 0) + 1
        for tok in range(t.num_tokens):
            labs = t.patch_labels[t.token_of_patch == tok]
            labs = labs[labs != 255]
            cls = int(np.bincount(labs).argmax()) if labs.size else 255
            key = "tokens_reached_end" if t.token_exit_block[tok] == t.meta.depth else f"tokens_exited_gate{t.token_exit_block[tok]}"
            acc.setdefault(cls, {}).setdefault(key, 0)
            acc[cls][key] += 1
    return acc


def test_dataset_tables_match_the_traces(tmp_path: Path, ckpt8: Path) -> None:
    result = run_job(_request(ckpt8, animation=False), out=tmp_path / "out")
    run = result.run_dir
    names = [json.loads((run / "run.json").read_text())["images"][i]["folder"] for i in range(5)]
    classes = pd.read_csv(run / "tables" / "classes.csv").set_index("class")
    expected = _rederive_classes(run, names)
    for cls, counts in expected.items():
        for key, value in counts.items():
            assert classes.loc[cls, key] == value, (cls, key)
    assert classes.filter(like="patches_level").to_numpy().sum() == sum(Trace.load(run / n).num_patches for n in names)
    fates = classes[["patches_merged", "patches_pruned", "patches_exited", "patches_reached_end"]].sum(axis=1)
    assert (fates == classes["patches"]).all()  # never renormalised: every patch has one fate
    blocks = pd.read_csv(run / "tables" / "blocks.csv")
    assert blocks["tokens_in"].tolist() == np.sum([Trace.load(run / n).block_tokens_in for n in names], axis=0).tolist()
    levels = pd.read_csv(run / "tables" / "levels.csv")
    assert levels["tokens"].sum() == sum(Trace.load(run / n).num_tokens for n in names)
    s = json.loads((run / "summary.json").read_text())
    assert 0 <= s["step_miou"] <= 1 and 0 <= s["baseline_miou"] <= 1 and s["class_source"] == "ground truth"
    assert np.asarray(s["flow_patches"]).sum() == s["patches"]
    for f in ("tokens_per_block", "class_fates", "class_levels", "token_flow"):
        assert (run / "figures" / f"{f}.png").is_file()


def test_a_killed_run_resumes_to_the_same_tables(tmp_path: Path, ckpt8: Path) -> None:
    whole = run_job(_request(ckpt8, animation=False, figures=False), out=tmp_path / "a").run_dir

    class Killed(Exception):
        pass

    def kill_at_third(done: int, total: int, item: str) -> None:
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        run_job(_request(ckpt8, animation=False, figures=False), out=tmp_path / "b", progress=kill_at_third)
    (part,) = list((tmp_path / "b").glob("run-*"))
    assert json.loads((part / "run.json").read_text())["status"] == "running"
    assert not (part / "tables").exists() and len([p for p in part.iterdir() if p.is_dir()]) == 2
    (part / ".partial-synthetic-000502").mkdir()  # a half-written folder from the kill
    r = CliRunner().invoke(app, ["run", "--resume", str(part), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((part / "run.json").read_text())["status"] == "complete"
    assert not list(part.glob(".partial-*"))
    for name in ("classes", "levels", "blocks"):
        a = pd.read_parquet(whole / "tables" / f"{name}.parquet")
        b = pd.read_parquet(part / "tables" / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, b)
    a = pd.read_parquet(whole / "tables" / "images.parquet").drop(columns=["forward_ms"])
    b = pd.read_parquet(part / "tables" / "images.parquet").drop(columns=["forward_ms"])
    pd.testing.assert_frame_equal(a, b)


def test_sweep_writes_pareto_plots(tmp_path: Path, ckpt8: Path) -> None:
    r = CliRunner().invoke(app, ["sweep", "--weights", str(ckpt8), "--policy", "oracle", "--seeds", "10:12",
                                 "--scene-size", "64", "--merge-thresholds", "0.5,0.9", "--exit-thresholds", "0.3,0.9",
                                 "--sizes", "64,96", "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (folder,) = list(tmp_path.glob("sweep-*"))
    df = pd.read_csv(folder / "sweep.csv")
    assert len(df) == 2 * (1 + 4 + 1) and df["is_default"].sum() == 2 and df["is_baseline"].sum() == 2
    base = df[df["is_baseline"]]
    assert (base["token_reduction"] == 1).all() and (base["exited_early_pct"] == 0).all()
    for s in (64, 96):
        assert (folder / f"pareto_gflops_{s}.png").is_file() and (folder / f"pareto_throughput_{s}.png").is_file()


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        d = dict(attrs)
        if "src" in d:
            self.srcs.append(d["src"])
        if "href" in d:
            self.hrefs.append(d["href"])


def test_report_is_one_self_contained_file(tmp_path: Path, ckpt8: Path) -> None:
    run = run_job(_request(ckpt8), out=tmp_path / "out").run_dir
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    text = (run / "report.html").read_text()
    p = _Collect()
    p.feed(text)
    assert p.srcs and all(s.startswith("data:image/") for s in p.srcs)
    assert p.hrefs == ["explorer.html"]  # the one link: the run's own explorer, beside the report
    assert "Per class" in text and "token_flow" in text and "image/gif" in text
    r2 = CliRunner().invoke(app, ["report", str(run)])
    assert r2.exit_code == 0 and (run / "report-2.html").is_file()  # never overwrites


def test_animation_has_one_frame_per_stage(tmp_path: Path, ckpt8: Path) -> None:
    run = run_job(_request(ckpt8, figures=False), out=tmp_path / "out").run_dir
    gif = Image.open(run / "synthetic-000500" / "tokens.gif")
    assert gif.n_frames == CFG8.timm_kwargs["depth"] + 1


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path, ckpt8: Path) -> None:
    run = run_job(_request(ckpt8, animation=False), out=tmp_path / "out").run_dir
    assert CliRunner().invoke(app, ["report", str(run)]).exit_code == 0
    shot = tmp_path / "shot.png"
    script = Path(__file__).resolve().parent.parent / "scripts" / "report_screenshot.sh"
    subprocess.run(["bash", str(script), str(run / "report.html"), str(shot), "1000", "1600"], check=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (1600, 1000)
    assert img.std() > 20  # text, tables and figures, not a blank page
