"""Train edgevlm's default VLM on the synthetic scenes task and save it as shipped weights.

``edgevlm train --model edgevlm_scenes`` reproduces models/weights/edgevlm_scenes.safetensors: a
byte-level BPE tokenizer is trained on the train split's text, then tower, compressor, projector and
decoder train together on (image, question, answer) triples with the loss on the answer tokens.
Seeded; the validation split picks the best epoch; the test split is never looked at.

``varied: 0.5`` in the recipe's ``training:`` block renders half the train split with varied looks
(``scenes.SceneConfig(varied=True)``: other backgrounds, sizes, anti-aliasing, outlines, rotations, JPEG,
typed question forms; ``true`` renders all of it so), so the model learns the task rather than the generator's
one look. Validation
stays on the original scenes, so its exact match (which picks the best epoch) is comparable across runs.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import scenes
from ..evaluate_scenes import CAPTION_PROMPT, qa_pairs  # noqa: F401  (the benchmark's questions; re-exported)

SPECIAL = ["<s>", "</s>", "<pad>", "<image>"]
MARKUP = ["<box>", "</box>", "<point>", "</point>"]
# Units the tokenizer keeps whole: a 2-decimal coordinate, a word (capitalised or not), digits, punctuation,
# whitespace. On lower-case text (all the default training text) it splits exactly as " ?[a-z]+" did.
PRE_TOKEN = r" ?[01]\.\d\d| ?[A-Za-z]+| ?\d+| ?[^\sA-Za-z\d]+|\s+"


def kind_weight_table(kind_weights: dict | None) -> dict:
    """Every question kind (and "caption") with its sampling weight: 1 unless ``kind_weights`` says otherwise."""
    kinds = scenes.KINDS + ("caption",)
    weights = {**{k: 1.0 for k in kinds}, **(kind_weights or {})}
    bad = sorted(set(weights) - set(kinds))
    if bad or any(float(w) < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"kind_weights {kind_weights}: give non-negative weights, not all zero, to kinds of {kinds}"
                         + (f"; unknown kinds {bad}" if bad else ""))
    return {k: float(w) for k, w in weights.items()}


def pick_questions(rng: np.random.Generator, qa: list, k: int, weights: dict) -> list:
    """``k`` distinct questions of ``qa`` (0: all), drawn with probability proportional to their kind's weight;
    zero-weight kinds are never drawn."""
    p = np.array([weights[kind] for kind, _, _ in qa], np.float64)
    n = int((p > 0).sum())
    k = n if k <= 0 else min(k, n)
    if k == 0:
        return []
    return [qa[j] for j in rng.choice(len(qa), size=k, replace=False, p=p / p.sum())]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE (`tokenizers`) whose pre-tokenizer keeps coordinates like 0.37 in one piece."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(MARKUP)
    return tok


def _pixels(img: Image.Image, spec) -> np.ndarray:
    """uint8 (H, W, 3) after the processor's resize (normalization happens in the training step)."""
    return np.asarray(img.resize((spec.size, spec.size), Image.BICUBIC), dtype=np.uint8)


NO_SHAPE, NO_COLOR = len(scenes.SHAPES), len(scenes.COLORS)     # the "no object centred here" classes


def cell_targets(scene: scenes.Scene, grid: int) -> np.ndarray:
    """Per feature-grid cell: (shape, colour, cx, cy, w, h) of the object centred in it, else the
    "none" classes; (grid*grid, 6) float32. Of two centres in one cell the larger object wins."""
    t = np.zeros((grid * grid, 6), np.float32)
    t[:, 0], t[:, 1] = NO_SHAPE, NO_COLOR
    for o in sorted(scene.objects, key=lambda o: (o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1])):
        cx, cy = o.center
        cell = min(int(cy * grid), grid - 1) * grid + min(int(cx * grid), grid - 1)
        x0, y0, x1, y1 = o.bbox
        t[cell] = (scenes.SHAPES.index(o.shape), list(scenes.COLORS).index(o.color), cx, cy, x1 - x0, y1 - y0)
    return t


LOOK_KINDS = ("color", "shape", "count", "exists", "detect", "point")
# "which shape is left of the red star?" / "which shape is leftmost?" (scenes._position), as typed.
_RELATION_Q = re.compile(r"which shape is (left|right) of the ([a-z]+(?: [a-z]+)?)|which shape is (above|below) "
                         r"the ([a-z]+(?: [a-z]+)?)")
_EXTREME_Q = re.compile(r"which shape is (leftmost|rightmost|topmost|bottommost)")


def _position_named(question: str):
    """A position question's lookup: ("relation", colour, shape, words) for "which shape is left of the red
    star?" (the reference object, and the words " left", " red", " star"), ("extreme", axis, sign, words) for
    "which shape is leftmost?"; None for anything else."""
    q = " ".join(re.findall(r"[a-z]+", question.lower()))
    m = _RELATION_Q.search(q)
    if m:
        rel = m[1] or m[3]
        words = (m[2] or m[4]).split()
        singular = {v: k for k, v in scenes.PLURALS.items()}
        shape = singular.get(words[-1], words[-1])
        color = words[0] if len(words) == 2 and words[0] in scenes.COLORS else None
        if shape not in scenes.SHAPES:
            return None
        return "relation", color, shape, [rel] + words
    m = _EXTREME_Q.search(q)
    if m:
        return ("extreme", *scenes._EXTREMES[m[1]], [m[1]])      # the generator's own (axis, sign) table
    return None


