"""`tokenscope compare --methods step,tome,cts,dtop`: token-reduction methods side by side.

Every method runs on the same weights and the same images as the plain ViT baseline: tokens
per block, GFLOPs (torch's counter), latency (median after warm-up, hooks off), agreement with
the baseline and mIoU with labels. Outputs: methods.csv (one row per image and method, then one
per method over all images), tokens_per_block.csv, and per image a methods.png with one row of
pictures per method and everyone's tokens per block below.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tokenscope import __version__
from tokenscope.analysis.metrics import confusion, mean_iou, pixel_agreement
from tokenscope.analysis.stability import spread
from tokenscope.analysis.uncertainty import class_counts, miou_change_interval, miou_interval
from tokenscope.analysis.windowed import ImagePrediction
from tokenscope.data.images import check_size, find_images
from tokenscope.data.windows import resolve_windows
from tokenscope.errors import ConfigError, StorageError, TokenscopeError
from tokenscope.analysis.timing_spread import paired_timing
from tokenscope.storage import text_of
from tokenscope.jobs.compare import BASELINES, CompareResult, Variant, measure_variants, prepare_input
from tokenscope.jobs.run import ImageResult, Progress
from tokenscope.jobs.runfolder import MANIFEST, image_folder, new_run_dir, unique_name, write_json_atomic, write_rgb, write_table
from tokenscope.jobs.setup import ModelOptions, label_file_space, load_model, method_setting
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.methods.merging import merge_rules
from tokenscope.models.methods.point import resolve_list
from tokenscope.render.manifest import method_folder_name
from tokenscope.render.overlays import groups_overlay, render_label_map, render_overlay
from tokenscope.render.plots import methods_figure
from tokenscope.trace.capture import TraceCapture

SUMMED = ("tokens", "gflops", "latency_ms", "merged", "pruned", "exited")


def figure_block(depth: int, at_block: int | None) -> int:
    """Which block's tokens the figure shows: the user's, else the middle of the encoder."""
    if at_block is None:
        return depth // 2 + 1
    if not 1 <= at_block <= depth + 1:
        raise ConfigError(f"--at-block must be in 1..{depth + 1} (depth + 1 = after the encoder), got {at_block}")
    return at_block


def compare_methods(paths: list[str], opts: ModelOptions, methods: list[str], baseline: str = "vit",
                    out: str | Path = "outputs", size: int | None = None, labels: str | None = None, repeats: int = 5,
                    warmup: int = 1, progress: Progress | None = None, window: int | None = None,
                    stride: int | None = None, model: tuple[LoadedModel, torch.device] | None = None,
                    at_block: int | None = None) -> CompareResult:
    if baseline not in BASELINES:
        raise ConfigError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if repeats < 1 or warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    labels_path = Path(labels) if labels is not None else None
    parsed = resolve_list(",".join(methods))
    images = find_images(paths)
    if not images:
        raise TokenscopeError("no images found in " + ", ".join(map(str, paths)))
    loaded, device = model if model is not None else load_model(opts, have_labels=labels_path is not None)
    variants = [Variant(m.label, method_setting(loaded, opts, m.text, labels_path is not None)) for m in parsed]
    base = Variant("baseline", loaded.setting.plain())
    space = label_file_space(loaded, opts, str(labels), images) if labels is not None else None
    cfg = loaded.config
    patch, depth = loaded.model.patch_size, loaded.model.depth
    block = figure_block(depth, at_block)
    check_size(size, patch)
    windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, window, stride, size, patch)
    capture = TraceCapture(loaded, device, base.setting, amp=opts.amp)
    run_dir = new_run_dir(out, "compare")
    num_classes = cfg.num_classes
    conf = {v.name: np.zeros((num_classes, num_classes), dtype=np.int64) for v in [base, *variants]}
    counts: dict[str, list[np.ndarray]] = {v.name: [] for v in [base, *variants]}  # per image: the intervals
    rows: list[dict[str, Any]] = []
    block_rows: list[pd.DataFrame] = []
    results: list[ImageResult] = []
    taken: set[str] = set()
    runs: dict[str, list[list[float]]] = {v.name: [] for v in [base, *variants]}  # per image, per interleaved repeat
    failed: dict[str, str] = {}
    """Methods whose plug-in failed (name -> its one line): left out from then on, said in the results."""
    for i, path in enumerate(images):
        if progress:
            progress(i, len(images), path.name)
        result = ImageResult(source=str(path))
        try:
            prepared = prepare_input(path, labels_path, size, patch, space)
            every = [base, *(v for v in variants if v.name not in failed)]
            done = measure_variants(loaded, every, prepared, windows, device, capture, repeats, warmup,
                                    failures=failed)
            if done[0] is None:  # the unreduced model is built in: its failure is not a method's
                raise TokenscopeError(failed.pop(base.name))
            measured: list[tuple[Variant, ImagePrediction, dict[str, Any]]] = [
                (v, got[0], got[1]) for v, got in zip(every, done) if got is not None]
            for v, _, m in measured:
                runs[v.name].append(m.pop("latency_runs_ms"))
            p_base, m_base = measured[0][1], measured[0][2]
            name = unique_name(path.stem, taken)
            panels = []
            for v, pred, m in measured:
                row: dict[str, Any] = {"image": text_of(path), "method": v.name,
                                       "merge_rules": merge_rules(v.setting.record.get("merging")), "input_h": prepared.input_hw[0],
                                       "input_w": prepared.input_hw[1], "windows": len(pred.traces),
                                       "patches": pred.patches, **m,
                                       "agreement": pixel_agreement(pred.label_map, p_base.label_map),
                                       "flop_reduction": m_base["gflops"] / m["gflops"],
                                       "speedup": m_base["latency_ms"] / m["latency_ms"],
                                       "block_token_reduction": m_base["mean_tokens_per_block"] / m["mean_tokens_per_block"]}
                if pred.labels is not None:
                    c = confusion(pred.label_map, pred.labels, num_classes)
                    conf[v.name] += c
                    counts[v.name].append(class_counts(c))
                    row["miou"] = mean_iou(c)
                rows.append(row)
                shown = pred.inputs[0].display
                first = pred.traces[0]
                caption = (f"{v.name} ({m['gflops']:.2f} GFLOPs, {m['latency_ms']:.0f} ms, "
                           f"{100 * row['agreement']:.1f}% agree" + (f", mIoU {100 * row['miou']:.1f}" if "miou" in row
                                                                     else "") + ")")
                panels.append((caption, render_label_map(prepared.display, pred.label_map, cfg.class_colours,
                                                        cfg.class_names, num_classes),
                               groups_overlay(shown, first, block), render_overlay("exit", shown, first)))
            with image_folder(run_dir, name) as folder:
                for v, pred, _ in measured:
                    for k, trace in enumerate(pred.traces):
                        trace.save(folder / method_folder_name(v.name) / (f"w{k:02d}" if pred.plan is not None else ""))
                write_rgb(folder / "image.png", prepared.display)
                where = "" if p_base.plan is None else f" (window 1 of {len(p_base.traces)})"
                methods_figure(prepared.display, panels, [(v.name, p.traces[0]) for v, p, _ in measured],
                               folder / "methods.png", f"{path.name}: methods on {cfg.name}{where}", block)
            per_block = {"image": name, "block": np.arange(1, depth + 1)}
            for v, pred, _ in measured:
                per_block[f"{v.name}_tokens_in"] = sum(t.block_tokens_in for t in pred.traces)
                per_block[f"{v.name}_merged"] = sum(t.merges_per_block() for t in pred.traces)
            block_rows.append(pd.DataFrame(per_block))
            result.folder = name
        except StorageError:
            raise  # the disk refused: stop (the folder is taken away)
        except TokenscopeError as exc:
            result.error = str(exc)
        results.append(result)
    if progress:
        progress(len(images), len(images), "")
    rows = [r for r in rows if r["method"] not in failed]  # a method that failed part-way is not summed over fewer images
    kept = [v for v in variants if v.name not in failed]
    overall = _overall(rows, conf, labels_path is not None, [base.name, *(v.name for v in kept)])
    for r in overall:  # an mIoU over the images with its interval, and its change against the plain ViT (paired)
        if counts[r["method"]]:
            r["miou_ci"] = miou_interval(counts[r["method"]]).as_dict()
            if r["method"] != base.name:
                r["miou_change_ci"] = miou_change_interval(counts[r["method"]], counts[base.name]).as_dict()
        r["class_condition"] = space.tag if space is not None else ""
    timing_warnings: list[str] = []
    for r in overall:  # the speed-up's interval over the interleaved repeats, and repeats that disagree
        if r["method"] == base.name:
            continue
        timing, said = paired_timing(runs[base.name], runs[r["method"]], r["method"], base.name)
        r.update(timing)
        timing_warnings += [w for w in said if w not in timing_warnings]
    warnings = [*loaded.warnings, *(space.warnings() if space is not None else []), *timing_warnings]
    for r in overall:
        r["status"] = "ok"
    overall += [{"method": name, "status": "failed", "error": why} for name, why in failed.items()]
    if rows:
        write_table(pd.concat([pd.DataFrame(rows), pd.DataFrame([{"image": "ALL", **r} for r in overall])],
                              ignore_index=True), run_dir / "methods.csv")
        write_table(pd.concat(block_rows, ignore_index=True), run_dir / "tokens_per_block.csv")
    write_json_atomic(run_dir / MANIFEST, {
        "tool": "tokenscope", "version": __version__, "kind": "compare", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": cfg.name, "weights": loaded.weights_id, "device": str(device), "baseline": baseline,
        "methods": [v.name for v in kept], "failed_methods": failed, "figure_block": block,
        "method_sources": {m.label: m.provenance() for m in parsed},
        "flop_convention": "2 FLOPs per multiply-add (torch.utils.flop_counter), policy network and matching included",
        "latency": f"median of {repeats} runs after {warmup} warm-up, hooks off, methods interleaved repeat by repeat",
        "overall": overall, "warnings": warnings, "class_space": None if space is None else space.record(),
        "totals": "tokens, GFLOPs and latency in `overall` are totals over the images; mIoU is pooled over them",
        "images": [{"source": r.source, "folder": r.folder, "error": r.error} for r in results],
    })
    return CompareResult(run_dir, rows, {}, results, warnings, [v.name for v in kept], overall, class_space=space)


def _overall(rows: list[dict[str, Any]], conf: dict[str, np.ndarray], have_labels: bool,
             order: list[str]) -> list[dict[str, Any]]:
    """Per method over all images: sums of tokens, FLOPs, time; ratios against the baseline."""
    if not rows:
        return []
    df = pd.DataFrame(rows)
    base = df[df["method"] == "baseline"]
    out = []
    for name in order:
        sub = df[df["method"] == name]
        r: dict[str, Any] = {"method": name, "merge_rules": sub["merge_rules"].iloc[0],
                             **{k: float(sub[k].sum()) for k in SUMMED}}
        weights = sub["windows"].to_numpy(float)
        r["mean_tokens_per_block"] = float(np.average(sub["mean_tokens_per_block"], weights=weights))
        for kind in ("merged", "pruned", "exited", "exited_early"):  # shares of the tokens, pooled over the images
            r[f"{kind}_pct"] = float(np.average(sub[f"{kind}_pct"], weights=np.maximum(sub["tokens"].to_numpy(float), 1)))
        r["flop_reduction"] = float(base["gflops"].sum() / sub["gflops"].sum())
        r["speedup"] = float(base["latency_ms"].sum() / sub["latency_ms"].sum())
        r["block_token_reduction"] = float(np.average(base["mean_tokens_per_block"], weights=base["windows"])
                                           / r["mean_tokens_per_block"])
        r["agreement"] = float(np.average(sub["agreement"], weights=sub["input_h"] * sub["input_w"]))
        tail = spread(sub["latency_ms"].to_numpy(dtype=np.float64), (50, 95, 99))  # of the per-image latencies
        r.update({f"latency_{p}_ms": tail[p] for p in ("p50", "p95", "p99")})
        r["latency_p99_over_p50"] = tail["p99_over_p50"]
        if have_labels:
            r["miou"] = mean_iou(conf[name])
        out.append(r)
    return out
