"""Calibration and parity images: a user's folder, or a built-in set.

- ``builtin:digits``: scikit-learn's handwritten digits, train split (never the test split).
- ``builtin:photos``: real photographs shipped inside scikit-image, as seeded random crops.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CalibrationError, ImageError
from .images import list_images, load_image, preprocess

BUILTIN = ("builtin:digits", "builtin:photos", "builtin:scenes")
# scikit-image sample photos that live inside its wheel (no download).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
           "retina", "colorwheel", "camera", "brick", "grass", "gravel")


def default_source(dataset: str | None) -> str:
    return {"digits": "builtin:digits", "scenes": "builtin:scenes"}.get(dataset or "", "builtin:photos")


def _photos(n: int, seed: int) -> list[Image.Image]:
    try:
        import skimage.data as sk
    except ImportError:
        raise CalibrationError("the built-in photo set needs scikit-image",
                               "pip install scikit-image, or pass --calib DIR with your own images") from None
    bases = []
    for name in _PHOTOS:
        arr = getattr(sk, name)()
        bases.append(Image.fromarray(arr).convert("RGB"))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = bases[i % len(bases)]
        w, h = img.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = img.crop((x, y, x + side, y + side))
        out.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def folder_files(path: Path) -> list[Path]:
    """The image files of a calibration folder; raises when it is missing or holds none."""
    if not path.is_dir():
        raise CalibrationError(f"calibration folder {path} does not exist", "pass --calib DIR with images in it")
    files = list_images(path)
    if not files:
        raise CalibrationError(f"calibration folder {path} holds no images (.png, .jpg, ...)",
                               "put 32-512 representative images in it, or use --calib builtin:photos")
    return files


def _folder(path: Path, n: int, seed: int) -> list[Image.Image]:
    files = folder_files(path)
    rng = np.random.default_rng(seed)
    if len(files) > n:
        files = [files[i] for i in sorted(rng.choice(len(files), n, replace=False))]
    out = []
    for f in files:
        try:
            out.append(load_image(f))
        except ImageError as e:
            raise CalibrationError(f"calibration image {f} is unusable: {e.problem}",
                                   "remove or replace that file") from None
    return out


def calibration_images(source: str | None, dataset: str | None, n: int, seed: int = 0,
                       split: str = "train") -> list[Image.Image]:
    """``n`` images from ``source`` (a folder or a built-in name); digits come from ``split``."""
    source = source or default_source(dataset)
    if source == "builtin:digits":
        from . import digits

        imgs, _ = digits.images(split)
        rng = np.random.default_rng(seed)
        return [imgs[i] for i in sorted(rng.choice(len(imgs), min(n, len(imgs)), replace=False))]
    if source == "builtin:photos":
        return _photos(n, seed)
    if source == "builtin:scenes":   # the VLM task's scenes (edgevlm/data/scenes.py), train split by default
        from . import scenes

        rng = np.random.default_rng(seed)
        idx = sorted(rng.choice(scenes.SPLIT_SIZES[split], n, replace=False))
        return [scenes.render(scenes.make_scene(split, int(i))) for i in idx]
    if source.startswith("builtin:"):
        raise CalibrationError(f"unknown built-in calibration set {source!r}", f"use one of {', '.join(BUILTIN)}")
    return _folder(Path(source).expanduser(), n, seed)


def as_batch(images: list[Image.Image], pre) -> np.ndarray:
    """Preprocess a list of images into one (N, 3, H, W) float32 array."""
    return np.stack([preprocess(im, pre) for im in images]).astype(np.float32)
