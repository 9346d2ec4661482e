"""Comparison tables for papers, read from a sweep, compare or run folder: Markdown, LaTeX or CSV.

Every number is read from the folder's own files (sweep.csv, methods.csv, tables/classes.csv and
the manifest); every header says its unit and whether a column is per image, a total over the
images or pooled over them; the conditions a reader needs (how many images, what the intervals
are, a class mismatch that was let through, the device that timed it) come as notes under the
table, never left out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from tokenscope.analysis.uncertainty import bounds_text, points
from tokenscope.errors import ConfigError
from tokenscope.render.manifest import read_manifest
from tokenscope.render.paper_table import PaperTable

FORMATS = ("markdown", "latex", "csv")
KINDS = ("methods", "classes", "agreement", "boundary")


def select_columns(t: PaperTable, spec: str) -> PaperTable:
    """Keep the columns `spec` names (comma-separated, each the start of a header, case-insensitive),
    in that order; one error listing the headers when a name matches none."""
    wanted = [w.strip() for w in str(spec).split(",") if w.strip()]
    if not wanted:
        raise ConfigError("--columns: name at least one column")
    picked = []
    for w in wanted:
        hit = next((i for i, c in enumerate(t.columns) if c.lower().startswith(w.lower())), None)
        if hit is None:
            raise ConfigError(f"--columns: {w!r} starts no column; the columns are: {'; '.join(t.columns)}")
        if hit not in picked:
            picked.append(hit)
    return PaperTable(t.title, [t.columns[i] for i in picked], [[r[i] for i in picked] for r in t.rows], t.notes, t.wide)


def _num(v: Any, digits: int = 2, signed: bool = False) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(x):
        return ""
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _ci(value: Any, low: Any, high: Any, signed: bool = False) -> str:
    """`46.21 [45.10, 47.30]` in points (inputs are fractions); the value alone without an interval."""
    if not _num(value):
        return ""
    return points(value, signed) + bounds_text({"low": low, "high": high}, signed)


def _manifest(folder: Path) -> dict[str, Any]:
    return read_manifest(folder, "sweep, compare or run folder")


NUMERIC_COLUMNS = frozenset({
    "size", "tokens", "gflops", "latency_ms", "peak_mib", "agreement", "miou", "miou_low", "miou_high", "miou_change",
    "miou_change_low", "miou_change_high", "merged_pct", "pruned_pct", "exited_pct", "exited_early_pct", "speedup",
    "flop_reduction", "token_reduction", "mean_tokens_per_block", "block_token_reduction", "images_per_s",
    "images_per_s_low", "images_per_s_high", "gflops_per_image", "merge_threshold", "exit_threshold", "images"})
"""Columns of the tables tokenscope writes that hold numbers: read back, text there is a damaged file."""


def _read_csv(path: Path) -> pd.DataFrame:
    """A table tokenscope wrote, read back as data: its number columns must hold numbers (one line naming
    the file, the column and the value otherwise, never a ValueError from a formatter)."""
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (the folder is incomplete)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable table ({exc})") from None
    for column in NUMERIC_COLUMNS & set(df.columns):
        values = pd.to_numeric(df[column], errors="coerce")
        bad = values.isna() & df[column].notna()
        if bad.any():
            raise ConfigError(f"{path}: column {column!r} holds {str(df[column][bad].iloc[0])[:40]!r} where a number "
                              "belongs; the file was edited or damaged (run the command again)")
        df[column] = values
    return df


def _condition_notes(manifest: dict[str, Any]) -> list[str]:
    space = manifest.get("class_space") or {}
    notes = []
    if isinstance(space, dict) and (space.get("condition") or space.get("notes")):
        notes.append("Class spaces: " + "; ".join([str(space.get("condition") or ""), *map(str, space.get("notes") or [])]).strip("; "))
    return notes


def _throughput(r: Any) -> str:
    """images/s with its 95% interval over the images, when the sweep measured one."""
    text = _num(r["images_per_s"])
    low, high = r.get("images_per_s_low"), r.get("images_per_s_high")
    if text and _num(low) and _num(high):
        text += f" [{_num(low)}, {_num(high)}]"
    return text


def sweep_methods_table(folder: Path) -> PaperTable:
    manifest = _manifest(folder)
    df = _read_csv(folder / "sweep.csv")
    base = df[df["is_baseline"]]
    if not len(base):
        raise ConfigError(f"{folder / 'sweep.csv'}: no baseline row")
    images = int(df["images"].iloc[0]) if "images" in df else 0
    base_gflops = {r["size"]: float(r["gflops_per_image"]) for _, r in base.iterrows()}  # each size against its own
    missing = sorted(set(df["size"]) - set(base_gflops))
    if missing:
        raise ConfigError(f"{folder / 'sweep.csv'}: no baseline row at size {', '.join(map(str, missing))}")
    unreduced = "scored_against" in df and str(df["scored_against"].iloc[0]) == "unreduced model"
    score = "agreement with unreduced (mIoU, %) [95% CI]" if unreduced else "mIoU (%) [95% CI]"
    columns = ["method", "operating point", "size (px)", score, "ΔmIoU (points) [95% CI]",
               "GFLOPs per image", "FLOP reduction (x)", "tokens per block (mean)", "merged (% of tokens)",
               "pruned (% of tokens)", "exited (% of tokens)", "throughput (images/s) [95% CI]"]
    rows = []
    for _, r in df.iterrows():
        point = "-" if r["is_baseline"] else (str(r["point"]).partition(":")[2] or str(r["point"]))
        change = "" if r["is_baseline"] else _ci(r.get("miou_change"), r.get("miou_change_low"), r.get("miou_change_high"), True)
        rows.append([str(r["method"]), point, str(r["size"]) if int(r["size"]) else "native", _ci(r["miou"], r.get("miou_low"), r.get("miou_high")), change,
                     _num(r["gflops_per_image"]), _num(base_gflops[r["size"]] / float(r["gflops_per_image"])),
                     _num(r["mean_tokens_per_block"], 0), _num(r.get("merged_pct"), 1), _num(r.get("pruned_pct"), 1),
                     _num(r.get("exited_pct", r["exited_early_pct"]), 1), _throughput(r)])
    data = manifest.get("data") or {}
    notes = [f"mIoU pooled over {images} images of {data.get('kind', '?')}"
             + (f" ({data.get('split')})" if data.get("kind") not in (None, "synthetic") else f" (scenes {data.get('seeds')})")
             + "; 95% percentile bootstrap intervals over images"
             + (f" ({manifest['intervals']['resamples']} resamples, seed {manifest['intervals']['seed']})"
                if isinstance(manifest.get("intervals"), dict) else "")
             + "; ΔmIoU paired against the unreduced model (vit) on the same images"
             + (" at the same input size; FLOP reduction against that size's unreduced model."
                if len(base_gflops) > 1 else "."),
             "GFLOPs: 2 per multiply-add, counted by torch's flop counter, policy network included, per image.",
             *(["Unlabelled images: every point is scored against the unreduced model's own labels (agreement, "
                "not accuracy)."] if unreduced else []),
             f"Throughput: measured on {manifest.get('device', '?')}, batch 1, forward passes only, each image through "
             "every point in turn; its interval is a bootstrap over the images.",
             f"Model: {manifest.get('model', '?')} (weights {manifest.get('weights', '?')})."]
    return PaperTable(f"Methods on {manifest.get('model', '?')}", columns, rows, notes + _condition_notes(manifest))


def compare_methods_table(folder: Path) -> PaperTable:
    manifest = _manifest(folder)
    df = _read_csv(folder / "methods.csv")
    every = df[df["image"] == "ALL"]
    images = int(df[df["image"] != "ALL"]["image"].nunique())
    overall = {r.get("method"): r for r in manifest.get("overall", []) if isinstance(r, dict)}
    columns = ["method", f"tokens in (total, {images} images)", "tokens per block (mean)", f"GFLOPs (total, {images} images)",
               f"latency (ms, total, {images} images)", "merged (% of tokens)", "pruned (% of tokens)",
               "exited (% of tokens)", "pixels agreeing with vit (%)",
               "mIoU (%) [95% CI]", "ΔmIoU (points) [95% CI]"]
    rows = []
    for _, r in every.iterrows():
        o = overall.get(r["method"], {})
        ci, ch = o.get("miou_ci") or {}, o.get("miou_change_ci") or {}
        rows.append([str(r["method"]), _num(r["tokens"], 0), _num(r["mean_tokens_per_block"], 0), _num(r["gflops"]),
                     _num(r["latency_ms"], 1), _num(r.get("merged_pct"), 1), _num(r.get("pruned_pct"), 1),
                     _num(r.get("exited_pct", r["exited_early_pct"]), 1), _num(100 * float(r["agreement"]), 1),
                     _ci(o["miou"], ci.get("low"), ci.get("high")) if "miou" in o else "",
                     _ci(ch.get("value"), ch.get("low"), ch.get("high"), True) if ch else ""])
    return PaperTable(f"Methods compared on {images} images", columns, rows, _compare_notes(manifest, images))


def _compare_notes(manifest: dict[str, Any], images: int) -> list[str]:
    """What a reader needs under a comparison's table: totals, intervals, timing, model, classes."""
    return [f"Totals are sums over the {images} images; mIoU is pooled over them (95% percentile bootstrap over "
            "images; Δ paired against vit on the same images).",
            f"Latency: {manifest.get('latency', 'median of repeated runs')}, on {manifest.get('device', '?')}; "
            f"GFLOPs: {manifest.get('flop_convention', '2 per multiply-add')}.",
            f"Model: {manifest.get('model', '?')} (weights {manifest.get('weights', '?')}).", *_condition_notes(manifest)]


