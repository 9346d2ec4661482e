"""`tokenscope sweep`: accuracy against cost over merge thresholds, exit thresholds and input sizes.

Every operating point is evaluated on the same images (mIoU over the data set, GFLOPs from the
traces, throughput from the measured forward passes); the plain ViT on the same weights is the
reference. Results go to a fresh `sweep-*` folder: sweep.csv, sweep.json and Pareto plots.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tokenscope import __version__, dist
from tokenscope.analysis.evaluate import OperatingPoint, Progress, evaluate
from tokenscope.analysis.uncertainty import LEVEL, RESAMPLES, SEED
from tokenscope.data.datasets import open_dataset
from tokenscope.data.images import check_size
from tokenscope.data.windows import resolve_windows
from tokenscope.errors import ConfigError
from tokenscope.jobs.runfolder import MANIFEST, new_run_dir, write_json_atomic, write_table
from tokenscope.jobs.setup import ModelOptions, load_model, method_setting
from tokenscope.models.methods.merging import merge_rules
from tokenscope.models.methods.point import resolve, resolve_list
from tokenscope.render.figures import DEFAULT_STYLE, FigureStyle
from tokenscope.analysis.timing_spread import speedup_interval, throughput_interval
from tokenscope.render.pareto import methods_pareto_plot, pareto_plot, size_scaling_plot

def expand_methods(text: str) -> list[str]:
    """`step,tome:r=16` -> step's three ladder points and the one ToMe point, in order. A method
    named without settings runs its own ladder (declared with the method); a combination such as
    dtop+tome, or a method with settings, is one point as written."""
    out: list[str] = []
    for point in resolve_list(text):
        single = len(point.parts) == 1 and not point.point.settings
        ladder = point.spelled(point.first.ladder) if single else []
        out.extend(ladder or [point.text])
    return out


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
    failed: dict[str, str] = field(default_factory=dict)
    """Points whose plug-in failed (name -> its one line): no row, said in run.json and by the CLI."""


def sweep(opts: ModelOptions, merge: list[float], exit_: list[float], sizes: list[int | None], dataset: str = "synthetic",
          data_root: str | None = None, split: str = "val", seeds: str = "100000:100050", scene_size: int = 512,
          out: str | Path = "outputs", progress: Progress | None = None, methods: str | None = None,
          window: int | None = None, stride: int | None = None, style: FigureStyle = DEFAULT_STYLE) -> SweepResult:
    """Threshold grid of the model's own method, or with `methods` every method's operating points
    (three each by default: each method's ladder), on the same images, against the plain ViT.

    Every mIoU comes with its 95% bootstrap interval over the images, and every reduced point
    with its mIoU change against the plain ViT on the same images (paired interval). A model
    whose exits are off (never trained, or `--exits none`) sweeps merge thresholds alone."""
    loaded, device = load_model(opts, have_labels=True)
    model = loaded.model
    for size in sizes:
        check_size(size, model.patch_size, "--sizes")
    if dataset == "synthetic":
        check_size(scene_size, model.patch_size, "--scene-size")
    ds = open_dataset(dataset, data_root, split, seeds, scene_size)
    own = loaded.setting
    default_merge, default_exit = own.merge_thresholds, own.exit_threshold
    policy, exits = own.policy, own.exits
    points = [OperatingPoint("baseline", "none", False)]
    default_name = "default"
    if methods:
        for text in expand_methods(methods):
            s = method_setting(loaded, opts, text, have_labels=True)
            points.append(OperatingPoint(resolve(text).label, s.policy, s.exits, s.merge_thresholds, s.exit_threshold,
                                         setting=s))
    else:
        for m, e in itertools.product(merge, exit_ if exits else [None]):
            name = f"merge={m:g}" + ("" if e is None else f" exit={e:g}")
            points.append(OperatingPoint(name, policy, exits, (m,) * 4, e))
        points.append(OperatingPoint(default_name, policy, exits, default_merge, default_exit))
    rows = []
    native = scene_size if dataset == "synthetic" else 0
    """A row's size: the long side it was resized to; 0 = each image at its own size (a file data set)."""
    total = len(sizes) * len(ds)
    failed: dict[str, str] = {}
    for si, size in enumerate(sizes):
        def prog(done: int, n: int, item: str, si: int = si) -> None:
            if progress:
                progress(si * len(ds) + done, total, f"size {size or 'native'}: {item}")
        cfg = loaded.config
        windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, window, stride, size, model.patch_size)
        res = evaluate(loaded, ds, points, device, prog, amp=opts.amp, size=size, windows=windows, data_label=dataset,
                       class_map=opts.class_map, ignore_class_mismatch=opts.ignore_class_mismatch)
        space = res.class_space  # checked by evaluate before its first image
        assert space is not None
        base = res.variants["baseline"]
        base_s = [ms / 1e3 for _, ms, _, _ in base.per_image]
        failed.update(res.failed)
        for p in points:
            if p.name in failed:
                continue
            v = res.variants[p.name]
            ci, change = v.miou_interval(), v.miou_change(base)
            point_s = [ms / 1e3 for _, ms, _, _ in v.per_image]
            ips_low, ips_high = throughput_interval(point_s)
            paired = speedup_interval(base_s, point_s) if len(point_s) == len(base_s) else {"low": None, "high": None}
            rows.append({
                "size": size or native, "point": p.name,
                "method": "vit" if p.name == "baseline" else p.name.split(":")[0] if methods else (own.method or "step"),
                "merge_rules": merge_rules(p.setting.record.get("merging") if p.setting is not None else None),
                "policy": p.policy, "exits": p.exits,
                "merge_threshold": None if p.merge_thresholds is None else p.merge_thresholds[0],
                "merge_thresholds": None if p.merge_thresholds is None else ",".join(f"{t:g}" for t in p.merge_thresholds),
                "exit_threshold": p.exit_threshold, "is_default": p.name == default_name, "is_baseline": p.name == "baseline",
                "miou": v.miou, "miou_low": ci.low, "miou_high": ci.high, "miou_change": change.value,
                "miou_change_low": change.low, "miou_change_high": change.high, "class_condition": space.tag,
                "gflops_per_image": v.gflops_per_image, "images_per_s": v.images / max(v.forward_s, 1e-12),
                "images_per_s_low": ips_low, "images_per_s_high": ips_high,
                "scored_against": "unreduced model" if getattr(ds, "unlabelled", False) else "ground truth",
                "speedup_median": paired.get("value", float("nan")),
                "speedup_low": float("nan") if paired["low"] is None else paired["low"],
                "speedup_high": float("nan") if paired["high"] is None else paired["high"],
                "token_reduction": v.reduction, "exited_early_pct": v.exited_pct, "exited_pct": v.exited_pct,
                "pruned_pct": v.pruned_pct, "merged_pct": v.merged_pct, "images": v.images,
                "mean_tokens_per_block": v.mean_tokens_per_block, "block_token_reduction": v.block_token_reduction,
            })
    table = pd.DataFrame(rows)
    default = {"merge_thresholds": list(default_merge), "exit_threshold": default_exit, "policy": policy}
    if not dist.context(device.type).is_writer:  # under torchrun, rank 0 writes the sweep folder
        return SweepResult(None, table, default, failed)
    folder = new_run_dir(out, "sweep")
    write_table(table, folder / "sweep.csv")
    plot = methods_pareto_plot if methods else pareto_plot
    for s_ in table["size"].unique():
        sub = table[table["size"] == s_]
        name = s_ or "native"
        plot(sub, "gflops_per_image", "GFLOPs per image (2 per multiply-add)", folder / f"pareto_gflops_{name}.png",
             lower_is_better=True, style=style)
        plot(sub, "images_per_s", f"measured throughput (images/s, {device.type}, batch 1)",
             folder / f"pareto_throughput_{name}.png", lower_is_better=False, style=style)
    if table["size"].nunique() > 1:  # how the reduction grows with resolution, each size against its own baseline
        size_scaling_plot(table, folder / "scaling.png", style=style)
    write_json_atomic(folder / MANIFEST, {
        "tool": "tokenscope", "version": __version__, "kind": "sweep", "status": "complete",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": loaded.config.name, "weights": loaded.weights_id,
        "device": str(device), "data": {"kind": dataset, "root": data_root, "split": split, "seeds": seeds},
        "merge": merge, "exit": exit_, "sizes": [s or native for s in sizes], "default": default,
        "methods": None if not methods else expand_methods(methods),
        "method_sources": None if not methods else {p.label: p.provenance() for p in resolve_list(methods)},
        "class_space": space.record(), "window": window, "stride": stride, "figures": asdict(style),
        "intervals": {"kind": "percentile bootstrap over images; changes paired against the baseline",
                      "level": LEVEL, "resamples": RESAMPLES, "seed": SEED},
        "rows": rows, "failed_points": failed,
    })
    return SweepResult(folder, table, default, failed)
