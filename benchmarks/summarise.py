"""Print the Markdown table of benchmarks/RESULTS.md from the JSON files `tokenscope bench --json` wrote.

    .venv/bin/python benchmarks/summarise.py [--times TIMES.tsv] benchmarks/results/*.json

One row per file, in the order given; every number is read from the file, none is typed by hand.
A file `bench --methods` wrote (several operating points against one baseline) is printed as its own
table, one row per operating point, after the others.
`--times` adds the wall seconds each row took (scripts/gpu_check.sh writes that file: file name,
seconds, status per line), so a short GPU lease can be planned from the last one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("model", "size", "batch", "device", "STEP", "tokens/img", "tokens/block", "GFLOPs/img", "latency ms", "images/s",
           "peak MiB", "speed-up", "FLOP reduction", "quotient", "recorder", "policy net (time / FLOPs)",
           "batch vs loop")


def _pair(base: float, step: float, fmt: str) -> str:
    return f"{format(base, fmt)} -> {format(step, fmt)}"


def _device(r: dict[str, Any]) -> str:
    """The device column: the CPU with its threads, or the GPU; bf16 when autocast was on."""
    device = f"{r['device']} ({r['threads']} thr)" if r["device"] == "cpu" else r["device"]
    return device + " bf16" if r.get("amp") else device


def row(r: dict[str, Any]) -> list[str]:
    """A `bench` file (one operating point against the baseline): one row."""
    b, s = r["baseline"], r["step"]
    if r.get("method"):
        variant = f"method {r['method']}"
    else:
        variant = f"budget {r['budget']}x" if r["policy"] == "budget" else r["policy"]
        variant += ", exits" if s["exits"] else ", no exits"
    per_block = (_pair(b["mean_tokens_per_block"], s["mean_tokens_per_block"], ".0f")
                 if "mean_tokens_per_block" in s else "-")  # files written before methods existed lack it
    loop = r.get("one_at_a_time_ms")
    loop_text = f"{s['latency_ms']:.0f} vs {loop:.0f} ms" if loop else "-"  # both: the whole batch
    net_time = r.get("learned_policy_net_time_pct_of_baseline")
    net_flops = r.get("learned_policy_net_flops_pct_of_baseline")
    net = f"{net_time:.2f}% / {net_flops:.2f}%" if net_time is not None else "-"
    return [r["model"], f"{r['size'][0]}x{r['size'][1]}", str(r["batch"]), _device(r), variant,
            _pair(b["tokens_per_image"], s["tokens_per_image"], ".0f"), per_block,
            _pair(b["gflops_per_image"], s["gflops_per_image"], ".1f"),
            _pair(b["latency_ms"], s["latency_ms"], ".0f"),
            _pair(b["images_per_s"], s["images_per_s"], ".3g"),
            _pair(b["peak_mib"], s["peak_mib"], ".0f"),
            f"{r['speedup']:.2f}x", f"{r['flop_reduction']:.2f}x", f"{r['speedup_over_flop_reduction']:.2f}",
            f"{r['recorder_overhead_pct']:+.1f}%", net, loop_text]


POINT_COLUMNS = ("model", "size", "batch", "device", "operating point", "tokens/block", "GFLOPs/img", "latency ms",
                 "speed-up [95% CI]", "FLOP reduction", "quotient", "padding", "host syncs")


def point_rows(r: dict[str, Any]) -> list[list[str]]:
    """A `bench --methods` file: the baseline, then one row per operating point, in the file's order."""
    head = [r["model"], f"{r['size'][0]}x{r['size'][1]}", str(r["batch"]), _device(r)]
    b = r["baseline"]
    rows = [[*head, "baseline (vit)", f"{b['mean_tokens_per_block']:.0f}", f"{b['gflops_per_image']:.1f}",
             f"{b['latency_ms']:.0f}", "1.00x", "1.00x", "-", "-", str(b["host_syncs"])]]
    for p in r["points"]:
        ci = p.get("speedup_ci") or {}
        interval = f" [{ci['low']:.2f}, {ci['high']:.2f}]" if ci.get("low") is not None else ""
        rows.append([*head, p["name"], f"{p['mean_tokens_per_block']:.0f}", f"{p['gflops_per_image']:.1f}",
                     f"{p['latency_ms']:.0f}", f"{p['speedup']:.2f}x{interval}", f"{p['flop_reduction']:.2f}x",
                     f"{p['speedup_over_flop_reduction']:.2f}", f"{p['padding_pct']:.1f}%", str(p["host_syncs"])])
    for name, line in (r.get("failed") or {}).items():
        rows.append([*head, f"{name} (failed: {line})", *["-"] * 8])
    return rows


def read_times(path: Path) -> dict[str, str]:
    """file name -> seconds the row took, from gpu_check.sh's tab-separated times file."""
    times = {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            times[parts[0]] = parts[1]
    return times


def main(args: list[str]) -> None:
    times: dict[str, str] | None = None
    if args[:1] == ["--times"]:
        times = read_times(Path(args[1]))
        args = args[2:]
    docs = {p: json.loads(Path(p).read_text()) for p in args}
    several = [p for p in args if "points" in docs[p]]
    single = [p for p in args if p not in several]
    if single:
        columns = [*COLUMNS, "row s"] if times is not None else list(COLUMNS)
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for p in single:
            cells = row(docs[p])
            if times is not None:
                cells.append(times.get(Path(p).name, "-"))
            print("| " + " | ".join(cells) + " |")
    if several:
        print("" if not single else "\n", end="")
        print("| " + " | ".join(POINT_COLUMNS) + " |")
        print("|" + "---|" * len(POINT_COLUMNS))
        for p in several:
            for cells in point_rows(docs[p]):
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
