"""The ``drawn`` split: scenes a person would draw for the scenes task, from code that shares nothing with the
training generator (:mod:`edgevlm.data.scenes`).

A new user tries the default model on a few shapes drawn with an ordinary image library on a plain background,
saved at whatever size their canvas had, and types questions the way people type them. This module does exactly
that, independently of the generator the model was trained on: its own scene descriptions (own seed stream), its
own colour values (CSS's named colours, not the generator's), plain backgrounds of any colour including white and
black, images of 128-640 px at aspect ratios 0.6-1.7, shapes drawn with Pillow's ``ImageDraw`` at 4x and reduced
(anti-aliased, as drawing programs do), some outlined instead of filled, and questions in the forms people type
("What colour is the circle", "how many stars are there?"), each answer derived from the scene description.

It imports nothing from :mod:`edgevlm.data.scenes`: the words (shape and colour names) are restated here, and a
test holds them equal to the generator's, so the split asks only what the model has words for. Only the
question-answer kinds are asked (colour, shape, count, exists, position): captions, boxes and points have the
generator's own phrasing and geometry, which this split is meant not to share.

``edgevlm eval MODEL_OR_BUNDLE --split drawn`` scores it with the same scorer as the generator's splits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SPLIT = "drawn"
SEED = 20_301
SIZE = 500
SUPERSAMPLE = 4
# The words the model knows (held equal to edgevlm.data.scenes' by a test).
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "diamond": "diamonds",
          "cross": "crosses"}
# CSS named colours a person picks for these words (https://www.w3.org/TR/css-color-4/#named-colors).
COLORS = {"red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
          "purple": (128, 0, 128), "orange": (255, 165, 0), "white": (255, 255, 255), "black": (0, 0, 0)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "light gray": (211, 211, 211),
               "ivory": (255, 255, 240), "light blue": (173, 216, 230), "dark slate gray": (47, 79, 79),
               "wheat": (245, 222, 179), "gray": (128, 128, 128)}
MIN_CONTRAST = 90.0          # RGB distance between the background and every object (the generator's rule too)
OUTLINED = 0.2               # share of objects drawn as an outline only
MARGIN = 0.10                # centres this far apart (normalized) before a position question is asked


@dataclass(frozen=True)
class DrawnObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]           # x0, y0, x1, y1 in pixels of the image (x1, y1 exclusive)
    outlined: bool

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class DrawnScene:
    index: int
    width: int
    height: int
    background: str
    objects: tuple[DrawnObject, ...]


def _contrast(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def make(index: int) -> DrawnScene:
    """Scene ``index`` (0..SIZE-1) of the drawn split: a pure function of the index."""
    if not 0 <= int(index) < SIZE:
        raise ValueError(f"index {index} is outside the {SPLIT} split (0..{SIZE - 1})")
    rng = np.random.default_rng([SEED, int(index)])
    side = int(rng.integers(128, 641))
    aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    w, h = (side, max(64, int(side / aspect))) if aspect >= 1 else (max(64, int(side * aspect)), side)
    bg = str(rng.choice(list(BACKGROUNDS)))
    colors = [c for c, rgb in COLORS.items() if _contrast(rgb, BACKGROUNDS[bg]) >= MIN_CONTRAST]
    count = int(rng.integers(1, 5))
    objects: list[DrawnObject] = []
    for _ in range(count):
        shape = str(objects[int(rng.integers(len(objects)))].shape if objects and rng.random() < 0.35
                    else rng.choice(SHAPES))
        color = str(rng.choice(colors))
        for _ in range(100):                              # a free spot, or the object is left out
            s = int(min(w, h) * rng.uniform(0.14, 0.34))
            x, y = int(rng.integers(2, w - s - 1)), int(rng.integers(2, h - s - 1))
            box = (x, y, x + s, y + s)
            if all(box[2] + 4 <= o.box[0] or o.box[2] + 4 <= box[0] or box[3] + 4 <= o.box[1] or o.box[3] + 4 <= box[1]
                   for o in objects):
                objects.append(DrawnObject(shape, color, box, bool(rng.random() < OUTLINED)))
                break
    return DrawnScene(int(index), w, h, bg, tuple(objects))


def _outline(shape: str, x0: float, y0: float, s: float) -> list[tuple[float, float]] | None:
    """The shape's polygon in a square of side ``s`` at (x0, y0); None for the circle (an ellipse)."""
    c = s / 2
    if shape == "square":
        return [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if shape == "triangle":
        return [(x0 + c, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    if shape == "diamond":
        return [(x0 + c, y0), (x0 + s, y0 + c), (x0 + c, y0 + s), (x0, y0 + c)]
    if shape == "cross":
        a, b = s * 0.32, s * 0.68
        return [(x0 + a, y0), (x0 + b, y0), (x0 + b, y0 + a), (x0 + s, y0 + a), (x0 + s, y0 + b), (x0 + b, y0 + b),
                (x0 + b, y0 + s), (x0 + a, y0 + s), (x0 + a, y0 + b), (x0, y0 + b), (x0, y0 + a), (x0 + a, y0 + a)]
    if shape == "star":                                   # 5 points, inner radius 0.4, top point up
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, c, 0.4 * c)
        return [(x0 + c + r * np.cos(t), y0 + c + r * np.sin(t)) for r, t in zip(rad, ang)]
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}")


def draw(scene: DrawnScene) -> Image.Image:
    """The scene as an RGB image of its own size: drawn at SUPERSAMPLE x and reduced with a Lanczos filter."""
    k = SUPERSAMPLE
    im = Image.new("RGB", (scene.width * k, scene.height * k), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(im)
    for o in scene.objects:
        x0, y0, x1, _ = (v * k for v in o.box)
        s = x1 - x0
        rgb = COLORS[o.color]
        fill, line = (None, rgb) if o.outlined else (rgb, None)
        width = max(k, int(s * 0.08)) if o.outlined else 0
        poly = _outline(o.shape, x0, y0, s - 1)
        if poly is None:
            d.ellipse([x0, y0, x0 + s - 1, y0 + s - 1], fill=fill, outline=line, width=width)
        else:
            d.polygon(poly, fill=fill, outline=line, width=width)
    return im.resize((scene.width, scene.height), Image.LANCZOS)


def _typed(rng: np.random.Generator, question: str) -> str:
    """The question as a person types it: capitalised or not, with or without the question mark."""
    if rng.random() < 0.5:
        question = question[0].upper() + question[1:]
    return question if rng.random() < 0.5 else question.rstrip("?")


def questions(scene: DrawnScene) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for the scene: colour, shape, count, exists and position questions, each answer
    read off the scene description."""
    rng = np.random.default_rng([SEED, scene.index, 1])
    objs = scene.objects
    shapes = [o.shape for o in objs]
    colors = [o.color for o in objs]
    out: list[tuple[str, str]] = []
    for s in sorted(set(shapes)):
        if shapes.count(s) == 1:
            word = "colour" if rng.random() < 0.5 else "color"
            out.append(("color", f"what {word} is the {s}?", colors[shapes.index(s)]))
    for c in sorted(set(colors)):
        if colors.count(c) == 1:
            out.append(("shape", f"what shape is {c}?", shapes[colors.index(c)]))
    out.append(("count", "how many shapes are there?", str(len(objs))))
    absent = [s for s in SHAPES if s not in shapes]
    for kind in ("count", "exists"):                    # about half about a shape in the picture, half not
        pool = sorted(set(shapes)) if rng.random() < 0.5 or not absent else absent
        s = str(pool[int(rng.integers(len(pool)))])
        out.append(("count", f"how many {PLURAL[s]} are there?", str(shapes.count(s))) if kind == "count" else
                   ("exists", f"is there {'an' if s[0] in 'aeiou' else 'a'} {s}?", "yes" if s in shapes else "no"))
    if len(objs) >= 2:
        for word, axis, sign in (("leftmost", 0, -1), ("rightmost", 0, 1), ("topmost", 1, -1), ("bottommost", 1, 1)):
            dims = (scene.width, scene.height)
            vals = sorted((sign * o.center[axis] / dims[axis], i) for i, o in enumerate(objs))
            if vals[-1][0] - vals[-2][0] >= MARGIN:
                out.append(("position", f"which shape is {word}?", objs[vals[-1][1]].shape))
                break
    return [(kind, _typed(rng, q), a) for kind, q, a in out]


__all__ = ["COLORS", "DrawnObject", "DrawnScene", "SHAPES", "SIZE", "SPLIT", "draw", "make", "questions"]