def compare_table(folder: Path) -> PaperTable:
    """A plain `compare` folder: the model's operating point against the same weights unreduced."""
    manifest = read_manifest(folder, "compare folder")
    o = manifest.get("overall") or {}
    if not isinstance(o, dict) or not o:
        raise ConfigError(f"{folder}: this comparison holds no image (nothing to tabulate)")
    images = len([e for e in manifest.get("images", []) if isinstance(e, dict) and e.get("folder")])
    step = manifest.get("step") or {}
    name = str(step.get("method") or "step")
    columns = ["variant", f"tokens in (total, {images} images)", f"GFLOPs (total, {images} images)",
               f"latency (ms, total, {images} images)", "peak extra memory (MiB, max)", "mIoU (%) [95% CI]",
               "ΔmIoU (points) [95% CI]"]
    rows = []
    for label, key in (("vit", "base"), (name, "step")):
        ci = o.get(f"{key}_miou_ci") or {}
        change = o.get("miou_change_ci") or {} if key == "step" else {}
        rows.append([label, _num(o.get(f"{key}_tokens"), 0), _num(o.get(f"{key}_gflops")), _num(o.get(f"{key}_latency_ms"), 1),
                     _num(o.get(f"{key}_peak_mib"), 0),
                     _ci(o[f"{key}_miou"], ci.get("low"), ci.get("high")) if f"{key}_miou" in o else "",
                     _ci(change.get("value"), change.get("low"), change.get("high"), True) if change else ""])
    return PaperTable(f"{name} against the unreduced model on {images} images", columns, rows,
                      _compare_notes(manifest, images))


