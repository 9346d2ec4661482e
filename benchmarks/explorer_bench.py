"""The explorer's speed in a real browser (Debian's Chromium through Playwright), and its size.

    .venv/bin/python benchmarks/explorer_bench.py [--out benchmarks/results/explorer_cpu.json]

Measures, printing a table and writing every number to the JSON file:
- page open (navigation to the data-set view ready, then to the image view drawn) and one scrubber
  step (mean over every block of the redraw that `setBlock` does, until a pixel can be read back),
  for the shipped demo at 512 px with the plain grid (1,024 tokens) and for ViT-B/16 at 1024 px
  (4,096 patches, random weights, ToMe merging in every block so each step recomputes the cover);
- `explorer.html` size for runs of 1, 20 and 200 images (demo, synthetic scenes at 512 px);
- `view --serve` first paint (index only) and first image for a 2,000-image run (the 200 image
  folders linked ten times each: the page's work depends on the count, not on the content).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from playwright.sync_api import sync_playwright

from tokenscope.jobs.view import serve, write_view

ROOT = Path(__file__).resolve().parents[1]
TS = [sys.executable, "-m", "tokenscope"]
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


def _run(args: list[str], out: Path) -> Path:
    subprocess.run([*TS, *args, "--device", "cpu", "--no-animation", "--out", str(out)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return next(out.glob("run-*"))


def _subset(run: Path, names: list[str], dest: Path) -> Path:
    """A run folder holding only `names` (image folders linked, tables filtered)."""
    dest.mkdir(parents=True)
    manifest = json.loads((run / "run.json").read_text())
    manifest["images"] = [{"folder": n} for n in names]
    (dest / "run.json").write_text(json.dumps(manifest))
    for n in names:
        (dest / n).symlink_to((run / n.split("~")[0]).resolve())
    (dest / "tables").mkdir()
    images = pd.read_csv(run / "tables" / "images.csv").set_index("image")
    rows = images.loc[[n.split("~")[0] for n in names]].reset_index()
    rows["image"] = names
    rows.to_csv(dest / "tables" / "images.csv", index=False)
    shutil.copy(run / "tables" / "classes.csv", dest / "tables" / "classes.csv")
    return dest


def _page_timings(browser, url: str, image: str) -> dict[str, float]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    t1 = time.perf_counter()
    page.evaluate(f"() => window.tokenscopeExplorer.openImage({json.dumps(image)})")
    page.wait_for_selector(".panel[data-tokens]")
    t2 = time.perf_counter()
    step_ms = page.evaluate("""() => {
        const ex = window.tokenscopeExplorer, depth = Number(document.getElementById('scrubber').max) - 1;
        const canvas = document.querySelector('.panel canvas');
        ex.setBlock(1); canvas.getContext('2d').getImageData(0, 0, 1, 1);
        const t = performance.now();
        for (let k = 2; k <= depth + 1; k++) {  // reading a pixel back waits for the drawing to finish
          ex.setBlock(k); canvas.getContext('2d').getImageData(0, 0, 1, 1);
        }
        return (performance.now() - t) / depth; }""")
    page.close()
    return {"open_dataset_ms": 1e3 * (t1 - t0), "open_image_ms": 1e3 * (t2 - t1), "scrub_step_ms": float(step_ms)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/explorer_cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="explorer-bench-"))
    results: dict[str, object] = {"machine": f"{os.cpu_count()} CPU cores, Chromium headless", "rows": []}
    try:
        demo = _run(["run", str(ROOT / "sample_images" / "street_5000001.png"), "--method", "vit"], work / "demo")
        vitb = _run(["run", str(ROOT / "sample_images" / "street_5000001.png"), "--model", "vitb", "--random-init",
                     "--method", "tome", "--size", "1024"], work / "vitb")
        many = _run(["run", "--dataset", "synthetic", "--seeds", "0:200", "--no-figures"], work / "many")
        names = json.loads((many / "run.json").read_text())
        folders = [e["folder"] for e in names["images"]]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            for label, run in (("demo 512 px, 1,024 tokens", demo), ("ViT-B/16 1024 px, 4,096 patches, ToMe", vitb)):
                page = write_view(run).page
                t = _page_timings(browser, page.as_uri(), "street_5000001")
                results["rows"].append({"case": label, **t, "html_bytes": page.stat().st_size})
            for n in (1, 20, 200):
                sub = _subset(many, folders[:n], work / f"sub{n}")
                page = write_view(sub).page
                t = _page_timings(browser, page.as_uri(), folders[0])
                results["rows"].append({"case": f"{n} images (demo, 512 px)", **t, "html_bytes": page.stat().st_size})
            big = _subset(many, [f"{f}~{k}" for k in range(10) for f in folders], work / "big")
            t0 = time.perf_counter()
            page = write_view(big, served=True).page
            written = time.perf_counter() - t0
            server, thread = serve(big)
            try:
                url = f"http://127.0.0.1:{server.server_address[1]}/{page.name}"
                t = _page_timings(browser, url, f"{folders[0]}~0")
            finally:
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)
            index = (big / "explorer_data" / "index.json").stat().st_size
            results["rows"].append({"case": "2,000 images, view --serve", **t, "html_bytes": index,
                                    "write_s": written})
            browser.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| case | data set view ready (ms) | image drawn (ms) | scrubber step (ms) | size |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:  # type: ignore[union-attr]
        size = f"{r['html_bytes'] / 2**20:.2f} MiB" + (" (index.json)" if "serve" in r["case"] else "")
        print(f"| {r['case']} | {r['open_dataset_ms']:.0f} | {r['open_image_ms']:.0f} | {r['scrub_step_ms']:.1f} | {size} |")


if __name__ == "__main__":
    main()
