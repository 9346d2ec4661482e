"""A seeded fuzz of the files tokenscope reads back: run.json fields, summary.json, trace meta and
checkpoint descriptions, each set to values of the wrong type, out of range, or holding markup. Every
command that reads them must answer with one line and an exit code, never a traceback (a test of the
promise in docs/commands.md: every file tokenscope reads back is data)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tokenscope.cli import app

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_images" / "street_5000001.png"
LABELS = ROOT / "sample_images" / "labels"
VALUES: list[Any] = [None, "x", "o[/]", -1, 0, 10**12, 1e300, float("inf"), float("nan"), True, [], [1], {}, {"a": 1},
                     [[1e400, 0, 0]], "../../etc", "\x1b[2J"]


@pytest.fixture(scope="module")
def base_run(labelled_run: Path) -> Path:
    return labelled_run


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON document (dict keys and list positions), leaves and inner nodes."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _one_line(r: Any, what: str) -> None:
    """Exit 0, or a user error's exit code (2, 3, 130...) with its line: never an exception."""
    assert r.exception is None or isinstance(r.exception, SystemExit), (what, type(r.exception).__name__, r.output[-400:])
    assert r.exit_code != 1, (what, r.output[-400:])


@pytest.mark.parametrize("seed", range(int(os.environ.get("TOKENSCOPE_FUZZ_RUNS", "6"))))
def test_run_folder_content_of_any_shape_is_one_line(base_run: Path, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    runner = CliRunner()
    image = next(p.name for p in base_run.iterdir() if (p / "trace.json").is_file())
    for draw in range(6):
        run = tmp_path / f"r{draw}"
        shutil.copytree(base_run, run)
        target = rng.choice(["run.json", "summary.json", f"{image}/trace.json", f"{image}/summary.json"])
        doc = json.loads((run / target).read_text())
        paths = [p for p in _paths(doc) if not (target.endswith("trace.json") and p[0] not in ("meta",))]
        path = rng.choice(paths)
        value = rng.choice(VALUES)
        _set(doc, path, value)
        (run / target).write_text(json.dumps(doc))
        what = f"{target}:{'.'.join(map(str, path))}={value!r}"
        for args in (["heatmap", str(run), "--kind", "merge"], ["view", str(run)], ["report", str(run)],
                     ["table", str(run), "--kind", "classes"], ["table", str(run), "--kind", "boundary"]):
            _one_line(runner.invoke(app, args), f"{args[0]} {what}")
        if target == "run.json" and path[0] == "request":
            manifest = json.loads((run / "run.json").read_text())
            if isinstance(manifest, dict):
                manifest["status"] = "running"
                (run / "run.json").write_text(json.dumps(manifest))
                _one_line(runner.invoke(app, ["run", "--resume", str(run), "--device", "cpu"]), f"resume {what}")
        shutil.rmtree(run)


@pytest.mark.parametrize("seed", range(3))
def test_checkpoint_descriptions_of_any_shape_are_one_line(tmp_path: Path, seed: int) -> None:
    rng = random.Random(100 + seed)
    weights = ROOT / "tokenscope" / "weights"
    base = json.loads((weights / "demo.json").read_text())
    shutil.copy(weights / "demo.safetensors", tmp_path / "m.safetensors")
    for draw in range(8):
        doc = json.loads(json.dumps(base))
        path = rng.choice(_paths(doc))
        value = rng.choice(VALUES)
        _set(doc, path, value)
        (tmp_path / "m.json").write_text(json.dumps(doc))
        r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "64", "--no-animation", "--no-figures",
                                     "--weights", str(tmp_path / "m.json"), "--device", "cpu",
                                     "--out", str(tmp_path / f"o{draw}")])
        _one_line(r, f"m.json:{'.'.join(map(str, path))}={value!r}")


@pytest.mark.parametrize("seed", range(2))
def test_odd_path_names_are_traced_and_printed_as_text(tmp_path: Path, seed: int) -> None:
    rng = random.Random(200 + seed)
    pieces = ["[/]", "[bold]", "[@a=(]", "\x1b[2J", "\n", "é", "💥", " ", "%00", "..", "tables", "run.json", "-",
              "a" * 100, "'", '"', "$HOME", "*"]
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        name = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))).replace("/", "_")[:200] or "x"
        shutil.copy(IMAGE, src / f"{name}{i}.png")
    out = tmp_path / "".join(rng.choice(pieces) for _ in range(3)).replace("/", "_")[:100]
    r = CliRunner().invoke(app, ["run", str(src), "--size", "64", "--no-animation", "--no-figures", "--device", "cpu",
                                 "--out", str(out)])
    _one_line(r, f"run with names {sorted(p.name for p in src.iterdir())!r}")
    assert r.exit_code == 0, r.output
    run = next(out.glob("run-*"))
    for args in (["heatmap", str(run), "--kind", "merge"], ["view", str(run)], ["report", str(run)],
                 ["table", str(run), "--kind", "classes"]):
        r = CliRunner().invoke(app, args)
        _one_line(r, args[0])
        assert r.exit_code == 0, (args[0], r.output)
