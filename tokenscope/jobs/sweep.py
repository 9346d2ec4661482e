"""`tokenscope sweep`: accuracy against cost over merge thresholds, exit thresholds and input sizes.

Every operating point is evaluated on the same images (mIoU over the data set, GFLOPs from the
traces, throughput from the measured forward passes); the plain ViT on the same weights is the
reference. Results go to a fresh `sweep-*` folder: sweep.csv, sweep.json and Pareto plots.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tokenscope import __version__, dist
from tokenscope.analysis.evaluate import OperatingPoint, Progress, evaluate
from tokenscope.data.datasets import open_dataset
from tokenscope.data.images import check_size
from tokenscope.data.windows import resolve_windows
from tokenscope.errors import ConfigError
from tokenscope.jobs.runfolder import MANIFEST, new_run_dir, write_json_atomic, write_table
from tokenscope.jobs.setup import ModelOptions, load_model
from tokenscope.render.pareto import pareto_plot


def parse_floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text!r}: expected comma-separated numbers") from None
    if not vals:
        raise ConfigError(f"{what} is empty")
    return vals


@dataclass
class SweepResult:
    folder: Path | None
    """The sweep folder (None on ranks other than 0 under torchrun)."""
    table: pd.DataFrame
    default: dict[str, Any]


def sweep(opts: ModelOptions, merge: list[float], exit_: list[float], sizes: list[int | None], dataset: str = "synthetic",
          data_root: str | None = None, split: str = "val", seeds: str = "100000:100050", scene_size: int = 512,
          out: str | Path = "outputs", progress: Progress | None = None) -> SweepResult:
    loaded, device = load_model(opts, have_labels=True)
    model = loaded.model
    for size in sizes:
        check_size(size, model.patch_size, "--sizes")
    if dataset == "synthetic":
        check_size(scene_size, model.patch_size, "--scene-size")
    ds = open_dataset(dataset, data_root, split, seeds, scene_size)
    default_merge, default_exit = model.merge_thresholds, model.exit_threshold
    policy, exits = model.active_policy, model.exits_enabled
    points = [OperatingPoint("baseline", "none", False)]
    for m, e in itertools.product(merge, exit_):
        points.append(OperatingPoint(f"merge={m:g} exit={e:g}", policy, exits, (m,) * 4, e))
    default_name = "default"
    points.append(OperatingPoint(default_name, policy, exits, default_merge, default_exit))
    rows = []
    total = len(sizes) * len(ds)
    for si, size in enumerate(sizes):
        def prog(done: int, n: int, item: str, si: int = si) -> None:
            if progress:
                progress(si * len(ds) + done, total, f"size {size or 'native'}: {item}")
        cfg = loaded.config
        windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, None, None, size)
        res = evaluate(loaded, ds, points, device, prog, amp=opts.amp, size=size, windows=windows)
        for p in points:
            v = res.variants[p.name]
            rows.append({
                "size": size or scene_size, "point": p.name, "policy": p.policy, "exits": p.exits,
                "merge_threshold": None if p.merge_thresholds is None else p.merge_thresholds[0],
                "merge_thresholds": None if p.merge_thresholds is None else ",".join(f"{t:g}" for t in p.merge_thresholds),
                "exit_threshold": p.exit_threshold, "is_default": p.name == default_name, "is_baseline": p.name == "baseline",
                "miou": v.miou, "gflops_per_image": v.gflops_per_image, "images_per_s": v.images / max(v.forward_s, 1e-12),
                "token_reduction": v.reduction, "exited_early_pct": v.exited_pct, "images": v.images,
            })
    table = pd.DataFrame(rows)
    default = {"merge_thresholds": list(default_merge), "exit_threshold": default_exit, "policy": policy}
    if not dist.context(device.type).is_writer:  # under torchrun, rank 0 writes the sweep folder
        return SweepResult(None, table, default)
    folder = new_run_dir(out, "sweep")
    write_table(table, folder / "sweep.csv")
    for s_ in table["size"].unique():
        sub = table[table["size"] == s_]
        pareto_plot(sub, "gflops_per_image", "GFLOPs per image (2 per multiply-add)", folder / f"pareto_gflops_{s_}.png",
                    lower_is_better=True)
        pareto_plot(sub, "images_per_s", f"measured throughput (images/s, {device.type}, batch 1)",
                    folder / f"pareto_throughput_{s_}.png", lower_is_better=False)
    write_json_atomic(folder / MANIFEST, {
        "tool": "tokenscope", "version": __version__, "kind": "sweep", "status": "complete",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": loaded.config.name, "weights": loaded.weights_id,
        "device": str(device), "data": {"kind": dataset, "root": data_root, "split": split, "seeds": seeds},
        "merge": merge, "exit": exit_, "sizes": [s or scene_size for s in sizes], "default": default,
        "rows": rows,
    })
    return SweepResult(folder, table, default)
