"""What `tokenscope compare` writes, for its two questions: one operating point against the plain
ViT (`PointReport`: compare.csv, compare.png per image, run.json's `step`), or several side by side
(`MethodsReport`, with --methods: methods.csv, methods.png per image, run.json's `methods`).

The comparison itself is one job (jobs/compare.py): the same images, the same interleaved
measurements of every operating point; a report only turns each image's measurements into rows and
figures, and the totals into the run folder's files.
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
from tokenscope.analysis.metrics import confusion, mean_iou, pixel_agreement
from tokenscope.analysis.stability import spread
from tokenscope.analysis.timing_spread import paired_timing
from tokenscope.analysis.uncertainty import class_counts, miou_change_interval, miou_interval
from tokenscope.analysis.windowed import ImagePrediction
from tokenscope.data.classspace import ClassSpace
from tokenscope.data.images import PreparedImage
from tokenscope.data.windows import WindowSpec
from tokenscope.errors import ConfigError
from tokenscope.jobs.run import ImageResult
from tokenscope.jobs.runfolder import MANIFEST, image_folder, write_json_atomic, write_rgb, write_table
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.methods.merging import merge_rules
from tokenscope.models.methods.point import ResolvedPoint
from tokenscope.models.step_vit import ReductionSetting
from tokenscope.render.manifest import method_folder_name
from tokenscope.render.overlays import groups_overlay, render_label_map, render_overlay
from tokenscope.render.plots import compare_figure, methods_figure
from tokenscope.storage import text_of

SUMMED = ("tokens", "gflops", "latency_ms", "merged", "pruned", "exited")


@dataclass
class Variant:
    """One operating point of the loaded model."""

    name: str
    setting: ReductionSetting


Measured = list[tuple[Variant, ImagePrediction, dict[str, Any]]]
"""One image's measurements: the baseline first, then every operating point that did not fail."""


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


@dataclass
class Context:
    """What every report of one comparison shares."""

    loaded: LoadedModel
    device: torch.device
    baseline: str
    repeats: int
    warmup: int
    space: ClassSpace | None
    windows: WindowSpec | None
    have_labels: bool


def figure_block(depth: int, at_block: int | None) -> int:
    """Which block's tokens the methods figure shows: the user's, else the middle of the encoder."""
    if at_block is None:
        return depth // 2 + 1
    if not 1 <= at_block <= depth + 1:
        raise ConfigError(f"--at-block must be in 1..{depth + 1} (depth + 1 = after the encoder), got {at_block}")
    return at_block


def _manifest_head(ctx: Context, kind: str = "compare") -> dict[str, Any]:
    return {"tool": "tokenscope", "version": __version__, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": ctx.loaded.config.name, "weights": ctx.loaded.weights_id, "device": str(ctx.device),
            "baseline": ctx.baseline}


def _windows_record(windows: WindowSpec | None) -> dict[str, Any] | None:
    return None if windows is None else {"window": windows.window, "stride": windows.stride,
                                         "resize_short": windows.resize_short}


