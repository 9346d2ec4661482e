"""One self-contained HTML report of a run folder: every picture embedded, no server, no network.

It reads only what `run` wrote (run.json, summary.json, tables/, figures/, image folders), so a
report can be made on another machine from a copied run folder.
"""

from __future__ import annotations

import base64
import os
import stat
import html
from pathlib import Path
from typing import Any

import cv2
import pandas as pd

from tokenscope.analysis.uncertainty import bounds_text, points
from tokenscope.errors import RunFolderError, TokenscopeError
from tokenscope.render.manifest import read_manifest
from tokenscope.schema import SUMMARY_FIELDS, check_fields, read_json
from tokenscope.storage import resolved_inside
from tokenscope.trace.trace import trace_damage

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} table{border-collapse:collapse;font-size:12.5px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px} .card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px} .card span{font-size:12px;color:#555}
.figs img{max-width:100%;margin:6px 0;border:1px solid #eee} .gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.item{border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px} .item img{width:100%;display:block;margin-bottom:4px}
.warn{background:#fff4d6;border:1px solid #e6c45c;padding:6px 10px;border-radius:4px;font-size:13px}
"""


EMBED_LIMIT = 64 * 2**20
"""The largest picture a report embeds (a GIF of a long clip is a few MB)."""


def embeddable(path: Path, run_dir: Path) -> str | None:
    """Why `path` must not go into a shareable report (a link leading out of the run folder, not a
    regular file, too large), or None when it may."""
    real = resolved_inside(path, run_dir)
    if real is None:
        return f"{path}: a link out of the run folder ({os.path.realpath(path)}), not embedded"
    try:
        st = os.stat(real)
    except OSError as exc:
        return f"{path}: unreadable ({exc.strerror or exc}), not embedded"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: not a regular file, not embedded"
    if st.st_size > EMBED_LIMIT:
        return f"{path}: {st.st_size} bytes, larger than a report embeds ({EMBED_LIMIT}), not embedded"
    return None


def _json_object(path: Path, problems: list[str]) -> dict[str, Any]:
    """A summary file's JSON object, or {} (said in `problems`) when it is missing, unreadable or not one."""
    if not path.is_file():
        return {}
    try:
        doc = read_json(path, path.name)
        check_fields(doc, SUMMARY_FIELDS, path)
    except (OSError, TokenscopeError) as exc:
        problems.append(f"{str(exc).splitlines()[0][:240]}; left out")
        return {}
    return doc


def _embed_file(path: Path, max_width: int | None = None) -> str:
    """The file as a data: URI; PNGs wider than max_width are shrunk and sent as JPEG."""
    if path.suffix.lower() == ".gif":
        return "data:image/gif;base64," + base64.b64encode(path.read_bytes()).decode()
    if max_width is not None:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is not None and img.shape[1] > max_width:
            img = cv2.resize(img, (max_width, int(round(img.shape[0] * max_width / img.shape[1]))), interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
            if ok:
                return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode()
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _table(df: pd.DataFrame, columns: list[str], formats: dict[str, str]) -> str:
    cols = [c for c in columns if c in df.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for r in df[cols].to_dict("records"):  # per-column types: iterrows would turn counts into floats
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float) and v.is_integer() and c not in formats:
                v = int(v)  # counts stored as float because a column has a gap
            try:
                text = formats.get(c, "{}").format(v) if not (isinstance(v, float) and pd.isna(v)) else "-"
            except (ValueError, TypeError):
                text = str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<div style='overflow-x:auto'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _n(value: Any, spec: str) -> str:
    """A number formatted, or "-" when the summary holds something else there (a hand-edited file)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return format(value, spec)


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _cards(s: dict[str, Any]) -> str:
    cards = [("images", _n(s.get("images"), "d") if isinstance(s.get("images"), int) else "-"),
             ("token reduction", f"{_n(s.get('token_reduction'), '.2f')}x"),
             ("tokens merged / pruned / exited", f"{_n(s.get('merged_pct', 0.0), '.1f')}% / "
                                                 f"{_n(s.get('pruned_pct', 0.0), '.1f')}% / "
                                                 f"{_n(s.get('exited_early_pct'), '.1f')}%"),
             ("GFLOPs / image", _n(s.get("gflops_per_image"), ".2f")),
             ("baseline GFLOPs / image", _n(s.get("baseline_gflops_per_image"), ".2f")),
             ("FLOP reduction", f"{_n(s.get('flop_reduction'), '.2f')}x")]

    def ci(key: str, signed: bool = False) -> str:  # the interval beside the number, when there is one
        return bounds_text(_obj(s.get(key)), signed)

    space = _obj(s.get("class_space"))
    tag = "" if not space.get("ignore_mismatch") and not space.get("class_map") else " (classes: see warnings)"
    if "step_miou" in s:
        cards.append((f"mIoU, reduced [95% CI]{tag}", f"{points(s['step_miou'])}{ci('step_miou_ci')}"))
    if "baseline_miou" in s:
        cards.append(("mIoU, no reduction [95% CI]", f"{points(s['baseline_miou'])}{ci('baseline_miou_ci')}"))
    change = _obj(s.get("miou_change_ci"))
    if change.get("value") is not None:
        cards.append((f"mIoU change, paired [95% CI] over {change.get('images')} images",
                      f"{points(change['value'], signed=True)}{ci('miou_change_ci', signed=True)}"))
    return '<div class="cards">' + "".join(f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>'
                                           for k, v in cards) + "</div>"


def build_report(run_dir: Path, gallery: int = 24, animations: int = 6, problems: list[str] | None = None) -> str:
    """The HTML text of the report of `run_dir`; damaged image folders are listed in it and, when
    `problems` is given, collected there one line each (for the terminal). Nothing outside the run
    folder is embedded: a picture that is a link leading out of it is left out and said."""
    refused: list[str] = []

    def _data_uri(path: Path, max_width: int | None = None) -> str:  # noqa: F811 (the checked one)
        why = embeddable(path, run_dir)
        if why is not None:
            refused.append(why)
            return ""
        return _embed_file(path, max_width)

    manifest = read_manifest(run_dir)
    if manifest.get("kind") != "run":
        raise RunFolderError(f"{run_dir}: report works on `tokenscope run` folders (this is a {manifest.get('kind')!r})")
    if manifest.get("status") == "failed":
        raise RunFolderError(f"{run_dir}: every image of this run failed (run.json names each one's error); nothing "
                             "to report")
    if manifest.get("status") != "complete":
        raise RunFolderError(f"{run_dir}: the run is not complete; finish it with `tokenscope run --resume {run_dir}`")
    summary = _json_object(run_dir / "summary.json", refused)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>tokenscope report: {html.escape(run_dir.name)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>Where do the tokens go? {html.escape(run_dir.name)}</h1>",
             "<p class='meta'>Interactive: <a href='explorer.html'>explorer.html</a> (block by block, token by token; "
             f"write it with <code>tokenscope view {html.escape(str(run_dir))}</code> if it is not there yet)</p>",
             "<p class='meta'>" + html.escape(
                 f"model {manifest.get('model')} ({manifest.get('arch')}), weights {manifest.get('weights')}, "
                 + (f"method {manifest['method']}, " if manifest.get("method") else "")
                 + f"policy {manifest.get('policy')}, exits {'on' if manifest.get('exits') else 'off'}, merge thresholds "
                 f"{manifest.get('merge_thresholds')}, exit threshold {manifest.get('exit_threshold')}, device "
                 f"{manifest.get('device')}, finished {manifest.get('finished', '?')}") + "</p>"]
    for w in manifest.get("warnings", []):
        parts.append(f"<p class='warn'>{html.escape(w)}</p>")
    parts.append("<h2>Summary</h2>" + _cards(summary))
    parts.append("<p class='meta'>GFLOPs count 2 FLOPs per multiply-add (policy network included). A token's class is "
                 f"its patches' {html.escape(str(summary.get('class_source', 'class')))} majority.</p>")
    figs = run_dir / "figures"
    captions = {"tokens_per_block": "Tokens entering each encoder block (mean per image), by superpatch level.",
                "token_flow": "Token flow: patches into superpatch levels, then where their tokens leave.",
                "class_levels": "Per class: which superpatch level its patches end up in.",
                "class_fates": "Per class: the share of its patches merged, pruned, exited or reaching the end, by block or gate."}
    if figs.is_dir():
        parts.append("<h2>Figures</h2><div class='figs'>")
        for name, cap in captions.items():
            p = figs / f"{name}.png"
            if p.is_file():
                parts.append(f"<figure><img alt='{name}' src='{_data_uri(p)}'><figcaption class='meta'>{html.escape(cap)}"
                             "</figcaption></figure>")
        parts.append("</div>")
    tables = run_dir / "tables"
    if (tables / "classes.csv").is_file():
        classes = pd.read_csv(tables / "classes.csv")
        parts.append("<h2>Per class</h2>")
        cols = ["name", "patches"] + [f"patches_level{k}" for k in range(5)] + ["tokens"] + \
            [f"patches_{f}" for f in ("merged", "pruned", "exited", "reached_end")] + \
            ["token_blocks_per_patch", "gflops_per_patch", "exited_accuracy", "pruned_accuracy", "iou", "iou_baseline"]
        fmt = {"exited_accuracy": "{:.3f}", "pruned_accuracy": "{:.3f}", "iou": "{:.3f}", "iou_baseline": "{:.3f}",
               "token_blocks_per_patch": "{:.2f}", "gflops_per_patch": "{:.4f}"}
        parts.append(_table(classes, cols, fmt))
    if (tables / "levels.csv").is_file():
        levels = pd.read_csv(tables / "levels.csv")
        parts.append("<h2>Per superpatch level</h2>")
        parts.append(_table(levels, ["level", "side_px", "tokens", "patches", "tokens_merged", "tokens_pruned",
                                     "tokens_exited", "tokens_reached_end", "token_blocks_per_patch", "accuracy"],
                            {"token_blocks_per_patch": "{:.2f}", "accuracy": "{:.3f}"}))
    images = [im for im in manifest.get("images", []) if im.get("folder")]
    errors = [im for im in manifest.get("images", []) if im.get("error")]
    if (tables / "images.csv").is_file():
        per_image = pd.read_csv(tables / "images.csv")
        parts.append("<h2>Per image</h2>")
        parts.append(_table(per_image.head(200), ["image", "patches", "tokens", "reduction", "merged_pct", "pruned_pct", "exited_pct", "gflops",
                                                  "baseline_gflops", "step_miou", "baseline_miou", "agreement", "forward_ms"],
                            {"reduction": "{:.2f}", "merged_pct": "{:.1f}", "pruned_pct": "{:.1f}", "exited_pct": "{:.1f}", "gflops": "{:.2f}", "baseline_gflops": "{:.2f}",
                             "step_miou": "{:.3f}", "baseline_miou": "{:.3f}", "agreement": "{:.3f}", "forward_ms": "{:.0f}"}))
    if errors:
        parts.append("<h2>Images that could not be processed</h2><ul>" +
                     "".join(f"<li>{html.escape(str(e['error']))}</li>" for e in errors) + "</ul>")
    damaged = [d for d in (trace_damage(run_dir / im["folder"]) for im in images) if d]
    if problems is not None:
        problems.extend(damaged)
    if damaged:
        parts.append("<h2>Damaged image folders (their numbers above may be stale; re-run those images)</h2><ul>" +
                     "".join(f"<li>{html.escape(d)}</li>" for d in damaged) + "</ul>")
    parts.append(f"<h2>Gallery ({min(gallery, len(images))} of {len(images)} images)</h2><div class='gallery'>")
    for i, im in enumerate(images[:gallery]):
        d = run_dir / im["folder"]
        parts.append(f"<div class='item'><b>{html.escape(im['folder'])}</b>")
        gif = d / "tokens.gif" if (d / "tokens.gif").is_file() else d / "w00" / "tokens.gif"
        if i < animations and gif.is_file():
            parts.append(f"<img alt='tokens leaving' src='{_data_uri(gif)}'>")
        for kind in ("merge", "exit", "segmentation"):
            p = d / f"{kind}.png"
            if not p.is_file() and (d / "w00" / f"{kind}.png").is_file():
                p = d / "w00" / f"{kind}.png"  # windowed image: its first window's picture
            if p.is_file():
                parts.append(f"<img alt='{kind}' src='{_data_uri(p, max_width=360)}'>")
        s = _json_object(d / "summary.json", refused)
        try:
            parts.append(html.escape(f"{int(s['tokens'])} tokens / {int(s['patches'])} patches "
                                     f"({float(s['reduction']):.2f}x), {float(s.get('merged_pct', 0)):.1f}% merged, "
                                     f"{float(s.get('pruned_pct', 0)):.1f}% pruned, {float(s['exited_early_pct']):.1f}% "
                                     f"exited, {float(s['gflops']):.2f} GFLOPs"))
        except (KeyError, TypeError, ValueError):
            if s:
                refused.append(f"{d / 'summary.json'}: fields missing or of the wrong type; its line is left out")
        parts.append("</div>")
    parts.append("</div></body></html>")
    if problems is not None:
        problems.extend(refused)
    return "\n".join(parts)
