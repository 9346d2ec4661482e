"""Synthetic street scenes with exact label maps, deterministic from a seed.

They exist because no segmentation data set can be downloaded here, and because they are exactly
what token reduction feeds on: large uniform regions (sky, road) next to small detailed objects
(people, poles, vehicles), with textures, noise, gradients and lighting changes so that "uniform"
is a learned notion rather than a flat colour. The same seed always gives the same scene at a given
size; layouts, sizes and colours vary between seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CLASSES = ("sky", "building", "vegetation", "road", "sidewalk", "vehicle", "person", "pole")
SKY, BUILDING, VEGETATION, ROAD, SIDEWALK, VEHICLE, PERSON, POLE = range(len(CLASSES))
CLASS_COLOURS = ((70, 130, 180), (70, 70, 70), (107, 142, 35), (128, 64, 128), (244, 35, 232), (0, 0, 142),
                 (220, 20, 60), (250, 170, 30))
"""RGB per class, after the Cityscapes colours of the same classes."""


@dataclass(frozen=True)
class Scene:
    """An RGB image in [0, 1] (H, W, 3) float32 and its int32 label map (H, W)."""

    image: np.ndarray
    labels: np.ndarray
    seed: int


def _noise_texture(rng: np.random.Generator, h: int, w: int, scale: float, amp: float) -> np.ndarray:
    """Smooth random texture: white noise blurred at `scale` pixels, amplitude `amp`."""
    base = rng.standard_normal((h, w)).astype(np.float32)
    k = max(1, int(scale)) | 1
    tex = cv2.GaussianBlur(base, (k, k), scale / 2.0) if k > 1 else base
    tex /= tex.std() + 1e-6
    return tex * amp


def _paint(img: np.ndarray, lab: np.ndarray, mask: np.ndarray, colour: np.ndarray, cls: int,
           texture: np.ndarray | None = None) -> None:
    pix = np.broadcast_to(colour, (int(mask.sum()), 3))
    img[mask] = pix + texture[mask][:, None] if texture is not None else pix
    lab[mask] = cls


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32), 0, 1)


def synthetic_scene(seed: int, height: int = 512, width: int = 512) -> Scene:
    """One street scene; see the module docstring."""
    rng = np.random.default_rng(seed)
    h, w = height, width
    img = np.zeros((h, w, 3), np.float32)
    lab = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fine, medium = _noise_texture(rng, h, w, 1.5, 1.0), _noise_texture(rng, h, w, 3, 1.0)

    def tex(kind: np.ndarray, amp: float) -> np.ndarray:
        """A shared texture, shifted at random so objects do not share a pattern."""
        return np.roll(kind, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1)) * amp

    horizon = int(h * rng.uniform(0.35, 0.6))

    # sky: vertical gradient, soft clouds
    top, bottom = _jitter(rng, (0.35, 0.55, 0.85), 0.12), _jitter(rng, (0.7, 0.8, 0.92), 0.08)
    t = (yy / max(horizon, 1)).clip(0, 1)[..., None]
    img[:] = top * (1 - t) + bottom * t
    if rng.random() < 0.7:
        clouds = _noise_texture(rng, h, w, scale=max(h, w) / 8, amp=1.0)
        img += (np.clip(clouds - 0.6, 0, None) * 0.25)[..., None]
    lab[:] = SKY

    # buildings along the horizon, with window grids
    x = int(rng.integers(-w // 10, w // 20))
    while x < w:
        bw = int(rng.uniform(0.12, 0.35) * w)
        if rng.random() < 0.2:  # a gap: sky stays visible down to the horizon
            x += bw // 2
            continue
        top_y = int(horizon - rng.uniform(0.1, 0.9) * horizon)
        facade = _jitter(rng, (0.55, 0.5, 0.45), 0.2)
        mask = np.zeros((h, w), bool)
        mask[max(top_y, 0):horizon + 2, max(x, 0):min(x + bw, w)] = True
        _paint(img, lab, mask, facade, BUILDING, tex(medium, 0.03))
        win = facade * rng.uniform(0.4, 0.7)
        step_x, step_y = int(rng.uniform(10, 22)), int(rng.uniform(12, 26))
        for wy in range(max(top_y, 0) + 6, horizon - 8, step_y):
            for wx in range(max(x, 0) + 5, min(x + bw, w) - 8, step_x):
                img[wy:wy + step_y // 2, wx:wx + step_x // 2] = win
        x += bw

    # vegetation: tree crowns and hedges, strongly textured
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = int(rng.uniform(0, w)), int(horizon - rng.uniform(0, 0.35) * h)
        r = int(rng.uniform(0.05, 0.14) * max(h, w))
        mask = ((xx - cx) ** 2 / r**2 + (yy - cy) ** 2 / (0.8 * r) ** 2) <= 1
        _paint(img, lab, mask, _jitter(rng, (0.2, 0.45, 0.15), 0.08), VEGETATION, tex(medium, 0.07))
        trunk = (np.abs(xx - cx) < max(2, r // 8)) & (yy > cy) & (yy < horizon + 4)
        _paint(img, lab, trunk & (lab != VEGETATION), _jitter(rng, (0.3, 0.2, 0.1), 0.05), VEGETATION)

    # ground: sidewalk strip, then road widening towards the viewer, with lane marks
    side_h = int(rng.uniform(0.03, 0.08) * h)
    ground = yy >= horizon
    _paint(img, lab, ground, _jitter(rng, (0.62, 0.6, 0.58), 0.06), SIDEWALK, tex(fine, 0.025))
    vp = rng.uniform(0.3, 0.7) * w
    spread = (yy - horizon - side_h).clip(0, None) / max(h - horizon, 1)
    half = 0.08 * w + spread * rng.uniform(0.7, 1.3) * w
    road = ground & (yy >= horizon + side_h) & (np.abs(xx - vp) <= half)
    _paint(img, lab, road, _jitter(rng, (0.3, 0.3, 0.32), 0.06), ROAD, tex(fine, 0.02))
    dash = road & (np.abs(xx - vp) < 1 + 0.012 * (yy - horizon)) & ((yy // max(4, h // 40)) % 2 == 0)
    img[dash] = np.clip(img[dash] + 0.45, 0, 1)

    # poles
    for _ in range(int(rng.integers(0, 4))):
        px = int(rng.uniform(0, w))
        pw = int(rng.integers(3, 8))
        top_y = int(horizon - rng.uniform(0.2, 0.6) * h)
        foot = int(horizon + side_h + rng.uniform(0, 0.2) * h)
        mask = np.zeros((h, w), bool)
        mask[max(top_y, 0):min(foot, h), px:px + pw] = True
        _paint(img, lab, mask, _jitter(rng, (0.25, 0.25, 0.25), 0.1), POLE)

    # vehicles on the road, larger when nearer
    for _ in range(int(rng.integers(0, 4))):
        fy = rng.uniform(horizon + side_h + 10, h)
        scale = (fy - horizon) / max(h - horizon, 1)
        vw, vh = int((0.12 + 0.25 * scale) * w), int((0.06 + 0.12 * scale) * h)
        vx = int(vp + rng.uniform(-1, 1) * (0.08 * w + scale * 0.6 * w) - vw / 2)
        vy = int(fy - vh)
        body = _jitter(rng, tuple(rng.uniform(0.1, 0.9, 3)), 0.0)
        mask = np.zeros((h, w), bool)
        mask[max(vy, 0):min(vy + vh, h), max(vx, 0):min(vx + vw, w)] = True
        _paint(img, lab, mask, body, VEHICLE, tex(fine, 0.02))
        cabin = np.zeros((h, w), bool)
        cabin[max(vy + vh // 8, 0):max(vy + vh // 2, 0), max(vx + vw // 6, 0):max(vx + 5 * vw // 6, 0)] = True
        img[cabin & mask] = (0.15, 0.2, 0.25)
        for wx in (vx + vw // 5, vx + 4 * vw // 5):
            cv2.circle(img, (int(wx), int(vy + vh)), max(2, vh // 5), (0.05, 0.05, 0.05), -1)
            cv2.circle(lab, (int(wx), int(vy + vh)), max(2, vh // 5), VEHICLE, -1)

    # people on the sidewalk and road edges
    for _ in range(int(rng.integers(0, 6))):
        fy = rng.uniform(horizon + 4, h)
        scale = 0.3 + 0.7 * (fy - horizon) / max(h - horizon, 1)
        ph, pw = int(0.16 * h * scale), max(3, int(0.035 * w * scale))
        px = int(rng.uniform(0, w - pw))
        top_y = int(fy - ph)
        mask = np.zeros((h, w), bool)
        mask[max(top_y + ph // 5, 0):int(fy), px:px + pw] = True
        head = (xx - (px + pw / 2)) ** 2 + (yy - (top_y + ph / 10)) ** 2 <= (ph / 10) ** 2
        _paint(img, lab, mask | head, _jitter(rng, tuple(rng.uniform(0.1, 0.8, 3)), 0.0), PERSON,
               tex(fine, 0.03))

    # lighting: a cast shadow, global exposure and colour cast, sensor noise, slight blur
    if rng.random() < 0.5:
        sx = rng.uniform(0, w)
        shadow = (xx - sx) * rng.uniform(-1, 1) + (yy - horizon) * rng.uniform(0.2, 1) > 0
        img[shadow & (yy > horizon)] *= rng.uniform(0.6, 0.85)
    img = img * rng.uniform(0.75, 1.2) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    img += rng.normal(0, rng.uniform(0.005, 0.025), img.shape).astype(np.float32)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), 0.6)
    return Scene(np.clip(img, 0, 1).astype(np.float32), lab, seed)