def named(kind: str, question: str, positions: bool = False) -> tuple[str | None, str | None, list[str]] | None:
    """What a question looks objects up by: (colour, shape, the words that say so), e.g. "how many red shapes
    are there?" -> ("red", None, ["red"]), "how many stars are there?" -> (None, "star", ["stars"]); "how many
    shapes are there?" -> (None, None, ["shapes"]). None for kinds that do not look an object up by name
    (captions name nothing; position questions name a reference, not the object to answer with, and are
    looked up only with ``positions``: "which shape is left of the red star?" -> ("red", "star", ["left", "red",
    "star"]), the reference and the relation; "which shape is leftmost?" -> (None, None, ["leftmost"]))."""
    if kind == "position" and positions:
        what = _position_named(question)
        if what is None:
            return None
        return (what[1], what[2], what[3]) if what[0] == "relation" else (None, None, what[3])
    if kind not in LOOK_KINDS:
        return None
    words = re.findall(r"[a-z]+", question.lower())           # "What colour is the Star" as typed
    singular = {v: k for k, v in scenes.PLURALS.items()}
    color = next((w for w in words if w in scenes.COLORS), None)
    shape_word = next((w for w in words if w in scenes.SHAPES or w in singular), None)
    said = [w for w in (color, shape_word) if w]
    if not said:
        return (None, None, ["shapes"]) if kind == "count" and "shapes" in words else None
    return color, singular.get(shape_word, shape_word), said


def look_cells(scene: scenes.Scene, kind: str, question: str, grid: int, positions: bool = False) -> list[int]:
    """The feature-grid cells (object centres, as :func:`cell_targets` places them) of the objects a question
    names (:func:`named`): "what shape is red?" -> the red object's cell, "how many stars are there?" -> every
    star's, "how many shapes are there?" -> every object's. Empty when none is present ("is there a red star?"
    with none) and for kinds that name no object to look at. With ``positions``, position questions look at
    their reference ("which shape is left of the red star?" -> the red star's cell) or, for an extreme ("which
    shape is leftmost?"), at the object that answers it."""
    def cell(o):
        return min(int(o.center[1] * grid), grid - 1) * grid + min(int(o.center[0] * grid), grid - 1)

    if kind == "position" and positions:
        what = _position_named(question)
        if what is None or not scene.objects:
            return []
        if what[0] == "extreme":
            _, axis, sign, _ = what
            return [cell(max(scene.objects, key=lambda o: sign * o.center[axis]))]
    what = named(kind, question, positions)
    if what is None:
        return []
    color, shape, _ = what
    return [cell(o) for o in scene.objects if color in (None, o.color) and shape in (None, o.shape)]


def word_tokens(tokenizer, ids: list[int], words: list[str]) -> list[int]:
    """Indices of the tokens of ``ids`` that spell any of ``words`` (whole words, by character span)."""
    ends, text = [], ""
    for i in ids:
        text += tokenizer.decode([i])
        ends.append(len(text))
    spans = [m.span() for w in words for m in re.finditer(rf"\b{w}\b", text, re.IGNORECASE)]
    starts = [0] + ends[:-1]
    return [j for j, (a, b) in enumerate(zip(starts, ends)) if any(a < e and s < b for s, e in spans)]


VARIED_STRIDE = 0.6180339887498949      # golden-ratio steps: which scenes are varied spreads evenly over the split


def is_varied(index: int, share: float) -> bool:
    """Whether training scene ``index`` is drawn with varied looks when a ``share`` (0..1) of them are: an even,
    seeded spread (scene i when frac(i * golden ratio) < share), so every stretch of the split has its share."""
    return share >= 1.0 or (index * VARIED_STRIDE) % 1.0 < share


def build_split(split: str, n: int, spec, log=print, grid: int = 0, draws: int = 1, color_lookups: bool = False,
                varied: float = 0.0, keep: list | None = None):
    """Images (n, H, W, 3) uint8, per image its (kind, question, answer) list, and (with ``grid``) the
    per-cell targets of the auxiliary dense loss, (n, grid*grid, 6). A ``varied`` share of the scenes
    (:func:`is_varied`) is drawn with ``SceneConfig(varied=True)`` (other sizes and looks, squashed to the model's
    size as the processor does, typed question forms), the rest as the benchmark draws them; ``keep``, a list,
    gets each scene appended."""
    looks = (scenes.SceneConfig(), scenes.SceneConfig(varied=True))
    imgs = np.empty((n, spec.size, spec.size, 3), np.uint8)
    cells = np.zeros((n, grid * grid, 6), np.float32)
    qas = []
    t0 = time.time()
    for i in range(n):
        config = looks[bool(varied) and is_varied(i, varied)]
        scene, qa = qa_pairs(split, i, draws, color_lookups, config)
        imgs[i] = _pixels(scenes.render(scene, config), spec)
        qas.append(qa)
        if keep is not None:
            keep.append(scene)
        if grid:
            cells[i] = cell_targets(scene, grid)
        if (i + 1) % 5000 == 0:
            log(f"  rendered {i + 1}/{n} {split} scenes ({time.time() - t0:.0f} s)")
    return imgs, qas, cells


