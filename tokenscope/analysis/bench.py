"""Speed of STEP against the same network without reduction, measured in one run as ratios.

Per variant: one untimed pass under torch's FLOP counter and a peak-memory probe (it doubles as
warm-up), further warm-up passes, then timed passes interleaved between the variants so that
drift in the machine's speed hits both alike. Also measured: the Recorder's overhead (the STEP
pass with and without hooks, interleaved), the active policy's share of the baseline's time and
FLOPs, the learned dCTS policy network's share, and optionally one-image-at-a-time processing
of the same batch (what the padded batched path is for).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch

from tokenscope.analysis.memory import LiveTensorBytes
from tokenscope.analysis.stability import spread
from tokenscope.analysis.timing_spread import disagreement, speedup_interval, spread_ms
from tokenscope.errors import TokenscopeError
from tokenscope.models.cost import measure_flops
from tokenscope.models.host_sync import count_host_syncs
from tokenscope.models.runtime import allocator_note, inference, keep_freed_memory, synchronize
from tokenscope.models.step_vit import ReductionSetting, StepViT
from tokenscope.trace.recorder import ImageRecord, Recorder

Progress = Callable[[int, int, str], None]


def _timing_dict(v: "VariantTiming") -> dict[str, Any]:
    """A variant's timing as JSON values: its setting described, not its modules."""
    out = {f.name: getattr(v, f.name) for f in fields(v) if f.name != "setting"}
    out["setting"] = None if v.setting is None else v.setting.describe()
    return out


@dataclass
class VariantTiming:
    name: str
    policy: str
    exits: bool
    setting: ReductionSetting | None = None
    """The whole operating point timed (merging included)."""
    method: str = ""
    tokens_per_image: float = 0.0
    """Tokens entering the encoder (the policy's partition)."""
    mean_tokens_per_block: float = 0.0
    """Tokens the average block works on per image, exits and in-block merges included."""
    gflops_per_image: float = 0.0
    peak_mib: float = 0.0
    host_syncs: int = 0
    """Host synchronisations in one forward (models/host_sync.py: torch's count on CUDA, else the calls that
    hand values to the host, which are the ones that synchronise on a GPU)."""
    host_sync_calls: dict[str, int] = field(default_factory=dict)
    padding_pct: float = 0.0
    """Share of the padded batch's slots that are padding (images of one batch padded to the longest). Blocks
    without a step inside run the real tokens only (EncoderBlock._packed), so this is what packing spares;
    a block with a step inside runs its attention over every slot."""
    latencies_s: list[float] = field(default_factory=list)

    @property
    def latency_ms(self) -> float:
        return 1e3 * statistics.median(self.latencies_s)

    def images_per_s(self, batch: int) -> float:
        return batch / statistics.median(self.latencies_s)

    def latency_tail(self) -> dict[str, float]:
        """p50/p90/p95/p99/max of the timed repeats, in ms (numpy's linear percentiles; with few
        repeats the high percentiles are close to the maximum, which they then say)."""
        ms = 1e3 * np.asarray(self.latencies_s, dtype=np.float64)
        if ms.size == 0:
            return {}
        return {**spread(ms), "repeats": int(ms.size)}


