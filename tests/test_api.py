"""The public Python API, used only through `import tokenscope as ts`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tokenscope as ts
from tokenscope.cli import app

STREET = "sample_images/street_5000001.png"
LABELS = "sample_images/labels/street_5000001.png"


@pytest.fixture(scope="module")
def demo() -> "ts.Model":
    return ts.load_model("demo", device="cpu")


def _same_trace(a: "ts.Trace", b: "ts.Trace") -> None:
    for f in dataclasses.fields(a):
        if f.name == "meta":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, list):
            assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y)), f.name
        elif x is None or y is None:
            assert x is None and y is None, f.name
        else:
            assert np.array_equal(x, y), f.name
    ma, mb = dataclasses.asdict(a.meta), dataclasses.asdict(b.meta)
    ma.pop("timings"), mb.pop("timings")
    assert ma == mb


def test_api_names_win_over_subpackages_of_the_same_name() -> None:
    import tokenscope.train.trainer  # noqa: F401 - binds the subpackages as attributes of the package
    import tokenscope.trace.capture  # noqa: F401

    assert callable(ts.trace) and callable(ts.train) and ts.trace.__module__ == "tokenscope.api"
    from tokenscope.train.trainer import Trainer

    assert Trainer.__name__ == "Trainer"


def test_help_reads_as_a_short_manual() -> None:
    out = subprocess.run([sys.executable, "-c", "import tokenscope as ts; help(ts)"], capture_output=True, text=True,
                         check=True, env={"PAGER": "cat", "PATH": ""}).stdout
    for name in ("load_model(", "trace(model, image", "trace_many(", "predict(", "load_trace(", "ts.plot.merge",
                 "TokenscopeError", "run(images"):
        assert name in out, name


def test_a_trace_from_the_api_equals_the_one_tokenscope_run_writes(tmp_path: Path, demo: "ts.Model") -> None:
    res = CliRunner().invoke(app, ["run", STREET, "--labels", LABELS, "--device", "cpu", "--out", str(tmp_path),
                                   "--no-animation", "--no-baseline"])
    assert res.exit_code == 0, res.output
    from_cli = ts.load_trace(next(tmp_path.glob("run-*")) / "street_5000001")
    from_api = ts.trace(demo, STREET, labels=LABELS)
    _same_trace(from_api, from_cli)
    assert from_cli.image is not None and from_cli.image.shape == (*from_api.meta.input_hw, 3)


def test_paths_arrays_pil_images_and_tensors_give_the_same_trace(demo: "ts.Model") -> None:
    rgb = np.array(Image.open(STREET).convert("RGB"))
    reference = ts.trace(demo, STREET)
    inputs = [rgb, rgb.astype(np.float32) / 255.0, rgb.astype(np.uint16) * 257, Image.fromarray(rgb),
              torch.from_numpy(rgb), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0,
              np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])]
    for image in inputs:
        t = ts.trace(demo, image)
        assert np.array_equal(t.token_of_patch, reference.token_of_patch), type(image)
        assert np.array_equal(t.token_exit_block, reference.token_exit_block), type(image)
        assert np.array_equal(t.label_map, reference.label_map), type(image)
    gray = ts.trace(demo, rgb[:, :, 0])
    assert gray.meta.input_hw == reference.meta.input_hw


def test_errors_are_documented_types_with_one_line_and_nothing_is_printed(capsys: pytest.CaptureFixture[str],
                                                                            demo: "ts.Model") -> None:
    cases = [(lambda: ts.trace(demo, "no/such/image.png"), ts.ImageError),
             (lambda: ts.trace(demo, np.zeros((4, 4, 5))), ts.ImageError),
             (lambda: ts.trace(demo, object()), ts.ImageError),
             (lambda: ts.load_model("demo", policy="sideways"), ts.ConfigError),
             (lambda: ts.load_model("demo", exits="sometimes"), ts.ConfigError),
             (lambda: ts.load_model("vitl"), ts.CheckpointError),
             (lambda: ts.load_model("demo", weights="missing.json"), ts.CheckpointError),
             (lambda: ts.trace_many(demo, [STREET], batch_size=0), ts.ConfigError),
             (lambda: ts.load_trace("no/such/folder"), ts.RunFolderError)]
    for call, kind in cases:
        with pytest.raises(kind) as info:
            call()
        assert isinstance(info.value, ts.TokenscopeError) and "\n" not in str(info.value)
    assert capsys.readouterr() == ("", "")


def test_tables_persistence_and_notebook_display(tmp_path: Path, demo: "ts.Model") -> None:
    t = ts.trace(demo, STREET, labels=LABELS)
    tokens, blocks, s = t.tokens(), t.blocks(), t.summary()
    assert len(tokens) == t.num_tokens == s["tokens"] and tokens["patches"].sum() == t.num_patches
    assert len(blocks) == t.meta.depth and blocks["tokens_in"].iloc[0] == t.num_tokens
    t.save(tmp_path / "street")
    back = ts.load_trace(tmp_path / "street")
    _same_trace(t, back)
    assert np.array_equal(back.image, t.image)
    assert back._repr_png_().startswith(b"\x89PNG") and "tokens" in back._repr_html_()
    for kind in (ts.plot.merge, ts.plot.exit, ts.plot.confidence, ts.plot.segmentation):
        img = kind(t)
        assert img.dtype == np.uint8 and img.shape[1] == t.meta.input_hw[1] and img.shape[0] >= t.meta.input_hw[0]
    assert ts.plot.merge(t, np.zeros((10, 10, 3), np.uint8)).shape == ts.plot.merge(t).shape  # resized to the trace
    for fig in (ts.plot.histogram(t), ts.plot.token_flow([t, t])):
        assert fig.axes


def test_trace_many_batches_equal_one_at_a_time(demo: "ts.Model") -> None:
    paths = [STREET, "sample_images/street_5000002.png", "sample_images/street_5000003.png"]
    seen: list[int] = []
    many = ts.trace_many(demo, paths, batch_size=2, progress=lambda done, total, item: seen.append(done))
    assert seen[-1] == 3
    for p, t in zip(paths, many):
        one = ts.trace(demo, p)
        assert np.array_equal(t.token_of_patch, one.token_of_patch) and np.array_equal(t.token_exit_block, one.token_exit_block)
        t.assert_consistent()
    tables = ts.tabulate(many, names=["a", "b", "c"])
    assert tables.summary["images"] == 3 and list(tables.images["image"]) == ["a", "b", "c"]


def test_models_are_independent_and_configure_checks_options(demo: "ts.Model") -> None:
    other = ts.load_model("demo", device="cpu", policy="none", exits=False)
    t_other = ts.trace(other, STREET)
    t_demo = ts.trace(demo, STREET)
    assert t_other.num_tokens == t_other.num_patches and t_demo.num_tokens < t_demo.num_patches
    other.configure(policy="learned", exits=True)
    assert np.array_equal(ts.trace(other, STREET).token_of_patch, t_demo.token_of_patch)
    with pytest.raises(ts.ConfigError):
        other.configure(exit_threshold=2.0)
    assert "demo" in set(ts.list_models()["name"])


def test_predict_follows_the_sliding_window_protocol(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from segmenter_reference import segmenter_state, write_segmenter_release

    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("mask", seed=3), "mask", window=64, stride=48)
    model = ts.load_model(weights=ckpt, device="cpu")
    rgb = (np.random.default_rng(0).random((96, 150, 3)) * 255).astype(np.uint8)
    pred = ts.predict(model, rgb)
    assert len(pred.traces) == 2 and pred.label_map.shape == (96, 150)
    assert all(isinstance(t, ts.Trace) for t in pred.traces)
    whole = ts.predict(model, rgb, window=0)
    assert len(whole.traces) == 1


def test_a_torch_module_where_a_model_is_expected_is_one_error_saying_what_to_pass() -> None:
    import timm

    import tokenscope as ts

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=1)
    image = np.zeros((32, 32, 3), np.uint8)
    for call in (lambda: ts.trace(vit, image), lambda: ts.load_model(vit), lambda: ts.trace_many(vit, [image]),
                 lambda: ts.predict(vit, image), lambda: ts.run([], model=vit, dataset="synthetic"),
                 lambda: ts.load_model("demo", weights=vit)):
        with pytest.raises(ts.TokenscopeError, match="expected .*(Model|path)"):
            call()
    with pytest.raises(ts.TokenscopeError, match=r"ts.load_model\('demo'\)"):
        ts.trace("demo", image)
