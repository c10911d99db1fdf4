"""benchmarks/distill_report.py --vlm end to end at a tiny budget, on the shipped default model as the teacher:
the four rows (teacher, two 1-token students, an attached 1-token compressor) are trained, scored and written.
The numbers at this budget mean nothing; the README's table comes from the full command it quotes."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("accelerate")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distill_report.py"


def _load():
    spec = importlib.util.spec_from_file_location("distill_report", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["distill_report"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_vlm_section_trains_scores_and_writes_every_row(tmp_path):
    from edgevlm.zoo import get_vlm_recipe

    recipe = get_vlm_recipe("edgevlm_scenes")
    out = tmp_path / "distill.json"
    out.write_text(json.dumps({"digits": {"kept": True}}))        # sections are merged, not overwritten
    argv = ["--skip-digits", "--vlm", "--teacher-vlm-weights", str(recipe.shipped_weights(recipe.default_weights)),
            "--steps", "3", "--vlm-batch-size", "2", "--student-tower-steps", "2", "--limit", "8",
            "--eval-limit", "3", "--threads", "1", "--quiet", "--work", str(tmp_path / "work"), "--json", str(out)]
    assert _load().main(argv) == 0
    res = json.loads(out.read_text())
    assert res["digits"] == {"kept": True}
    scenes = res["scenes"]
    assert scenes["steps"] == 3 and scenes["student_tower_steps"] == 2 and scenes["eval_scenes"] == 3
    runs = scenes["runs"]
    assert list(runs) == ["teacher", "1-token student, scratch", "1-token student, distilled",
                          "teacher + attached 1-token compressor"]
    assert runs["teacher"]["vision_tokens"] == 36
    assert all(r["vision_tokens"] == 1 for name, r in runs.items() if name != "teacher")
    teacher_params = runs["teacher"]["trainable_params"]
    # students train everything; the attached compressor is a small part of the frozen teacher
    assert runs["1-token student, scratch"]["trainable_params"] > 0.9 * teacher_params
    assert 0 < runs["teacher + attached 1-token compressor"]["trainable_params"] < 0.1 * teacher_params
    # both students start from one tower stage at the recipe's batch; only the KD weight differs
    batch = recipe.training["tower_batch"]
    for name in ("1-token student, scratch", "1-token student, distilled"):
        assert f"2 label-only tower steps of {batch} images" in runs[name]["how"]
    assert "no teacher" in runs["1-token student, scratch"]["how"]
    assert "KD alpha 0.5" in runs["1-token student, distilled"]["how"]
    for r in runs.values():
        for split in ("val", "test"):
            assert 0.0 <= r[split]["exact_match"] <= 1.0 and set(r[split]["per_kind"]) <= set(scenes["kinds"])
    # the shipped teacher answers most short questions even on 3 scenes; random students would not score this
    assert runs["teacher"]["test"]["exact_match"] >= 0.6