@dataclass
class BenchResult:
    batch: int
    size: tuple[int, int]
    device: str
    threads: int
    amp: bool
    baseline: VariantTiming
    step: VariantTiming
    model: str = ""
    """The model's name (its config's: a folder's or a checkpoint's, not just what --model said)."""
    recorder_on_s: list[float] = field(default_factory=list)
    recorder_off_s: list[float] = field(default_factory=list)
    policy_s: list[float] = field(default_factory=list)
    policy_gflops: float = 0.0
    learned_net_s: list[float] = field(default_factory=list)
    learned_net_gflops: float = 0.0
    loop_s: list[float] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.baseline.latency_ms / self.step.latency_ms

    @property
    def flop_reduction(self) -> float:
        return self.baseline.gflops_per_image / self.step.gflops_per_image

    @property
    def quotient(self) -> float:
        """Speed-up per unit of FLOP reduction: 1.0 means time falls exactly as FLOPs do."""
        return self.speedup / self.flop_reduction

    @property
    def recorder_overhead_pct(self) -> float:
        if not self.recorder_on_s:
            return float("nan")
        return 100.0 * (statistics.median(self.recorder_on_s) / statistics.median(self.recorder_off_s) - 1.0)

    def speedup_interval(self) -> dict[str, Any]:
        """The speed-up with its 95% interval over the interleaved repeat pairs."""
        return speedup_interval(self.baseline.latencies_s, self.step.latencies_s)

    def warnings(self) -> list[str]:
        """One line per variant whose repeats disagree by more than the limit (a busy machine)."""
        return [w for w in (disagreement(v.name, v.latencies_s) for v in (self.baseline, self.step)) if w]

    def share_pct(self, seconds: list[float]) -> float:
        return 100.0 * statistics.median(seconds) / statistics.median(self.baseline.latencies_s) if seconds else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "batch": self.batch, "size": list(self.size), "device": self.device, "threads": self.threads, "amp": self.amp,
            "baseline": {**_timing_dict(self.baseline), "latency_ms": self.baseline.latency_ms,
                         "images_per_s": self.baseline.images_per_s(self.batch), "latency_tail": self.baseline.latency_tail()},
            "step": {**_timing_dict(self.step), "latency_ms": self.step.latency_ms, "images_per_s": self.step.images_per_s(self.batch),
                     "latency_tail": self.step.latency_tail()},
            "speedup": self.speedup, "flop_reduction": self.flop_reduction, "speedup_over_flop_reduction": self.quotient,
            "speedup_ci": self.speedup_interval(),
            "timing": {"interleaved": True, "baseline": spread_ms(self.baseline.latencies_s),
                       "step": spread_ms(self.step.latencies_s)},
            "warnings": self.warnings(),
            "recorder_overhead_pct": self.recorder_overhead_pct,
            "policy_time_pct_of_baseline": self.share_pct(self.policy_s),
            "policy_flops_pct_of_baseline": 100.0 * self.policy_gflops / max(self.baseline.gflops_per_image * self.batch, 1e-12),
            "learned_policy_net_time_pct_of_baseline": self.share_pct(self.learned_net_s),
            "learned_policy_net_flops_pct_of_baseline":
                100.0 * self.learned_net_gflops / max(self.baseline.gflops_per_image * self.batch, 1e-12),
            "one_at_a_time_ms": 1e3 * statistics.median(self.loop_s) if self.loop_s else None,
            "raw_seconds": {"recorder_off": self.recorder_off_s, "recorder_on": self.recorder_on_s,
                            "policy": self.policy_s, "learned_policy_net": self.learned_net_s, "one_at_a_time": self.loop_s},
            "environment": self.environment,
        }


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def _probe(fn: Callable[[], Any], device: torch.device) -> tuple[int, int, Any]:
    """One pass under the FLOP counter, with peak memory: (flops, peak bytes, result)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        flops, _, out = measure_flops(fn)
        synchronize(device)
        return flops, int(torch.cuda.max_memory_allocated(device) - before), out
    with LiveTensorBytes() as mem:
        flops, _, out = measure_flops(fn)
    return flops, mem.peak, out


def padding_share(records: list[ImageRecord]) -> float:
    """Share of the padded batch's slots that are padding: in each block every image is padded to the
    batch's longest, so the padded layout holds batch x longest slots for the sum of the images' tokens."""
    tokens = np.stack([r.block_tokens_in for r in records]).astype(np.float64)  # (B, depth)
    slots = tokens.max(axis=0) * tokens.shape[0]
    return float(1.0 - tokens.sum() / slots.sum()) if slots.sum() > 0 else 0.0


def _block_tokens(record: ImageRecord) -> float:
    """Mean tokens per block of one image: entering, and after an in-block merge, averaged."""
    tin = record.block_tokens_in.astype(np.float64)
    mid = tin if record.block_tokens_mid is None else record.block_tokens_mid.astype(np.float64)
    return float(((tin + mid) / 2).mean())


def environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(), "threads": str(torch.get_num_threads())}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["allocator"] = allocator_note()
    return env


class _Ticks:
    """Counts the passes a bench has done of the `total` it will do, for its progress bar."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(min(self.done, self.total), self.total, what)


