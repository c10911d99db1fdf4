"""android: ORT-format export, its reduced-operator config, and parity of the .ort file itself."""
import numpy as np
import pytest

EXAMPLE = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)


def _calibration() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((16, 3, 64, 64)).astype(np.float32)


def _ctx(model, precision, workdir):
    from edgevlm.config import QuantConfig
    from edgevlm.exporters.base import ExportContext
    from edgevlm.targets import get_target

    return ExportContext(model, get_target("android"), QuantConfig(precision=precision), workdir, EXAMPLE,
                         calibration=_calibration,
                         log=lambda s: None)


def _tiny_with_matmul():
    """A conv stem plus a token MLP: its Linear on (B, tokens, C) exports as MatMul, which INT4 quantizes."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 32, 8, stride=8)
            self.mlp = torch.nn.Linear(32, 64)
            self.head = torch.nn.Linear(64, 10)

        def forward(self, x):
            tokens = self.stem(x).flatten(2).transpose(1, 2)
            return self.head(torch.nn.functional.gelu(self.mlp(tokens)).mean(1))

    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def android(fastvit, tmp_path_factory):
    """(model name, precision) -> (artifact, bundle dir, context), each exported once per module."""
    from edgevlm.exporters import get_exporter

    models = {"fastvit_t8": fastvit, "tiny": None}
    done = {}

    def run(name, precision):
        if (name, precision) not in done:
            model = models[name] if models[name] is not None else _tiny_with_matmul()
            ctx = _ctx(model, precision, tmp_path_factory.mktemp(f"android-{name}-{precision}"))
            (art,) = get_exporter("ort")(ctx)
            done[name, precision] = art, ctx.workdir, ctx
        return done[name, precision]

    return run


def test_ort_exporter_is_registered_for_android():
    from edgevlm.exporters import get_exporter
    from edgevlm.exporters.ort_mobile import export
    from edgevlm.targets import get_target

    assert get_target("android").format == "ort"
    assert get_exporter("ort") is export


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_ort_file_loads_and_matches_eager(android, precision):
    import onnxruntime as ort

    art, workdir, ctx = android("fastvit_t8", precision)
    path = workdir / "model.ort"
    assert art.path == "model.ort" and art.format == "ort" and art.precision == precision
    assert path.read_bytes()[4:8] == b"ORTM"            # an ORT flatbuffer, not an ONNX protobuf
    assert not (workdir / "model.onnx").exists()

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    out = sess.run(None, {"pixel_values": EXAMPLE})[0]
    ref = ctx.eager(EXAMPLE)
    assert out.shape == ref.shape == (2, 10) and np.isfinite(out).all()
    assert art.inputs == [{"name": "pixel_values", "shape": ["batch", 3, 64, 64], "dtype": "float32"}]
    assert art.outputs[0]["shape"] == ["batch", 10]
    if precision == "fp32":
        assert np.abs(out - ref).max() <= 1e-4
        assert art.parity["passed"] is True and art.parity["max_abs_diff"] <= 1e-4
    else:
        assert art.parity["passed"] is None                    # judged by task metrics, recorded here
        assert art.parity["max_abs_diff"] == pytest.approx(float(np.abs(out - ref).max()), rel=1e-5)
    assert "ORT format" in art.parity["runtime"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_required_operators_config_lists_the_graphs_ops(android, precision):
    import onnxruntime as ort

    from edgevlm.exporters.ort_mobile import read_ops_config

    art, workdir, _ = android("fastvit_t8", precision)
    config = workdir / "required_operators.config"
    text = config.read_text()
    assert "/tmp" not in text and "edgevlm-ort-" not in text    # no scratch paths leak into the bundle
    ops = read_ops_config(config)
    assert ops == art.details["required_operators"]
    source_ops = set(art.details["onnx"]["export"]["ops"])   # the FP32 graph before quantization and fusion
    if precision == "fp32":
        assert "Conv" in ops["ai.onnx"]
        assert set(ops["ai.onnx"]) <= source_ops             # fusions drop ops, they never invent ai.onnx ones
    else:
        assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops["ai.onnx"])
        assert "Gelu" in ops["ai.onnx"]                       # activations stay float (opset 20 Gelu)
    d = art.details
    assert d["ops_config"] == "required_operators.config"
    assert d["optimization_style"] == "Runtime" and "conversion_fallback" not in d
    assert d["onnxruntime_version"] == ort.__version__
    assert d["minimal_build"]["include_ops_by_config"] == "required_operators.config"
    assert d["minimal_build"]["contrib_ops_required"] == ("com.microsoft" in ops)
    assert d["onnx_parity"]["passed"] in (True, None) and "export" in d["onnx"]


@pytest.mark.slow
def test_int4_matmulnbits_is_listed_as_a_contrib_op(android):
    import onnxruntime as ort

    art, workdir, ctx = android("tiny", "int4")
    ops = art.details["required_operators"]
    assert "MatMulNBits" in ops["com.microsoft"]
    lines = (workdir / "required_operators.config").read_text().splitlines()
    assert any(ln.split(";")[0] == "com.microsoft" and "MatMulNBits" in ln.split(";")[2].split(",") for ln in lines)
    assert art.details["onnx"]["quantization"]["format"] == "MatMulNBits on MatMul"
    assert art.details["onnx"]["quantization"]["matmulnbits_layers"] == 1
    mb = art.details["minimal_build"]
    assert mb["contrib_ops_required"] is True and "MatMulNBits" in mb["int4"] and "--disable_contrib_ops" in mb["note"]

    sess = ort.InferenceSession(str(workdir / "model.ort"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"pixel_values": EXAMPLE})[0]
    assert out.shape == (2, 10) and np.isfinite(out).all()
    assert art.parity["passed"] is None and art.parity["top1_agreement"] >= 0.5
