"""edgevlm's default VLM: its family, training loop, saved format, and the scenes evaluation harness."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgevlm import evaluate_scenes as ev
from edgevlm.cli import main
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.modeling.families import load_vlm
from edgevlm.zoo import get_vlm_recipe

pytest.importorskip("transformers")


def test_scorers_on_hand_made_answers():
    ref = "<box>0.10,0.10,0.30,0.30</box> <box>0.50,0.50,0.70,0.70</box>"
    assert ev.score_detect(ref, ref) == pytest.approx(1.0)
    half = "<box>0.10,0.10,0.30,0.30</box>"                       # one of two boxes found
    assert ev.score_detect(half, ref) == pytest.approx(0.5)
    shifted = "<box>0.20,0.10,0.40,0.30</box> <box>0.50,0.50,0.70,0.70</box>"
    assert ev.score_detect(shifted, ref) == pytest.approx((1 / 3 + 1) / 2)
    assert ev.score_detect("none", "none") == 1.0 and ev.score_detect(half, "none") == 0.0
    pts = "<point>0.20,0.20</point> <point>0.60,0.60</point>"
    assert ev.score_point(pts, pts) == 1.0
    assert ev.score_point("<point>0.24,0.20</point>", pts) == 0.5          # within 0.05 of one target
    assert ev.score_point("<point>0.30,0.20</point>", pts) == 0.0
    assert ev.point_distance("<point>0.23,0.24</point>", "<point>0.20,0.20</point>") == pytest.approx(0.05)
    assert ev.caption_f1("a red circle", "a red circle") == 1.0
    assert ev.caption_f1("a blue circle", "a red circle") == pytest.approx(2 / 3)
    assert ev.score("count", " 3 ", "3") == 1.0 and ev.score("color", "red", "blue") == 0.0


def test_tokenizer_keeps_coordinates_whole_and_round_trips():
    from edgevlm.train.scenes_vlm import MARKUP, qa_pairs, train_tokenizer

    texts = [f"{q} {a}" for i in range(200) for _, q, a in qa_pairs("train", i)[1]]
    tok = train_tokenizer(texts, 600)
    for t in texts[:300]:
        assert tok.decode(tok.encode(t).ids) == t
    ids = tok.encode("<box>0.12,0.37,0.25,0.44</box>").ids
    assert len(ids) == 9                     # <box>, 4 coordinates, 3 commas, </box>
    assert all(tok.token_to_id(m) is not None for m in MARKUP)


def test_kind_weights_steer_which_questions_are_asked():
    from edgevlm.train.scenes_vlm import kind_weight_table, pick_questions, qa_pairs

    qa = qa_pairs("train", 0, draws=4)[1]
    kinds = {k for k, _, _ in qa}
    assert {"position", "color", "caption"} <= kinds
    rng = np.random.default_rng(0)
    w = kind_weight_table({"position": 8.0, "caption": 0})
    drawn = [k for _ in range(300) for k, _, _ in pick_questions(rng, qa, 4, w)]
    assert "caption" not in drawn                                   # weight 0: never asked
    n_pos = sum(k == "position" for k, _, _ in qa)
    share = drawn.count("position") / len(drawn)
    assert share > 2 * n_pos / len(qa)                              # weighted up well past its share of the pool
    assert len(pick_questions(rng, qa, 0, w)) == len(qa) - 1        # 0 = every question with a weight
    for bad in ({"colour": 1.0}, {"count": -1.0}, {k: 0 for k in kind_weight_table(None)}):
        with pytest.raises(ValueError, match="kind_weights"):
            kind_weight_table(bad)


def test_color_lookups_ask_every_colour_in_the_generators_words_for_training_only():
    from edgevlm.data import scenes
    from edgevlm.train.scenes_vlm import qa_pairs

    # scenes whose colours repeat and whose generator draws leave some colour lookups unasked
    seen_gap = False
    for i in range(40):
        plain = qa_pairs("train", i, draws=4)[1]
        more = qa_pairs("train", i, draws=4, color_lookups=True)[1]
        scene = scenes.make_scene("train", i)
        colors = [o.color for o in scene.objects]
        asked = {q: (k, a) for k, q, a in more}
        assert set(plain) <= set(more) and len(asked) == len(more)          # a superset, no question twice
        for o in scene.objects:
            q = f"what shape is {o.color}?"
            assert (q in asked) == (colors.count(o.color) == 1)              # only when the colour names one object
            if q in asked:
                assert asked[q] == ("shape", o.shape)
        for c in set(colors):
            assert asked[f"how many {c} shapes are there?"] == ("count", str(colors.count(c)))
        absent = [c for c in scenes.COLORS if c not in colors]
        assert not any(f"how many {c} shapes" in q for c in absent for q in asked)
        seen_gap |= len(more) > len(plain)
    assert seen_gap
    # the generator's own questions use the same words (what the evaluation asks)
    gen = [q for i in range(200) for k, q, _ in qa_pairs("val", i)[1] if k == "shape"]
    assert gen and all(q.startswith("what shape is ") and q.endswith("?") for q in gen)
    assert qa_pairs("val", 3)[1] == qa_pairs("val", 3, color_lookups=False)[1]


def test_train_command_runs_the_recipes_training_block(monkeypatch, tmp_path):
    import edgevlm.train.scenes_vlm as sv

    seen = {}
    monkeypatch.setattr(sv, "train_scenes_vlm", lambda name, out, **kw: seen.update(name=name, out=out, **kw))
    assert main(["train", "--model", "edgevlm_scenes", "--out", str(tmp_path / "w.safetensors")]) == 0
    block = get_vlm_recipe("edgevlm_scenes").training
    assert seen["name"] == "edgevlm_scenes" and seen["seed"] == 0
    assert {k: seen[k] for k in block} == block and block["question_draws"] > 1
    assert main(["train", "--model", "edgevlm_scenes", "--epochs", "1", "--out", str(tmp_path / "w.safetensors")]) == 0
    assert seen["epochs"] == 1                                          # --epochs overrides the recipe


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    from edgevlm.train.scenes_vlm import train_scenes_vlm

    out = tmp_path_factory.mktemp("scenes") / "tiny.safetensors"
    lines = []
    facts = train_scenes_vlm("edgevlm_scenes_tiny", out, epochs=1, images_per_step=8, train_images=32,
                             val_images=2, log=lines.append, tower_steps=3)
    facts["log"] = lines
    return out, facts


def test_training_saves_weights_that_load_and_answer(tiny_trained):
    out, facts = tiny_trained
    assert facts["dataset"] == "scenes" and len(facts["history"]) == 1
    # stage 1 (tower on the per-cell loss) ran and reported its validation cell accuracy; stage 2 kept it
    assert any("tower step 3/3" in line and "validation cells" in line for line in facts["log"])
    assert {"cell_shape", "cell_color"} <= set(facts["history"][0])
    vlm = load_vlm("edgevlm_scenes_tiny", weights=out)
    assert vlm.facts["trained_with"]["train_images"] == 32 and vlm.facts["trained_with"]["tower_steps"] == 3
    assert not any(k.startswith("head") for k in vlm.state_dict())     # no separate training-only head
    # the recipe's cell head is part of the tower: trained by the dense loss, saved, shown to the decoder
    assert "vision.cells.linear.weight" in vlm.state_dict()
    assert vlm.vision.out_dim == vlm.vision.feat_dim + vlm.vision.cells.width
    from edgevlm.data import scenes

    img = scenes.render(scenes.make_scene("test", 0))
    a = vlm.generate(img, "how many shapes are there?", max_new_tokens=6)
    assert a.stats.image_tokens == 36 and len(a.token_ids) <= 6
    # FP16 storage: the loaded weights are the saved ones to FP16 precision, and the file is small
    assert out.stat().st_size < 2 * sum(p.numel() for p in vlm.parameters()) + 200_000


def test_frozen_tower_trains_only_connector_and_decoder(tmp_path):
    from edgevlm.modeling.families import build_vlm
    from edgevlm.train.scenes_vlm import train_scenes_vlm

    lines = []
    out = tmp_path / "frozen.safetensors"
    train_scenes_vlm("edgevlm_scenes_tiny", out, epochs=1, images_per_step=8, train_images=16, val_images=2,
                     log=lines.append, tower_steps=0, freeze_tower=True)
    assert any("tower frozen" in line and "(36, " in line for line in lines)
    torch.manual_seed(0)                                  # the training run's seed: the same fresh weights
    fresh = build_vlm("edgevlm_scenes_tiny").state_dict()
    got = load_vlm("edgevlm_scenes_tiny", weights=out).state_dict()
    tower = [k for k in fresh if k.startswith("vision.") and fresh[k].is_floating_point()]
    assert tower and all(torch.allclose(got[k], fresh[k], atol=2e-3) for k in tower)
    assert not torch.allclose(got["connector.pos"], fresh["connector.pos"], atol=2e-3)   # the rest trained


def test_eval_harness_scores_every_kind(tiny_trained, tmp_path):
    import json

    out, _ = tiny_trained
    from edgevlm.evaluate import evaluate_vlm

    res = evaluate_vlm("edgevlm_scenes_tiny", weights=str(out), limit=3, json_out=tmp_path / "r.json", quiet=True)
    assert set(res["kinds"]) >= {"detect", "point", "caption", "count"}
    assert all(0.0 <= k["value"] <= 1.0 for k in res["kinds"].values())
    assert json.loads((tmp_path / "r.json").read_text())["scenes"] == 3


def test_tower_reparameterizes_with_equal_outputs():
    from edgevlm.compress.reparam import count_branches, reparameterize_model
    from edgevlm.modeling.families import build_vlm

    torch.manual_seed(0)
    vlm = build_vlm("edgevlm_scenes_tiny")
    for m in vlm.vision.modules():     # non-trivial BN statistics, or folding proves little
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 96, 96)
    before = vlm.vision(x)
    folded = reparameterize_model(vlm.vision)
    assert count_branches(vlm.vision) > 0 and count_branches(folded) == 0
    assert torch.allclose(folded(x), before, atol=1e-4)


def test_bad_weights_for_the_default_vlm(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    with pytest.raises(CheckpointError, match="carries no tokenizer"):
        load_vlm("edgevlm_scenes_tiny", weights=f)
    with pytest.raises(ConfigError, match="not trained on the scenes task"):
        from edgevlm.evaluate import evaluate_vlm

        evaluate_vlm("edgevlm_scenes_tiny", weights="random", limit=1, quiet=True)
    assert main(["eval", "llava_tiny", "--weights", "random", "--limit", "1"]) == 2


def test_every_cell_is_a_vision_token_and_a_compressor_attaches():
    """The default model shows the decoder each of its 6x6 cells (a learned position each); compression
    is attached afterwards on the same projector."""
    from edgevlm.modeling.families import build_vlm
    from edgevlm.modeling.scenes_vlm import CellProjector
    from edgevlm.train.distill import attach

    torch.manual_seed(0)
    vlm = build_vlm("edgevlm_scenes_tiny").eval()
    assert get_vlm_recipe("edgevlm_scenes").config["vision_tokens"] == 0
    assert isinstance(vlm.connector, CellProjector) and vlm.connector.n_tokens == 36
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens = vlm.vision(x)
        out = vlm.connector(tokens)
        # the same content in another cell gives another token: the position is part of it
        swapped = vlm.connector(tokens[:, [1, 0] + list(range(2, 36))])
    assert out.shape == (2, 36, vlm.hidden_size)
    assert not torch.allclose(swapped[:, 0], out[:, 1], atol=1e-4)
    with pytest.raises(ValueError, match="image size"):
        vlm.connector(tokens[:, :16])
    mini, parts = attach(vlm, 4, prefusion_layers=0)
    assert parts == ["connector.compressor"] and mini.connector.projector is vlm.connector.projector
    with torch.no_grad():
        assert mini.connector(mini.vision(x)).shape == (2, 4, vlm.hidden_size)


def test_cells_are_said_in_the_decoders_words_and_empty_cells_are_gated():
    """With ``cell_words`` a cell's token adds the decoder's own embedding of the shape and colour its head
    sees (shared with the decoder, trained by it); with ``gate`` a cell where the head sees no object passes
    its features on scaled by the head's objectness."""
    from edgevlm.data import scenes
    from edgevlm.modeling.families import build_vlm
    from edgevlm.modeling.scenes_vlm import PROB_SCALE, CellWords

    recipe = get_vlm_recipe("edgevlm_scenes_tiny")        # the tiny recipe switches both on, so every test uses them
    assert recipe.config["cell_words"] and recipe.config["vision"]["gate"]
    torch.manual_seed(0)
    vlm = build_vlm("edgevlm_scenes_tiny").eval()
    words, tower = vlm.connector.words, vlm.vision
    assert isinstance(words, CellWords) and tower.gate
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        tokens, raw, logits = tower.forward_with_cells(x)
    feat = torch.nn.functional.layer_norm(raw, raw.shape[-1:])
    assert torch.allclose(tokens[..., :tower.feat_dim], feat * tower.cells.objectness(logits), atol=1e-5)
    assert not torch.allclose(tokens[..., :tower.feat_dim], feat, atol=1e-3)

    # cell 5 made certainly red, then certainly blue: its word part moves by scale * (E[blue] - E[red])
    off, s = tower.feat_dim, len(scenes.SHAPES) + 1
    red, blue = (s + list(scenes.COLORS).index(c) for c in ("red", "blue"))
    a, b = tokens.clone(), tokens.clone()
    for t, c in ((a, red), (b, blue)):
        t[:, 5, off + s:off + s + len(scenes.COLORS) + 1] = 0
        t[:, 5, off + c] = PROB_SCALE
    emb = vlm.language_model.get_input_embeddings()
    say = lambda w: emb(torch.tensor(vlm.tokenizer.encode(" " + w))).mean(0)          # noqa: E731
    with torch.no_grad():
        d = words(b) - words(a)
    assert torch.allclose(d[:, 5], (words.scale * (say("blue") - say("red"))).expand(2, -1), atol=1e-5)
    assert torch.allclose(d[:, :5], torch.zeros_like(d[:, :5])) and d[:, 5].abs().max() > 0
    # one table, the decoder's: trained through the cells, and not stored twice
    vlm.connector(tokens).sum().backward()
    assert emb.weight.grad[words.ids[words.mask > 0]].abs().sum() > 0
    assert [k for k in vlm.state_dict() if k.startswith("connector.words")] == ["connector.words.scale"]