def _measure(model: StepViT, images: torch.Tensor, device: torch.device, v: VariantTiming, warmup: int,
             tick: Callable[[str], None]) -> None:
    """Everything but the timing of one variant: FLOPs and peak memory in one counted pass (also its
    first warm-up), tokens per block and the padding share from the Recorder, host synchronisations in
    one more pass; then the rest of its warm-up passes."""
    b = images.shape[0]

    def call() -> Any:
        return model(images, setting=v.setting)

    flops, peak, out = _probe(call, device)
    v.gflops_per_image, v.peak_mib = flops / 1e9 / b, peak / 2**20
    v.tokens_per_image = sum(p.num_tokens for p in out.partitions) / b
    with Recorder(model, v.setting) as probe:
        call()
        records = probe.pop_records()
        v.mean_tokens_per_block = float(np.mean([_block_tokens(r) for r in records]))
        v.padding_pct = 100.0 * padding_share(records)
    with count_host_syncs(device) as syncs:
        call()
    v.host_syncs, v.host_sync_calls = syncs.total, dict(syncs.calls)
    tick(f"{v.name} probe")
    for _ in range(max(warmup - 1, 0)):
        call()
        tick(f"{v.name} warm-up")


def run_bench(model: StepViT, images: torch.Tensor, device: torch.device, step_setting: ReductionSetting,
              repeats: int = 3, warmup: int = 1, amp: bool = False, recorder_repeats: int | None = None,
              loop: bool = False, progress: Progress | None = None) -> BenchResult:
    """Benchmark an operating point (policy, exits and any in-network merging) against the same
    weights without reduction; each forward is given its setting, nothing is set on the model. On the
    CPU freed memory is kept in the process first (runtime.keep_freed_memory, recorded in `environment`)."""
    if device.type == "cpu":
        keep_freed_memory()
    b = images.shape[0]
    variants = {"baseline": VariantTiming("baseline", "none", False, step_setting.plain(), "vit"),
                "step": VariantTiming("step", step_setting.policy, step_setting.exits, step_setting,
                                      step_setting.method)}
    result = BenchResult(b, (int(images.shape[-2]), int(images.shape[-1])), str(device), torch.get_num_threads(),
                         amp and device.type == "cuda", variants["baseline"], variants["step"],
                         environment=environment(device))
    calls: dict[str, Callable[[], Any]] = {}
    for v in variants.values():
        def call(v: VariantTiming = v) -> Any:
            return model(images, setting=v.setting)
        calls[v.name] = call
    rec_repeats = repeats if recorder_repeats is None else recorder_repeats
    tick = _Ticks(2 * max(warmup, 1) + 2 * repeats + rec_repeats + repeats + (repeats if loop else 0), progress)

    with inference(device, amp):
        for v in variants.values():
            _measure(model, images, device, v, warmup, tick)
        rec = Recorder(model, step_setting)
        with rec:  # warm the hooked path too (it matters once blocks are compiled)
            model(images, setting=step_setting)
            rec.pop_records()
        for _ in range(repeats):
            for v in variants.values():
                v.latencies_s.append(_timed(calls[v.name], device))
                tick(f"{v.name} timed")
        for _ in range(rec_repeats):
            result.recorder_off_s.append(_timed(lambda: model(images, setting=step_setting), device))
            rec.attach()
            result.recorder_on_s.append(_timed(lambda: (model(images, setting=step_setting), rec.pop_records()),
                                               device))
            rec.detach()
            tick("recorder on/off")
        policy = model.policy_of(step_setting)
        learned = model.policies["learned"].net
        result.policy_gflops = measure_flops(lambda: policy.score(images, None))[0] / 1e9
        result.learned_net_gflops = measure_flops(lambda: learned(images))[0] / 1e9
        for _ in range(repeats):
            result.policy_s.append(_timed(lambda: policy(images), device))
            result.learned_net_s.append(_timed(lambda: learned(images), device))
            tick("policy")
        if loop:
            for _ in range(repeats):
                result.loop_s.append(_timed(lambda: [model(images[i:i + 1], setting=step_setting) for i in range(b)],
                                            device))
                tick("one at a time")
    return result


