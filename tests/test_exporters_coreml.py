"""Core ML exporter: conversion, spec check and weight round trip (Linux), predictions (macOS only)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("coremltools")
pytest.importorskip("timm")

from edgevlm.config import Precision, QuantConfig  # noqa: E402
from edgevlm.errors import ValidationError  # noqa: E402
from edgevlm.exporters import get_exporter  # noqa: E402
from edgevlm.exporters.base import ExportContext  # noqa: E402
from edgevlm.targets import get_target  # noqa: E402

pytestmark = pytest.mark.slow
SIZE = 64
# Images the parity records are measured on. 32 rather than 2: top-1 agreement over 2 images can only be 0, 0.5
# or 1, so no bound on it separates a sound INT4 package from a broken one (a sign flip scores 0.5).
N_EXAMPLES = 32


@pytest.fixture(scope="module")
def model():
    import timm
    import torch

    from edgevlm.compress.reparam import reparameterize_model

    torch.manual_seed(0)
    m = timm.create_model("fastvit_t8", num_classes=10)
    return reparameterize_model(m.eval())


@pytest.fixture(scope="module")
def example():
    return np.random.default_rng(0).standard_normal((N_EXAMPLES, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(model, example, tmp_path_factory):
    """Export once per precision (lazily) and share the artifacts between tests."""
    cache: dict[str, tuple] = {}

    def run(precision: str):
        if precision not in cache:
            workdir = tmp_path_factory.mktemp(f"coreml-{precision}")
            ctx = ExportContext(model=model, target=get_target("ios"), quant=QuantConfig(precision=precision),
                                workdir=workdir, example=example, log=lambda s: None)
            cache[precision] = (get_exporter("coreml")(ctx), workdir)
        return cache[precision]

    return run


@pytest.mark.parametrize("precision,dtype,target,spec_version", [
    ("fp16", "fp16", "iOS16", 7),
    ("int8", "int8", "iOS16", 7),
    ("int4", "int4", "iOS18", 9),
])
def test_export_writes_checked_package(exported, precision, dtype, target, spec_version):
    (art,), workdir = exported(precision)
    assert (workdir / "model.mlpackage").is_dir()
    assert art.path == "model.mlpackage" and art.format == "coreml" and art.precision == precision
    assert art.inputs == [{"name": "pixel_values", "shape": [1, 3, SIZE, SIZE], "dtype": "float32"}]
    assert art.outputs == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    cm = art.details["coreml"]
    assert cm["minimum_deployment_target"] == target and cm["spec_version"] == spec_version
    assert cm["compute_units"] == "ALL"
    assert cm["compute_precision"] == "FLOAT16"
    weights = cm["weights_by_dtype"]
    assert weights.get(dtype, 0) > 0
    assert "fp32" not in weights
    if precision == "fp16":
        assert set(weights) == {"fp16"} and not cm["compression_ops"]
    else:
        assert cm["quantization"]["compressed_share"] >= 0.5
        other = {"int8", "int4"} - {dtype}
        assert not other & set(weights)
    op = {"int8": "constexpr_affine_dequantize", "int4": "constexpr_blockwise_shift_scale"}.get(precision)
    if op:
        assert set(cm["compression_ops"]) == {op}
    assert art.parity["traced"]["passed"] is True
    assert art.parity["traced"]["max_abs_diff"] <= 1e-4


def test_sizes_shrink_with_precision(exported):
    sizes = {p: exported(p)[0][0].details["coreml"]["size_bytes"] for p in ("fp16", "int8", "int4")}
    assert sizes["fp16"] > sizes["int8"] > sizes["int4"], sizes
    assert sizes["int8"] < 0.6 * sizes["fp16"], sizes


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_weight_roundtrip_parity(exported, precision):
    (art,), _ = exported(precision)
    rt = art.parity["weight_roundtrip"]
    assert rt["status"] == "ok", rt
    m = rt["mapping"]
    total = int(m["compressed_loaded"].split("/")[1])
    assert m["compressed_loaded"] == f"{total}/{total}"
    assert m["by_shape_order_fit"] > 0   # BatchNorm / layer scale fused by the converter were mapped back
    if precision == "fp16":
        assert rt["passed"] is True and rt["max_rel_diff"] <= 1e-2
    else:
        assert total > 0 and rt["passed"] is None
        assert rt["max_abs_diff"] > 0     # the dequantized weights really were loaded
        # Measured here (fastvit_t8, seed-0 random init, the 32 seed-0 images; median top-1/top-2 logit gap 8e-4):
        # INT8 top-1 0.906, max rel diff 0.016; INT4 top-1 0.8125 (26/32), max rel diff 0.119. The same model with
        # broken weights (in eager PyTorch) scores far lower: 30% Gaussian weight noise top-1 0.47 / rel 0.70,
        # signs flipped 0.31 / 0.97, weights doubled 0.19, a half-step zero-point offset 0.09, another random
        # init 0.03 / 1.08. INT4's bounds (0.6, 0.3) leave 6 images and 2.5x of margin and fail all of those.
        assert rt["top1_agreement"] >= (0.5 if precision == "int8" else 0.6), rt
        assert rt["max_rel_diff"] < (0.1 if precision == "int8" else 0.3), rt
    assert art.parity["coreml_predict"].startswith("skipped") or sys.platform == "darwin"


def test_roundtrip_mapping_is_exact_at_fp32(model, example, tmp_path):
    """Loading the FP32 program's own weights back must reproduce eager exactly: the mapping is right."""
    import torch

    from edgevlm.exporters import coreml

    with torch.no_grad():
        x = torch.from_numpy(example)
        reference = model(x).numpy()
        traced = torch.jit.trace(model, x[:1], check_trace=False)
    ml = coreml.convert(traced, SIZE, "iOS16", fp16=False)
    weights = coreml.program_weights(ml._mil_program)
    mapping, stats = coreml.map_weights(model, weights)
    assert stats["by_name"] > 0 and stats["by_shape_order_fit"] > 0
    # every tensor that is not a 1-D (bias) tensor is mapped
    assert all(w.name in mapping for w in weights if len(w.shape) >= 2 and np.any(w.value()))
    ml.save(str(tmp_path / "fp32.mlpackage"))
    rec, stand_in = coreml.weight_roundtrip(model, tmp_path / "fp32.mlpackage", weights, example, reference, "fp32")
    assert rec["status"] == "ok" and rec["max_abs_diff"] <= 1e-5 and stand_in is not None


