"""The synthetic scene generator: determinism, split separation, pixel truth and annotation truth."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from edgevlm.data import scenes as S

CFG = S.SceneConfig()
QUIET = S.SceneConfig(noise=0)


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _signature(scene: S.Scene) -> tuple:
    return (tuple((o.shape, o.color, o.size, o.cell) for o in scene.objects), scene.background)


# --- determinism and splits ------------------------------------------------------------------

def test_same_index_gives_identical_scene_pixels_and_annotations():
    for split, i in [("train", 0), ("train", 19_999), ("val", 7), ("test", 999)]:
        a, b = S.make_scene(split, i), S.make_scene(split, i)
        assert a == b
        assert np.array_equal(_pixels(S.render(a)), _pixels(S.render(b)))
        qa = S.questions(a, np.random.default_rng(5))
        assert qa == S.questions(b, np.random.default_rng(5))
        sa, sb = S.sample(split, i), S.sample(split, i)
        assert (sa.kind, sa.question, sa.answer) == (sb.kind, sb.question, sb.answer)
        assert np.array_equal(_pixels(sa.image), _pixels(sb.image))


def test_different_indexes_give_different_images():
    imgs = [_pixels(S.render(S.make_scene("train", i))).tobytes() for i in range(30)]
    assert len(set(imgs)) == 30


def test_splits_share_no_scene():
    train = [S.make_scene("train", i) for i in range(200)]
    test = [S.make_scene("test", i) for i in range(200)]
    val = [S.make_scene("val", i) for i in range(200)]
    assert not {_signature(s) for s in train} & {_signature(s) for s in test}
    assert not {_signature(s) for s in train} & {_signature(s) for s in val}
    assert {s.seed for s in train}.isdisjoint({s.seed for s in test})
    assert not np.array_equal(_pixels(S.render(train[0])), _pixels(S.render(test[0])))


@pytest.mark.parametrize("split,index", [("train", S.SPLIT_SIZES["train"]), ("val", -1),
                                         ("test", S.SPLIT_SIZES["test"]), ("dev", 0)])
def test_out_of_range_index_or_unknown_split_raises(split, index):
    with pytest.raises(ValueError):
        S.make_scene(split, index)


def test_render_rejects_a_config_of_another_size():
    with pytest.raises(ValueError, match="px"):
        S.render(S.make_scene("train", 0), S.SceneConfig(image_size=64))


# --- rendering truth -------------------------------------------------------------------------

def _box_px(o: S.SceneObject, n: int) -> tuple[int, int, int, int]:
    return tuple(int(round(v * n)) for v in o.bbox)


def test_scene_contents_are_in_range_and_do_not_overlap():
    seen_counts, seen = Counter(), set()
    for i in range(300):
        sc = S.make_scene("train", i)
        assert CFG.min_objects <= len(sc.objects) <= CFG.max_objects
        seen_counts[len(sc.objects)] += 1
        for o in sc.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            assert x0 < o.center[0] < x1 and y0 < o.center[1] < y1
            seen.add((o.shape, o.color, o.size))
        for a in sc.objects:
            for b in sc.objects:
                if a is not b:
                    ax0, ay0, ax1, ay1 = a.bbox
                    bx0, by0, bx1, by1 = b.bbox
                    assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (i, a, b)
    assert set(seen_counts) == {1, 2, 3, 4}
    assert {s for s, _, _ in seen} == set(S.SHAPES)
    assert {c for _, c, _ in seen} == set(S.COLORS)
    assert {z for _, _, z in seen} == set(S.SIZES)


def test_pixels_show_each_object_in_its_colour_inside_its_tight_box():
    n, noise = CFG.image_size, CFG.noise
    for i in range(120):
        sc = S.make_scene("val", i)
        img, clean, bg = _pixels(S.render(sc)), _pixels(S.render(sc, QUIET)), S.background(sc)
        assert img.shape == (n, n, 3)
        # The noise is mild and bounded.
        assert np.abs(img - clean).max() <= noise
        # The centre pixel has the object's colour, up to the noise.
        for o in sc.objects:
            cx, cy = int(o.center[0] * n), int(o.center[1] * n)
            assert np.abs(img[cy, cx] - np.asarray(o.rgb)).max() <= noise, (i, o)
        # Away from every box the image is the background, up to the noise.
        inside = np.zeros((n, n), bool)
        for o in sc.objects:
            x0, y0, x1, y1 = _box_px(o, n)
            inside[y0:y1, x0:x1] = True
        assert np.abs(img[~inside] - np.round(bg[~inside])).max() <= noise
        # Each box is the tight box of the pixels that are not background, and those pixels are the object's colour.
        changed = np.abs(clean - np.round(bg)).max(-1) > 0
        assert not changed[~inside].any()
        for o in sc.objects:
            x0, y0, x1, y1 = _box_px(o, n)
            ys, xs = np.nonzero(changed[y0:y1, x0:x1])
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0), (i, o)
            assert (clean[y0:y1, x0:x1][changed[y0:y1, x0:x1]] == np.asarray(o.rgb)).all()
            # ... and the background contrasts with the object.
            assert np.linalg.norm(np.subtract(sc.background.rgb, o.rgb)) >= S.BG_MIN_CONTRAST


def test_backgrounds_vary_and_other_sizes_render():
    kinds = Counter(S.make_scene("train", i).background.kind for i in range(150))
    assert set(kinds) == set(S.BG_KINDS) and min(kinds.values()) >= 25
    textured = next(s for s in (S.make_scene("train", i) for i in range(50)) if s.background.kind == "texture")
    assert np.ptp(S.background(textured)) > 5
    small = S.SceneConfig(image_size=64)
    sc = S.make_scene("test", 3, small)
    assert S.render(sc, small).size == (64, 64)
    assert all(cell[0] + cell[2] <= 64 and cell[1] + cell[2] <= 64 for cell in (o.cell for o in sc.objects))


# --- annotation truth ------------------------------------------------------------------------

def _find(sc: S.Scene, name: str) -> list[S.SceneObject]:
    """Objects matching 'circle' or 'red circle'."""
    words = name.split()
    if len(words) == 1:
        return [o for o in sc.objects if o.shape == words[0]]
    return [o for o in sc.objects if o.color == words[0] and o.shape == words[1]]


def _referent(sc: S.Scene, text: str) -> S.SceneObject:
    found = _find(sc, text.removeprefix("the "))
    assert len(found) == 1, f"{text!r} does not name one object"
    return found[0]


def _check(sc: S.Scene, kind: str, q: str, a: str) -> None:
    shapes = [o.shape for o in sc.objects]
    colors = [o.color for o in sc.objects]
    plural = {v: k for k, v in S.PLURALS.items()}
    if kind == "color":
        s = re.fullmatch(r"what color is the (\w+)\?", q)[1]
        assert shapes.count(s) == 1 and a == colors[shapes.index(s)]
    elif kind == "shape":
        c = re.fullmatch(r"what shape is (\w+)\?", q)[1]
        assert colors.count(c) == 1 and a == shapes[colors.index(c)]
    elif kind == "count":
        m = re.fullmatch(r"how many (?:(\w+) )?(\w+) are there\?", q)
        assert a.isdigit()
        if m[2] == "shapes":
            want = colors.count(m[1]) if m[1] else len(shapes)
        else:
            assert m[1] is None
            want = shapes.count(plural[m[2]])
        assert int(a) == want
    elif kind == "exists":
        m = re.fullmatch(r"is there (a|an) ([\w ]+)\?", q)
        assert m[1] == ("an" if m[2][0] in "aeiou" else "a")
        assert a == ("yes" if _find(sc, m[2]) else "no")
    elif kind == "position":
        m = re.fullmatch(r"which shape is (\w+)\?", q)
        if m:
            axis, sign = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1), "bottommost": (1, 1)}[m[1]]
            ranked = sorted(sc.objects, key=lambda o: sign * o.center[axis])
            assert sign * (ranked[-1].center[axis] - ranked[-2].center[axis]) >= S.POSITION_MARGIN
            assert a == ranked[-1].shape
        else:
            m = re.fullmatch(r"which shape is (left of|right of|above|below) (the [\w ]+)\?", q)
            anchor = _referent(sc, m[2])
            axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[m[1]]
            d = {o: sign * (o.center[axis] - anchor.center[axis]) for o in sc.objects if o is not anchor}
            hits = [o for o, v in d.items() if v >= S.POSITION_MARGIN]
            assert len(hits) == 1 and a == hits[0].shape
            assert all(v <= -S.POSITION_MARGIN for o, v in d.items() if o is not hits[0])   # no near call
    elif kind in ("detect", "point"):
        m = re.fullmatch(r"detect ([\w ]+)" if kind == "detect" else r"point to the ([\w ]+)", q)
        hits = sorted(_find(sc, m[1]), key=lambda o: o.center)
        if not hits:
            assert a == "none"
            return
        got = S.parse_boxes(a) if kind == "detect" else S.parse_points(a)
        want = [o.bbox if kind == "detect" else o.center for o in hits]
        assert len(got) == len(want)
        assert np.allclose(got, want, atol=0.0051), (q, a, want)
        assert a.count("<") == 2 * len(want)     # nothing but the boxes or points
    else:
        raise AssertionError(f"unknown kind {kind}")


def test_questions_are_true_of_their_scene():
    kinds, yes_no, position_qs = Counter(), Counter(), []
    for i in range(300):
        sc = S.make_scene("train", i)
        for r in range(2):
            for kind, q, a in S.questions(sc, np.random.default_rng([i, r])):
                _check(sc, kind, q, a)
                kinds[kind] += 1
                assert a == a.lower() and a.strip() == a
                if a in ("yes", "no"):
                    yes_no[kind, a] += 1
                if kind == "position":
                    position_qs.append(q)
        # A colour question exists exactly when some shape is unique (likewise shape / colour).
        got = {k for k, _, _ in S.questions(sc, np.random.default_rng(i))}
        shapes, colors = [o.shape for o in sc.objects], [o.color for o in sc.objects]
        assert ("color" in got) == any(shapes.count(s) == 1 for s in shapes)
        assert ("shape" in got) == any(colors.count(c) == 1 for c in colors)
        assert {"count", "exists", "detect", "point"} <= got
    assert set(kinds) == set(S.KINDS)
    yes, no = yes_no["exists", "yes"], yes_no["exists", "no"]
    assert 0.35 <= yes / (yes + no) <= 0.65, (yes, no)
    assert not yes_no["position", "yes"] + yes_no["position", "no"]     # position questions name a shape
    relative = [q for q in position_qs if " of " in q or "above " in q or "below " in q]
    assert 0.3 * len(position_qs) <= len(relative) <= 0.8 * len(position_qs)


def test_boxes_and_points_round_trip():
    sc = next(s for s in (S.make_scene("test", i) for i in range(50)) if len(s.objects) == 4)
    boxes = S.format_boxes(sc.objects)
    assert re.fullmatch(r"(<box>\d\.\d\d,\d\.\d\d,\d\.\d\d,\d\.\d\d</box> ?){4}", boxes + " ")
    ordered = sorted(sc.objects, key=lambda o: o.center)
    assert np.allclose(S.parse_boxes(boxes), [o.bbox for o in ordered], atol=0.0051)
    points = S.format_points(sc.objects)
    assert np.allclose(S.parse_points(points), [o.center for o in ordered], atol=0.0051)
    assert S.format_boxes([]) == S.format_points([]) == "none"
    assert S.parse_boxes("none") == [] and S.parse_points("none") == []
    # The harness parses model output leniently: malformed pieces are skipped, not fatal.
    messy = "<box>0.1,0.2,0.3,0.4</box><box>1,2</box> junk <box>a,b,c,d</box><box> 0.5,0.5,0.6,0.7 </box>"
    assert S.parse_boxes(messy) == [(0.1, 0.2, 0.3, 0.4), (0.5, 0.5, 0.6, 0.7)]
    assert S.parse_points("<point>0.25,0.75</point> <point>0.1</point>") == [(0.25, 0.75)]


def test_caption_lists_objects_left_to_right_and_the_background():
    for i in range(40):
        sc = S.make_scene("val", i)
        cap = S.caption(sc)
        assert cap.endswith(" on " + sc.background.describe())
        assert sc.background.color in cap
        things = cap[: -len(" on " + sc.background.describe())]
        parts = [re.sub(r"^an? ", "", t) for t in re.split(r", | and ", things)]
        assert parts == [f"{o.size} {o.color} {o.shape}" for o in sorted(sc.objects, key=lambda o: o.center)]
    one = next(s for s in (S.make_scene("val", i) for i in range(50)) if len(s.objects) == 2)
    a, b = sorted(one.objects, key=lambda o: o.center)
    assert S.caption(one).startswith(f"a {a.size} {a.color} {a.shape} and a {b.size} {b.color} {b.shape} on ")


# --- samples ---------------------------------------------------------------------------------

def test_samples_cover_every_kind_and_are_true():
    ss = S.samples("train", 300)
    assert len(ss) == 300 and [s.scene.index for s in ss] == list(range(300))
    shares = Counter(s.kind for s in ss)
    assert set(shares) == set(S.KINDS)
    assert min(shares.values()) >= 0.05 * len(ss), shares
    for s in ss:
        _check(s.scene, s.kind, s.question, s.answer)
        assert s.image.mode == "RGB" and s.image.size == (CFG.image_size, CFG.image_size)
    answers = Counter(s.answer for s in ss)
    assert answers["yes"] > 10 and answers["no"] > 10 and answers["none"] > 5


def test_samples_restricted_to_kinds():
    ss = S.samples("val", 12, kinds=["position"])
    assert len(ss) == 12 and {s.kind for s in ss} == {"position"}
    assert all(len(s.scene.objects) >= 2 for s in ss)
    with pytest.raises(ValueError):
        S.samples("val", 2, kinds=["colour"])
    with pytest.raises(ValueError):
        S.samples("val", S.SPLIT_SIZES["val"] + 1)


def test_save_examples(tmp_path):
    paths = S.save_examples(tmp_path, 3)
    assert len(paths) == 3 and all(p.suffix == ".png" and p.is_file() for p in paths)
    notes = json.loads((tmp_path / "annotations.json").read_text())
    assert [n["file"] for n in notes] == [p.name for p in paths]
    from PIL import Image

    first = S.make_scene("val", notes[0]["scene"]["index"])
    assert np.array_equal(_pixels(Image.open(paths[0])), _pixels(S.render(first)))
    assert notes[0]["caption"] == S.caption(first)
    assert {"question", "answer", "kind"} <= set(notes[0])


def test_shipped_sample_scenes_are_test_split_renders():
    """models/samples/scene_i.png (the demo's and README's examples) are exactly test scene i, so their
    questions and answers can be looked up with scenes.make_scene("test", i)."""
    from PIL import Image

    from edgevlm.resources import zoo_dir

    files = sorted((zoo_dir() / "samples").glob("scene_*.png"))
    assert len(files) >= 4
    for f in files:
        i = int(f.stem.split("_")[1])
        shipped = np.asarray(Image.open(f).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(S.render(S.make_scene("test", i)).convert("RGB"))), f.name