def test_cell_targets_put_each_object_at_its_centre_cell():
    from edgevlm.data import scenes
    from edgevlm.train.scenes_vlm import NO_COLOR, NO_SHAPE, cell_targets

    for i in range(20):
        sc = scenes.make_scene("train", i)
        t = cell_targets(sc, 6)
        objs = t[t[:, 0] < NO_SHAPE]
        assert (t[:, 0] < NO_SHAPE).sum() == (t[:, 1] < NO_COLOR).sum() <= len(sc.objects)
        for o in sc.objects:
            cell = min(int(o.center[1] * 6), 5) * 6 + min(int(o.center[0] * 6), 5)
            if t[cell, 0] == scenes.SHAPES.index(o.shape):          # unless a larger object shares the cell
                assert t[cell, 1] == list(scenes.COLORS).index(o.color)
                np.testing.assert_allclose(t[cell, 2:4], o.center, atol=1e-6)
        assert len(objs) >= 1


def test_look_cells_are_the_centre_cells_of_the_objects_a_question_names():
    from edgevlm.train.scenes_vlm import look_cells, qa_pairs

    def cell(o):
        return min(int(o.center[1] * 6), 5) * 6 + min(int(o.center[0] * 6), 5)

    kinds_seen = set()
    for i in range(60):
        scene, qa = qa_pairs("train", i, draws=2)
        objs = scene.objects
        for kind, q, a in qa:
            got = sorted(look_cells(scene, kind, q, 6))
            if kind == "shape":                                  # "what shape is red?": the red object
                want = [cell(o) for o in objs if f" {o.color}?" in q]
                assert len(want) == 1 and got == want and objs[[cell(o) for o in objs].index(got[0])].shape == a
            elif kind == "color":
                assert got == [cell(o) for o in objs if f" {o.shape}?" in q]
            elif kind == "count" and q == "how many shapes are there?":
                assert got == sorted(cell(o) for o in objs)
            elif kind == "count":                                # as many named cells as the answer says
                assert len(got) == int(a)
            elif kind == "exists":
                assert bool(got) == (a == "yes")
            elif kind in ("position", "caption"):
                assert got == []
            kinds_seen.add(kind)
    assert {"shape", "color", "count", "exists", "position"} <= kinds_seen