@pytest.mark.parametrize("field,value", [
    ("weight_dtype", "int4"),            # an int8 package is not int4
    ("weight_dtype", "fp16"),            # nor uncompressed fp16
    ("deployment_target", "iOS18"),      # it was built for iOS16
    ("input_size", SIZE * 2),            # and its input is 64x64
])
def test_spec_check_rejects_wrong_expectations(exported, field, value):
    from edgevlm.exporters.coreml import check_package

    _, workdir = exported("int8")
    expect = {"deployment_target": "iOS16", "input_size": SIZE, "weight_dtype": "int8", "num_classes": 10}
    assert check_package(workdir / "model.mlpackage", **expect)["weights_by_dtype"]["int8"] > 0
    expect[field] = value
    with pytest.raises(ValidationError):
        check_package(workdir / "model.mlpackage", **expect)


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS")
def test_coreml_predict_matches_eager(exported):
    (art,), _ = exported("fp16")
    rec = art.parity["coreml_predict"]
    assert isinstance(rec, dict) and rec["passed"] is True


def test_missing_coremltools_is_actionable(monkeypatch, tmp_path, model, example):
    import builtins

    from edgevlm.errors import BackendUnavailableError
    from edgevlm.exporters import coreml

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "coremltools" or name.startswith("coremltools."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(sys.modules, "coremltools", raising=False)
    ctx = ExportContext(model=model, target=get_target("ios"), quant=QuantConfig(precision=Precision.FP16),
                        workdir=tmp_path, example=example, log=lambda s: None)
    with pytest.raises(BackendUnavailableError, match="coremltools is not installed"):
        coreml.export(ctx)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_reference_interpreter_parity(exported, precision):
    """The saved package itself, run by edgevlm's numpy ML-program interpreter, against eager."""
    (art,), _ = exported(precision)
    rec = art.parity["reference_interpreter"]
    assert rec["status"] == "ok" and rec["uncovered"] == [], rec
    assert rec["runtime"].startswith("edgevlm reference ML-program interpreter")
    assert rec["inputs"] == N_EXAMPLES
    if precision == "fp16":
        assert rec["passed"] is True and rec["max_rel_diff"] <= 1e-2
    else:   # weight quantization error on top of FP16 arithmetic
        assert rec["top1_agreement"] >= {"int8": 0.9, "int4": 0.5}[precision], rec


def test_reference_interpreter_records_uncovered_op(exported, example, tmp_path):
    """A package with an op the interpreter lacks: recorded as "not covered: OP", parity not claimed."""
    import shutil

    from edgevlm.exporters import coreml

    _, workdir = exported("fp16")
    path = tmp_path / "renamed.mlpackage"
    shutil.copytree(workdir / "model.mlpackage", path)
    spec = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    data = spec.read_bytes()
    assert b"\x04gelu" in data
    spec.write_bytes(data.replace(b"\x04gelu", b"\x04gelv"))   # same length: the protobuf stays valid
    rec = coreml.interpreter_parity(path, example[:1], np.zeros((1, 10), np.float32), "fp16")
    assert rec["status"] == "not covered: gelv" and rec["uncovered"] == ["gelv"] and rec["passed"] is None
    assert "max_abs_diff" not in rec
