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


# -- Idefics3 / SmolVLM tiles ------------------------------------------------------------------------------
# Reference: transformers' Idefics3ImageProcessor (the slow, PIL one) and Idefics3Processor. The image's longest
# side is resized to ``longest_edge`` (up or down; the other side even), then either squashed to one ``size``x``size``
# view, or (``splitting``) resized up to multiples of ``size`` and cut into a row-major grid of ``size`` tiles
# followed by the whole image squashed to ``size`` (a grid of 0x0 when the image is one tile already). Every resize
# is PIL's LANCZOS on 8-bit RGB; pixels are x * (1/255) in float64, cast to float32, then (x - mean) / std.
IDEFICS3_DEFAULTS = {"longest_edge": 2048, "splitting": True, "resample": "lanczos"}
IDEFICS3_MAX_SIDE = 4096                 # the processor's absolute cap on either side
FAKE_TOKEN, GLOBAL_TOKEN, IMAGE_TOKEN = "<fake_token_around_image>", "<global-img>", "<image>"


def idefics3_params(spec) -> dict:
    out = {**IDEFICS3_DEFAULTS, **dict(spec.options)}
    out["size"] = int(spec.size)
    return out


def _fit_longest(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest side ``longest``, the other truncated then rounded up to even, then both
    capped at IDEFICS3_MAX_SIDE (the processor's two-step rule)."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > IDEFICS3_MAX_SIDE:
        width, height = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
    elif height > width and height > IDEFICS3_MAX_SIDE:
        height, width = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of the tile ``size``, the shorter side following the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / size) * size
        height = math.ceil(int(width / aspect) / size) * size
    else:
        height = math.ceil(height / size) * size
        width = math.ceil(int(height * aspect) / size) * size
    return height, width


def idefics3_grid(height: int, width: int, size: int, longest_edge: int = 2048, splitting: bool = True,
                  **_) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (height, width) pixels; (0, 0): one global view only."""
    if not splitting:
        return 0, 0
    h, w = _tile_multiple(*_fit_longest(height, width, longest_edge), size)
    return (h // size, w // size) if h > size or w > size else (0, 0)


def idefics3_tiles_with_grid(img: Image.Image, spec) -> tuple[np.ndarray, tuple[int, int]]:
    """(V, 3, S, S) float32 views (tiles row-major, then the global view) and the (rows, cols) grid."""
    p = idefics3_params(spec)
    size, resample = p["size"], _RESAMPLE[p["resample"]]
    img = img.convert("RGB")
    h, w = _fit_longest(img.height, img.width, int(p["longest_edge"]))
    img = img.resize((w, h), resample)
    if p["splitting"]:
        h, w = _tile_multiple(h, w, size)
        img = img.resize((w, h), resample)
    rows, cols = (h // size, w // size) if p["splitting"] and (h > size or w > size) else (0, 0)
    arr = np.asarray(img)
    views = [arr[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    views.append(np.asarray(img.resize((size, size), resample)) if (h, w) != (size, size) else arr)
    x = (np.stack(views).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), (rows, cols)                      # (V, 3, S, S)


def idefics3_tiles(img: Image.Image, spec) -> np.ndarray:
    """The registered layout: only the views (use :func:`idefics3_grid` for the grid)."""
    return idefics3_tiles_with_grid(img, spec)[0]


def idefics3_image_text(rows: int, cols: int) -> list:
    """The processor's text for one image with its views' slots as None: text, None, text, ... (one None per
    view, in the views' order). Each slot stands for the view's run of ``<image>`` tokens."""
    out: list = []
    for r in range(rows):
        for c in range(cols):
            out += [f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>", None]
        out.append("\n")
    out += [("\n" if rows else "") + FAKE_TOKEN + GLOBAL_TOKEN, None, FAKE_TOKEN]
    return out


def idefics3_text_runs(template: str, prompt: str, grid: tuple[int, int] | None, marker: str = IMAGE_TOKEN) -> list:
    """The prompt text between the image's view slots: ``views + 1`` strings (text only, ``grid`` None: the template
    without its marker, one string). Text next to a slot is encoded on its own, as a tokenizer splits text at the
    special ``<image>`` tokens the processor writes there; adjacent pieces are joined first (``"\\n" + "\\n..."``)."""
    if grid is None or marker not in template:
        return [template.replace(marker, "").replace("{prompt}", prompt)]
    head, tail = template.split(marker, 1)
    head, tail = head.replace("{prompt}", prompt), tail.replace("{prompt}", prompt)
    runs, cur = [], head
    for piece in idefics3_image_text(*grid):
        if piece is None:
            runs.append(cur)
            cur = ""
        else:
            cur += piece
    runs.append(cur + tail)
    return runs


IMAGE_LAYOUTS.setdefault("idefics3_tiles", idefics3_tiles)