class PointReport:
    """One operating point (the model's, or `--method`) against the plain ViT."""

    def __init__(self, ctx: Context, step: Variant) -> None:
        self.ctx, self.step = ctx, step
        n = ctx.loaded.config.num_classes
        self.rows: list[dict[str, Any]] = []
        self.block_rows: list[pd.DataFrame] = []
        self.conf_step = np.zeros((n, n), dtype=np.int64)
        self.conf_base = np.zeros_like(self.conf_step)
        self.counts_step: list[np.ndarray] = []  # per image, for the bootstrap intervals
        self.counts_base: list[np.ndarray] = []

    def image(self, run_dir: Path, name: str, path: Path, prepared: PreparedImage, measured: Measured) -> None:
        cfg, num_classes = self.ctx.loaded.config, self.ctx.loaded.config.num_classes
        (_, p_base, m_base), (_, p_step, m_step) = measured
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
            self.conf_step += cs
            self.conf_base += cb
            self.counts_step.append(class_counts(cs))
            self.counts_base.append(class_counts(cb))
            row["step_miou"], row["base_miou"] = mean_iou(cs), mean_iou(cb)
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
        self.block_rows.append(pd.DataFrame({"image": name, "block": np.arange(1, t_step.meta.depth + 1),
                                             "base_tokens_in": sum(t.block_tokens_in for t in p_base.traces),
                                             "step_tokens_in": sum(t.block_tokens_in for t in p_step.traces)}))
        row["folder"] = name
        self.rows.append(row)

    def finish(self, run_dir: Path, results: list[ImageResult], runs: dict[str, list[list[float]]],
               failed: dict[str, str]) -> CompareResult:
        ctx, step, rows = self.ctx, self.step, self.rows
        overall = _point_overall(rows, self.conf_step, self.conf_base, ctx.have_labels)
        timing, timing_warnings = paired_timing(runs["baseline"], runs[step.name], step.setting.method or "the reduced model")
        if overall:
            overall.update(timing)
        if self.counts_step:
            overall["step_miou_ci"] = miou_interval(self.counts_step).as_dict()
            overall["base_miou_ci"] = miou_interval(self.counts_base).as_dict()
            overall["miou_change_ci"] = miou_change_interval(self.counts_step, self.counts_base).as_dict()
        if rows:
            df = pd.DataFrame(rows)
            write_table(pd.concat([df, pd.DataFrame([{"image": "ALL", **overall}])], ignore_index=True),
                        run_dir / "compare.csv")
            write_table(pd.concat(self.block_rows, ignore_index=True), run_dir / "tokens_per_block.csv")
        space = ctx.space
        warnings = [*ctx.loaded.warnings, *(space.warnings() if space is not None else []), *timing_warnings]
        s = step.setting
        write_json_atomic(run_dir / MANIFEST, {
            **_manifest_head(ctx),
            "step": {"policy": s.policy, "exits": s.exits, "method": s.method,
                     "merge_thresholds": list(s.merge_thresholds), "exit_threshold": s.exit_threshold,
                     "operating_point": s.describe()},
            "flop_convention": "2 FLOPs per multiply-add (torch.utils.flop_counter), policy network included",
            "latency": f"median of {ctx.repeats} runs after {ctx.warmup} warm-up, hooks off, variants interleaved "
                       "repeat by repeat",
            "overall": overall, "warnings": warnings,
            "class_space": None if space is None else space.record(),
            "windows": _windows_record(ctx.windows),
            "images": [{"source": r.source, "folder": r.folder, "error": r.error} for r in results],
        })
        return CompareResult(run_dir, rows, overall, results, warnings, class_space=space)


def _point_overall(rows: list[dict[str, Any]], conf_step: np.ndarray, conf_base: np.ndarray,
                   have_labels: bool) -> dict[str, Any]:
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


