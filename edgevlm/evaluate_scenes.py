"""Scoring a VLM on the scenes task: exact match per question kind, box IoU, point distance, caption F1.

Every question of every scene in the split is asked (the question set of a scene is fixed by its seed),
plus "describe the image." for the caption. The scorers are plain functions so that eager models and
bundles (through the runtime) are measured by the same code.

Splits (:data:`SPLITS`): the generator's ``train``/``val``/``test`` (:mod:`edgevlm.data.scenes`), and ``drawn``,
scenes a person would draw, rendered and asked by independent code (:mod:`edgevlm.data.drawn`; question-answer
kinds only).
"""
from __future__ import annotations

import re
import time
from collections import defaultdict

import numpy as np

from .data import drawn, scenes

QA_KINDS = ("color", "shape", "count", "exists", "position")
POINT_HIT = 0.05      # a point counts as a hit within this normalized distance of a target centre
_WORD = re.compile(r"[a-z0-9]+")
CAPTION_PROMPT = "describe the image."


def qa_pairs(split: str, index: int, draws: int = 1, color_lookups: bool = False,
             config: scenes.SceneConfig = scenes.SceneConfig()) -> tuple[scenes.Scene, list[tuple[str, str, str]]]:
    """Every (kind, question, answer) of a scene, the caption included (kind "caption").

    ``draws`` > 1 adds the questions of further seeded draws of the generator (duplicates dropped): the
    evaluation asks draw 0's questions; training on several draws shows each image with more of the
    questions one can ask about it (one "is there ...?" per draw, and so on). ``color_lookups`` adds every
    question that finds objects by their colour (:func:`scenes.color_lookups`); training only, off in the recipe.
    ``config``: how the scene is drawn (training draws some with ``varied=True``: other looks, typed questions)."""
    scene = scenes.make_scene(split, index, config)
    rng = np.random.default_rng([scenes.SPLIT_SEED[split], index, 7])
    qa = scenes.questions(scene, rng, config)
    seen = {q for _, q, _ in qa}
    more = [scenes.questions(scene, np.random.default_rng([scenes.SPLIT_SEED[split], index, 1000 + d]), config)
            for d in range(1, draws)]
    for extra in more + ([scenes.color_lookups(scene)] if color_lookups else []):
        for kind, q, a in extra:
            if q not in seen:
                seen.add(q)
                qa.append((kind, q, a))
    return scene, qa + [("caption", CAPTION_PROMPT, scenes.caption(scene))]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _match(pred, ref, sim) -> list[float]:
    """Greedy one-to-one matching by similarity, best pairs first: the matched similarities."""
    pairs = sorted(((sim(p, r), i, j) for i, p in enumerate(pred) for j, r in enumerate(ref)), reverse=True)
    used_p, used_r, out = set(), set(), []
    for s, i, j in pairs:
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            out.append(s)
    return out


def score_detect(pred: str, ref: str) -> float:
    """Mean IoU over max(#pred, #ref) boxes after one-to-one matching (1.0 when both say none)."""
    p, r = scenes.parse_boxes(pred), scenes.parse_boxes(ref)
    if not p and not r:
        return float(pred.strip() == "none" or not pred.strip()) if not r else 0.0
    return sum(_match(p, r, iou)) / max(len(p), len(r))


def score_point(pred: str, ref: str) -> float:
    """Share of targets hit (a matched point within POINT_HIT), penalizing extra points (1.0 for none/none)."""
    p, r = scenes.parse_points(pred), scenes.parse_points(ref)
    if not p and not r:
        return float(pred.strip() == "none" or not pred.strip())

    def close(a, b) -> float:
        return 1.0 if ((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 <= POINT_HIT else 0.0

    return sum(_match(p, r, close)) / max(len(p), len(r))


def point_distance(pred: str, ref: str) -> float | None:
    """Mean distance from each target centre to the nearest predicted point (None when either is empty)."""
    p, r = scenes.parse_points(pred), scenes.parse_points(ref)
    if not p or not r:
        return None
    return sum(min(((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2) ** 0.5 for a in p) for b in r) / len(r)


def caption_f1(pred: str, ref: str) -> float:
    """Token F1 of the bags of words (lower-cased, alphanumeric)."""
    p, r = _WORD.findall(pred.lower()), _WORD.findall(ref.lower())
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def score(kind: str, pred: str, ref: str) -> float:
    if kind in QA_KINDS:
        return float(pred.strip().lower() == ref.strip().lower())
    return {"detect": score_detect, "point": score_point, "caption": caption_f1}[kind](pred, ref)


METRIC = {**{k: "exact match" for k in QA_KINDS}, "detect": "mean IoU", "point": f"hit rate (≤{POINT_HIT})",
          "caption": "token F1"}


def _generator_case(split: str, index: int):
    scene, qa = qa_pairs(split, index)
    return scenes.render(scene), qa


def _drawn_case(split: str, index: int):
    scene = drawn.make(index)
    return drawn.draw(scene), drawn.questions(scene)


# split -> (scenes in it, index -> (image, [(kind, question, answer)]))
SPLITS = {**{name: (size, _generator_case) for name, size in scenes.SPLIT_SIZES.items()},
          drawn.SPLIT: (drawn.SIZE, _drawn_case)}


def run(answer, split: str = "test", limit: int | None = None, progress=None) -> dict:
    """Ask ``answer(image, question, kind) -> str`` every question of the first ``limit`` scenes."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {tuple(SPLITS)}")
    size, case = SPLITS[split]
    n = min(limit or size, size)
    per_kind: dict[str, list[float]] = defaultdict(list)
    dists: list[float] = []
    examples = []
    t0 = time.time()
    for i in range(n):
        image, qa = case(split, i)
        for kind, q, a in qa:
            pred = answer(image, q, kind)
            per_kind[kind].append(score(kind, pred, a))
            if kind == "point" and (d := point_distance(pred, a)) is not None:
                dists.append(d)
            if len(examples) < 20:
                examples.append({"scene": i, "kind": kind, "question": q, "answer": a, "prediction": pred})
        if progress and (i + 1) % max(1, n // 10) == 0:
            progress(f"  {i + 1}/{n} scenes ({time.time() - t0:.0f} s)")
    kinds = {k: {"n": len(v), "metric": METRIC[k], "value": sum(v) / len(v)} for k, v in per_kind.items()}
    qa = [s for k in QA_KINDS for s in per_kind.get(k, [])]
    return {"split": split, "scenes": n, "kinds": kinds,
            "qa_exact_match": sum(qa) / len(qa) if qa else None,
            "point_mean_distance": sum(dists) / len(dists) if dists else None,
            "seconds": round(time.time() - t0, 1), "examples": examples}


def rows(result: dict) -> list[dict]:
    out = [{"question kind": k, "n": v["n"], "metric": v["metric"], "score": round(100 * v["value"], 2)}
           for k, v in sorted(result["kinds"].items(), key=lambda kv: (kv[0] not in QA_KINDS, kv[0]))]
    if result["qa_exact_match"] is not None:
        out.append({"question kind": "all questions (QA kinds)", "n": sum(result["kinds"][k]["n"] for k in QA_KINDS
                    if k in result["kinds"]), "metric": "exact match", "score": round(100 * result["qa_exact_match"], 2)})
    return out