def test_look_position_finds_the_reference_or_the_extreme_object():
    """With ``positions`` (recipe key ``look_position``), "which shape is left of the red star?" looks at the red
    star (the only object of that name) and names " left", " red", " star"; "which shape is leftmost?" looks at
    the object that answers it. Without it, position questions look at nothing (the shipped recipe)."""
    from edgevlm.data import scenes
    from edgevlm.train.scenes_vlm import look_cells, named, qa_pairs

    def cell(o):
        return min(int(o.center[1] * 6), 5) * 6 + min(int(o.center[0] * 6), 5)

    assert named("position", "Which shape is left of the Red star", True) == ("red", "star", ["left", "red", "star"])
    assert named("position", "which shape is above the circle?", True) == (None, "circle", ["above", "circle"])
    assert named("position", "which shape is bottommost?", True) == (None, None, ["bottommost"])
    assert named("position", "which shape is left of the red star?") is None
    seen = {"relation": 0, "extreme": 0}
    for i in range(120):
        config = scenes.SceneConfig(varied=bool(i % 2))
        scene, qa = qa_pairs("train", i, draws=2, config=config)
        for kind, q, a in qa:
            if kind != "position":
                continue
            assert look_cells(scene, kind, q, 6) == []
            got = look_cells(scene, kind, q, 6, positions=True)
            color, shape, words = named(kind, q, True)
            objs = scene.objects
            if shape is None:                                    # an extreme: the answer's object
                axis, sign = {"leftmost": (0, -1), "rightmost": (0, 1), "topmost": (1, -1),
                              "bottommost": (1, 1)}[words[0]]
                far = max(objs, key=lambda o: sign * o.center[axis])
                assert got == [cell(far)] and far.shape == a
                seen["extreme"] += 1
            else:                                                # a relation: its one reference object
                ref = [o for o in objs if o.shape == shape and color in (None, o.color)]
                assert len(ref) == 1 and got == [cell(ref[0])] and words[0] in q.lower()
                axis, sign = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}[words[0]]
                side = [o for o in objs if sign * (o.center[axis] - ref[0].center[axis]) > 0]
                assert [o.shape for o in side] == [a]            # the answer is the one object on that side
                seen["relation"] += 1
    assert min(seen.values()) >= 5, seen