def dense_head(dim: int):
    """Training-only head on the tower's tokens: shape (+none), colour (+none), box (cx, cy, w, h)."""
    from torch import nn

    return nn.Linear(dim, NO_SHAPE + 1 + NO_COLOR + 1 + 4)


def dense_loss(head, feats, target):
    """Auxiliary loss that teaches the tower what sits in each cell: (B, M, C) features, (B, M, 6) targets.

    Learning shapes only through the language loss is slow (a colour is one pixel's business, a shape is
    not): in a probe, colour presence was learned in 150 steps and shape presence hardly in 400.
    """
    import torch
    import torch.nn.functional as F

    out = head(feats)                                                          # (B, M, 6+1 + 8+1 + 4)
    s, c = NO_SHAPE + 1, NO_COLOR + 1
    shape, color = target[..., 0].long(), target[..., 1].long()
    w_s = torch.ones(s)
    w_s[-1] = 0.2
    w_c = torch.ones(c)
    w_c[-1] = 0.2
    loss = F.cross_entropy(out[..., :s].reshape(-1, s), shape.reshape(-1), weight=w_s) + \
        F.cross_entropy(out[..., s:s + c].reshape(-1, c), color.reshape(-1), weight=w_c)
    obj = (shape < NO_SHAPE).float().unsqueeze(-1)
    box = ((out[..., s + c:] - target[..., 2:]).abs() * obj).sum() / obj.sum().clamp(min=1)
    return loss + 5 * box


def dense_accuracy(out, target) -> dict:
    """Shape and colour accuracy on the cells holding an object centre."""
    s, c = NO_SHAPE + 1, NO_COLOR + 1
    obj = target[..., 0] < NO_SHAPE
    return {"cell_shape": float((out[..., :s].argmax(-1) == target[..., 0].long())[obj].float().mean()),
            "cell_color": float((out[..., s:s + c].argmax(-1) == target[..., 1].long())[obj].float().mean())}


def pixel_normalizer(spec):
    """uint8 (B, H, W, 3) -> the processor's normalized float (B, 3, H, W) tensor."""
    import torch

    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def pixels(batch_u8):
        x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).contiguous().float() / 255.0
        return (x - mean) / std
    return pixels


def tower_features(vision, px):
    """The tower's raw per-cell features, the ones the dense loss supervises (before any cell head)."""
    return vision.features(px)


def cell_head(vision):
    """The tower's own :class:`CellHead` when it has one (it is then part of the model), else a fresh
    training-only head on its features."""
    own = getattr(vision, "cells", None)
    return own if own is not None else dense_head(getattr(vision, "feat_dim", vision.out_dim))


def cell_accuracy(vision, head, imgs, cells, pixels) -> dict:
    """:func:`dense_accuracy` of ``head`` on the tower's features of ``imgs`` (eval mode, 100 at a time)."""
    import torch

    was = vision.training
    vision.eval()
    with torch.no_grad():
        out = torch.cat([head(tower_features(vision, pixels(imgs[i:i + 100]))) for i in range(0, len(imgs), 100)])
    vision.train(was)
    return dense_accuracy(out, torch.from_numpy(cells))


