"""ios VLM bundles: every part a Core ML ML Program (the decoder stateful, iOS 18), the embedding table raw, each
package run by edgevlm's reference ML-program interpreter at export (parity recorded) and by the runtime (end-to-end
parity, golden cases, `edgevlm run`/`verify`), for every VLM family."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="the ios target converts with coremltools (the coreml extra)")

from edgevlm.config import VLMExportConfig
from edgevlm.errors import BundleError, ConfigError, ExportError
from edgevlm.exporters import coreml_vlm as cv
from edgevlm.modeling.families import load_vlm
from edgevlm.runtime import golden as g


def _export(out: Path, name: str, precision: str, **kw):
    """As tests/test_android_vlm.py: random weights scaled so greedy tokens vary."""
    from edgevlm.api import export_config

    vlm = load_vlm(name, weights="random")
    with torch.no_grad():
        for p in vlm.language_model.parameters():
            p.mul_(4.0)
    cfg = VLMExportConfig(model=name, weights="random", target="ios", precision=precision, calib_size=4, out=out, **kw)
    return export_config(cfg, quiet=True, model=vlm.eval())


@pytest.fixture(scope="module")
def scenes_fp16(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("ios") / "scenes-fp16", "edgevlm_scenes_tiny", "fp16")


def test_scenes_bundle_parts_states_and_deployment_targets(scenes_fp16):
    out, m = scenes_fp16
    assert m["target"]["format"] == "coreml" and m["target"]["vlm"]["decoders"] == ["coreml"]
    parts = m["parts"]
    assert set(parts) == {"vision_encoder", "embed_tokens", cv.DECODER_PART}
    assert parts["vision_encoder"]["path"] == "vision_encoder.mlpackage" and (out / "vision_encoder.mlpackage").is_dir()
    assert parts["vision_encoder"]["details"]["coreml"]["minimum_deployment_target"] == "iOS16"
    dec = parts[cv.DECODER_PART]
    assert dec["path"] == cv.DECODER_FILE and dec["details"]["coreml"]["minimum_deployment_target"] == "iOS18"
    n, h, hd = (m["generation"][k] for k in ("num_layers", "num_kv_heads", "head_dim"))
    ctx = m["generation"]["context_length"]
    assert dec["details"]["states"] == {s: [n, 1, h, ctx, hd] for s in cv.STATES}
    emb = parts["embed_tokens"]
    assert emb["format"] == "raw" and emb["details"]["dtype"] == "float16"
    v, d = emb["details"]["shape"]
    assert (out / emb["path"]).stat().st_size == v * d * 2
    # no ONNX file ships in an ios bundle; every file is checksummed (package directories file by file)
    assert not list(out.rglob("*.onnx"))
    assert any(k.startswith("decoder.mlpackage/") for k in m["files"])


def test_every_package_ran_through_the_reference_interpreter_at_export(scenes_fp16):
    _, m = scenes_fp16
    for name, rec in m["parts"].items():
        if rec["format"] != "coreml":
            continue
        ref = rec["parity"]["reference_interpreter"]
        assert ref["status"] == "ok", (name, ref)
        assert ref["max_rel_diff"] < 0.02, (name, ref["max_rel_diff"])      # FP16 programs against eager FP32
    dec = m["parts"][cv.DECODER_PART]["parity"]
    assert dec["traced"]["max_rel_diff"] < 5e-3          # float16 KV states against the eager LM's float32 cache
    assert dec["reference_interpreter"]["calls"] == [6, 1, 1, 1, 1]
    assert dec["reference_interpreter"]["top1_agreement"] >= 0.8


def test_end_to_end_parity_and_golden_cases_run_through_the_interpreter(scenes_fp16):
    from edgevlm import runtime

    out, m = scenes_fp16
    (res,) = m["parity"]["results"]
    assert res["backend"] == "coreml" and res["teacher_forced_top1_agreement"] >= 0.8
    doc = json.loads((out / g.GOLDEN_JSON).read_text())
    assert set(doc["measured"]["figures"]) == {"coreml"}
    pipe = runtime.load(out)
    assert pipe.backend == "coreml-reference"
    report = pipe.verify()
    assert report.passed, report.rows


def test_cli_verify_and_run_say_reference_interpreter(scenes_fp16):
    from edgevlm.cli import DECODERS
    from edgevlm.runtime.vlm_ops import DECODERS as RUNTIME_DECODERS

    assert DECODERS == RUNTIME_DECODERS
    out, _ = scenes_fp16
    p = subprocess.run([sys.executable, "-m", "edgevlm", "verify", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "coreml" in p.stdout
    doc = json.loads((out / g.GOLDEN_JSON).read_text())
    img = out / g.GOLDEN_DIR / doc["cases"][0]["image"]
    p = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(out), "--image", str(img), "--prompt",
                        doc["cases"][0]["prompt"], "--max-new-tokens", "4"], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "coreml-reference" in p.stderr


def test_a_perturbed_decoder_weight_fails_verify(scenes_fp16, tmp_path):
    """The golden cases catch a decoder whose weights changed after export (checksums rewritten)."""
    import shutil

    from edgevlm import bundle, runtime

    out, _ = scenes_fp16
    d = tmp_path / "b"
    shutil.copytree(out, d)
    blob = d / "decoder.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    raw = bytearray(blob.read_bytes())
    rng = np.random.default_rng(0)
    body = np.frombuffer(bytes(raw[4096:]), np.uint8).copy()
    idx = rng.choice(len(body), size=len(body) // 3, replace=False)
    body[idx] = rng.integers(0, 255, len(idx), dtype=np.uint8)
    raw[4096:] = body.tobytes()
    blob.write_bytes(bytes(raw))
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = bundle.file_table(d)
    (d / "manifest.json").write_text(json.dumps(m))
    try:
        report = runtime.load(d).verify()
    except BundleError:
        return                                    # a broken blob record is refused outright: also a failure
    assert not report.passed


def test_moondream_bundle_has_every_part_and_its_skills_run(tmp_path):
    from edgevlm import runtime

    out, m = _export(tmp_path / "md", "moondream2_tiny", "fp16")
    assert {"vision_tower", "vision_projector", "region", cv.DECODER_PART} <= set(m["parts"])
    assert "hidden" in m["parts"][cv.DECODER_PART]["details"]["outputs"]
    tower = m["parts"]["vision_tower"]["details"]["coreml"]
    assert tower["minimum_deployment_target"] == "iOS16"
    pipe = runtime.load(out)
    assert pipe.verify().passed
    img = out / g.GOLDEN_DIR / json.loads((out / g.GOLDEN_JSON).read_text())["cases"][0]["image"]
    boxes = pipe.detect(img, "circle", max_objects=2)
    assert isinstance(boxes, list)


@pytest.mark.parametrize("name", ["llava_tiny", "llava_mini_tiny", "tinygpt_v_tiny", "smolvlm_tiny"])
def test_other_families_export_int4_and_verify(tmp_path, name):
    from edgevlm import runtime

    out, m = _export(tmp_path / name, name, "int4")
    dec = m["parts"][cv.DECODER_PART]
    assert dec["details"]["coreml"]["weights"] == "int4 block-wise symmetric"
    assert all(r["details"]["coreml"]["minimum_deployment_target"] == "iOS18"
               for r in m["parts"].values() if r["format"] == "coreml")
    assert runtime.load(out).verify().passed


def test_decoder_choice_and_bounds_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="does not take"):
        _export(tmp_path / "x", "edgevlm_scenes_tiny", "fp16", decoder="onnx")
    from edgevlm.parts import PartSpec

    spec = PartSpec("p", torch.nn.Identity(), ("x",), ("y",), (torch.zeros(2, 3),), dynamic={"x": {0: "rows"}})
    with pytest.raises(ExportError, match="no bound"):
        cv._tensor_type(spec, "x", spec.example[0])


def test_raw_embedding_refuses_a_short_file(scenes_fp16, tmp_path):
    from edgevlm.runtime.coreml import RawEmbedding

    out, m = scenes_fp16
    rec = m["parts"]["embed_tokens"]
    short = tmp_path / "e.f16"
    short.write_bytes((out / rec["path"]).read_bytes()[:-2])
    with pytest.raises(BundleError, match="bytes"):
        RawEmbedding(short, rec["details"])
    table = RawEmbedding(out / rec["path"], rec["details"])
    with pytest.raises(BundleError, match="outside"):
        table(input_ids=np.array([[10 ** 6]]))


def test_a_part_that_does_not_convert_names_the_part_and_the_op(tmp_path):
    """Core ML's converter has no bicubic resize: the export names the part and the op, and writes nothing."""
    import torch.nn.functional as F

    from edgevlm.config import Precision
    from edgevlm.parts import PartSpec
    from edgevlm.targets import get_target

    class Bicubic(torch.nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2.0, mode="bicubic", align_corners=False)

    spec = PartSpec("upsampler", Bicubic(), ("pixel_values",), ("image_embeds",), (torch.rand(1, 3, 8, 8),))
    with pytest.raises(ExportError, match=r"part upsampler: .*upsample_bicubic2d"):
        cv.export_image_part(spec, Precision.FP16, get_target("ios"), tmp_path, 32, lambda *_: None)
    assert not (tmp_path / "upsampler.mlpackage").exists()


def test_fp32_is_refused_for_vlms_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match=r"does not take VLMs at fp32 \(Core ML states.*float16 only\).*--quant fp16"):
        _export(tmp_path / "x", "edgevlm_scenes_tiny", "fp32")
    assert not (tmp_path / "x").exists()


def test_the_cli_export_summary_sizes_package_directories(scenes_fp16, capsys):
    from edgevlm.cli import _print_vlm_export

    out, m = scenes_fp16
    _print_vlm_export(out, m)
    text = capsys.readouterr().out
    size = sum(f.stat().st_size for f in (out / "decoder.mlpackage").rglob("*") if f.is_file())
    assert "decoder.mlpackage" in text and f"{round(size / 1e6, 2)}" in text
