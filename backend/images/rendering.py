"""PNG renderings for the browser: nucleus outlines and fills over a tile."""
from __future__ import annotations

import numpy as np
from skimage.segmentation import find_boundaries


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def overlay(rgb: np.ndarray, instances: np.ndarray, *, classes: dict[str, int] | None = None,
            class_colors: dict[int, str] | None = None, default_color: str = "#00e5ff", alpha: float = 0.25) -> np.ndarray:
    """Tint each nucleus with its class colour and draw its outline; (H, W, 3) uint8 out."""
    out = rgb.astype(np.float32).copy()
    color_of = {int(k): hex_to_rgb((class_colors or {}).get(int(v), default_color)) for k, v in (classes or {}).items()}
    default = np.array(hex_to_rgb(default_color), dtype=np.float32)
    lut = np.tile(default, (int(instances.max(initial=0)) + 1, 1))
    for label, color in color_of.items():
        if label < len(lut):
            lut[label] = color
    colors = lut[instances]
    inside = instances > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colors[inside]
    edges = find_boundaries(instances, mode="inner") & inside
    out[edges] = colors[edges]
    return np.clip(out, 0, 255).astype(np.uint8)
