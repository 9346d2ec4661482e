"""`tokenscope compare`: the same weights with and without token reduction, image by image.

For each image both variants are traced (tokens per block), counted (torch's FLOP counter over
the whole forward pass, policy included, 2 FLOPs per multiply-add), timed (median of repeats
after warm-up, hooks off) and measured for peak memory; their label maps are compared with
each other and, when labels are given, with the ground truth (mIoU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tokenscope import __version__
from tokenscope.analysis.memory import peak_forward_bytes
from tokenscope.storage import text_of
from tokenscope.trace.fates import fate_percentages
from tokenscope.analysis.metrics import confusion, mean_iou, pixel_agreement
from tokenscope.analysis.timing import median, time_calls
from tokenscope.analysis.timing_spread import paired_timing
from tokenscope.analysis.uncertainty import class_counts, miou_change_interval, miou_interval
from tokenscope.analysis.windowed import ImagePrediction, predict
from tokenscope.data.classspace import ClassSpace
from tokenscope.data.images import PreparedImage, check_size, find_images, find_label_for, load_prepared
from tokenscope.data.windows import WindowSpec, resolve_windows
from tokenscope.errors import ConfigError, StorageError, TokenscopeError
from tokenscope.models.methods.registry import PluginError
from tokenscope.jobs.run import ImageResult, Progress
from tokenscope.jobs.runfolder import MANIFEST, image_folder, new_run_dir, unique_name, write_json_atomic, write_rgb, write_table
from tokenscope.jobs.setup import ModelOptions, label_file_space, load_model
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.cost import measure_flops
from tokenscope.models.runtime import inference
from tokenscope.models.step_vit import ReductionSetting
from tokenscope.render.overlays import render_label_map, render_overlay
from tokenscope.render.plots import compare_figure
from tokenscope.trace.capture import TraceCapture, images_to_tensor

BASELINES = ("vit",)


@dataclass
class Variant:
    """One operating point of the loaded model."""

    name: str
    setting: ReductionSetting


@dataclass
class CompareResult:
    run_dir: Path
    rows: list[dict[str, Any]]
    overall: dict[str, Any]
    images: list[ImageResult]
    warnings: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    """With --methods: the operating points compared (rows are then one per image and method)."""
    method_overall: list[dict[str, Any]] = field(default_factory=list)
    """With --methods: one row per method over all images."""
    class_space: ClassSpace | None = None
    """How the labels met the model's classes (None without labels); its `tag` goes beside every mIoU."""


def measure_variants(loaded: LoadedModel, variants: list[Variant], image: PreparedImage, windows: WindowSpec | None,
                     device: torch.device, capture: TraceCapture, repeats: int, warmup: int,
                     failures: dict[str, str] | None = None) -> list[tuple[ImagePrediction, dict[str, Any]] | None]:
    """Predict one image with every variant, count each one's FLOPs and peak memory, then time their
    forward passes interleaved (repeat r of every variant before repeat r + 1 of any), so that a busy
    machine slows all of them alike and repeat r of two variants is a pair (`latency_runs_ms`).

    With sliding windows the windows of one size run as one batch; a repeat's latency adds up the batches.
    With `failures`, a variant whose plug-in fails is recorded there (name -> its one line) and given None,
    and the others are still measured; without it the failure is raised.
    """
    model = loaded.model
    counted: list[Any] = []
    for v in variants:
        try:
            pred = predict(capture.at(v.setting), image, windows)
        except PluginError as exc:
            if failures is None:
                raise
            failures[v.name] = str(exc)
            counted.append(None)
            continue
        groups: dict[tuple[int, int], list[PreparedImage]] = {}
        for inp in pred.inputs:
            groups.setdefault(inp.padded_hw, []).append(inp)
        batches = [images_to_tensor(group, device) for group in groups.values()]
        flops, peak = 0, 0
        with inference(device, capture.amp):
            for x, labels in batches:
                flops += measure_flops(lambda: model(x, labels, setting=v.setting))[0]
                peak = max(peak, peak_forward_bytes(lambda: model(x, labels, setting=v.setting), device))
        counted.append((pred, batches, flops, peak))
    runs: list[list[float]] = [[] for _ in variants]
    with inference(device, capture.amp):
        for r in range(warmup + repeats):
            for k, v in enumerate(variants):
                if counted[k] is None:
                    continue
                total = sum(sum(time_calls(lambda: model(x, labels, setting=v.setting), device, repeats=1, warmup=0))
                            for x, labels in counted[k][1])
                if r >= warmup:
                    runs[k].append(total)
    out: list[tuple[ImagePrediction, dict[str, Any]] | None] = []
    for done, seconds in zip(counted, runs):
        if done is None:
            out.append(None)
            continue
        pred, _, flops, peak = done
        fates = pred.fate_totals()
        out.append((pred, {"gflops": flops / 1e9, "latency_ms": 1e3 * median(seconds), "peak_mib": peak / 2**20,
                           "latency_runs_ms": [1e3 * t for t in seconds],
                           "tokens": pred.tokens, "mean_tokens_per_block": pred.mean_tokens_per_block,
                           **{kind: fates[f"tokens_{kind}"] for kind in ("merged", "pruned", "exited")},
                           **fate_percentages(fates, pred.tokens)}))
    return out