class MethodsReport:
    """Several operating points (`--methods a,b,c`) side by side, each against the plain ViT."""

    def __init__(self, ctx: Context, base: Variant, variants: list[Variant], parsed: list[ResolvedPoint],
                 block: int) -> None:
        self.ctx, self.base, self.variants, self.parsed, self.block = ctx, base, variants, parsed, block
        n = ctx.loaded.config.num_classes
        names = [base.name, *(v.name for v in variants)]
        self.conf = {name: np.zeros((n, n), dtype=np.int64) for name in names}
        self.counts: dict[str, list[np.ndarray]] = {name: [] for name in names}  # per image: the intervals
        self.rows: list[dict[str, Any]] = []
        self.block_rows: list[pd.DataFrame] = []

    def image(self, run_dir: Path, name: str, path: Path, prepared: PreparedImage, measured: Measured) -> None:
        cfg = self.ctx.loaded.config
        num_classes, depth, block = cfg.num_classes, self.ctx.loaded.model.depth, self.block
        p_base, m_base = measured[0][1], measured[0][2]
        panels = []
        for v, pred, m in measured:
            row: dict[str, Any] = {"image": text_of(path), "method": v.name,
                                   "merge_rules": merge_rules(v.setting.record.get("merging")),
                                   "input_h": prepared.input_hw[0], "input_w": prepared.input_hw[1],
                                   "windows": len(pred.traces), "patches": pred.patches, **m,
                                   "agreement": pixel_agreement(pred.label_map, p_base.label_map),
                                   "flop_reduction": m_base["gflops"] / m["gflops"],
                                   "speedup": m_base["latency_ms"] / m["latency_ms"],
                                   "block_token_reduction": m_base["mean_tokens_per_block"] / m["mean_tokens_per_block"]}
            if pred.labels is not None:
                c = confusion(pred.label_map, pred.labels, num_classes)
                self.conf[v.name] += c
                self.counts[v.name].append(class_counts(c))
                row["miou"] = mean_iou(c)
            self.rows.append(row)
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
        self.block_rows.append(pd.DataFrame(per_block))

    def finish(self, run_dir: Path, results: list[ImageResult], runs: dict[str, list[list[float]]],
               failed: dict[str, str]) -> CompareResult:
        ctx, base, space = self.ctx, self.base, self.ctx.space
        rows = [r for r in self.rows if r["method"] not in failed]  # a method that failed part-way is not summed over fewer images
        kept = [v for v in self.variants if v.name not in failed]
        overall = _methods_overall(rows, self.conf, ctx.have_labels, [base.name, *(v.name for v in kept)])
        for r in overall:  # an mIoU over the images with its interval, and its change against the plain ViT (paired)
            if self.counts[r["method"]]:
                r["miou_ci"] = miou_interval(self.counts[r["method"]]).as_dict()
                if r["method"] != base.name:
                    r["miou_change_ci"] = miou_change_interval(self.counts[r["method"]], self.counts[base.name]).as_dict()
            r["class_condition"] = space.tag if space is not None else ""
        timing_warnings: list[str] = []
        for r in overall:  # the speed-up's interval over the interleaved repeats, and repeats that disagree
            if r["method"] == base.name:
                continue
            timing, said = paired_timing(runs[base.name], runs[r["method"]], r["method"], base.name)
            r.update(timing)
            timing_warnings += [w for w in said if w not in timing_warnings]
        warnings = [*ctx.loaded.warnings, *(space.warnings() if space is not None else []), *timing_warnings]
        for r in overall:
            r["status"] = "ok"
        overall += [{"method": name, "status": "failed", "error": why} for name, why in failed.items()]
        if rows:
            write_table(pd.concat([pd.DataFrame(rows), pd.DataFrame([{"image": "ALL", **r} for r in overall])],
                                  ignore_index=True), run_dir / "methods.csv")
            write_table(pd.concat(self.block_rows, ignore_index=True), run_dir / "tokens_per_block.csv")
        write_json_atomic(run_dir / MANIFEST, {
            **_manifest_head(ctx),
            "methods": [v.name for v in kept], "failed_methods": failed, "figure_block": self.block,
            "method_sources": {m.label: m.provenance() for m in self.parsed},
            "flop_convention": "2 FLOPs per multiply-add (torch.utils.flop_counter), policy network and matching included",
            "latency": f"median of {ctx.repeats} runs after {ctx.warmup} warm-up, hooks off, methods interleaved "
                       "repeat by repeat",
            "overall": overall, "warnings": warnings, "class_space": None if space is None else space.record(),
            "totals": "tokens, GFLOPs and latency in `overall` are totals over the images; mIoU is pooled over them",
            "images": [{"source": r.source, "folder": r.folder, "error": r.error} for r in results],
        })
        return CompareResult(run_dir, rows, {}, results, warnings, [v.name for v in kept], overall, class_space=space)


def _methods_overall(rows: list[dict[str, Any]], conf: dict[str, np.ndarray], have_labels: bool,
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
