"""Multi-view image layouts (torch-free): families register functions img, spec -> (V, 3, H, W).

``overlap_crops`` is Moondream2's (2025 revisions) layout: one global view of the whole image
squashed to the crop size, then a row-major grid of overlapping local crops cut from the image
resized so that the crops tile it exactly. Neighbouring crops share ``2 * overlap_margin`` patches;
the encoder drops the inner margins when it stitches local features back together, which needs
the grid: :func:`overlap_crop_grid` recomputes it from the image size alone (eager model and
bundle runtimes call the same function). Reference: vikhyat/moondream ``moondream/torch/image_crops.py``.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

# Extra image layouts, the modes an ImageSpec may name besides crop and squash (edgevlm.processor re-exports
# it): name -> fn(img, spec) -> (V, 3, H, W) float32.
IMAGE_LAYOUTS: dict[str, Callable[..., np.ndarray]] = {}
OVERLAP_DEFAULTS = {"patch_size": 14, "overlap_margin": 4, "max_crops": 12, "resample": "lanczos"}
_RESAMPLE = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of ``window``-sized tiles for a (height, width) area, at most ``max_crops`` tiles.

    Small sides give a single tile; otherwise the grid follows the aspect ratio (about
    sqrt(max_crops * h / w) rows), never fewer tiles than needed to cover each side, and is
    shrunk along its longer dimension when it holds too many tiles.
    """
    if height <= window or width <= window:
        return 1, 1
    need_h, need_w = math.ceil(height / window), math.ceil(width / window)
    if need_h * need_w > max_crops:                       # cannot cover: scale both sides down evenly
        shrink = math.sqrt(max_crops / (need_h * need_w))
        return max(1, math.floor(need_h * shrink)), max(1, math.floor(need_w * shrink))
    rows = max(math.floor(math.sqrt(max_crops * height / width)), need_h)
    cols = max(math.floor(math.sqrt(max_crops * width / height)), need_w)
    if rows * cols > max_crops:
        if cols > rows:
            cols = math.floor(max_crops / rows)
        else:
            rows = math.floor(max_crops / cols)
    return max(1, rows), max(1, cols)


def overlap_params(spec) -> dict:
    """Crop size and the layout options of an ImageSpec, with Moondream2's defaults filled in."""
    out = {**OVERLAP_DEFAULTS, **dict(spec.options)}
    out["crop_size"] = int(spec.size)
    return out


def _window_and_margin(crop_size: int, patch_size: int, overlap_margin: int) -> tuple[int, int]:
    patches = crop_size // patch_size
    if patches * patch_size != crop_size or patches <= 2 * overlap_margin:
        from ..errors import ConfigError

        raise ConfigError(f"crop size {crop_size} with patch {patch_size} and margin {overlap_margin} patches "
                          "leaves no crop window", "use a crop size that is a multiple of the patch size and "
                          "more than 2 * overlap_margin patches wide")
    return (patches - 2 * overlap_margin) * patch_size, overlap_margin * patch_size   # pixels


def overlap_crop_grid(height: int, width: int, crop_size: int = 378, patch_size: int = 14, overlap_margin: int = 4,
                      max_crops: int = 12, **_) -> tuple[int, int]:
    """The (rows, cols) grid of local crops for an image of (height, width) pixels."""
    window, margin = _window_and_margin(crop_size, patch_size, overlap_margin)
    return select_tiling(height - 2 * margin, width - 2 * margin, window, max_crops)


def stitched_size(grid: tuple[int, int], patches: int, overlap_margin: int) -> tuple[int, int]:
    """Feature-grid size (in patches) of the local crops stitched together without inner margins."""
    step = patches - 2 * overlap_margin
    return grid[0] * step + 2 * overlap_margin, grid[1] * step + 2 * overlap_margin


def overlap_crops_with_grid(img: Image.Image, spec) -> tuple[np.ndarray, tuple[int, int]]:
    """(1 + rows*cols, 3, S, S) float32 views (global first, then crops row-major) and (rows, cols)."""
    p = overlap_params(spec)
    size, resample = p["crop_size"], _RESAMPLE[p["resample"]]
    window, margin = _window_and_margin(size, p["patch_size"], p["overlap_margin"])
    img = img.convert("RGB")
    w, h = img.size
    rows, cols = overlap_crop_grid(h, w, **p)
    big = np.asarray(img.resize((cols * window + 2 * margin, rows * window + 2 * margin), resample))
    views = np.zeros((1 + rows * cols, size, size, 3), np.uint8)
    views[0] = np.asarray(img.resize((size, size), resample))
    for r in range(rows):
        for c in range(cols):
            tile = big[r * window:r * window + size, c * window:c * window + size]
            views[1 + r * cols + c, :tile.shape[0], :tile.shape[1]] = tile
    x = (views.astype(np.float32) / 255.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), (rows, cols)           # (V, 3, S, S)


def overlap_crops(img: Image.Image, spec) -> np.ndarray:
    """The registered layout: only the views (use :func:`overlap_crop_grid` for the grid)."""
    return overlap_crops_with_grid(img, spec)[0]


IMAGE_LAYOUTS.setdefault("overlap_crops", overlap_crops)
