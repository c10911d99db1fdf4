"""The drawn split: scenes a person would draw, from code independent of the training generator, checked
against its own descriptions (pixels, counts by connected components) and scored by the same evaluation."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from edgevlm import evaluate_scenes
from edgevlm.data import drawn, scenes

ROOT = Path(__file__).parents[1]


def test_it_asks_only_words_the_model_has():
    assert set(drawn.SHAPES) == set(scenes.SHAPES)
    assert drawn.PLURAL == scenes.PLURALS
    assert set(drawn.COLORS) == set(scenes.COLORS)


def test_it_shares_no_code_with_the_generator():
    tree = ast.parse((ROOT / "edgevlm" / "data" / "drawn.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {f"{n.module}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("scenes" in m or "edgevlm" in m for m in imported), imported
    assert drawn.COLORS["red"] != scenes.COLORS["red"]          # its own colour values too


def test_scenes_are_seeded_and_vary_as_a_person_draws():
    assert drawn.make(3) == drawn.make(3) and drawn.draw(drawn.make(3)).tobytes() == drawn.draw(drawn.make(3)).tobytes()
    made = [drawn.make(i) for i in range(120)]
    assert {s.background for s in made} >= {"white", "black"}
    assert len({(s.width, s.height) for s in made}) > 100                       # sizes and aspect ratios
    assert min(s.width / s.height for s in made) < 0.75 < 1.4 < max(s.width / s.height for s in made)
    assert any(o.outlined for s in made for o in s.objects) and any(not o.outlined for s in made for o in s.objects)
    for s in made:                                                         # the contrast rule holds
        assert all(np.linalg.norm(np.subtract(drawn.COLORS[o.color], drawn.BACKGROUNDS[s.background])) >= 90
                   for o in s.objects)
    with pytest.raises(ValueError, match="outside the drawn split"):
        drawn.make(drawn.SIZE)


@pytest.mark.parametrize("index", range(0, 60, 3))
def test_pixels_match_the_description(index):
    scene = drawn.make(index)
    img = np.asarray(drawn.draw(scene)).astype(int)
    assert img.shape == (scene.height, scene.width, 3)
    bg = np.array(drawn.BACKGROUNDS[scene.background])
    for o in scene.objects:
        cx, cy = (int(v) for v in o.center)
        want = bg if o.outlined else np.array(drawn.COLORS[o.color])   # an outline leaves its inside alone
        assert np.abs(img[cy, cx] - want).max() <= 3, (o, img[cy, cx])
        x0, y0, x1, y1 = o.box
        assert (np.abs(img[y0:y1, x0:x1] - np.array(drawn.COLORS[o.color])).max(-1) <= 3).any()
    away = np.abs(img - bg).max(-1) > 40                                   # everything not background ...
    inside = np.zeros(away.shape, bool)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        inside[max(0, y0 - 1):y1 + 1, max(0, x0 - 1):x1 + 1] = True
    assert not (away & ~inside).any()                                      # ... lies in an object's box
    _, found = ndimage.label(away, structure=np.ones((3, 3)))
    assert found == len(scene.objects)                                     # one blob per object: counts are right


def test_answers_follow_the_description_and_questions_are_typed_as_people_type():
    qs = [(s, q) for s in (drawn.make(i) for i in range(150)) for q in drawn.questions(s)]
    for s, (kind, q, a) in qs:
        shapes = [o.shape for o in s.objects]
        words = q.lower().rstrip("?").split()
        if kind == "count" and words[2] != "shapes":
            assert a == str(shapes.count(next(k for k, v in drawn.PLURAL.items() if v == words[2])))
        elif kind == "count":
            assert a == str(len(s.objects))
        elif kind == "exists":
            assert a == ("yes" if words[-1] in shapes else "no")
        elif kind == "color":
            assert [o.color for o in s.objects if o.shape == words[-1]] == [a]
    texts = [q for _, (_, q, _) in qs]
    assert any("colour" in q for q in texts) and any("color" in q for q in texts)
    assert any(q[0].isupper() for q in texts) and any(q[0].islower() for q in texts)
    assert any(q.endswith("?") for q in texts) and any(not q.endswith("?") for q in texts)
    assert {k for _, (k, _, _) in qs} == set(evaluate_scenes.QA_KINDS)
    answers = [a for _, (k, _, a) in qs if k == "exists"]
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_the_evaluation_scores_it_like_the_generators_splits():
    seen = []

    def answer(image, question, kind):
        seen.append(image.size)
        return "yes"

    res = evaluate_scenes.run(answer, split="drawn", limit=6)
    assert res["split"] == "drawn" and res["scenes"] == 6
    assert set(res["kinds"]) <= set(evaluate_scenes.QA_KINDS)             # no caption, boxes or points
    assert 0 < res["kinds"]["exists"]["value"] < 1 and res["kinds"]["color"]["value"] == 0
    assert seen[0] == (drawn.make(0).width, drawn.make(0).height)           # the picture at its own size
    with pytest.raises(ValueError, match="unknown split"):
        evaluate_scenes.run(answer, split="photos", limit=1)


def test_the_cli_offers_every_split():
    from edgevlm.cli import build_parser

    p = build_parser()
    action = next(a for a in p._subparsers._group_actions[0].choices["eval"]._actions if a.dest == "split")
    assert tuple(action.choices) == tuple(evaluate_scenes.SPLITS)


def test_a_classifier_refuses_the_scenes_only_split():
    from edgevlm.errors import ConfigError
    from edgevlm.evaluate import evaluate

    with pytest.raises(ConfigError, match="drawn split is the scenes task's"):
        evaluate("fastvit_t8", split="drawn", weights="digits", quiet=True)