def train_tower(vision, head, imgs, cells, val_imgs, val_cells, pixels, steps: int, lr: float,
                rng: np.random.Generator, log, batch: int = 64) -> dict:
    """Stage 1: the tower alone learns what sits in each cell of its grid (shape, colour, box) with
    :func:`dense_loss`; fast, since no language model runs in the step. Warm-up then cosine; validation
    cell accuracy logged every 100 steps and returned."""
    import torch

    params = list(vision.parameters())
    params += [p for p in head.parameters() if id(p) not in {id(q) for q in params}]   # an own head is in both
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    w = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / w if i < w else
                                              0.5 * (1 + math.cos(math.pi * (i - w) / max(1, steps - w))))

    acc, t0 = {}, time.time()
    for i in range(steps):
        idx = rng.integers(0, len(imgs), batch)
        loss = dense_loss(head, tower_features(vision, pixels(imgs[idx])), torch.from_numpy(cells[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (i + 1) % 100 == 0 or i + 1 == steps:
            acc = cell_accuracy(vision, head, val_imgs, val_cells, pixels)
            log(f"  tower step {i + 1}/{steps} dense loss {float(loss.detach()):.3f}, validation cells: shape "
                f"{acc['cell_shape']:.3f}, colour {acc['cell_color']:.3f} ({time.time() - t0:.0f} s)")
    return acc


def pack_questions(prefix: int, segments: list[list[tuple[list[int], list[int]]]], pad: int):
    """Several questions about one image in one row, each seeing only the image prefix and itself.

    ``segments[r]`` lists (question ids, answer ids) for row r; every row starts with ``prefix`` shared
    positions (BOS + vision tokens). Returns the text ids after the prefix (R, T), the additive 4-D
    attention mask (R, 1, prefix+T, prefix+T), position ids (R, prefix+T) that restart after the prefix
    for each question (so a packed question sees exactly what a lone one would), labels (R, prefix+T)
    already shifted (the label at i is the token at i+1; -100 elsewhere) and, for each label, the index
    of its answer (-1 elsewhere). Sharing the prefix makes the language model read each image once per
    step instead of once per question: on the default model about 2× the answers per second.
    """
    import torch

    T = max(sum(len(q) + len(a) for q, a in segs) for segs in segments)
    R, L = len(segments), prefix + T
    ids = torch.full((R, T), pad, dtype=torch.long)
    mask = torch.full((R, 1, L, L), float("-inf"))
    pos = torch.zeros((R, L), dtype=torch.long)
    labels = torch.full((R, L), -100, dtype=torch.long)
    answer = torch.full((R, L), -1, dtype=torch.long)
    causal = lambda n: torch.full((n, n), float("-inf")).triu(1)        # noqa: E731
    k = 0
    for r, segs in enumerate(segments):
        mask[r, 0, :prefix, :prefix] = causal(prefix)
        pos[r, :prefix] = torch.arange(prefix)
        t = prefix
        for q, a in segs:
            n = len(q) + len(a)
            mask[r, 0, t:t + n, :prefix] = 0.0
            mask[r, 0, t:t + n, t:t + n] = causal(n)
            pos[r, t:t + n] = torch.arange(prefix, prefix + n)
            ids[r, t - prefix:t - prefix + n] = torch.tensor(q + a)
            labels[r, t + len(q) - 1:t + n - 1] = torch.tensor(a)
            answer[r, t + len(q) - 1:t + n - 1] = k
            k, t = k + 1, t + n
        for i in range(t, L):                       # padding attends to itself only (never read)
            mask[r, 0, i, i] = 0.0
    return ids, mask, pos, labels, answer


def answer_mean_loss(logits, labels, answer):
    """Cross-entropy averaged within each answer, then over answers: a 40-token list of boxes weighs
    as much as a one-word answer."""
    import torch
    import torch.nn.functional as F

    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none")
    a = answer.reshape(-1)
    keep = a >= 0
    n = int(a.max()) + 1
    per = torch.zeros(n).index_add(0, a[keep], tok[keep])
    cnt = torch.zeros(n).index_add(0, a[keep], torch.ones_like(tok[keep]))
    return (per / cnt.clamp(min=1)).mean()


def answer_starts(answer) -> dict[int, tuple[int, int]]:
    """Answer k -> (row, position) of its first prediction, from :func:`pack_questions`' ``answer``."""
    import torch

    first: dict[int, tuple[int, int]] = {}
    for r, t in torch.nonzero(answer >= 0).tolist():        # row-major: the first hit is the answer's start
        first.setdefault(int(answer[r, t]), (r, t))
    return first


def look_loss(attn, seen: dict, mask, points: list[tuple[int, int]], targets: list[list[int]]):
    """-log of the attention mass (mean over heads) that query position ``points[i]`` = (row, position) puts
    on the key positions ``targets[i]``, averaged over the points.

    ``attn`` is one decoder layer's Llama attention module and ``seen`` what a forward pre-hook on it kept of
    its last call (``hidden_states``, ``position_embeddings``): the weights are recomputed at the few query
    positions needed, so the forward pass itself stays on SDPA. ``mask`` (R, 1, L, L) is the additive mask the
    forward pass used (:func:`pack_questions`)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if not points:
        return mask.new_zeros(())
    h = seen["hidden_states"]                                        # (R, L, D), after the input norm
    cos, sin = seen["position_embeddings"]
    R, L, _ = h.shape
    d = attn.head_dim
    q = attn.q_proj(h).view(R, L, -1, d).transpose(1, 2)
    key = attn.k_proj(h).view(R, L, -1, d).transpose(1, 2)
    q, key = apply_rotary_pos_emb(q, key, cos, sin)
    key = key.repeat_interleave(q.shape[1] // key.shape[1], dim=1)   # grouped-query attention
    rows = torch.tensor([r for r, _ in points])
    cols = torch.tensor([t for _, t in points])
    scores = torch.einsum("phd,phld->phl", q[rows, :, cols], key[rows]) * attn.scaling + mask[rows, 0, cols][:, None]
    probs = scores.softmax(-1)                                       # (P, H, L)
    losses = [-torch.log(probs[i, :, t].sum(-1).mean().clamp(min=1e-6)) for i, t in enumerate(targets)]
    return torch.stack(losses).mean()


@dataclass
class _Plan:
    """The settings of one :func:`train_scenes_vlm` run, resolved (split sizes, kind weights, output path)."""

    model_name: str
    out: Path
    epochs: int
    images_per_step: int
    questions_per_image: int
    lr: float
    n_train: int
    n_val: int
    seed: int
    tower_steps: int
    dense_weight: float
    question_draws: int
    weights: dict
    freeze_tower: bool
    tower_batch: int
    color_lookups: bool
    look_weight: float
    look_layer: int
    look_words: float
    varied: float = 0.0
    look_position: bool = False

    def trained_with(self) -> dict:
        """The settings as the saved weights' ``trained_with`` facts record them (before the best epoch's)."""
        return {"command": f"edgevlm train --model {self.model_name} --epochs {self.epochs} --seed {self.seed}",
                "seed": self.seed, "epochs": self.epochs,
                "train_images": self.n_train, "images_per_step": self.images_per_step,
                "questions_per_image": self.questions_per_image, "question_draws": self.question_draws,
                "lr": self.lr, "tower_steps": self.tower_steps, "dense_weight": self.dense_weight,
                "kind_weights": self.weights, "freeze_tower": self.freeze_tower, "tower_batch": self.tower_batch,
                "color_lookups": self.color_lookups, "look_weight": self.look_weight, "look_layer": self.look_layer,
                "look_words": self.look_words, "varied": self.varied,
                **({"look_position": True} if self.look_position else {})}


@dataclass
class _Data:
    """The rendered splits: images, (kind, question, answer) lists and cell targets, and the cells to look at."""

    grid: int
    tr_imgs: np.ndarray
    tr_qa: list
    tr_cells: np.ndarray
    va_imgs: np.ndarray
    va_qa: list
    va_cells: np.ndarray
    tr_look: list | None


def _render(plan: _Plan, recipe, ispec, log) -> _Data:
    """Render the train and validation scenes (with cell targets when a dense loss or stage 1 needs the grid)."""
    from ..modeling.scenes_vlm import grid_side

    log(f"rendering {plan.n_train} train{f' ({plan.varied:.0%} varied looks)' if plan.varied else ''} and {plan.n_val} validation "
        f"scenes at {ispec.size} px")
    grid = grid_side(recipe) if (plan.dense_weight or plan.tower_steps) else 0
    train_scenes: list = []
    tr_imgs, tr_qa, tr_cells = build_split("train", plan.n_train, ispec, log, grid, plan.question_draws,
                                           plan.color_lookups, plan.varied, train_scenes)
    va_imgs, va_qa, va_cells = build_split("val", plan.n_val, ispec, log, grid)      # the original look
    tr_look = None
    if plan.look_weight or plan.look_words:
        if not grid:
            raise ValueError("look_weight needs the cell grid (tower_steps or dense_weight above 0)")
        tr_look = []
        for i, scene in enumerate(train_scenes):
            tr_look.append({q: look_cells(scene, kind, q, grid, plan.look_position) for kind, q, _ in tr_qa[i]})
    return _Data(grid, tr_imgs, tr_qa, tr_cells, va_imgs, va_qa, va_cells, tr_look)


class _Learner:
    """The VLM being trained with its tokenizer, the training-only cell head, the attention hooks of the look
    losses and (with a frozen tower) the cached vision tokens: what one step's loss needs."""

    def __init__(self, plan: _Plan, recipe, data: _Data, ispec, log) -> None:
        """Train the tokenizer on the training text, build the model, hook the looked-at layers, make the cell head."""
        from ..modeling.families import build_vlm
        from ..processor import TextTokenizer

        texts = [f"{q} {a}" for qa in data.tr_qa for _, q, a in qa]
        hf_tok = train_tokenizer(texts, recipe.config["text"]["vocab_size"] - len(MARKUP))
        self.tokenizer = tokenizer = TextTokenizer(hf_tok, hf_tok.token_to_id("<s>"), (hf_tok.token_to_id("</s>"),),
                                                   "trained")
        self.model = model = build_vlm(recipe, tokenizer=tokenizer).train()
        grid = data.grid
        if data.tr_look is not None and model.connector.n_tokens != grid * grid:
            raise ValueError(f"look_weight needs one vision token per cell ({grid * grid}); {plan.model_name} has "
                             f"{model.connector.n_tokens}: set vision_tokens: 0")
        self.layers = layers = model.language_model.model.layers
        self.looked = {"cells": (plan.look_layer, plan.look_weight), "words": (plan.look_layer - 1, plan.look_words)}
        self.seen = seen = {part: {} for part in self.looked}
        self.hooks = [layers[i].self_attn.register_forward_pre_hook(
                          lambda mod, args, kw, d=seen[part]: d.update(kw) and None, with_kwargs=True)
                      for part, (i, w) in self.looked.items() if w]   # what the looked-at layers' attention gets
        self.said: dict[tuple[str, str], list[int]] = {}     # (kind, question) -> its naming words' token indices
        self.positions = plan.look_position
        n_params = sum(p.numel() for p in model.parameters())
        log(f"tokenizer: {tokenizer.vocab_size} tokens; model: {n_params / 1e6:.2f}M parameters, "
            f"{model.connector.n_tokens} vision tokens")
        self.eos, self.pad = tokenizer.eos_ids[0], hf_tok.token_to_id("<pad>")
        self.pspec = model.prompt_spec
        self.pixels = pixel_normalizer(ispec)
        self.emb = model.language_model.get_input_embeddings()
        self.head = cell_head(model.vision) if grid else None
        self.frozen_tokens = None

    def prompt_ids(self, question: str):
        """The prompt's token ids before and after the image, for ``question``."""
        from ..processor import tokenize_prompt

        p = tokenize_prompt(self.tokenizer, self.pspec, question)
        return p.before, p.after

    def _vision(self, img_u8, cells, idx):
        """The images' vision tokens and the dense loss on their cells (cached tokens and no loss when frozen)."""
        import torch

        if self.frozen_tokens is not None:
            return self.frozen_tokens[idx], torch.zeros(())
        tokens, raw, _ = self.model.vision.forward_with_cells(self.pixels(img_u8))     # one pass for both losses
        dense = dense_loss(self.head, raw, torch.from_numpy(cells)) if cells is not None else torch.zeros(())
        return tokens, dense

    def _group(self, picks, looks):
        """Questions and answers as ids grouped by image row, with what each answer should look at; (rows,
        the shared ids before the image, {row: [(question ids, answer ids)]}, {row: [(cells, words, len)]})."""
        per_row: dict[int, list] = {}
        look_row: dict[int, list] = {}
        before = None
        for row, (kind, q, a) in picks:
            b, after = self.prompt_ids(q)
            if before is not None and b != before:
                raise ValueError("packing needs the same prompt ids before the image for every question")
            before = b
            per_row.setdefault(row, []).append((after, self.tokenizer.encode(" " + a) + [self.eos]))
            if looks is not None:
                if (kind, q) not in self.said:
                    what = named(kind, q, self.positions)
                    self.said[kind, q] = word_tokens(self.tokenizer, after, what[2]) if what else []
                look_row.setdefault(row, []).append((looks[row].get(q, []), self.said[kind, q], len(after)))
        return sorted(per_row), before, per_row, look_row

    def _look_losses(self, rows, look_row, n_before: int, answer, mask) -> dict:
        """{"cells": look loss, "words": look loss} at the positions that predict each answer's first token."""
        first, k = answer_starts(answer), 0
        at = {part: ([], []) for part in self.looked}
        for r in rows:
            for cells, words, n_after in look_row[r]:
                row_t = first[k]
                for part, keys in (("cells", [n_before + c for c in cells]),
                                   ("words", [row_t[1] - n_after + 1 + j for j in words])):
                    if keys and self.looked[part][1]:
                        at[part][0].append(row_t)
                        at[part][1].append(keys)
                k += 1
        return {part: look_loss(self.layers[self.looked[part][0]].self_attn, self.seen[part], mask, *at[part])
                for part in self.looked}

    def step_loss(self, img_u8, picks, cells=None, idx=None, looks=None):
        """(mean next-token loss on the answers of ``picks`` [(image row, (kind, q, a))], dense loss,
        {"cells": look loss, "words": look loss}).
        The questions about one image share one packed row (:func:`pack_questions`). With a frozen tower
        the tokens of training images ``idx`` come from the cache."""
        import torch

        tokens, dense = self._vision(img_u8, cells, idx)
        vis = self.model.connector(tokens)                                          # (B, N, D)
        rows, before, per_row, look_row = self._group(picks, looks)
        prefix = len(before) + vis.shape[1]
        ids, mask, pos, labels, answer = pack_questions(prefix, [per_row[r] for r in rows], self.pad)
        x = torch.cat([self.emb(torch.tensor(before)).expand(len(rows), -1, -1), vis[rows], self.emb(ids)], 1)
        logits = self.model.language_model(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                                           use_cache=False).logits
        look = {part: torch.zeros(()) for part in self.looked}
        if looks is not None:
            look = self._look_losses(rows, look_row, len(before), answer, mask)
        return answer_mean_loss(logits, labels, answer), dense, look

    def val_exact_match(self, data: _Data, n_val: int, freeze_tower: bool) -> float:
        """Greedy exact match on the validation questions (detect, point and caption aside)."""
        import torch

        from ..modeling.vlm import GenerationConfig
        from ..processor import PromptPieces

        model = self.model
        with torch.no_grad():
            model.eval()
            hits = total = 0
            for i in range(n_val):
                for kind, q, a in data.va_qa[i]:
                    if kind in ("detect", "point", "caption"):
                        continue
                    pv = self.pixels(data.va_imgs[i:i + 1])
                    before, after = self.prompt_ids(q)
                    embeds = model.splice(PromptPieces(before, after, True), model.encode_image(pv))
                    ids = list(model.decode_tokens(embeds, GenerationConfig(max_new_tokens=8, stop_ids=(self.eos,))))
                    hits += self.tokenizer.decode(ids).strip() == a
                    total += 1
            model.train()
            if freeze_tower:
                model.vision.eval()
            return hits / max(total, 1)


def _tower_stage(lrn: _Learner, plan: _Plan, data: _Data, rng: np.random.Generator, log) -> None:
    """Stage 1 (the tower alone on the per-cell loss), then with ``freeze_tower`` freeze it and cache its tokens."""
    import torch

    model = lrn.model
    if lrn.head is not None and plan.tower_steps > 0:
        # Stage 1: the tower alone learns what sits in each cell (fast: no language model in the step).
        train_tower(model.vision, lrn.head, data.tr_imgs, data.tr_cells, data.va_imgs, data.va_cells, lrn.pixels,
                    plan.tower_steps, plan.lr, rng, log, batch=plan.tower_batch)
    if plan.freeze_tower:
        model.vision.eval().requires_grad_(False)
        t1 = time.time()
        with torch.no_grad():
            lrn.frozen_tokens = torch.cat([model.vision(lrn.pixels(data.tr_imgs[i:i + 250]))
                                           for i in range(0, plan.n_train, 250)])
        log(f"tower frozen; tokens of {plan.n_train} training images cached {tuple(lrn.frozen_tokens.shape[1:])} "
            f"({time.time() - t1:.0f} s)")


def _optimizer(lrn: _Learner, plan: _Plan):
    """Stage 2's AdamW (the model's trainable parameters and a training-only head's) with warmup then cosine:
    (optimizer, scheduler, steps per epoch)."""
    import torch

    params = [p for p in lrn.model.parameters() if p.requires_grad]
    if lrn.head is not None:                # a training-only head is not in the model; the tower's own one is
        params += [p for p in lrn.head.parameters() if p.requires_grad and id(p) not in {id(q) for q in params}]
    opt = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(plan.n_train / plan.images_per_step)
    total_steps, warm = plan.epochs * steps_per_epoch, min(300, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total_steps - warm))))
    return opt, sched, steps_per_epoch


