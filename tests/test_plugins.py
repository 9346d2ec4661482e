"""Methods from outside the package: an installed distribution's entry point (the example package
in examples/plugins/norm_prune, installed with pip), a method file, and broken plug-ins, which are
one line naming them and never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.render.explorer import image_payload
from tokenscope.trace.trace import TRACE_JSON, Trace

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugins" / "norm_prune"
IMAGE = ROOT / "sample_images" / "street_5000001.png"


def _cli(env: dict[str, str], *args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenscope", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package pip-installed (offline, from a copy of its folder) into its own site dir."""
    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(EXAMPLE, work / "src")
    target = work / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(work / "src")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return target


def _env(*paths: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths), "TOKENSCOPE_OFFLINE": "1"}


def _traces(folder: Path) -> list[Trace]:
    return [Trace.load(p.parent) for p in sorted(folder.rglob(TRACE_JSON))]


def test_an_installed_plugin_is_listed_compared_swept_and_shown(site: Path, tmp_path: Path) -> None:
    env = _env(site)
    r = _cli(env, "methods", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = {m["name"]: m for m in json.loads(r.stdout)}
    plug = listed["norm_prune"]
    assert plug["source"].startswith("entry point norm_prune = norm_prune:METHOD from tokenscope-norm-prune 0.1.0")
    assert plug["kind"] == "prune" and plug["settings"][0] == {"name": "frac", "type": "number", "default": 0.2,
                                                                "help": "share of the tokens that leave"}
    assert plug["ladder"] == ["norm_prune:frac=0.1", "norm_prune:frac=0.2", "norm_prune:frac=0.4"]
    assert {"vit", "step", "dcts", "dtop", "cts", "tome", "algm", "evit"} <= set(listed)
    assert all(set(m) >= {"name", "kind", "settings", "ladder", "reference", "source"} for m in listed.values())

    r = _cli(env, "compare", IMAGE, "--methods", "step,norm_prune,evit", "--size", "256", "--device", "cpu",
             "--repeats", "1", "--warmup", "0", "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    run = next((tmp_path / "out").glob("compare-*"))
    traces = _traces(run)
    assert len(traces) == 4  # baseline, step, norm_prune, evit
    for t in traces:
        t.assert_consistent()  # every patch accounted for exactly once, counts agree with the hooks
    prune = next(t for t in traces if t.meta.method == "norm_prune")
    depth_third = prune.meta.depth // 3
    pruned = prune.token_pruned_at > 0
    assert pruned.sum() == int(0.2 * prune.num_tokens) and set(prune.token_pruned_at[pruned]) == {depth_third}
    assert prune.block_tokens_in[depth_third] == prune.num_tokens - pruned.sum()  # they really skip later blocks
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["method_sources"]["norm_prune"][0]["source"].startswith("entry point norm_prune")
    assert len(manifest["method_sources"]["norm_prune"][0]["digest"]) == 64
    image = next(p for p in run.iterdir() if p.is_dir())
    payload = image_payload(image, "compare", ["baseline", *manifest["methods"]])
    panels = {p["name"]: p for p in payload["panels"]}
    assert "error" not in panels["norm_prune"] and panels["norm_prune"]["method"] == "norm_prune"
    assert sum(v > 0 for v in panels["norm_prune"]["pruned"]) == pruned.sum()

    r = _cli(env, "sweep", "--methods", "norm_prune", "--seeds", "100000:100002", "--scene-size", "128", "--device",
             "cpu", "--out", tmp_path / "sw", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    table = pd.read_csv(next((tmp_path / "sw").glob("sweep-*")) / "sweep.csv")
    assert table["point"].tolist() == ["baseline", "norm_prune:frac=0.1", "norm_prune:frac=0.2", "norm_prune:frac=0.4"]
    assert table["gflops_per_image"].is_monotonic_decreasing


def _broken_site(root: Path, body: str) -> Path:
    """A site dir holding one installed distribution whose entry point is the module `broken_rule`."""
    site = root / "broken-site"
    info = site / "broken_rule-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-rule\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tokenscope.methods]\nbroken = broken_rule:METHOD\n")
    (site / "broken_rule.py").write_text(body)
    return site


@pytest.mark.parametrize("body, words", [
    ("raise RuntimeError('boom at import')\n", "failed to load: RuntimeError: boom at import"),
    ("METHOD = 42\n", "defines no tokenscope method"),
])
def test_a_broken_plugin_is_one_line_naming_it(tmp_path: Path, body: str, words: str) -> None:
    env = _env(_broken_site(tmp_path, body))
    r = _cli(env, "methods", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "method plug-in 'broken'" in r.stderr and words in r.stderr and "step" in r.stdout
    r = _cli(env, "run", IMAGE, "--method", "broken", "--device", "cpu", "--out", tmp_path / "o", cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "method plug-in 'broken' (entry point broken_rule:METHOD from broken-rule 0.1)" in lines[0] and words in lines[0]
    assert not (tmp_path / "o").exists()  # refused before any work
    r = _cli(env, "run", IMAGE, "--method", "step", "--device", "cpu", "--no-figures", "--out", tmp_path / "s",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # a broken plug-in does not stop the methods that work


def _method_file(folder: Path, forward: str = "") -> Path:
    src = (EXAMPLE / "norm_prune.py").read_text()
    if forward:
        src = src.replace("        norms = view.x.float().norm(dim=-1)\n", f"        {forward}\n        norms = view.x.float().norm(dim=-1)\n")
    path = folder / "my_rule.py"
    path.write_text(src)
    return path


def test_a_method_file_runs_is_recorded_with_its_digest_and_a_changed_file_is_not_resumed(tmp_path: Path) -> None:
    rule = _method_file(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(IMAGE), "--method", f"{rule}:frac=0.3:block=2", "--device", "cpu", "--no-figures",
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "o").glob("run-*"))
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["method_sources"][0]["source"] == f"file {rule.resolve()}"
    trace = _traces(run)[0]
    trace.assert_consistent()
    assert trace.meta.pruning == {"kind": "norm_prune", "frac": 0.3, "block": 2, "inside": [], "after": [2]}
    assert (trace.token_pruned_at > 0).sum() == int(0.3 * trace.num_tokens)
    rule.write_text(rule.read_text().replace("smallest first", "smallest first (edited)"))
    r = runner.invoke(app, ["run", "--resume", str(run), "--device", "cpu"])  # the run folder alone runs no code
    assert r.exit_code != 0 and "never makes code run" in r.output and "--method" in r.output
    r = runner.invoke(app, ["run", "--resume", str(run), "--method", f"{rule}:frac=0.3:block=2", "--device", "cpu"])
    assert r.exit_code != 0 and "start a new run instead of resuming" in r.output and "Traceback" not in r.output
    rule.unlink()
    r = runner.invoke(app, ["run", "--resume", str(run), "--method", f"{rule}:frac=0.3:block=2", "--device", "cpu"])
    assert r.exit_code != 0 and "no such file" in r.output and "Traceback" not in r.output


def test_a_plugin_step_that_fails_or_decides_nonsense_is_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    for forward, words in (("raise ZeroDivisionError('inside the rule')", "failed: ZeroDivisionError: inside the rule"),
                           ("return PruneDecision(self.block, 'x', view.token_ids, view.valid, view.valid[:, :1])",
                            "must be a tensor of shape")):
        folder = tmp_path / str(len(words))
        folder.mkdir()
        rule = _method_file(folder, forward)
        r = runner.invoke(app, ["compare", str(IMAGE), "--methods", f"step,{rule}", "--size", "128", "--device", "cpu",
                                "--repeats", "1", "--warmup", "0", "--out", str(folder / "o")])
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        errors = [ln for ln in r.output.splitlines() if "error" in ln.lower()]
        assert any("method norm_prune (file" in ln and words in ln for ln in errors), r.output


def test_a_method_file_is_swept_and_tuned_over_its_own_ladder(tmp_path: Path) -> None:
    rule = _method_file(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["sweep", "--methods", str(rule), "--seeds", "100000:100002", "--scene-size", "64",
                            "--device", "cpu", "--out", str(tmp_path / "sw")])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(next((tmp_path / "sw").glob("sweep-*")) / "sweep.csv")
    assert table["point"].tolist() == ["baseline", "norm_prune:frac=0.1", "norm_prune:frac=0.2", "norm_prune:frac=0.4"]
    op = tmp_path / "op.json"
    r = runner.invoke(app, ["tune", "--method", str(rule), "--out", str(op), "--max-gflops", "1000",
                            "--max-miou-drop", "100", "--scene-size", "64", "--calib-seeds", "200000:200002",
                            "--held-seeds", "300000:300002", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    chosen = json.loads(op.read_text())["method"]
    assert chosen == f"{rule}:frac=0.4"  # the cheapest qualifying point, spelled so that it resolves again
    r = runner.invoke(app, ["run", str(IMAGE), "--operating-point", str(op), "--size", "128", "--device", "cpu",
                            "--no-figures", "--out", str(tmp_path / "runs")])
    assert r.exit_code == 2 and "never makes code run" in r.output  # an operating-point file is data, not code
    r = runner.invoke(app, ["run", str(IMAGE), "--method", chosen, "--size", "128", "--device", "cpu",
                            "--no-figures", "--out", str(tmp_path / "runs")])  # named on the command line: it runs
    assert r.exit_code == 0, r.output


def _view(b: int = 2, n: int = 5, d: int = 8):
    from tokenscope.models.steps import TokenView

    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, -1] = False
    ids = torch.where(valid, torch.arange(n).expand(b, n), torch.full((b, n), -1))
    return TokenView(3, torch.randn(b, n, d), ids, valid, valid.float(), None, torch.zeros(b, 1, d))  # type: ignore[arg-type]


def _merge(view, **change):  # noqa: ANN001, ANN003, ANN202
    from tokenscope.models.steps import MergeDecision

    b, n = view.valid.shape
    merged = torch.zeros(b, n, dtype=torch.bool)
    merged[:, 0] = True
    into = torch.zeros(b, n, dtype=torch.long)
    into[:, 0] = 1
    fields = {"block": view.block, "kind": "mine", "token_ids": view.token_ids, "valid": view.valid, "merged": merged,
              "into": into, "matching_flops": torch.zeros(b, dtype=torch.long), **change}
    return MergeDecision(**fields)


def _prune(view, **change):  # noqa: ANN001, ANN003, ANN202
    from tokenscope.models.steps import PruneDecision

    fields = {"block": view.block, "kind": "mine", "token_ids": view.token_ids, "valid": view.valid,
              "pruned": torch.zeros_like(view.valid), **change}
    return PruneDecision(**fields)


def test_every_decision_a_plugin_step_returns_is_checked_before_the_encoder_carries_it_out() -> None:
    """The second probe's contract violations (wrong dtype, a slot merged into itself or out of range, wrong ids,
    wrong block, a fused token of the wrong width, NaN, writing into what the step was shown) are each one line
    naming the method, its source, the block and the field; a good decision passes untouched."""
    from types import SimpleNamespace

    from tokenscope.models.methods.point import GuardedStep
    from tokenscope.models.methods.registry import PluginError

    method = SimpleNamespace(name="mine", source="file my_rule.py")
    view = _view()
    bad_into = torch.zeros(2, 5, dtype=torch.long)
    cases = {
        "merged must be bool": lambda v: _merge(v, merged=_merge(v).merged.long()),
        "into must be an integer type": lambda v: _merge(v, into=_merge(v).into.float()),
        "merges a slot into itself": lambda v: _merge(v, into=bad_into),
        "outside 0..N-1": lambda v: _merge(v, into=bad_into + 9),
        "merges into a padding slot": lambda v: _merge(v, into=bad_into + 4),
        "itself merged away": lambda v: _merge(v, merged=torch.ones(2, 5, dtype=torch.bool) & v.valid),
        "token_ids are not the slots": lambda v: _merge(v, token_ids=v.token_ids.flip(1)),
        "says block 7": lambda v: _merge(v, block=7),
        "fused tokens must be a tensor (B=2, F, D=8)": lambda v: _prune(v, fused=torch.zeros(2, 1, 4)),
        "NaN or infinite": lambda v: _prune(v, fused=torch.full((2, 1, 8), float("nan"))),
        "pruned must be a tensor of shape (2, 5)": lambda v: _prune(v, pruned=v.valid[:, :1]),
        "returned str": lambda v: "prune everything",
    }
    for words, decide in cases.items():
        step = GuardedStep(LambdaStep(decide), method)
        with pytest.raises(PluginError, match="method mine .file my_rule.py., block 3") as err:
            step(view)
        assert words in str(err.value) and "\n" not in str(err.value), (words, str(err.value))

    def writes(v):  # noqa: ANN001, ANN202
        v.x.mul_(float("nan"))  # on a copy: nothing it writes reaches the encoder
        return _prune(v)

    before = view.x.clone()
    GuardedStep(LambdaStep(writes), method)(view)
    assert torch.equal(view.x, before)
    good = _merge(view)
    passed = GuardedStep(LambdaStep(lambda v: good), method)(view)  # untouched, but for the counted cost
    assert torch.equal(passed.merged, good.merged) and torch.equal(passed.into, good.into)
    assert passed.matching_flops.tolist() == [0, 0]  # nothing a counter counts was done


class LambdaStep(torch.nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, view):  # noqa: ANN001, ANN201
        return self.fn(view)


def test_a_plugin_step_writing_into_the_tokens_cannot_change_the_run(tmp_path: Path) -> None:
    """A step shown the tokens writes NaN into them: the encoder never sees it, so the run is the one the
    same rule gives without the write (the probe's 'mIoU 4.27 and no word' cannot happen)."""
    outs = []
    for name, write in (("clean", ""), ("writes", "        view.x.mul_(float('nan'))\n")):
        folder = tmp_path / name
        folder.mkdir()
        rule = _method_file(folder)
        decided = "        pruned = view.valid & (rank < drop[:, None])\n"
        assert decided in rule.read_text()
        rule.write_text(rule.read_text().replace(decided, decided + write))  # after deciding: the write alone
        r = CliRunner().invoke(app, ["run", str(IMAGE), "--method", f"{rule}:frac=0.3", "--size", "96", "--device", "cpu",
                                     "--no-animation", "--no-figures", "--out", str(folder / "o")])
        assert r.exit_code == 0 and "Traceback" not in r.output, r.output
        outs.append(_traces(next((folder / "o").glob("run-*")))[0])
    assert np.array_equal(outs[0].label_map, outs[1].label_map)
    assert np.array_equal(outs[0].token_pruned_at, outs[1].token_pruned_at)


def test_a_failing_plugin_is_marked_failed_and_the_other_methods_are_kept(tmp_path: Path) -> None:
    """compare --methods and sweep --methods: the plug-in that fails is one error line and a failed row; the
    built-in methods beside it are measured and written, and the command exits 3 (something failed)."""
    rule = _method_file(tmp_path, "raise ZeroDivisionError('inside the rule')")
    runner = CliRunner()
    r = runner.invoke(app, ["compare", str(IMAGE), "--methods", f"tome:r=4,{rule}", "--size", "96", "--device", "cpu",
                            "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "c")])
    assert r.exit_code == 3 and "Traceback" not in r.output, r.output
    assert any(ln.startswith("error: method") and "failed and is left out" in ln and "ZeroDivisionError" in ln
               for ln in r.output.splitlines()), r.output
    folder = next((tmp_path / "c").glob("compare-*"))
    manifest = json.loads((folder / "run.json").read_text())
    assert manifest["methods"] == ["tome:r=4"] and list(manifest["failed_methods"]) == ["norm_prune"]
    table = pd.read_csv(folder / "methods.csv")
    assert set(table[table["image"] != "ALL"]["method"]) == {"baseline", "tome:r=4"}
    assert table[table["method"] == "norm_prune"]["status"].tolist() == ["failed"]  # its row says so
    assert [o["status"] for o in manifest["overall"]] == ["ok", "ok", "failed"]
    r = runner.invoke(app, ["sweep", "--methods", f"tome:r=4,{rule}", "--seeds", "100000:100002", "--scene-size", "96",
                            "--device", "cpu", "--out", str(tmp_path / "s")])
    assert r.exit_code == 3 and "Traceback" not in r.output, r.output
    folder = next((tmp_path / "s").glob("sweep-*"))
    manifest = json.loads((folder / "run.json").read_text())
    assert sorted(manifest["failed_points"]) == [f"norm_prune:frac={f}" for f in ("0.1", "0.2", "0.4")]  # its ladder
    assert set(pd.read_csv(folder / "sweep.csv")["point"]) == {"baseline", "tome:r=4"}


def test_a_run_whose_every_image_failed_is_not_complete(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    r = CliRunner().invoke(app, ["run", str(tmp_path / "bad.png"), "--size", "96", "--device", "cpu",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code == 3, r.output
    manifest = json.loads(next((tmp_path / "o").glob("run-*/run.json")).read_text())
    assert manifest["status"] == "failed"


def test_a_plugins_own_flops_are_counted_by_the_counter_in_every_command(tmp_path: Path) -> None:
    """A plug-in that scores with a matrix product and declares no scoring FLOPs: its trace (what run,
    sweep and tables read) counts what torch's counter counts for the whole forward (what compare
    measures), so one operating point has one GFLOPs whichever command reports it."""
    import tokenscope as ts
    from tokenscope.data.images import load_prepared
    from tokenscope.models.cost import measure_flops
    from tokenscope.trace.capture import images_to_tensor

    rule = _method_file(tmp_path, "similar = view.x.float() @ view.x.float().transpose(1, 2)")
    assert "scoring_flops" not in rule.read_text()
    model = ts.load_model("demo", method=f"{rule}:frac=0.3", device="cpu")
    trace = ts.trace(model, IMAGE, size=96)
    n, d = trace.block_tokens_in[1], 192  # the tokens the step saw, the demo's width
    assert trace.meta.flops["pruning"] == 2 * n * n * d
    x, _ = images_to_tensor([load_prepared(IMAGE, size=96)], torch.device("cpu"))
    with torch.no_grad():
        total, _, _ = measure_flops(lambda: model.module(x, setting=model.setting))
    # what still differs is the decoder: the encoder decodes the pruned tokens' saved features in one pass over
    # every slot (the counter sees all of them), the trace counts the pruned ones
    decoded_twice = 2 * d * trace.meta.num_classes * (trace.num_tokens - int((trace.token_pruned_at > 0).sum()))
    assert trace.meta.flops["total"] + decoded_twice == total


def test_bench_methods_times_the_points_side_by_side_and_marks_a_failing_plugin(tmp_path: Path) -> None:
    """bench --methods: one baseline, every operating point timed in the same interleaved rounds, a row each
    with its ratios in the JSON; the plug-in that fails is one error line, the command exits 3."""
    rule = _method_file(tmp_path, "raise ZeroDivisionError('inside the rule')")
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "--model", "vitt", "--random-init", "--size", "96", "--batch", "2",
                                 "--device", "cpu", "--repeats", "2", "--warmup", "0",
                                 "--methods", f"tome:r=4,dcts,{rule}", "--json", str(out)])
    assert r.exit_code == 3 and "Traceback" not in r.output, r.output
    assert any(ln.startswith("error: method norm_prune failed and is left out") and "ZeroDivisionError" in ln
               for ln in r.output.splitlines()), r.output
    s = json.loads(out.read_text())
    assert [p["name"] for p in s["points"]] == ["tome:r=4", "dcts"] and list(s["failed"]) == ["norm_prune"]
    assert s["timing"]["rounds"] == 2 and len(s["baseline"]["latencies_s"]) == 2
    for p in s["points"]:
        assert len(p["latencies_s"]) == 2
        assert p["speedup"] == pytest.approx(s["baseline"]["latency_ms"] / p["latency_ms"])
        assert p["flop_reduction"] == pytest.approx(s["baseline"]["gflops_per_image"] / p["gflops_per_image"])
        assert p["speedup_over_flop_reduction"] == pytest.approx(p["speedup"] / p["flop_reduction"])
        assert p["flop_reduction"] > 1.0
    by_name = {p["name"]: p for p in s["points"]}
    assert by_name["dcts"]["padding_pct"] > 0.0 and by_name["tome:r=4"]["padding_pct"] == 0.0
    r = CliRunner().invoke(app, ["bench", "--model", "vitt", "--random-init", "--size", "96", "--device", "cpu",
                                 "--methods", "tome", "--method", "tome"])
    assert r.exit_code == 2 and "leave out --method" in r.output and "Traceback" not in r.output, r.output