def test_word_tokens_find_the_words_a_question_looks_up_by():
    from edgevlm.processor import TextTokenizer
    from edgevlm.train.scenes_vlm import named, train_tokenizer, word_tokens

    hf = train_tokenizer(["what shape is red? how many stars are there? is there a red star? how many shapes"
                          " which shape is left of the red star?"] * 5, 300)
    tok = TextTokenizer(hf, hf.token_to_id("<s>"), (hf.token_to_id("</s>"),), "t")
    for kind, q, want in (("shape", "what shape is red?", {" red"}), ("count", "how many stars are there?", {" stars"}),
                          ("exists", "is there a red star?", {" red", " star"}),
                          ("count", "how many shapes are there?", {" shapes"}),
                          ("position", "which shape is left of the red star?", {" left", " red", " star"})):
        ids = tok.encode(q + "\n")
        got = word_tokens(tok, ids, named(kind, q, positions=True)[2])
        assert got and "".join(tok.decode([ids[j]]) for j in got).split() == [w.strip() for w in
                                                                              sorted(want, key=q.index)]
    assert named("position", "which shape is left of the red star?") is None
    assert named("count", "how many shapes are there?") == (None, None, ["shapes"])


def test_look_loss_reads_the_attention_the_layer_computes():
    """The look loss recomputes one layer's attention at the answer positions (the forward pass stays on
    SDPA); it must equal what the eager implementation returns, packed rows and masks included."""
    import math

    from edgevlm.modeling.families import build_vlm
    from edgevlm.train.scenes_vlm import answer_starts, look_loss, pack_questions

    torch.manual_seed(0)
    lm = build_vlm("edgevlm_scenes_tiny").eval().language_model
    attn, seen = lm.model.layers[1].self_attn, {}
    hook = attn.register_forward_pre_hook(lambda mod, args, kw: seen.update(kw) and None, with_kwargs=True)
    segs = [[([5, 6, 7], [8, 9]), ([10, 11], [12])], [([13, 14, 15, 16], [17, 18, 19])]]
    prefix = 1 + 36
    ids, mask, pos, labels, answer = pack_questions(prefix, segs, 0)
    x = torch.cat([torch.randn(2, prefix, lm.config.hidden_size), lm.get_input_embeddings()(ids)], 1)
    lm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            weights = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False,
                         output_attentions=True).attentions[1]
            first = answer_starts(answer)
            got = look_loss(attn, seen, mask, [first[0], first[2]], [[4, 5], [1]])
    finally:
        lm.config._attn_implementation = "sdpa"
        hook.remove()
    # answer 0 starts at row 0, position prefix + 3 - 1; answer 2 at row 1, position prefix + 4 - 1
    assert first == {0: (0, prefix + 2), 1: (0, prefix + 6), 2: (1, prefix + 3)}
    want = (-math.log(float(weights[0, :, prefix + 2, [4, 5]].sum(-1).mean()))
            - math.log(float(weights[1, :, prefix + 3, [1]].sum(-1).mean()))) / 2
    assert abs(float(got) - want) < 1e-4
    assert float(look_loss(attn, seen, mask, [], [])) == 0.0