FATE_HEADERS = {"merged": "merged", "pruned": "pruned", "exited": "exited", "reached_end": "reached the end"}


def run_classes_table(folder: Path) -> PaperTable:
    """Per class: patches, supertoken sizes, the share of its patches in each fate, cost per patch, the
    accuracy of its early decisions and its IoU with and without reduction."""
    manifest = _manifest(folder)
    df = _read_csv(folder / "tables" / "classes.csv")
    df = df[df["class"] != 255]
    levels = sorted(int(c.removeprefix("patches_level")) for c in df.columns if c.startswith("patches_level")
                    and (df[c] > 0).any())  # a method without supertokens has no level columns to show
    level_table = folder / "tables" / "levels.csv"
    side = dict(zip(*_read_csv(level_table)[["level", "side_px"]].T.values)) if level_table.is_file() else {}
    fates = [f for f in FATE_HEADERS if f"patches_{f}" in df.columns and (df[f"patches_{f}"] > 0).any()]
    iou = "iou" if "iou" in df.columns else "iou_step"  # run folders written before fates
    columns = ["class", "patches (total)",
               *[f"in {int(side.get(k, 16 * 2 ** k))}-px supertokens (% of patches)" for k in levels if k > 0],
               *[f"{FATE_HEADERS[f]} (% of patches)" for f in fates],
               "token-blocks per patch", "GFLOPs per 1000 patches",
               *(["exit accuracy (% of exited patches)"] if "exited" in fates else []), "IoU reduced (%)",
               "IoU unreduced (%)"]
    rows = []
    for _, r in df.iterrows():
        total = float(r["patches"]) or 1.0
        exit_acc = r.get("exited_accuracy", r.get("exit_accuracy"))
        rows.append([str(r["name"]), _num(r["patches"], 0),
                     *[_num(100 * float(r[f"patches_level{k}"]) / total, 1) for k in levels if k > 0],
                     *[_num(100 * float(r[f"patches_{f}"]) / total, 1) for f in fates],
                     _num(r.get("token_blocks_per_patch"), 2), _num(1000 * float(r.get("gflops_per_patch", "nan")), 2),
                     *([_num(100 * float(exit_acc), 1) if exit_acc is not None else ""] if "exited" in fates else []),
                     _num(100 * float(r[iou]), 1) if iou in r else "",
                     _num(100 * float(r["iou_baseline"]), 1) if "iou_baseline" in r else ""])
    n = len([e for e in manifest.get("images", []) if isinstance(e, dict) and e.get("folder")])
    patch = int(side.get(0, 16))
    source = str((manifest.get("summary") or {}).get("class_source") or "ground truth")  # run.json holds the summary
    notes = [f"Per class over {n} images (patches: {patch}x{patch}-pixel grid cells of the processed input; supertoken "
             f"sizes in pixels of that input; a patch's class is its {source} label). IoU pooled over the images.",
             "Fates: each patch's token was merged into another inside a block, pruned, exited at a gate or reached the "
             "end; the shares of a class add up to 100%. Cost: each block's work shared over the tokens that ran it and "
             "each token's share over the patches it covered (encoder blocks only).",
             f"Model: {manifest.get('model', '?')}."]
    return PaperTable(f"Where each class's tokens went ({n} images)", columns, rows, notes + _condition_notes(manifest))


