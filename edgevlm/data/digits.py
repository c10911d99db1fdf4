"""scikit-learn's 1,797 real handwritten digits as RGB images, with fixed splits.

Each 8x8 scan (ink 0-16) is drawn as dark ink on white paper and upscaled with the same
Pillow resize the runtime uses, so a PNG of a digit and the training tensor agree exactly.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from ..zoo import PreprocessSpec

NAME = "digits"
LABELS = [str(i) for i in range(10)]
SPLIT_SEED = 0
SPLITS = ("train", "val", "test")
# Digits models run at 64 px: big enough for every backbone's stride-32 stem, small enough to train on a CPU.
PREPROCESS = PreprocessSpec(input_size=64, interpolation="bilinear", crop_pct=1.0,
                            mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=None)
def split_indices(split: str) -> np.ndarray:
    """Stratified, seeded: 70% train, 10% validation, 20% test (the test split is never tuned on)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    from sklearn.model_selection import train_test_split

    _, y = _raw()
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, random_state=SPLIT_SEED, stratify=y)
    train, val = train_test_split(rest, test_size=0.125, random_state=SPLIT_SEED, stratify=y[rest])
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}[split]


def to_image(scan: np.ndarray, size: int = 64) -> Image.Image:
    """An 8x8 scan as an RGB image of ``size`` pixels: dark ink on white."""
    gray = np.clip(255.0 - scan * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB").resize((size, size), Image.BILINEAR)


def images(split: str, size: int = 64) -> tuple[list[Image.Image], np.ndarray]:
    x, y = _raw()
    idx = split_indices(split)
    return [to_image(x[i], size) for i in idx], y[idx]


def arrays(split: str, pre: PreprocessSpec = PREPROCESS) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed (N, 3, H, W) float32 inputs and (N,) labels for one split."""
    from .images import preprocess

    imgs, y = images(split, pre.input_size)
    return np.stack([preprocess(im, pre) for im in imgs]), y