@dataclass
class MethodsBenchResult:
    """Several operating points against one unreduced baseline, on one batch, timed side by side."""

    batch: int
    size: tuple[int, int]
    device: str
    threads: int
    amp: bool
    baseline: VariantTiming
    points: list[VariantTiming]
    failed: dict[str, str] = field(default_factory=dict)
    """Operating points whose plug-in failed (label -> its one line): not timed, said in the results."""
    model: str = ""
    environment: dict[str, str] = field(default_factory=dict)

    def ratios(self, v: VariantTiming) -> dict[str, Any]:
        """Speed-up (with its interval over the interleaved rounds), FLOP reduction and their quotient."""
        speedup = self.baseline.latency_ms / v.latency_ms
        reduction = self.baseline.gflops_per_image / v.gflops_per_image
        return {"speedup": speedup, "flop_reduction": reduction, "speedup_over_flop_reduction": speedup / reduction,
                "speedup_ci": speedup_interval(self.baseline.latencies_s, v.latencies_s)}

    def warnings(self) -> list[str]:
        return [w for w in (disagreement(v.name, v.latencies_s) for v in (self.baseline, *self.points)) if w]

    def summary(self) -> dict[str, Any]:
        def timing(v: VariantTiming) -> dict[str, Any]:
            return {**_timing_dict(v), "latency_ms": v.latency_ms, "images_per_s": v.images_per_s(self.batch),
                    "latency_tail": v.latency_tail()}

        return {"model": self.model, "batch": self.batch, "size": list(self.size), "device": self.device,
                "threads": self.threads, "amp": self.amp, "timing": {"interleaved": True, "rounds": len(
                    self.baseline.latencies_s)},
                "baseline": timing(self.baseline),
                "points": [{**timing(v), **self.ratios(v)} for v in self.points],
                "failed": dict(self.failed), "warnings": self.warnings(), "environment": self.environment}


def run_methods_bench(model: StepViT, images: torch.Tensor, device: torch.device,
                      points: list[tuple[str, ReductionSetting]], repeats: int = 3, warmup: int = 1, amp: bool = False,
                      progress: Progress | None = None) -> MethodsBenchResult:
    """Each operating point (label, setting) and the same weights without reduction on one batch: the
    counted FLOPs, tokens, padding and host synchronisations of each, then `repeats` rounds that time
    the baseline and every point in turn, so a machine that slows down slows them all alike. A point
    whose plug-in fails is marked failed (its line kept) and the others are still measured. On the CPU freed
    memory is kept in the process first, as in run_bench."""
    if device.type == "cpu":
        keep_freed_memory()
    baseline = VariantTiming("baseline", "none", False, points[0][1].plain() if points else None, "vit")
    variants = [VariantTiming(label, setting.policy, setting.exits, setting, label) for label, setting in points]
    result = MethodsBenchResult(images.shape[0], (int(images.shape[-2]), int(images.shape[-1])), str(device),
                                torch.get_num_threads(), amp and device.type == "cuda", baseline, [],
                                environment=environment(device))
    tick = _Ticks((1 + len(variants)) * (max(warmup, 1) + repeats), progress)

    with inference(device, amp):
        _measure(model, images, device, baseline, warmup, tick)
        for v in variants:
            try:
                _measure(model, images, device, v, warmup, tick)
            except TokenscopeError as exc:  # a plug-in that fails: said, the other points go on
                result.failed[v.name] = str(exc)
                continue
            result.points.append(v)
        for _ in range(repeats):
            for v in (baseline, *result.points):
                v.latencies_s.append(_timed(lambda v=v: model(images, setting=v.setting), device))
                tick(f"{v.name} timed")
    return result
