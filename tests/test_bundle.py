"""Bundles: atomic writes, checksums, schema versions, and the torch-free runtime."""
import json
import subprocess
import sys

import pytest

from edgevlm import runtime
from edgevlm.build import export_bundle
from edgevlm.bundle import SCHEMA_VERSION, read_manifest, verify
from edgevlm.config import ExportConfig, QuantConfig
from edgevlm.errors import BundleError, CalibrationError, ConfigError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "fastvit-cpu-fp32"
    export_bundle(ExportConfig(model="fastvit_t8", target="cpu", quant=QuantConfig(precision="fp32"), out=out),
                  quiet=True)
    return out


def _copy(bundle, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_manifest_records_what_a_user_needs(bundle):
    m = read_manifest(bundle)
    assert m["schema_version"] == SCHEMA_VERSION and m["task"] == "classification"
    assert m["model"]["name"] == "fastvit_t8" and m["weights"]["kind"] == "shipped"
    art = m["artifacts"][0]
    assert art["path"] == "model.onnx" and m["files"]["model.onnx"]["size"] > 1_000_000
    assert len(m["files"]["model.onnx"]["sha256"]) == 64
    assert art["parity"]["passed"] is True and art["parity"]["max_abs_diff"] <= 1e-4
    assert art["export"]["opset"] >= 17 and art["export"]["dynamic_axes"]["pixel_values"] == {"0": "batch"}
    assert m["reparameterization"]["applied"] and m["reparameterization"]["passed"]
    assert m["preprocessing"]["input_size"] == 64 and m["labels"][3] == "3"
    for k in ("torch", "onnx", "onnxruntime", "timm"):
        assert k in m["versions"]
    assert m["accuracy"]["status"] == "measured" and m["accuracy"]["bundle"] > 0.9


def test_dynamic_batch_runs(bundle):
    import numpy as np

    clf = runtime.load(bundle)
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)
    assert clf.logits(x, batch_size=5).shape == (5, 10)


def test_tampered_bundle_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        runtime.load(b)


def test_missing_part_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing model.onnx"):
        runtime.load(b)


def test_newer_schema_is_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="upgrade edgevlm"):
        runtime.load(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no bundle"):
        runtime.load(tmp_path / "nothing")
    (tmp_path / "d").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        runtime.load(tmp_path / "d")


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from edgevlm import exporters

    def boom(ctx):
        (ctx.workdir / "model.onnx").write_bytes(b"half")
        raise RuntimeError("simulated crash mid-export")

    monkeypatch.setattr(exporters, "get_exporter", lambda fmt: boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        export_bundle(ExportConfig(model="fastvit_t8", quant=QuantConfig(precision="fp32"), out=out), quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_overwrite(bundle):
    with pytest.raises(BundleError, match="--overwrite"):
        export_bundle(ExportConfig(model="fastvit_t8", quant=QuantConfig(precision="fp32"), out=bundle), quiet=True)


def test_empty_calibration_folder_fails_before_work(tmp_path):
    (tmp_path / "calib").mkdir()
    with pytest.raises(CalibrationError, match="holds no images"):
        export_bundle(ExportConfig(model="fastvit_t8", quant=QuantConfig(precision="int8",
                                                                         calib=str(tmp_path / "calib")),
                                   out=tmp_path / "o"), quiet=True)
    assert not (tmp_path / "o").exists()


def test_unreadable_calibration_image_is_named(tmp_path):
    from edgevlm.data.calibration import calibration_images

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(CalibrationError, match="broken.jpg"):
        calibration_images(str(tmp_path / "c"), None, 8)


def test_unsupported_precision_names_the_choices():
    with pytest.raises(ConfigError, match="fp32 | fp16"):
        QuantConfig(precision="int3")


def test_out_of_range_image_size():
    with pytest.raises(ConfigError, match="multiple of 32"):
        ExportConfig(model="fastvit_t8", img_size=100)


def test_runtime_imports_no_torch(bundle, sample_image):
    code = ("import sys; from edgevlm import runtime; p = runtime.load(sys.argv[1]).classify(sys.argv[2]);"
            "assert 'torch' not in sys.modules, 'torch was imported'; print(p[0].label)")
    r = subprocess.run([sys.executable, "-c", code, str(bundle), str(sample_image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"


def test_verify_detects_extra_files(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    (b / "stray.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="does not list"):
        verify(b, read_manifest(b))


@pytest.mark.slow
@pytest.mark.parametrize("target, precision", [("jetson", "int8"), ("android", "int8"), ("ios", "fp16")])
def test_every_target_bundle_is_checked_and_runs_where_it_can(tmp_path, target, precision, sample_image):
    """Each target's bundle carries its artifacts and checks, and the runtime runs it."""
    out, m = export_bundle(ExportConfig(model="fastvit_t8", target=target, quant=QuantConfig(precision=precision),
                                        out=tmp_path / target), quiet=True)
    art = m["artifacts"][0]
    assert m["target"]["name"] == target and art["precision"] == precision
    if target == "jetson":
        assert art["tensorrt"]["op_check"]["passed"] is True and "build_engine.sh" in m["files"]
        assert m["target"]["tensorrt"]["version"] and m["accuracy"]["bundle"] >= m["accuracy"]["eager_fp32"] - 0.01
    if target == "android":
        assert art["path"] == "model.ort" and "required_operators.config" in m["files"]
    if target == "ios":
        assert art["path"] == "model.mlpackage" and any(f.startswith("model.mlpackage/") for f in m["files"])
        assert "macOS" in m["accuracy"]["runtime"] and m["accuracy"]["bundle"] >= m["accuracy"]["eager_fp32"] - 0.01
    if target == "ios":
        ref = art["parity"]["reference_interpreter"]
        assert ref["passed"] is not False and ref["top1_agreement"] >= 0.9, ref
    # jetson without a GPU: ONNX Runtime falls back to the CPU provider; ios off Apple OSes: the reference interpreter
    clf = runtime.load(out)
    assert clf.classify(sample_image)[0].label == "3"
    if target == "ios" and sys.platform != "darwin":
        assert clf.backend.startswith("coreml-reference")


def test_missing_converter_fails_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from edgevlm.errors import BackendUnavailableError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    with pytest.raises(BackendUnavailableError, match=r"edgevlm\[coreml\]"):
        export_bundle(ExportConfig(model="fastvit_t8", target="ios", out=tmp_path / "o"), quiet=True)
    assert not (tmp_path / "o").exists()


def test_listed_size_counts_external_data_and_package_contents():
    """The part table's size: an ONNX graph with its ``<file>.data`` (a 1.1 GB INT8 tower whose graph file is 7 MB
    was listed as 7.1 MB), a Core ML package as the files under it, a lone file as itself."""
    from edgevlm.bundle import listed_size

    files = {"vision_encoder.onnx": {"size": 7_000_000}, "vision_encoder.onnx.data": {"size": 1_100_000_000},
             "decoder.onnx": {"size": 5}, "v.mlpackage/Manifest.json": {"size": 3},
             "v.mlpackage/Data/weight.bin": {"size": 40}}
    assert listed_size(files, "vision_encoder.onnx") == 1_107_000_000
    assert listed_size(files, "decoder.onnx") == 5 and listed_size(files, "v.mlpackage") == 43
