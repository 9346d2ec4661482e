"""Every command through typer's CliRunner, including the ways users get things wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.trace.trace import Trace

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _runs(out: Path, kind: str = "run") -> list[Path]:
    return sorted(p for p in out.glob(f"{kind}-*") if p.is_dir())


def test_run_writes_a_complete_run_folder(tmp_path: Path, image_files: dict[str, Path], tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    r = invoke("run", image_files["scene"], image_files["odd"], "--weights", tiny_checkpoint, "--device", "cpu",
               "--exit-threshold", "0.3", "--out", out)
    assert r.exit_code == 0, r.output
    (run,) = _runs(out)
    manifest = json.loads((run / "run.json").read_text())
    assert [im["folder"] for im in manifest["images"]] == ["scene", "odd"]
    for name in ("scene", "odd"):
        d = run / name
        for f in ("trace.json", "trace.npz", "image.png", "merge.png", "exit.png", "confidence.png",
                  "segmentation.png", "histogram.png", "tokens.csv", "blocks.csv", "summary.json"):
            assert (d / f).is_file(), f
        trace = Trace.load(d)
        trace.assert_consistent()
        tokens = pd.read_csv(d / "tokens.csv")
        assert len(tokens) == trace.num_tokens and tokens["patches"].sum() == trace.num_patches
        blocks = pd.read_csv(d / "blocks.csv")
        assert blocks["tokens_in"].tolist() == trace.block_tokens_in.tolist()
    odd = Trace.load(run / "odd")
    assert odd.meta.input_hw == (70, 101) and odd.meta.padded_hw == (80, 112) and odd.label_map.shape == (70, 101)
    assert len(pd.read_parquet(run / "tables" / "tokens.parquet")) == sum(Trace.load(run / n).num_tokens for n in ("scene", "odd"))
    assert (run / "scene" / "tokens.gif").is_file() and (run / "figures" / "token_flow.png").is_file()
    assert "reduction" in r.output and "GFLOPs" in r.output


def test_a_bad_image_is_reported_and_the_others_still_processed(tmp_path: Path, image_files: dict[str, Path],
                                                                  tiny_checkpoint: Path) -> None:
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(image_files["scene"].read_bytes()[:200])
    out = tmp_path / "out"
    r = invoke("run", image_files["scene"], bad, tmp_path / "missing.jpg", "--weights", tiny_checkpoint,
               "--device", "cpu", "--out", out)
    assert r.exit_code == 3
    assert "broken.png" in r.output and "truncated" in r.output and "missing.jpg" in r.output
    (run,) = _runs(out)
    assert (run / "scene" / "trace.json").is_file()
    errors = [im for im in json.loads((run / "run.json").read_text())["images"] if im["error"]]
    assert len(errors) == 2


def test_a_second_run_never_touches_the_first(tmp_path: Path, image_files: dict[str, Path], tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    args = ("run", image_files["scene"], "--weights", tiny_checkpoint, "--device", "cpu", "--out", out)
    assert invoke(*args).exit_code == 0
    (first,) = _runs(out)
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    assert invoke(*args).exit_code == 0
    assert len(_runs(out)) == 2
    assert before == {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    r = invoke("run", tmp_path / "nothing-here.png", "--weights", tiny_checkpoint, "--device", "cpu", "--out", out)
    assert r.exit_code != 0
    assert before == {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}


def test_heatmap_rerenders_the_latest_run_without_a_model(tmp_path: Path, image_files: dict[str, Path],
                                                          tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert invoke("run", image_files["scene"], "--weights", tiny_checkpoint, "--device", "cpu", "--out", out).exit_code == 0
    (run,) = _runs(out)
    import tokenscope.jobs.setup as setup
    import tokenscope.models.resolve as front_door

    for module in (front_door, setup):  # the front door, and the name the model-running commands call it by
        monkeypatch.setattr(module, "build_model", lambda *a, **k: pytest.fail("heatmap must not load a model"))
    r = invoke("heatmap", "--out", out)
    assert r.exit_code == 0, r.output
    (hm,) = _runs(run, "heatmaps")
    assert {p.name for p in (hm / "scene").iterdir()} == {"merge.png", "exit.png", "confidence.png",
                                                         "segmentation.png", "histogram.png", "groups_b01.png"}
    assert (hm / "scene" / "merge.png").read_bytes() == (run / "scene" / "merge.png").read_bytes()
    r = invoke("heatmap", run, "--kind", "exit", "--out", out)
    assert r.exit_code == 0
    assert invoke("heatmap", run, "--kind", "sparkles").exit_code == 2
    assert invoke("heatmap", "--out", tmp_path / "empty").exit_code == 2


def test_compare_reports_both_variants(tmp_path: Path, image_files: dict[str, Path], tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    r = invoke("compare", image_files["scene"], "--baseline", "vit", "--weights", tiny_checkpoint, "--device", "cpu",
               "--labels", image_files["labels"].parent, "--policy", "oracle", "--exit-threshold", "0.3",
               "--repeats", "2", "--warmup", "0", "--out", out)
    assert r.exit_code == 0, r.output
    (run,) = _runs(out, "compare")
    df = pd.read_csv(run / "compare.csv")
    row = df[df["image"] != "ALL"].iloc[0]
    assert row["base_tokens"] == row["patches"] == 48 and row["step_tokens"] < row["base_tokens"]
    assert row["step_gflops"] < row["base_gflops"]
    assert 0 <= row["agreement"] <= 1 and 0 <= row["step_miou"] <= 1 and 0 <= row["base_miou"] <= 1
    assert row["base_peak_mib"] > 0 and row["step_latency_ms"] > 0
    assert (run / "scene" / "compare.png").is_file()
    Trace.load(run / "scene" / "step").assert_consistent()
    assert "ALL" in df["image"].tolist()


@pytest.mark.parametrize("args,needle", [
    (["--policy", "magic"], "unknown policy"),
    (["--merge-threshold", "abc"], "merge threshold"),
    (["--merge-threshold", "0.5,0.5"], "1 or 4 values"),
    (["--exit-threshold", "2"], "between 0 and 1"),
    (["--exits", "sometimes"], "unknown exit mode"),
    (["--policy", "oracle"], "--labels"),
    (["--size", "8"], "smaller than one 16-pixel patch"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_flags_are_one_line_errors(tmp_path: Path, image_files: dict[str, Path], tiny_checkpoint: Path,
                                       args: list[str], needle: str) -> None:
    out = tmp_path / "out"
    r = invoke("run", image_files["scene"], "--weights", tiny_checkpoint, "--out", out, *args)
    assert r.exit_code != 0
    assert needle in r.output, r.output


def test_model_choice_errors(tmp_path: Path, image_files: dict[str, Path]) -> None:
    r = invoke("run", image_files["scene"], "--model", "vitl", "--out", tmp_path)
    assert r.exit_code == 2 and "--random-init" in r.output and "--weights" in r.output
    r = invoke("run", image_files["scene"], "--model", "resnet", "--out", tmp_path)
    assert r.exit_code == 2 and "unknown model" in r.output
    junk = tmp_path / "w.safetensors"
    junk.write_bytes(b"garbage")
    r = invoke("run", image_files["scene"], "--model", "vitt", "--weights", junk, "--out", tmp_path)
    assert r.exit_code == 2 and "cannot read weights" in r.output
    r = invoke("run", image_files["scene"], "--model", "vitt", "--random-init", "--policy", "learned", "--device", "cpu",
               "--out", tmp_path)
    assert r.exit_code == 0 and "RANDOM" in r.output
    assert not list(tmp_path.glob("run-*/.partial-*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, image_files: dict[str, Path], tiny_checkpoint: Path) -> None:
    r = invoke("run", image_files["scene"], "--weights", tiny_checkpoint, "--device", "cuda", "--out", tmp_path)
    assert r.exit_code == 2 and "no CUDA GPU" in r.output


def test_models_lists_the_registry() -> None:
    r = invoke("models")
    assert r.exit_code == 0 and "vit_large_patch16_224" in r.output