def _train_epoch(lrn: _Learner, plan: _Plan, data: _Data, rng: np.random.Generator, opt, sched, epoch: int,
                 steps_per_epoch: int, log) -> tuple[float, float]:
    """One epoch of stage 2 over the training images in a seeded order; (summed answer loss, start time)."""
    import torch

    order = rng.permutation(plan.n_train)
    run_loss, run_look, run_words, t_ep = 0.0, 0.0, 0.0, time.time()
    for s in range(steps_per_epoch):
        idx = np.sort(order[s * plan.images_per_step:(s + 1) * plan.images_per_step])
        picks = []
        for row, i in enumerate(idx):
            picks += [(row, q) for q in pick_questions(rng, data.tr_qa[i], plan.questions_per_image, plan.weights)]
        lm_loss, dense, look = lrn.step_loss(data.tr_imgs[idx], picks,
                                             data.tr_cells[idx] if lrn.head is not None else None, idx,
                                             [data.tr_look[i] for i in idx] if data.tr_look is not None else None)
        loss = lm_loss + plan.dense_weight * dense + plan.look_weight * look["cells"] + plan.look_words * look["words"]
        run_look += float(look["cells"].detach())
        run_words += float(look["words"].detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lrn.model.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss += float(lm_loss.detach())
        if (s + 1) % 50 == 0:
            log(f"  epoch {epoch + 1}/{plan.epochs} step {s + 1}/{steps_per_epoch} loss {run_loss / (s + 1):.4f} "
                + (f"look {run_look / (s + 1):.3f} " if plan.look_weight else "")
                + (f"words {run_words / (s + 1):.3f} " if plan.look_words else "") + f"({time.time() - t_ep:.0f} s)")
    return run_loss, t_ep


def _validate(lrn: _Learner, plan: _Plan, data: _Data, epoch: int, loss: float, t_ep: float, log) -> dict:
    """The epoch's record: its loss, validation exact match and (with a cell head) validation cell accuracy."""
    em = lrn.val_exact_match(data, plan.n_val, plan.freeze_tower)
    cells = (cell_accuracy(lrn.model.vision, lrn.head, data.va_imgs, data.va_cells, lrn.pixels)
             if lrn.head is not None else {})
    rec = {"epoch": epoch + 1, "loss": loss, "val_exact_match": em, **cells, "seconds": round(time.time() - t_ep, 1)}
    log(f"epoch {epoch + 1}: loss {loss:.4f}, validation exact match {em:.3f} "
        f"{cells} ({time.time() - t_ep:.0f} s)")
    return rec


def train_scenes_vlm(model_name: str = "edgevlm_scenes", out: Path | None = None, epochs: int = 3,
                     images_per_step: int = 32, questions_per_image: int = 4, lr: float = 2e-3,
                     train_images: int | None = None, val_images: int = 300, seed: int = 0, log=None,
                     tower_steps: int = 600, dense_weight: float = 1.0, question_draws: int = 1,
                     kind_weights: dict | None = None, freeze_tower: bool = False,
                     tower_batch: int = 64, color_lookups: bool = False, look_weight: float = 0.0,
                     look_layer: int = 1, look_words: float = 0.0, varied: float = 0.0,
                     look_position: bool = False) -> dict:
    """Two stages: ``tower_steps`` steps of the tower alone on the per-cell dense loss (``tower_batch`` images
    a step; a step's time is proportional to its images, and the shapes are learned per update, not per image),
    then the whole VLM on (image, question, answer) with the dense loss kept alongside (``dense_weight``).
    ``question_draws``: training questions per image from that many draws of the generator (see
    :func:`qa_pairs`); ``questions_per_image`` of them (0: all) are asked in each step, packed in one row,
    drawn with probability proportional to ``kind_weights[kind]`` (default 1; e.g. more position questions);
    ``color_lookups`` adds every colour lookup of each training image to its pool (:func:`qa_pairs`).
    ``freeze_tower``: after stage 1 the tower is frozen (eval mode, as LLaVA trains with a frozen vision
    encoder) and its tokens of every training image are computed once; stage 2 then trains connector and
    decoder on them (no dense loss, about a quarter less time a step).
    ``look_weight`` > 0 adds a training-only loss on where the decoder looks: at the position that predicts an
    answer's first token, the attention of layer ``look_layer`` (mean over its heads) should fall on the cells
    of the objects the question names (:func:`look_cells`): -log of that attention mass, times the weight.
    ``look_words`` > 0 does the same one layer earlier on the question's own words that name them
    (:func:`named`: " red" in "what shape is red?"), so the answer position holds what it must look for.
    ``varied``: the share (0..1; ``true`` = all) of training scenes drawn with varied looks and typed question forms
    (``scenes.SceneConfig(varied=True)``, :func:`is_varied`); validation stays on the original scenes.
    ``look_position``: the look losses cover position questions too (:func:`look_cells`: the reference of "which
    shape is left of the red star?" and the words " left", " red", " star"; the answer of "which shape is
    leftmost?" and " leftmost").
    The best validation epoch so far is written to ``out`` after every epoch."""
    import torch

    from ..modeling.scenes_vlm import save
    from ..processor import ImageSpec
    from ..zoo import get_vlm_recipe

    log = log or (lambda msg: print(msg, flush=True))
    weights = kind_weight_table(kind_weights)            # bad weights fail before minutes of rendering
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    recipe = get_vlm_recipe(model_name)
    plan = _Plan(model_name=model_name, out=Path(out or Path("models/weights") / f"{model_name}.safetensors"),
                 epochs=epochs, images_per_step=images_per_step, questions_per_image=questions_per_image, lr=lr,
                 n_train=train_images or scenes.SPLIT_SIZES["train"], n_val=min(val_images, scenes.SPLIT_SIZES["val"]),
                 seed=seed, tower_steps=tower_steps, dense_weight=dense_weight, question_draws=question_draws,
                 weights=weights, freeze_tower=freeze_tower, tower_batch=tower_batch, color_lookups=color_lookups,
                 look_weight=look_weight, look_layer=look_layer, look_words=look_words, varied=float(varied),
                 look_position=bool(look_position))
    ispec = ImageSpec(**recipe.image)
    if not (1 if look_words else 0) <= look_layer < recipe.config["text"]["num_hidden_layers"]:
        raise ValueError(f"look_layer {look_layer} is not a layer of the decoder"
                         + (" after its first (look_words looks one layer earlier)" if look_words else ""))
    data = _render(plan, recipe, ispec, log)
    lrn = _Learner(plan, recipe, data, ispec, log)
    _tower_stage(lrn, plan, data, rng, log)

    # Stage 2: the whole VLM on (image, question, answer); the best validation epoch so far is saved after each.
    opt, sched, steps_per_epoch = _optimizer(lrn, plan)
    best, best_sd, history = -1.0, None, []
    t0 = time.time()
    for epoch in range(epochs):
        run_loss, t_ep = _train_epoch(lrn, plan, data, rng, opt, sched, epoch, steps_per_epoch, log)
        history.append(_validate(lrn, plan, data, epoch, run_loss / steps_per_epoch, t_ep, log))
        em = history[-1]["val_exact_match"]
        if em > best:
            best = em
            best_sd = {k: v.detach().clone() for k, v in lrn.model.state_dict().items()}
            facts = {"model": model_name, "dataset": "scenes", "trained_with": {
                **plan.trained_with(), "best_epoch": epoch + 1,
                "best_val_exact_match": best, "minutes": round((time.time() - t0) / 60, 1)},
                "history": list(history)}
            save(lrn.model, plan.out, facts)          # an interrupted run keeps its best epoch so far

    lrn.model.load_state_dict(best_sd)
    lrn.model.eval()
    for hook in lrn.hooks:
        hook.remove()
    facts["trained_with"]["minutes"] = round((time.time() - t0) / 60, 1)
    facts["history"] = history
    save(lrn.model, plan.out, facts)
    log(f"saved {plan.out} ({plan.out.stat().st_size / 1e6:.1f} MB); best validation exact match {best:.3f}")
    return facts
