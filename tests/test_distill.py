"""Distillation: loss math by hand, the sparse teacher-logit store (round trip, replay, same gradient as a live
teacher), DeiT's distillation token, answer-token KD for VLMs, and bad input refused before any compute."""
from __future__ import annotations

import json
from dataclasses import replace
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevlm.compress.distill import (DistilledStudent, KDConfig, TeacherLogitStore, answer_kd_loss,
                                      check_same_vocabulary, dense_targets, hard_kd_loss, soft_kd_loss, sparse_topk)
from edgevlm.errors import CheckpointError, ConfigError, ImageError

pytest.importorskip("accelerate")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_soft_and_hard_kd_match_hand_computation():
    s, t, T = [1.0, 0.0, -1.0], [0.5, 1.5, 0.0], 2.0
    p, q = softmax([x / T for x in t]), softmax([x / T for x in s])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    got = soft_kd_loss(torch.tensor([s]), torch.tensor([t]), temperature=T)
    assert float(got) == pytest.approx(kl * T * T, rel=1e-6)
    # the same through given probabilities
    assert float(soft_kd_loss(torch.tensor([s]), teacher_probs=torch.tensor([p]), temperature=T)) == \
        pytest.approx(kl * T * T, rel=1e-5)
    # hard KD: cross-entropy against the teacher's argmax (class 1)
    assert float(hard_kd_loss(torch.tensor([s]), torch.tensor([t]))) == pytest.approx(-math.log(softmax(s)[1]), rel=1e-6)
    # the mix: (1 - alpha) CE(labels) + alpha KD
    cfg = KDConfig("soft", alpha=0.25, temperature=T)
    ce = -math.log(softmax(s)[2])
    got = cfg.loss(torch.tensor([s]), torch.tensor([2]), torch.tensor([p]))
    assert float(got) == pytest.approx(0.75 * ce + 0.25 * kl * T * T, rel=1e-5)
    assert float(KDConfig("none").loss(torch.tensor([s]), torch.tensor([2]), None)) == pytest.approx(ce, rel=1e-6)
    with pytest.raises(ConfigError, match="alpha"):
        KDConfig("soft", alpha=1.5)
    with pytest.raises(ConfigError, match="unknown kdkind"):
        KDConfig("medium")


def test_sparse_targets_reconstruct_the_teacher_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    T = 1.5
    full = torch.softmax(logits / T, -1)
    v, i, rest = sparse_topk(logits, 5, T)                       # k = C: exact
    assert torch.allclose(dense_targets(v, i, rest, 5, T), full, atol=1e-7)
    v, i, rest = sparse_topk(logits, 2, T)                       # top-2: classes 0 and 1 exact, the rest uniform
    got = dense_targets(v, i, rest, 5, T)[0]
    assert torch.allclose(got[[0, 1]], full[0, [0, 1]], atol=1e-6)
    left = float(1 - full[0, [0, 1]].sum())
    assert float(rest[0]) == pytest.approx(left, rel=1e-5)
    assert torch.allclose(got[[2, 3, 4]], torch.full((3,), left / 3), atol=1e-6)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-6)


def _store(path, k=3, epochs=1, dtype="float16"):
    return TeacherLogitStore.create(path, teacher="t", k=k, num_classes=10, temperature=2.0,
                                    data={"name": "d", "n": 6}, augmentation={"kind": "affine"}, value_dtype=dtype)