def test_look_weight_trains_and_is_recorded(tmp_path):
    from edgevlm.modeling.checkpoint import read_metadata
    from edgevlm.train.scenes_vlm import train_scenes_vlm

    lines = []
    out = tmp_path / "look.safetensors"
    facts = train_scenes_vlm("edgevlm_scenes_tiny", out, epochs=1, images_per_step=4, train_images=200,
                             val_images=2, log=lines.append, tower_steps=0, look_weight=1.0, look_words=0.5,
                             questions_per_image=8, look_position=True)
    assert facts["trained_with"]["look_weight"] == 1.0 and facts["trained_with"]["look_words"] == 0.5
    assert facts["trained_with"]["look_position"] is True
    for part in (" look ", " words "):
        got = [float(line.split(part)[1].split()[0]) for line in lines if part in line]
        assert got and all(math.isfinite(v) and v > 0 for v in got)       # each loss was computed and logged
    assert read_metadata(out)["trained_with"]["look_layer"] == 1
    assert load_vlm("edgevlm_scenes_tiny", weights=out).language_model.config._attn_implementation != "eager"
    with pytest.raises(ValueError, match="look_layer"):
        train_scenes_vlm("edgevlm_scenes_tiny", tmp_path / "x.safetensors", train_images=4, val_images=1,
                         tower_steps=0, look_weight=1.0, look_layer=9)