def prepare_input(path: Path, labels_path: Path | None, size: int | None, patch: int,
                  space: ClassSpace | None = None) -> PreparedImage:
    """One image of a comparison, with its label map (in the model's class ids, see `space`) when a
    labels file or folder was given."""
    lab = find_label_for(path, labels_path) if labels_path is not None else None
    return load_prepared(path, size=size, labels_path=lab, patch=patch,
                         convert_labels=None if space is None else space.labels)


def compare_images(paths: list[str], opts: ModelOptions, baseline: str = "vit", out: str | Path = "outputs",
                   size: int | None = None, labels: str | None = None, repeats: int = 5, warmup: int = 1,
                   progress: Progress | None = None, window: int | None = None,
                   stride: int | None = None, model: tuple[LoadedModel, torch.device] | None = None,
                   methods: list[str] | None = None, at_block: int | None = None) -> CompareResult:
    """Compare the configured STEP operating point (or, with `methods`, several) with the plain
    ViT on every image."""
    if methods:
        from tokenscope.jobs.compare_methods import compare_methods

        return compare_methods(paths, opts, methods, baseline=baseline, out=out, size=size, labels=labels,
                               repeats=repeats, warmup=warmup, progress=progress, window=window, stride=stride,
                               model=model, at_block=at_block)
    if baseline not in BASELINES:
        raise ConfigError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if repeats < 1 or warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    images = find_images(paths)
    if not images:
        raise TokenscopeError("no images found in " + ", ".join(map(str, paths)))
    labels_path = Path(labels) if labels is not None else None
    loaded, device = model if model is not None else load_model(opts, have_labels=labels_path is not None)
    space = label_file_space(loaded, opts, str(labels), images) if labels is not None else None
    cfg = loaded.config
    patch = loaded.model.patch_size
    check_size(size, patch)
    windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, window, stride, size, patch)
    step = Variant("step", loaded.setting)
    base = Variant("baseline", loaded.setting.plain())
    capture = TraceCapture(loaded, device, step.setting, amp=opts.amp)
    run_dir = new_run_dir(out, "compare")
    rows: list[dict[str, Any]] = []
    block_rows: list[pd.DataFrame] = []
    results: list[ImageResult] = []
    num_classes = loaded.config.num_classes
    conf_step = np.zeros((num_classes, num_classes), dtype=np.int64)
    conf_base = np.zeros_like(conf_step)
    counts_step: list[np.ndarray] = []  # per image, for the bootstrap intervals
    counts_base: list[np.ndarray] = []
    taken: set[str] = set()
    runs: dict[str, list[list[float]]] = {"base": [], "step": []}  # per image, per interleaved repeat (ms)
    for i, path in enumerate(images):
        if progress:
            progress(i, len(images), path.name)
        result = ImageResult(source=str(path))
        try:
            prepared = prepare_input(path, labels_path, size, patch, space)
            (p_step, m_step), (p_base, m_base) = measure_variants(loaded, [step, base], prepared, windows, device,
                                                                  capture, repeats, warmup)
            runs["base"].append(m_base.pop("latency_runs_ms"))
            runs["step"].append(m_step.pop("latency_runs_ms"))
            row: dict[str, Any] = {"image": text_of(path), "input_h": prepared.input_hw[0], "input_w": prepared.input_hw[1],
                                   "windows": len(p_step.traces), "patches": p_base.patches}
            for prefix, m in (("base", m_base), ("step", m_step)):
                row.update({f"{prefix}_{k}": v for k, v in m.items()})
            row["token_reduction"] = p_base.tokens / p_step.tokens
            row["flop_reduction"] = m_base["gflops"] / m_step["gflops"]
            row["speedup"] = m_base["latency_ms"] / m_step["latency_ms"]
            row["agreement"] = pixel_agreement(p_step.label_map, p_base.label_map)
            if p_step.labels is not None:
                gt = p_step.labels
                cs, cb = confusion(p_step.label_map, gt, num_classes), confusion(p_base.label_map, gt, num_classes)
                conf_step += cs
                conf_base += cb
                counts_step.append(class_counts(cs))
                counts_base.append(class_counts(cb))
                row["step_miou"], row["base_miou"] = mean_iou(cs), mean_iou(cb)
            name = unique_name(path.stem, taken)
            t_step, t_base = p_step.traces[0], p_base.traces[0]
            with image_folder(run_dir, name) as folder:
                for variant_dir, pred in (("step", p_step), ("baseline", p_base)):
                    for k, trace in enumerate(pred.traces):
                        trace.save(folder / variant_dir / (f"w{k:02d}" if pred.plan is not None else ""))
                write_rgb(folder / "image.png", prepared.display)
                shown = p_step.inputs[0].display
                where = "" if p_step.plan is None else f" (window 1 of {len(p_step.traces)})"
                panels = [("baseline segmentation", render_label_map(prepared.display, p_base.label_map, cfg.class_colours,
                                                                     cfg.class_names, num_classes)),
                          ("STEP segmentation", render_label_map(prepared.display, p_step.label_map, cfg.class_colours,
                                                                 cfg.class_names, num_classes)),
                          ("STEP supertokens" + where, render_overlay("merge", shown, t_step)),
                          ("STEP exits" + where, render_overlay("exit", shown, t_step))]
                compare_figure(prepared.display, panels, t_step, t_base, folder / "compare.png",
                               f"{path.name}: {row['token_reduction']:.2f}x fewer tokens, {row['flop_reduction']:.2f}x "
                               f"fewer FLOPs, {row['speedup']:.2f}x faster, {100 * row['agreement']:.1f}% pixels agree",
                               where)
            block_rows.append(pd.DataFrame({"image": name, "block": np.arange(1, t_step.meta.depth + 1),
                                            "base_tokens_in": sum(t.block_tokens_in for t in p_base.traces),
                                            "step_tokens_in": sum(t.block_tokens_in for t in p_step.traces)}))
            row["folder"] = name
            rows.append(row)
            result.folder = name
        except StorageError:
            raise  # the disk refused: stop (the folder is taken away)
        except TokenscopeError as exc:
            result.error = str(exc)
        results.append(result)
    if progress:
        progress(len(images), len(images), "")
    overall = _overall(rows, conf_step, conf_base, labels_path is not None)
    timing, timing_warnings = paired_timing(runs["base"], runs["step"], step.setting.method or "the reduced model")
    if overall:
        overall.update(timing)
    if counts_step:
        overall["step_miou_ci"] = miou_interval(counts_step).as_dict()
        overall["base_miou_ci"] = miou_interval(counts_base).as_dict()
        overall["miou_change_ci"] = miou_change_interval(counts_step, counts_base).as_dict()
    if rows:
        df = pd.DataFrame(rows)
        write_table(pd.concat([df, pd.DataFrame([{"image": "ALL", **overall}])], ignore_index=True), run_dir / "compare.csv")
        write_table(pd.concat(block_rows, ignore_index=True), run_dir / "tokens_per_block.csv")
    warnings = [*loaded.warnings, *(space.warnings() if space is not None else []), *timing_warnings]
    write_json_atomic(run_dir / MANIFEST, {
        "tool": "tokenscope", "version": __version__, "kind": "compare", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": loaded.config.name, "weights": loaded.weights_id, "device": str(device), "baseline": baseline,
        "step": {"policy": step.setting.policy, "exits": step.setting.exits, "method": step.setting.method,
                 "merge_thresholds": list(step.setting.merge_thresholds),
                 "exit_threshold": step.setting.exit_threshold, "operating_point": step.setting.describe()},
        "flop_convention": "2 FLOPs per multiply-add (torch.utils.flop_counter), policy network included",
        "latency": f"median of {repeats} runs after {warmup} warm-up, hooks off, variants interleaved repeat by repeat",
        "overall": overall, "warnings": warnings,
        "class_space": None if space is None else space.record(),
        "windows": None if windows is None else {"window": windows.window, "stride": windows.stride,
                                                  "resize_short": windows.resize_short},
        "images": [{"source": r.source, "folder": r.folder, "error": r.error} for r in results],
    })
    return CompareResult(run_dir, rows, overall, results, warnings, class_space=space)


def _overall(rows: list[dict[str, Any]], conf_step: np.ndarray, conf_base: np.ndarray, have_labels: bool) -> dict[str, Any]:
    if not rows:
        return {}
    df = pd.DataFrame(rows)
    sums = {k: float(df[k].sum()) for k in ("base_gflops", "step_gflops", "base_latency_ms", "step_latency_ms")}
    overall: dict[str, Any] = {
        "patches": int(df["patches"].sum()), "base_tokens": int(df["base_tokens"].sum()),
        "step_tokens": int(df["step_tokens"].sum()), **sums,
        "base_peak_mib": float(df["base_peak_mib"].max()), "step_peak_mib": float(df["step_peak_mib"].max()),
        "token_reduction": float(df["base_tokens"].sum() / df["step_tokens"].sum()),
        "flop_reduction": sums["base_gflops"] / sums["step_gflops"],
        "speedup": sums["base_latency_ms"] / sums["step_latency_ms"],
        "agreement": float(np.average(df["agreement"], weights=df["input_h"] * df["input_w"])),
    }
    if have_labels:
        overall["step_miou"], overall["base_miou"] = mean_iou(conf_step), mean_iou(conf_base)
    return overall