def test_store_round_trip_and_replay_of_the_augmented_view(tmp_path):
    from edgevlm.train.data import SeededAffine, sample_seed

    aug = SeededAffine()
    x = torch.randn(6, 3, 16, 16)
    seeds = [sample_seed(0, 0, i) for i in range(6)]
    views = aug.batch(x, seeds)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    with torch.no_grad():
        logits = teacher(views)
    st = _store(tmp_path / "s", k=3)
    st.write_epoch(0, np.arange(6), seeds, logits)
    back = TeacherLogitStore.open(tmp_path / "s")
    got_seeds, targets = back.lookup(0, [4, 1])
    assert got_seeds.tolist() == [seeds[4], seeds[1]]
    # replay: the stored seed gives the very view the teacher saw, and the teacher agrees with its stored top-k
    replay = aug.batch(x[[4, 1]], got_seeds.tolist())
    assert torch.equal(replay, views[[4, 1]])
    with torch.no_grad():
        again = teacher(replay)
    assert torch.equal(targets.topk(3).indices.sort().values, again.topk(3).indices.sort().values)
    want = dense_targets(*sparse_topk(logits[[4, 1]], 3, 2.0), 10, 2.0)
    assert torch.allclose(targets, want, atol=2e-3)                        # FP16 values
    assert not torch.equal(aug(x[0], seeds[0]), aug(x[0], seeds[0] + 1))  # the seed matters
    # storage per sample: id (int32), seed (int64), 3 FP16 values, 3 int16 indices, FP16 rest; plus headers
    assert back.size_bytes() < 6 * (4 + 8 + 6 + 6 + 2) + 1500


def test_store_refuses_a_run_it_does_not_fit(tmp_path):
    st = _store(tmp_path / "s", k=3)
    st.write_epoch(0, np.arange(6), np.arange(6), torch.randn(6, 10))
    with pytest.raises(CheckpointError, match="holds 1 epoch"):
        st.check_compatible(data={"name": "d", "n": 6}, num_classes=10, augmentation={"kind": "affine"}, epochs=2)
    with pytest.raises(CheckpointError, match="classes"):
        st.check_compatible(data={"name": "d", "n": 6}, num_classes=5, augmentation={"kind": "affine"}, epochs=1)
    with pytest.raises(CheckpointError, match="data"):
        st.check_compatible(data={"name": "other"}, num_classes=10, augmentation={"kind": "affine"}, epochs=1)
    with pytest.raises(CheckpointError, match="temperature"):
        st.check_compatible(data={"name": "d", "n": 6}, num_classes=10, augmentation={"kind": "affine"}, epochs=1,
                            temperature=4.0)
    with pytest.raises(CheckpointError, match="not a teacher-logit store"):
        TeacherLogitStore.open(tmp_path / "nothing")


def test_stored_teacher_gives_the_live_teachers_gradient_when_k_is_all_classes(tmp_path):
    from dist_worker import digits16, tiny_cnn
    from edgevlm.train.data import SeededAffine
    from edgevlm.train.distill import ClassifierTask, write_teacher_store

    data = digits16(32)
    teacher = tiny_cnn(1, 16).eval()
    kd = KDConfig("soft", alpha=0.7, temperature=3.0)
    aug = SeededAffine()
    write_teacher_store(teacher, "tiny", data, tmp_path / "store", epochs=2, k=10, temperature=3.0, seed=0, aug=aug,
                        dtype="float32", log=lambda m: None)
    store = TeacherLogitStore.open(tmp_path / "store")
    grads = []
    for src in ("live", "stored"):
        student = tiny_cnn(0)
        task = ClassifierTask("t", student, data, kd, 0, aug, teacher=teacher if src == "live" else None,
                              store=store if src == "stored" else None)
        batch = task.batch(np.array([3, 17, 5, 30]), epoch=1)
        loss = task.module(batch)["loss"]
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in student.parameters()]))
    (l1, g1), (l2, g2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5)             # float32 sums in another order: a few ulps
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-5) for a, b in zip(g1, g2))
    # and a top-3 store is not the same objective (the test can fail)
    write_teacher_store(teacher, "tiny", data, tmp_path / "s3", epochs=2, k=3, temperature=3.0, seed=0, aug=aug,
                        log=lambda m: None)
    task = ClassifierTask("t", tiny_cnn(0), data, kd, 0, aug, store=TeacherLogitStore.open(tmp_path / "s3"))
    with torch.no_grad():
        assert float(task.module(task.batch(np.array([3, 17, 5, 30]), 1))["loss"]) != pytest.approx(l1, rel=1e-6)


