"""Write sample_images/street_clip.avi: a synthetic street scene filmed by a camera panning right.

    .venv/bin/python scripts/make_sample_clip.py

One wide scene from tokenscope's scene generator (no download), cut into 256x256 views 12 px
apart: 24 frames at 12 frames/s, Motion-JPEG in AVI (OpenCV writes and reads it everywhere).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tokenscope.data.synthetic import synthetic_scene


def main(path: Path = Path(__file__).resolve().parents[1] / "sample_images" / "street_clip.avi") -> None:
    scene = synthetic_scene(5000001, 256, 256 + 23 * 12)
    rgb = (np.clip(scene.image, 0, 1) * 255).round().astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 12.0, (256, 256))
    for k in range(24):
        writer.write(cv2.cvtColor(np.ascontiguousarray(rgb[:, 12 * k:12 * k + 256]), cv2.COLOR_RGB2BGR))
    writer.release()
    print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
