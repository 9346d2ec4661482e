"""How sure a time is: the spread of repeated timings, a speed-up's interval, and a warning when
repeats disagree.

On a shared machine the same forward pass can take twice as long from one call to the next; one
median then looks as sure as a FLOP count. Variants are timed interleaved (repeat r of every variant
before repeat r + 1 of any), so drift hits all alike and repeat r of two variants is a pair. A
speed-up's interval is a percentile bootstrap over those pairs (over images, where each image is timed
once per variant): the draws come from `uncertainty.draws`, the one source of randomness.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tokenscope.analysis.uncertainty import LEVEL, RESAMPLES, SEED, draws

DISAGREE_FACTOR = 1.5
"""Repeats of one variant whose slowest is this many times its fastest make the numbers suspect."""


def spread_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, min and max of repeated timings, in ms, with the count and max/min."""
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    if ms.size == 0:
        return {}
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "max_over_min": float(ms.max() / max(ms.min(), 1e-12)),
            "repeats": int(ms.size)}


def speedup_interval(reference_s: Sequence[float], variant_s: Sequence[float], resamples: int = RESAMPLES,
                     level: float = LEVEL, seed: int = SEED) -> dict[str, Any]:
    """median(reference) / median(variant), with a percentile bootstrap interval over the paired repeats
    (or images): the same draws for both, as they were timed together. Fewer than two pairs: no interval."""
    a = np.asarray(reference_s, dtype=np.float64)
    b = np.asarray(variant_s, dtype=np.float64)
    if a.size != b.size:
        raise ValueError(f"a paired speed-up needs as many reference as variant timings ({a.size} vs {b.size})")
    if a.size == 0:
        return {"value": float("nan"), "low": None, "high": None, "pairs": 0, "level": level}
    value = float(np.median(a) / np.median(b))
    if a.size < 2:
        return {"value": value, "low": None, "high": None, "pairs": int(a.size), "level": level}
    idx = draws(a.size, resamples, seed)
    samples = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return {"value": value, "low": float(low), "high": float(high), "pairs": int(a.size), "level": level,
            "resamples": resamples, "seed": seed}


def disagreement(name: str, seconds: Sequence[float], factor: float = DISAGREE_FACTOR) -> str | None:
    """One line when the repeats of `name` disagree by more than `factor` (slowest over fastest)."""
    s = spread_ms(seconds)
    if not s or s["repeats"] < 2 or s["max_over_min"] <= factor:
        return None
    return (f"timing: {name}'s {s['repeats']} repeats range {s['min_ms']:.0f} to {s['max_ms']:.0f} ms "
            f"({s['max_over_min']:.1f}x, over the {factor:g}x limit): the machine was busy or its clock changed; "
            "treat its times and speed-ups as rough (re-run with more --repeats on an idle machine)")


def per_repeat_totals(runs_per_image: Sequence[Sequence[float]]) -> list[float]:
    """Repeat r's time summed over the images (each image's variants were timed interleaved, so repeat r
    of two variants is a pair on every image)."""
    if not runs_per_image:
        return []
    n = min(len(r) for r in runs_per_image)
    return [float(sum(r[k] for r in runs_per_image)) for k in range(n)]


def paired_timing(reference: Sequence[Sequence[float]], variant: Sequence[Sequence[float]], name: str,
                  reference_name: str = "the unreduced model") -> tuple[dict[str, Any], list[str]]:
    """Flat columns for a table row: the speed-up's 95% interval over the interleaved repeats
    (`speedup_low`, `speedup_high`, `speedup_pairs`) and the quartiles of the variant's per-repeat total
    latency (`latency_q1_ms`, `latency_q3_ms`); and warnings when either's repeats disagree."""
    ref, var = per_repeat_totals(reference), per_repeat_totals(variant)
    ci = speedup_interval(ref, var) if ref and var else {"low": None, "high": None, "pairs": 0}
    s = spread_ms([t / 1e3 for t in var])
    warnings = [w for w in (disagreement(reference_name, [t / 1e3 for t in ref]),
                            disagreement(name, [t / 1e3 for t in var])) if w]
    nan = float("nan")
    return {"speedup_low": nan if ci["low"] is None else ci["low"], "speedup_high": nan if ci["high"] is None else ci["high"],
            "speedup_pairs": ci["pairs"], "latency_q1_ms": s.get("q1_ms", nan), "latency_q3_ms": s.get("q3_ms", nan)}, warnings


def throughput_interval(seconds_per_image: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL,
                        seed: int = SEED) -> tuple[float, float]:
    """(low, high) of images/s = n / total time, a percentile bootstrap over the images (NaN with fewer than two)."""
    t = np.asarray(seconds_per_image, dtype=np.float64)
    if t.size < 2:
        return float("nan"), float("nan")
    idx = draws(t.size, resamples, seed)
    samples = t.size / t[idx].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(samples, [alpha, 1 - alpha])
    return float(low), float(high)
