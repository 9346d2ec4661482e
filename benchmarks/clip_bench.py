"""A video run's frame rate against the model alone, on the same frames of the same clip.

    .venv/bin/python benchmarks/clip_bench.py [--size 512] [--frames 240] [--repeats 3] [--device cpu]
                                              [--no-figures] [--out benchmarks/results/clip_cpu.json]
    .venv/bin/python benchmarks/clip_bench.py --table benchmarks/results/clip_cpu_*.json   # README table

The clip is a synthetic street scene filmed by a camera panning right (the scene generator, no
download), written as Motion-JPEG AVI into a temporary folder. Two ways through its frames, with
the same loaded model (the demo unless --model) on the same device:

- **model alone**: what a deployment runs without tokenscope: decode the frame, prepare it, the
  model's forward pass, its label map (logits upsampled to the image, argmax) on the host;
- **run**: `tokenscope run CLIP` as the command does it (figures on unless --no-figures): traces
  recorded through hooks, one folder per frame, then the run's tables and figures, the clip's
  frame table, timeline and overlay video. Timed from the first frame to `run.json` marked
  complete, so the derived outputs count; loading the model counts in neither.

Model-alone passes and runs alternate (--repeats pairs); each run is compared with the faster of
the passes just before and after it, so a slow moment of a shared machine cannot flatter the
ratio, and the median ratio is reported with the smallest and largest.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import torch

from tokenscope.data.images import prepare_image
from tokenscope.data.synthetic import synthetic_scene
from tokenscope.data.video import FrameReader, probe
from tokenscope.jobs.run import RunRequest, run_job
from tokenscope.jobs.setup import ModelOptions, load_model
from tokenscope.models.runtime import inference, synchronize
from tokenscope.models.step_vit import segment
from tokenscope.trace.capture import images_to_tensor

ROOT = Path(__file__).resolve().parents[1]


def write_clip(path: Path, size: int, frames: int, step: int = 8, fps: float = 25.0) -> None:
    """A camera panning `step` pixels a frame across one wide synthetic street scene."""
    scene = synthetic_scene(5000001, size, size + (frames - 1) * step)
    rgb = (np.clip(scene.image, 0, 1) * 255).round().astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
    for k in range(frames):
        writer.write(cv2.cvtColor(np.ascontiguousarray(rgb[:, step * k:step * k + size]), cv2.COLOR_RGB2BGR))
    writer.release()


def model_alone(clip: Path, loaded, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    """Seconds to turn every frame into a label map with the model alone."""
    model, patch = loaded.model, loaded.model.patch_size
    info = probe(clip)
    reader = FrameReader(info)
    start = time.perf_counter()
    with inference(device):
        for index in range(info.frames):
            prepared = prepare_image(reader.frame(index), f"{clip}#frame={index}", patch=patch)
            x, _ = images_to_tensor([prepared], device)
            out = model(x, None, setting=loaded.setting)  # the operating point the run resolved
            segment(out.patch_logits, prepared.padded_hw, prepared.input_hw)[0].cpu().numpy()
    synchronize(device)
    reader.close()
    return time.perf_counter() - start


def timed_run(clip: Path, opts: ModelOptions, loaded, device: torch.device, out: Path,  # type: ignore[no-untyped-def]
              figures: bool) -> tuple[float, float, float, int]:
    """(run seconds, of which tracing the frames, forward passes inside, frames traced)."""
    req = RunRequest(inputs=[str(clip)], model=asdict(opts), figures=figures)
    frames_done: list[float] = []

    def progress(done: int, total: int, _: str) -> None:
        if done == total:
            frames_done.append(time.perf_counter())

    start = time.perf_counter()
    result = run_job(req, out, model=(loaded, device), progress=progress)
    run_s = time.perf_counter() - start
    forward_s = float(result.tables.images["forward_ms"].sum()) / 1e3 if result.tables is not None else float("nan")
    return run_s, frames_done[-1] - start, forward_s, sum(1 for r in result.images if r.error is None)


def table(files: list[Path]) -> str:
    """The README's table, from result files (so no number is typed by hand)."""
    lines = ["| clip | figures | model alone, frames/s | run, frames/s | run / model alone: median (min-max) | measured |",
             "|---|---|---|---|---|---|"]
    for f in files:
        n = json.loads(f.read_text())
        c, runs = n["clip"], n["runs"]
        alone = sorted(c["frames"] / r["model_alone_s"] for r in runs)
        run = sorted(c["frames"] / r["run_s"] for r in runs)
        lines.append(f"| {c['frames']} frames, {c['size']} px | {'on' if c['figures'] else 'off'} | {alone[len(alone) // 2]:.1f} "
                     f"| {run[len(run) // 2]:.1f} | **{n['ratio_median']:.2f}** ({n['ratio_min']:.2f}-{n['ratio_max']:.2f}) "
                     f"| {n['measured']}, {n['machine']} |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--table"]:
        print(table([Path(a) for a in sys.argv[2:]]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--repeats", type=int, default=3, help="model-alone / run pairs (the median ratio is reported)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the numbers")
    args = ap.parse_args()
    opts = ModelOptions(model=args.model, device=args.device)
    loaded, device = load_model(opts, have_labels=False)
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "pan.avi"
        write_clip(clip, args.size, args.frames)
        model_alone(clip, loaded, device)  # warm-up: first calls allocate and pick kernels
        alone = [model_alone(clip, loaded, device)]
        for k in range(args.repeats):
            run_s, frames_s, forward_s, traced = timed_run(clip, opts, loaded, device, Path(tmp) / f"runs{k}",
                                                           not args.no_figures)
            alone.append(model_alone(clip, loaded, device))
            reference = min(alone[-2], alone[-1])  # the faster pass beside this run
            pairs.append({"run_s": run_s, "frames_s": frames_s, "derive_s": run_s - frames_s, "forward_s": forward_s,
                          "traced": traced, "model_alone_s": reference, "ratio": reference / run_s})
    ratios = sorted(p["ratio"] for p in pairs)
    median = ratios[len(ratios) // 2]
    machine = (f"{platform.machine()}, {torch.get_num_threads()} threads" if device.type == "cpu"
               else torch.cuda.get_device_name(device))
    numbers = {
        "clip": {"size": args.size, "frames": args.frames, "figures": not args.no_figures},
        "model": args.model, "device": str(device), "machine": machine, "model_alone_s": alone, "runs": pairs,
        "ratio_median": median, "ratio_min": ratios[0], "ratio_max": ratios[-1], "measured": time.strftime("%Y-%m-%d"),
    }
    print(f"{args.frames} frames at {args.size} px, {machine}, figures {'off' if args.no_figures else 'on'}")
    for k, p in enumerate(pairs):
        print(f"  pair {k + 1}: model alone {args.frames / p['model_alone_s']:6.2f} frames/s, run {args.frames / p['run_s']:6.2f} "
              f"frames/s ({p['frames_s']:.2f} s tracing + {p['derive_s']:.2f} s tables, figures, video; forward passes "
              f"{p['forward_s']:.2f} s)  ratio {p['ratio']:.3f}")
    print(f"  run / model alone: median {median:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f})")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(numbers, indent=1) + "\n")


if __name__ == "__main__":
    main()