def test_deit_token_trains_two_heads_and_averages_them_at_inference():
    import timm

    torch.manual_seed(0)
    net = timm.create_model("fastvit_t8", num_classes=10)
    st = DistilledStudent(net).train()
    x = torch.randn(2, 3, 64, 64)
    cls, dist = st(x)
    assert cls.shape == dist.shape == (2, 10) and not torch.allclose(cls, dist)
    loss = KDConfig("deit", alpha=0.5).loss((cls, dist), torch.tensor([1, 2]), torch.softmax(torch.randn(2, 10), -1))
    loss.backward()
    assert st.dist_token.grad.abs().sum() > 0 and st.dist_head.weight.grad.abs().sum() > 0
    st.eval()
    st.training = True                           # the wrapper's two outputs with the backbone in eval mode
    with torch.no_grad():
        cls, dist = st(x)
        st.training = False
        assert torch.allclose(st(x), (cls + dist) / 2, atol=1e-5)
    assert set(st.backbone_state()) == set(net.state_dict())
    assert all(k.startswith("dist_") for k in st.dist_state())


def test_answer_kd_aligns_answers_behind_prompts_of_different_length():
    V = 7
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(1, 6, V), torch.randn(1, 9, V)
    # student: prompt of 3, answer of 3 tokens at positions 3..5; teacher: prompt of 6, answer at 6..8
    s_lab = torch.tensor([[-100, -100, -100, 4, 2, 1]])
    t_lab = torch.tensor([[-100] * 6 + [4, 2, 1]])
    T = 2.0
    want = 0.0
    for sp, tp in zip((2, 3, 4), (5, 6, 7)):                   # logits at t predict label t + 1
        p = torch.softmax(t_logits[0, tp] / T, -1)
        want += float((p * (p.log() - torch.log_softmax(s_logits[0, sp] / T, -1))).sum())
    got = answer_kd_loss(s_logits, s_lab, t_logits, t_lab, T)
    assert float(got) == pytest.approx(want / 3 * T * T, rel=1e-5)
    with pytest.raises(ConfigError, match="vocabulary"):
        answer_kd_loss(s_logits[..., :5], s_lab, t_logits, t_lab)


def test_vlm_vocabulary_mismatch_is_refused_before_training():
    from dataclasses import replace

    from edgevlm.modeling.families import build_vlm
    from edgevlm.zoo import get_vlm_recipe

    r = get_vlm_recipe("edgevlm_scenes_tiny")
    a = build_vlm(r)
    b = build_vlm(replace(r, config={**r.config, "text": {**r.config["text"], "vocab_size": 300}}))
    with pytest.raises(ConfigError, match="do not share a vocabulary.*320 output tokens.*300"):
        check_same_vocabulary(a, b)