def paper_table(folder: str | Path, kind: str = "methods") -> PaperTable:
    """The table of `kind` that `folder` holds: methods (sweep, compare), classes (run), agreement (compare:
    early decisions against the unreduced model), boundary (compare or run: fates against the distance to a
    class boundary)."""
    p = Path(folder)
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: choose one of {', '.join(KINDS)}")
    if not p.is_dir():
        raise ConfigError(f"{p}: no such folder")
    if kind in ("agreement", "boundary"):
        from tokenscope.render.decision_tables import agreement_table, boundary_table

        return agreement_table(p) if kind == "agreement" else boundary_table(p)
    manifest = _manifest(p)
    what = manifest.get("kind")
    if kind == "classes":
        if what != "run":
            raise ConfigError(f"{p}: per-class tables come from run folders; this is a {what} folder")
        return run_classes_table(p)
    if what == "sweep":
        return sweep_methods_table(p)
    if what == "compare":
        return compare_methods_table(p) if "methods" in manifest else compare_table(p)
    raise ConfigError(f"{p}: a methods table needs a sweep or compare folder (this is {what!r}); "
                      "for a run, use --kind classes")


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$"}


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_markdown(t: PaperTable) -> str:
    cell: Callable[[str], str] = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, t.columns)) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in t.rows]
    return "\n".join(lines + [""] + [f"{n}" for n in t.notes]) + "\n"


def to_latex(t: PaperTable) -> str:
    """A booktabs table (needs \\usepackage{booktabs}); the notes become its caption."""
    spec = "l" * min(2, len(t.columns)) + "r" * max(len(t.columns) - 2, 0)
    env = "table*" if t.wide else "table"
    lines = [r"\begin{" + env + "}[t]", r"\centering", r"\small", r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join(_latex(c) for c in t.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex(c) for c in r) + r" \\" for r in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + _latex(t.title + ". " + " ".join(t.notes)) + "}",
              r"\end{" + env + "}"]
    return "\n".join(lines) + "\n"


def to_csv(t: PaperTable) -> str:
    return pd.DataFrame(t.rows, columns=t.columns).to_csv(index=False) + "".join(f"# {n}\n" for n in t.notes)


def render_table(t: PaperTable, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return {"markdown": to_markdown, "latex": to_latex, "csv": to_csv}[fmt](t)
