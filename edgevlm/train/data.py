"""Training data for distillation and fine-tuning, checked completely before any compute is spent.

``--data`` names one of:

- ``digits``: scikit-learn's handwritten digits (classification; fixed 70/10/20 splits);
- ``scenes``: edgevlm's synthetic scenes task (visual question answering);
- a folder of class subfolders (``DIR/<label>/*.png``, or ``DIR/train/<label>/...`` with optional
  ``val/`` and ``test/``) for classifiers;
- a folder with ``qa.jsonl`` (one ``{"image": "file.png", "question": ..., "answer": ...}`` per line)
  for VLMs.

Augmentation is driven by one integer seed per (epoch, sample), so a stored view can be replayed
exactly (TinyViT's fast distillation stores the seed beside the teacher's logits).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ImageError

BUILTIN_CLASSIFICATION = ("digits",)
BUILTIN_VQA = ("scenes",)


# -- seeded augmentation ---------------------------------------------------------------------------------


def sample_seed(base: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch (independent of batch layout and process count)."""
    return int(np.random.SeedSequence([int(base), int(epoch), int(index)]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class SeededAffine:
    """Small rotations, shifts and scale changes whose parameters come from one seed (replayable).

    The same family of views as ``edgevlm train`` (torchvision's RandomAffine), drawn from
    ``numpy.random.default_rng(seed)`` instead of torch's global generator.
    """

    degrees: float = 10.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    fill: float = 1.0                    # the digits' white paper, normalized

    def spec(self) -> dict:
        return {"kind": "affine", "degrees": self.degrees, "translate": self.translate, "scale": list(self.scale),
                "fill": self.fill}

    def params(self, seed: int, size: tuple[int, int]) -> tuple[float, list[int], float]:
        rng = np.random.default_rng(int(seed))
        angle = float(rng.uniform(-self.degrees, self.degrees))
        h, w = size
        tx = int(round(rng.uniform(-self.translate * w, self.translate * w)))
        ty = int(round(rng.uniform(-self.translate * h, self.translate * h)))
        return angle, [tx, ty], float(rng.uniform(*self.scale))

    def __call__(self, x, seed: int):
        """(3, H, W) float tensor -> its augmented view for ``seed``."""
        from torchvision.transforms.v2 import functional as TF

        angle, shift, scale = self.params(seed, tuple(x.shape[-2:]))
        return TF.affine(x, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0], fill=self.fill)

    def batch(self, x, seeds):
        """(B, 3, H, W) and B seeds -> the B augmented views."""
        import torch

        return torch.stack([self(x[i], int(s)) for i, s in enumerate(seeds)])


# -- classification --------------------------------------------------------------------------------------


@dataclass
class ClassificationData:
    """Preprocessed (N, 3, H, W) float32 images and (N,) labels per split, with their label names."""

    name: str
    labels: list[str]
    splits: dict                      # split -> (x, y)
    preprocess: object                # zoo.PreprocessSpec
    fingerprint: str = ""

    def split(self, name: str):
        return self.splits[name]

    def describe(self) -> dict:
        return {"name": self.name, "classes": len(self.labels),
                **{f"{k}_images": int(len(v[1])) for k, v in self.splits.items()}, "fingerprint": self.fingerprint}


def _decode_all(files: list[Path], pre) -> np.ndarray:
    """Decode and preprocess every file; raise one error naming every unreadable file."""
    from ..data.images import preprocess

    out, bad = [], []
    for f in files:
        try:
            out.append(preprocess(f, pre))
        except ImageError as e:
            bad.append(f"{f} ({e.problem})")
    if bad:
        raise ImageError(f"{len(bad)} of {len(files)} images in the data folder cannot be used: "
                         + "; ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""),
                         "remove or replace those files (nothing was trained)")
    return np.stack(out) if out else np.zeros((0, 3, pre.input_size, pre.input_size), np.float32)


def _class_folder(folder: Path, labels: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    from ..data.images import list_images

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ConfigError(f"data folder {folder} has no class subfolders",
                          "lay it out as DIR/<label>/*.png (or DIR/train/<label>/...), or pass --data digits")
    if labels is not None and classes != labels:
        raise ConfigError(f"{folder} has classes {classes}, the training split {labels}",
                          "give every split the same class subfolders")
    files, ys = [], []
    for i, c in enumerate(classes):
        found = list_images(folder / c)
        files += found
        ys += [i] * len(found)
    if not files:
        raise ConfigError(f"data folder {folder} holds no images (.png, .jpg, ...)", "put images in its class folders")
    return files, ys, classes


def load_classification(data: str, pre=None, seed: int = 0) -> ClassificationData:
    """``digits`` or an image folder, preprocessed with ``pre`` (default: the digits' 64 px spec)."""
    from ..compress.distill import fingerprint
    from ..data import digits

    pre = pre or digits.PREPROCESS
    if data == "digits":
        splits = {s: digits.arrays(s, pre) for s in digits.SPLITS}
        return ClassificationData("digits", list(digits.LABELS), splits, pre,
                                  fingerprint(*[a for s in digits.SPLITS for a in splits[s]]))
    folder = Path(data).expanduser()
    if not folder.is_dir():
        known = ", ".join(BUILTIN_CLASSIFICATION)
        raise ConfigError(f"--data {data!r} is neither a built-in data set nor a folder",
                          f"pass {known} or a folder of class subfolders")
    if (folder / "train").is_dir():
        files, ys, labels = _class_folder(folder / "train")
        parts = {"train": (files, ys)}
        for s in ("val", "test"):
            if (folder / s).is_dir():
                f, y, _ = _class_folder(folder / s, labels)
                parts[s] = (f, y)
    else:
        files, ys, labels = _class_folder(folder)
        parts = {"all": (files, ys)}
    x_all = {k: _decode_all(f, pre) for k, (f, _) in parts.items()}       # every image, before any compute
    if "all" in parts:
        from sklearn.model_selection import train_test_split

        y = np.asarray(parts["all"][1])
        idx = np.arange(len(y))
        strat = y if np.bincount(y).min() >= 5 else None
        rest, test = train_test_split(idx, test_size=0.2, random_state=seed, stratify=strat)
        train, val = train_test_split(rest, test_size=0.125, random_state=seed, stratify=None if strat is None else y[rest])
        splits = {s: (x_all["all"][np.sort(i)], y[np.sort(i)]) for s, i in (("train", train), ("val", val), ("test", test))}
    else:
        splits = {k: (x_all[k], np.asarray(parts[k][1], np.int64)) for k in parts}
        if "val" not in splits:
            n = len(splits["train"][1])
            order = np.random.default_rng(seed).permutation(n)
            cut = max(1, n // 10)
            splits["val"] = (splits["train"][0][order[:cut]], splits["train"][1][order[:cut]])
            splits["train"] = (splits["train"][0][order[cut:]], splits["train"][1][order[cut:]])
    splits = {k: (x.astype(np.float32), y.astype(np.int64)) for k, (x, y) in splits.items()}
    return ClassificationData(str(folder), labels, splits, pre, fingerprint(*[a for s in sorted(splits) for a in splits[s]]))


# -- visual question answering ---------------------------------------------------------------------------


@dataclass
class VQAData:
    """Images (uint8 H×W×3) with their (kind, question, answer) triples; pixels made per model spec."""

    name: str
    images: list = field(default_factory=list)      # np.ndarray uint8 (H, W, 3) per image
    qa: list = field(default_factory=list)          # per image: [(kind, question, answer), ...]
    _pixels: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, spec):
        """(N, V, 3, H, W) float16 pixel values for an :class:`~edgevlm.processor.ImageSpec`, cached."""
        import torch

        from ..processor import preprocess_image

        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self._pixels:
            self._pixels[key] = torch.from_numpy(np.stack([preprocess_image(im, spec) for im in self.images])).half()
        return self._pixels[key]

    def describe(self) -> dict:
        return {"name": self.name, "images": len(self.images), "questions": sum(len(q) for q in self.qa)}


SHORT_KINDS = ("color", "shape", "count", "exists", "position")   # the scenes task's one-word answers


def load_vqa(data: str, split: str = "train", limit: int | None = None, kinds: tuple[str, ...] | None = None) -> VQAData:
    """``scenes`` (the synthetic task's split, ``limit`` scenes) or a folder with ``qa.jsonl``; ``kinds``
    keeps only those question kinds (scenes: e.g. :data:`SHORT_KINDS`)."""
    from ..data.images import load_image

    if data == "scenes":
        from ..data import scenes
        from ..evaluate_scenes import qa_pairs

        n = scenes.SPLIT_SIZES[split] if limit is None else min(int(limit), scenes.SPLIT_SIZES[split])
        out = VQAData(f"scenes/{split}")
        for i in range(n):
            scene, qa = qa_pairs(split, i)
            qa = [x for x in qa if kinds is None or x[0] in kinds]
            if qa:
                out.images.append(np.asarray(scenes.render(scene), dtype=np.uint8))
                out.qa.append(qa)
        return out
    folder = Path(data).expanduser()
    f = folder / "qa.jsonl"
    if not f.is_file():
        raise ConfigError(f"--data {data!r} is neither a built-in VQA data set nor a folder with qa.jsonl",
                          'pass scenes, or a folder with qa.jsonl lines {"image": "a.png", "question": "...", '
                          '"answer": "..."}')
    by_image: dict[str, list] = {}
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key, q, a = str(rec["image"]), str(rec["question"]), str(rec["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{f} line {n} is not a qa record ({type(e).__name__}: {e})",
                              'write {"image": "a.png", "question": "...", "answer": "..."} per line') from None
        by_image.setdefault(key, []).append((rec.get("kind", "qa"), q, a))
    if not by_image:
        raise ConfigError(f"{f} holds no questions", "add one JSON record per line")
    out, bad = VQAData(str(folder)), []
    for key in sorted(by_image)[:None if limit is None else int(limit)]:
        try:
            out.images.append(np.asarray(load_image(folder / key), dtype=np.uint8))
            out.qa.append(by_image[key])
        except ImageError as e:
            bad.append(f"{key} ({e.problem})")
    if bad:
        raise ImageError(f"{len(bad)} images named in {f} cannot be used: " + "; ".join(bad[:5])
                         + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""),
                         "fix or remove those records (nothing was trained)")
    return out
