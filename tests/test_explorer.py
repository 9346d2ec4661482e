"""The explorer (`tokenscope view`): its data against the traces, and the page in a real Chromium.

Browser tests drive Debian's Chromium through Playwright (pointed at /usr/bin/chromium; Playwright's
own browser download is never used). Without Chromium or Playwright they skip with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
from test_cli import invoke

from tokenscope.jobs.view import serve, write_view
from tokenscope.render.explorer import explorer_html, run_index
from tokenscope.trace.trace import Trace

SAMPLE = Path(__file__).resolve().parents[1] / "sample_images"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None  # type: ignore[assignment]
needs_browser = pytest.mark.skipif(CHROMIUM is None or sync_playwright is None,
                                   reason="needs Debian's chromium and the playwright package (.ci/run installs both)")
SHOTS = Path(os.environ["TOKENSCOPE_SCREENSHOTS"]) if os.environ.get("TOKENSCOPE_SCREENSHOTS") else None
"""Where the browser tests leave screenshots of the three views (README's come from here)."""
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def _made(out: Path, command: str, *args: object) -> Path:
    """The one folder `tokenscope COMMAND ARGS --out OUT` makes (run-* or compare-*)."""
    r = invoke(command, *args, "--out", out)
    assert r.exit_code == 0, r.output
    (folder,) = out.glob(f"{command}-*")
    return folder


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo (STEP: supertokens and exits) on the sample street scene at 256 px, with labels."""
    return _made(tmp_path_factory.mktemp("runs"), "run", SAMPLE / "street_5000001.png", "--labels", SAMPLE / "labels",
                 "--size", "256", "--device", "cpu", "--no-animation")


@pytest.fixture(scope="module")
def methods_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _made(tmp_path_factory.mktemp("compare"), "compare", SAMPLE / "street_5000001.png", "--size", "256",
                 "--device", "cpu", "--methods", "step,tome:r=8,algm", "--repeats", "1", "--warmup", "0")


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _made(tmp_path_factory.mktemp("dataset"), "run", "--dataset", "synthetic", "--seeds", "100:106",
                 "--scene-size", "256", "--device", "cpu", "--no-animation", "--no-figures")


def _shot(page: object, name: str) -> None:
    if SHOTS is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / name), full_page=True)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None or sync_playwright is None:
        pytest.skip("needs Debian's chromium and the playwright package")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _open(browser: object, url: str) -> tuple[object, list[str]]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    page.errors = errors  # type: ignore[attr-defined]
    return page, requests


def _open_image(page: object, name: str) -> None:
    page.click(f"#images-table tbody tr[data-image='{name}']")  # type: ignore[attr-defined]
    page.wait_for_selector(".panel[data-tokens]")  # type: ignore[attr-defined]


def _centre(box: dict, trace: Trace, row: int, col: int) -> tuple[float, float]:
    gh, gw = trace.meta.grid
    return box["x"] + (col + 0.5) * box["width"] / gw, box["y"] + (row + 0.5) * box["height"] / gh


def _image_folder(run: Path) -> Path:
    (folder,) = [p for p in run.iterdir() if p.is_dir() and (p / "trace.json").exists()]
    return folder


# ---- without a browser ---------------------------------------------------------------------------

def test_the_page_is_one_file_with_no_external_resource_and_data_equal_to_the_trace(demo_run: Path) -> None:
    text = explorer_html(demo_run)
    for needle in ("<script src", "<link", "http://", "https://", "@import", "url("):
        assert needle not in text, needle
    raw = text.split('<script id="ts-data" type="application/json">', 1)[1].split("</script>", 1)[0]
    data = json.loads(raw)
    folder = _image_folder(demo_run)
    trace = Trace.load(folder)
    panel = data["images"][folder.name]["panels"][0]
    assert panel["top"] == trace.token_of_patch.ravel().tolist()
    assert panel["exit"] == trace.token_exit_block.tolist() and panel["blocks_in"] == trace.block_tokens_in.tolist()
    assert panel["truth"] == trace.patch_labels.ravel().tolist()
    assert data["index"]["rows"][0]["image"] == folder.name


def test_view_writes_a_fresh_page_and_refuses_a_folder_that_is_not_a_run(demo_run: Path, tmp_path: Path) -> None:
    r = invoke("view", demo_run)
    assert r.exit_code == 0, r.output
    first = demo_run / "explorer.html"
    assert first.is_file()
    r = invoke("view", demo_run)
    assert r.exit_code == 0 and (demo_run / "explorer-2.html").is_file()  # the first page is kept
    r = invoke("view", tmp_path)
    assert r.exit_code != 0 and "run.json" in r.output and "Traceback" not in r.output


def test_the_notebook_view_of_a_trace_is_the_same_page(demo_run: Path) -> None:
    import tokenscope as ts

    tr = ts.load_trace(_image_folder(demo_run))
    v = ts.view(tr)
    assert "<iframe srcdoc=" in v._repr_html_() and '"kind":"run"' in v.html and "explorer.js" not in v.html


# ---- in Chromium ---------------------------------------------------------------------------------

@needs_browser
def test_scrubbing_to_every_block_draws_the_tokens_blocks_csv_says_enter_it(demo_run: Path, browser: object) -> None:
    page = write_view(demo_run).page
    p, requests = _open(browser, page.as_uri())
    folder = _image_folder(demo_run)
    _open_image(p, folder.name)
    blocks = pd.read_csv(folder / "blocks.csv")
    trace = Trace.load(folder)
    assert trace.exited_early.any()  # the scrubber really has something to show
    counts = []
    for k in range(1, trace.meta.depth + 1):
        counts.append(int(p.locator(".panel").first.get_attribute("data-tokens")))
        assert p.locator(".panel").first.get_attribute("data-block") == str(k)
        p.keyboard.press("ArrowRight")
    assert counts == blocks["tokens_in"].tolist()
    end = int(p.locator(".panel").first.get_attribute("data-tokens"))
    assert end == int((trace.token_exit_block == trace.meta.depth).sum())
    p.keyboard.press("ArrowLeft")
    assert p.locator(".panel").first.get_attribute("data-block") == str(trace.meta.depth)
    assert not p.errors and all(u.startswith(("file:", "data:")) for u in requests), requests


@needs_browser
def test_hovering_a_patch_shows_the_record_tokens_csv_gives_its_token(demo_run: Path, browser: object) -> None:
    page = write_view(demo_run).page
    p, _ = _open(browser, page.as_uri())
    folder = _image_folder(demo_run)
    _open_image(p, folder.name)
    trace = Trace.load(folder)
    tokens = pd.read_csv(folder / "tokens.csv").set_index("token")
    box = p.locator(".panel canvas").first.bounding_box()
    rng = np.random.default_rng(0)
    gh, gw = trace.meta.grid
    for r, c in zip(rng.integers(0, gh, 12), rng.integers(0, gw, 12)):
        p.mouse.move(*_centre(box, trace, int(r), int(c)))
        tip = p.locator(".panel .tooltip").first
        t = int(trace.token_of_patch[r, c])
        assert int(tip.get_attribute("data-token")) == t
        assert int(tip.get_attribute("data-level")) == int(tokens.loc[t, "level"])
        assert int(tip.get_attribute("data-exit")) == int(tokens.loc[t, "exit_block"])
        assert tip.get_attribute("data-cls") == tokens.loc[t, "class_name"]
    p.mouse.click(*_centre(box, trace, 0, 0))
    row = p.locator("#selected-row td").all_inner_texts()
    assert row[0] == str(int(trace.token_of_patch[0, 0]))
    p.keyboard.press("ArrowRight")
    p.keyboard.press("ArrowRight")
    p.keyboard.press("ArrowRight")
    p.keyboard.press("ArrowRight")
    p.locator("input[data-layer='prediction']").check()
    p.mouse.move(*_centre(box, trace, 10, 4))
    _shot(p, "image_view.png")


@needs_browser
def test_the_method_view_highlights_the_hovered_patch_in_every_panel(methods_run: Path, browser: object) -> None:
    page = write_view(methods_run).page
    p, requests = _open(browser, page.as_uri())
    name = run_index(methods_run).index["images"][0]
    _open_image(p, name)
    panels = p.locator(".panel")
    assert panels.count() == 4  # baseline, step, tome, algm
    traces = [Trace.load(methods_run / name / sub) for sub in ("baseline", "step", "tome_r8", "algm")]
    p.keyboard.press("ArrowRight")  # block 2: ToMe and ALGM have merged in block 1
    box = p.locator(".panel canvas").nth(2).bounding_box()
    for r, c in ((3, 5), (10, 2), (14, 14)):
        p.mouse.move(*_centre(box, traces[2], r, c))
        patch = r * traces[2].meta.grid[1] + c
        assert [panels.nth(i).get_attribute("data-hover-patch") for i in range(4)] == [str(patch)] * 4
        for i, tr in enumerate(traces):  # each panel's tooltip speaks for its own token
            assert int(panels.nth(i).locator(".tooltip").get_attribute("data-token")) == int(tr.cover_at(2)[r, c])
    counts = [int(panels.nth(i).get_attribute("data-tokens")) for i in range(4)]
    assert counts == [int(tr.block_tokens_in[1]) for tr in traces]
    _shot(p, "method_view.png")
    assert not p.errors and all(u.startswith(("file:", "data:")) for u in requests), requests


@needs_browser
def test_a_damaged_trace_shows_its_message_and_a_version_1_trace_loads(demo_run: Path, tmp_path: Path,
                                                                         browser: object) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_run, broken, ignore=shutil.ignore_patterns("explorer*"))
    folder = _image_folder(broken)
    (folder / "trace.npz").write_bytes((folder / "trace.npz").read_bytes()[:200])
    p, _ = _open(browser, write_view(broken).page.as_uri())
    p.click(f"#images-table tbody tr[data-image='{folder.name}']")
    p.wait_for_selector(".panel .error")
    assert "cannot be read" in p.locator(".panel .error").inner_text()
    assert p.locator("#image-error").is_visible()
    old = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "data" / "run_v1", old)
    p, _ = _open(browser, write_view(old).page.as_uri())
    _open_image(p, "street_5000001")
    assert int(p.locator(".panel").first.get_attribute("data-tokens")) == int(Trace.load(old / "street_5000001").block_tokens_in[0])


@needs_browser
def test_served_explorer_loads_an_image_only_when_it_is_opened(demo_run: Path, tmp_path: Path, browser: object) -> None:
    run = tmp_path / "served"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("explorer*"))
    result = write_view(run, served=True)
    server, thread = serve(run)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{result.page.name}"
        p, requests = _open(browser, url)
        assert not any("/images/" in u for u in requests)  # the index only
        folder = _image_folder(run)
        _open_image(p, folder.name)
        assert any(u.endswith(f"/images/{folder.name}.json") for u in requests)
        assert all(u.startswith("http://127.0.0.1") or u.startswith("data:") for u in requests), requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@needs_browser
def test_the_data_set_view_sorts_filters_and_opens_an_image(dataset_run: Path, browser: object) -> None:
    p, _ = _open(browser, write_view(dataset_run).page.as_uri())
    images = pd.read_csv(dataset_run / "tables" / "images.csv")
    rows = p.locator("#images-table tbody tr")
    assert rows.count() == len(images) == 6
    p.click("#images-table th[data-key='tokens']")
    shown = [r.get_attribute("data-image") for r in rows.all()]
    assert shown == images.sort_values("tokens", kind="stable")["image"].tolist()
    p.click("#images-table th[data-key='tokens']")  # again: descending
    assert rows.first.get_attribute("data-image") == images.sort_values("tokens")["image"].iloc[-1]
    assert p.locator("#classes-table tbody tr").count() > 0
    _shot(p, "dataset_view.png")
    p.fill("#filter", images["image"].iloc[2])
    assert rows.count() == 1
    rows.first.click()
    p.wait_for_selector(".panel[data-tokens]")
    assert p.locator("#image-name").inner_text() == images["image"].iloc[2]


def test_images_a_run_could_not_process_are_named_in_the_index(tmp_path: Path) -> None:
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    shutil.copy(SAMPLE / "street_5000001.png", tmp_path / "in" / "good.png")
    r = invoke("run", tmp_path / "in", "--size", "128", "--device", "cpu", "--no-animation", "--no-figures",
               "--out", tmp_path / "out")
    assert r.exit_code == 3, r.output  # one image failed, the other was traced
    (run,) = (tmp_path / "out").glob("run-*")
    index = run_index(run).index
    assert index["images"] == ["good"]
    assert len(index["missing"]) == 1 and index["missing"][0].startswith("broken.png (")


@needs_browser
def test_sliding_windows_are_drawn_at_their_place_over_the_whole_image(tmp_path: Path, browser: object) -> None:
    from segmenter_reference import segmenter_state, write_segmenter_release
    from test_windows import _folder_dataset

    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("mask", seed=8), "mask", window=64, stride=48)
    _folder_dataset(tmp_path / "data", n=1)
    r = invoke("run", tmp_path / "data" / "images", "--weights", ckpt, "--policy", "uniform", "--exits", "none",
               "--device", "cpu", "--no-animation", "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "out").glob("run-*"))
    p, _ = _open(browser, write_view(run).page.as_uri())
    p.click("#images-table tbody tr")
    p.wait_for_selector(".panel[data-tokens]")
    plan = json.loads((run / "im0" / "windows.json").read_text())
    panels = p.locator(".panel")
    assert panels.count() == len(plan["boxes"]) == 2
    for k, (top, left, h, w) in enumerate(plan["boxes"]):
        trace = Trace.load(run / "im0" / f"w{k:02d}")
        assert int(panels.nth(k).get_attribute("data-tokens")) == int(trace.block_tokens_in[0])
        box = p.locator(".panel canvas").nth(k).bounding_box()
        sx, sy = box["width"] / plan["resized_hw"][1], box["height"] / plan["resized_hw"][0]
        for r_, c_ in ((0, 0), (1, 2), (3, 3)):  # the centre of a window patch, in whole-image pixels
            y = top + (r_ + 0.5) * trace.patch_size
            x = left + (c_ + 0.5) * trace.patch_size
            p.mouse.move(box["x"] + x * sx, box["y"] + y * sy)
            tip = panels.nth(k).locator(".tooltip")
            assert int(tip.get_attribute("data-token")) == int(trace.token_of_patch[r_, c_]), (k, r_, c_)