def test_one_token_student_distils_from_a_many_token_teacher(tmp_path):
    from edgevlm.modeling.families import load_vlm
    from edgevlm.train.distill import VLMDistillConfig, distill_vlm, load_distilled_vlm
    from edgevlm.train.loop import TrainConfig

    teacher = load_vlm("edgevlm_scenes_tiny", weights="random")
    res = distill_vlm(VLMDistillConfig("edgevlm_scenes_tiny", TrainConfig(tmp_path, batch_size=4, max_steps=2,
                                                                          quiet=True),
                                       teacher_weights="random", vision_tokens=1, limit=8, val_limit=0,
                                       init_from_teacher=True), log=lambda m: None, teacher=teacher)
    assert res["changes"] == {"vision_tokens": 1} and res["copied_from_teacher"] > 0 and res["steps"] == 2
    student = load_distilled_vlm(res["weights"])
    assert student.connector.n_tokens == 1 and teacher.connector.n_tokens == 36
    # the reductions travel in the file: the student loads and exports under its base recipe's name
    assert load_vlm("edgevlm_scenes_tiny", weights=res["weights"]).connector.n_tokens == 1
    from edgevlm.cli import main

    out = tmp_path / "bundle"
    assert main(["export", "--model", "edgevlm_scenes_tiny", "--weights", str(res["weights"]), "--quant", "fp32",
                 "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["vision_tokens"] == 1


def test_student_starts_from_given_weights(tmp_path):
    from safetensors.torch import save_file

    from edgevlm.modeling.families import load_vlm
    from edgevlm.train.distill import VLMDistillConfig, build_student
    from edgevlm.train.loop import TrainConfig

    teacher = load_vlm("edgevlm_scenes_tiny", weights="random")
    cfg = VLMDistillConfig("edgevlm_scenes_tiny", TrainConfig(tmp_path), vision_tokens=1)
    first, _, _, _ = build_student(cfg, teacher)
    with torch.no_grad():                   # a fresh build has the same seed: make the saved weights differ
        for p in first.parameters():
            p.add_(0.5)
    save_file({k: v.clone().contiguous() for k, v in first.state_dict().items()}, str(tmp_path / "init.safetensors"))
    again, _, _, _ = build_student(replace(cfg, init_weights=tmp_path / "init.safetensors"), teacher)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    save_file({"nothing.fits": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ConfigError, match="has no tensor that fits"):
        build_student(replace(cfg, init_weights=tmp_path / "other.safetensors"), teacher)


def test_label_set_mismatch_fails_before_any_step(tmp_path):
    from edgevlm.train.distill import BackboneDistillConfig, distill_backbone
    from edgevlm.train.loop import TrainConfig

    cfg = BackboneDistillConfig("fastvit_t8", TrainConfig(tmp_path / "o", max_steps=1), teacher="fastvit_t8",
                                teacher_weights="random")                # a 1000-class head against 10 digits
    with pytest.raises(ConfigError, match="does not fit data digits: 1000 classes against 10"):
        distill_backbone(cfg, log=lambda m: None)
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_unreadable_images_in_a_data_folder_fail_before_any_step(tmp_path):
    from PIL import Image

    from edgevlm.train.distill import BackboneDistillConfig, distill_backbone
    from edgevlm.train.loop import TrainConfig

    for c in ("cat", "dog"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (i * 40, 10, 10)).save(tmp_path / "d" / c / f"{i}.png")
    (tmp_path / "d" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = BackboneDistillConfig("fastvit_t8", TrainConfig(tmp_path / "o", max_steps=1), kd=KDConfig("none"),
                                data=str(tmp_path / "d"))
    with pytest.raises(ImageError, match="1 of 7 images.*broken.jpg"):
        distill_backbone(cfg, log=lambda m: None)
    assert not (tmp_path / "o").exists()


def edgevlm(*args):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, text=True)


def test_cli_distill_smoke_and_one_line_errors(tmp_path, capsys):
    """A folder of real digits (class folders 0-9), the shipped TinyViT digits teacher written into a top-2 store."""
    from edgevlm.data import digits

    imgs, ys = digits.images("val")
    for c in range(10):
        (tmp_path / "d" / str(c)).mkdir(parents=True)
        for j in np.flatnonzero(ys == c)[:2]:
            imgs[j].save(tmp_path / "d" / str(c) / f"{j}.png")
    r = edgevlm("distill", "--student", "fastvit_t8", "--teacher", "tiny_vit_5m_224", "--data", tmp_path / "d",
                "--steps", "2", "--batch-size", "4", "--out", tmp_path / "o", "--kd", "hard", "--store",
                tmp_path / "store", "--top-k", "2", "--epochs", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable parameters" in r.stdout and "3,2" in r.stdout          # fastvit_t8 with 10 classes: 3.2M
    res = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert res["store"]["k"] == 2 and res["train"]["steps"] == 2
    assert TeacherLogitStore.open(tmp_path / "store").lookup(0, [0])[1].shape == (1, 10)
    from edgevlm.modeling.vision import load_backbone

    bb = load_backbone("fastvit_t8", str(tmp_path / "o" / "fastvit_t8.safetensors"))   # what export/eval read
    assert bb.num_classes == 10 and bb.labels == [str(i) for i in range(10)]
    from edgevlm.cli import main

    for args, needle in ((["--data", "digits"], "needs a teacher"),
                         (["--data", str(tmp_path / "missing"), "--kd", "none"], "neither a built-in data set nor a folder")):
        code = main(["distill", "--student", "fastvit_t8", "--out", str(tmp_path / "p"), *args])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.startswith("edgevlm: error:") and "fix:" in err
    assert not (tmp_path / "p").exists()