def test_compression_report_runs_every_precision_and_backend(tiny_trained, tmp_path):
    import hashlib
    import json
    import subprocess
    import sys

    out, _ = tiny_trained
    r = subprocess.run([sys.executable, "benchmarks/compression_report.py", "--variant", f"edgevlm_scenes_tiny={out}",
                        "--limit", "1", "--precisions", "fp32", "int8", "--bench-runs", "1",
                        "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    engines = {(row["engine"], row["precision"]) for row in data["rows"]}
    assert ("eager PyTorch", "fp32") in engines and ("onnxruntime", "int8") in engines
    for row in data["rows"]:
        assert 0 <= row["qa_exact_match"] <= 100
        if row["engine"] != "eager PyTorch":
            assert row["size_mb"] > 0 and row["ttft_ms"] > 0 and "delta_points" in row
    # FP32 bundles answer as the eager model does: same score
    fp32 = [row for row in data["rows"] if row["precision"] == "fp32"]
    assert len({row["qa_exact_match"] for row in fp32}) == 1
    assert {t["precision"] for t in data["targets"]} == {"int8"}
    assert (tmp_path / "out" / "compression_report.png").is_file()
    # a cached bundle is reused only when it was exported from the same weights (its sha256 stamp beside it)
    stamp = tmp_path / "cache" / "edgevlm_scenes_tiny-cpu-fp32-both.weights-sha256"
    assert stamp.read_text() == hashlib.sha256(out.read_bytes()).hexdigest()
    again = [sys.executable, "benchmarks/compression_report.py", "--variant", f"edgevlm_scenes_tiny={out}", "--limit",
             "1", "--precisions", "fp32", "--no-eager", "--bench-runs", "1", "--cache", str(tmp_path / "cache"),
             "--out", str(tmp_path / "out2")]
    r = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "exporting" not in r.stdout + r.stderr, r.stderr[-2000:]
    stamp.write_text("0" * 64)                  # as if the weights had changed since the bundle was exported
    r = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "exporting the cpu fp32 bundle" in r.stdout + r.stderr, r.stderr[-2000:]
    assert stamp.read_text() == hashlib.sha256(out.read_bytes()).hexdigest()



def test_packed_questions_equal_separate_sequences():
    """Questions packed into one row per image (shared BOS + vision prefix) give each answer exactly the
    logits and loss it gets alone, so packing changes the speed of training, not what is learned."""
    import torch
    import torch.nn.functional as F

    from edgevlm.train.scenes_vlm import answer_mean_loss, pack_questions

    torch.manual_seed(0)
    from edgevlm.modeling.families import build_vlm

    lm = build_vlm("edgevlm_scenes_tiny").eval().language_model
    emb = lm.get_input_embeddings()
    vis = torch.randn(2, 4, lm.config.hidden_size)
    before, prefix = [5], 5
    segs = [[([7, 8, 9], [11, 1]), ([12, 13], [14, 15, 16, 1])], [([20, 21, 22, 23], [24, 1])]]
    ids, mask, pos, labels, answer = pack_questions(prefix, segs, pad=2)
    assert ids.shape == (2, 11) and mask.shape == (2, 1, 16, 16)
    x = torch.cat([emb(torch.tensor(before)).expand(2, -1, -1), vis, emb(ids)], 1)
    k, lone_losses = 0, []
    with torch.no_grad():
        packed = lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).logits
        loss = answer_mean_loss(packed, labels, answer)
        for r, row in enumerate(segs):
            for q, a in row:
                alone = torch.cat([emb(torch.tensor(before)), vis[r], emb(torch.tensor(q + a))])[None]
                logits = lm(inputs_embeds=alone, use_cache=False).logits[0]
                start = prefix + len(q) - 1                    # the positions whose next token is the answer
                at = (answer[r] == k).nonzero().flatten()
                assert labels[r, at].tolist() == a
                assert torch.allclose(packed[r, at], logits[start:start + len(a)], atol=1e-5)
                lone_losses.append(F.cross_entropy(logits[start:start + len(a)], torch.tensor(a)))
                k += 1
    assert torch.allclose(loss, torch.stack(lone_losses).mean(), atol=1e-5)


def test_shipped_weights_were_made_by_the_recipes_training_block():
    """The default model's file records how it was trained; that must be the recipe's `training:` block
    (what `edgevlm train --model edgevlm_scenes` runs), and it must stay within the 30 MB budget."""
    from edgevlm.modeling.checkpoint import read_metadata

    recipe = get_vlm_recipe("edgevlm_scenes")
    path = recipe.shipped_weights(recipe.default_weights)
    trained = read_metadata(path)["trained_with"]
    assert recipe.training and {k: trained[k] for k in recipe.training} == recipe.training
    assert trained["seed"] == 0 and trained["train_images"] == 20_000
    assert path.stat().st_size <= 30e6
    vlm = load_vlm("edgevlm_scenes")                       # no --weights: the shipped file
    assert vlm.connector.n_tokens == 36 and sum(p.numel() for p in vlm.parameters()) == recipe.params


# --- varied looks in training (recipe key `varied`) -----------------------------------------------

def test_named_and_look_cells_read_questions_as_people_type_them():
    from edgevlm.data import scenes
    from edgevlm.train.scenes_vlm import look_cells, named, qa_pairs

    assert named("color", "What colour is the Star") == (None, "star", ["star"])
    assert named("color", "what colour is the star?") == named("color", "what color is the star?")
    assert named("shape", "What shape is red") == ("red", None, ["red"])
    assert named("count", "How many Stars are there") == (None, "star", ["stars"])
    assert named("count", "How many shapes are there") == (None, None, ["shapes"])
    assert named("exists", "Is there a Red star") == ("red", "star", ["red", "star"])
    typed = 0
    for i in range(60):
        scene, qa = qa_pairs("train", i, 2, config=scenes.SceneConfig(varied=True))
        for kind, q, _ in qa:
            plain = q[0].lower() + q[1:].replace("colour", "color")
            typed += plain != q
            assert look_cells(scene, kind, q, 6) == look_cells(scene, kind, plain, 6), q
    assert typed > 30


def test_word_tokens_find_capitalised_words():
    from edgevlm.processor import TextTokenizer
    from edgevlm.train.scenes_vlm import named, train_tokenizer, word_tokens

    hf = train_tokenizer(["What colour is the star How many Stars are there? what shape is red"] * 5, 300)
    tok = TextTokenizer(hf, hf.token_to_id("<s>"), (hf.token_to_id("</s>"),), "t")
    for kind, q, want in (("color", "What colour is the star", ["star"]), ("count", "How many Stars are there?",
                                                                            ["Stars"])):
        ids = tok.encode(q + "\n")
        got = word_tokens(tok, ids, named(kind, q)[2])
        assert "".join(tok.decode([ids[j]]) for j in got).split() == want


def test_pre_tokenizer_keeps_capitalised_words_whole_and_splits_lower_case_as_before():
    import re

    from edgevlm.train.scenes_vlm import PRE_TOKEN, qa_pairs

    before = r" ?[01]\.\d\d| ?[a-z]+| ?\d+| ?[^\sa-z\d]+|\s+"        # the pre-tokenizer of the shipped model
    texts = [f"{q} {a}" for i in range(100) for _, q, a in qa_pairs("train", i, draws=2)[1]]
    assert all(re.findall(PRE_TOKEN, t) == re.findall(before, t) for t in texts)
    assert re.findall(PRE_TOKEN, "What colour is the Star?") == ["What", " colour", " is", " the", " Star", "?"]


def test_qa_pairs_of_varied_scenes_are_typed():
    from edgevlm.data import scenes
    from edgevlm.train.scenes_vlm import qa_pairs

    varied = scenes.SceneConfig(varied=True)
    capital = 0
    for i in range(30):
        assert qa_pairs("train", i, 3, True, scenes.SceneConfig()) == qa_pairs("train", i, 3, True)
        scene, qa = qa_pairs("train", i, 3, config=varied)
        assert scene == scenes.make_scene("train", i, varied) and qa[-1][0] == "caption"
        assert len({q for _, q, _ in qa}) == len(qa)
        capital += sum(q[0].isupper() for _, q, _ in qa)
    assert capital > 20


def test_build_split_renders_varied_train_scenes_at_the_models_size():
    from edgevlm.processor import ImageSpec
    from edgevlm.train.scenes_vlm import build_split, cell_targets, is_varied

    spec = ImageSpec(**get_vlm_recipe("edgevlm_scenes_tiny").image)
    kept: list = []
    imgs, qas, cells = build_split("train", 12, spec, log=lambda m: None, grid=6, draws=2, varied=1.0, keep=kept)
    assert imgs.shape == (12, spec.size, spec.size, 3) and len(qas) == len(kept) == 12
    assert any((s.width, s.height) != (spec.size, spec.size) for s in kept)           # squashed to the model's size
    assert all(s.look is not None for s in kept)
    assert all(np.array_equal(cells[i], cell_targets(s, 6)) for i, s in enumerate(kept))
    plain, _, _ = build_split("train", 12, spec, log=lambda m: None)
    assert not np.array_equal(plain, imgs)
    # a share: those scenes is_varied picks are the varied ones, the others the benchmark's own, pixel for pixel
    half: list = []
    mixed, _, _ = build_split("train", 12, spec, log=lambda m: None, varied=0.5, keep=half)
    picked = [is_varied(i, 0.5) for i in range(12)]
    assert 4 <= sum(picked) <= 8 and [s.look is not None for s in half] == picked
    assert all(np.array_equal(mixed[i], (imgs if p else plain)[i]) for i, p in enumerate(picked))
    assert abs(sum(is_varied(i, 0.3) for i in range(1000)) - 300) <= 2      # an even spread


def test_varied_training_runs_and_is_recorded(tmp_path):
    from edgevlm.train.scenes_vlm import train_scenes_vlm

    lines: list = []
    facts = train_scenes_vlm("edgevlm_scenes_tiny", tmp_path / "v.safetensors", epochs=1, images_per_step=4,
                             train_images=12, val_images=2, tower_steps=2, look_weight=1.0, look_words=1.0,
                             varied=True, log=lines.append)
    assert facts["trained_with"]["varied"] == 1.0
    assert any("(100% varied looks)" in m for m in lines)
    assert load_vlm("edgevlm_scenes_tiny", weights=tmp_path / "v.safetensors") is not None
