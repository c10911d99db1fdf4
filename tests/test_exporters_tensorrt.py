"""jetson: TensorRT operator check, Q/DQ rules and the on-device engine build script."""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgevlm.errors import ExportError
from edgevlm.exporters.tensorrt import check_ops

BASH = shutil.which("bash")


# --- hand-made graphs -------------------------------------------------------------------

def _model(nodes, inits=(), opset=18, extra_opsets=(), inputs=None, outputs=None):
    from onnx import TensorProto, helper

    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])]
    outputs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _matmul_onnx(path: Path, k: int = 64, n: int = 32) -> Path:
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "W")
    onnx.save(_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [w]), str(path))
    return path


def _int4_dq_model(scales: np.ndarray, weight_shape=(64, 32), block: int = 32):
    """DequantizeLinear of constant INT4 weights, blocked along axis 0, feeding a MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    q = helper.make_tensor("Wq", TensorProto.INT4, list(weight_shape),
                           np.random.default_rng(0).integers(-8, 8, size=weight_shape).flatten().tolist())
    s = numpy_helper.from_array(scales.astype(np.float32), "Ws")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws"], ["W"], name="dq", axis=0, block_size=block),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return _model(nodes, [q, s], opset=21)


# --- check_ops on hand-made graphs --------------------------------------------------------

def test_matmulnbits_is_refused_with_its_name_and_a_fix(tmp_path):
    import onnx

    from edgevlm.compress import quantize

    src = _matmul_onnx(tmp_path / "mm.onnx")
    quantize.to_int4(src, tmp_path / "nbits.onnx", 32, fmt="matmulnbits")
    with pytest.raises(ExportError) as e:
        check_ops(onnx.load(str(tmp_path / "nbits.onnx")), "10.3")
    assert "com.microsoft.MatMulNBits x1" in e.value.problem
    assert "contrib" in e.value.problem
    assert "qdq" in e.value.fix and "int8" in e.value.fix


def test_ops_outside_tensorrts_list_are_named_with_counts():
    from onnx import helper

    nodes = [helper.make_node("Unique", ["x"], ["u1"], name="u1"),
             helper.make_node("Unique", ["u1"], ["u2"], name="u2"),
             helper.make_node("FancyOp", ["u2"], ["y"], name="f"),
             helper.make_node("Relu", ["x"], ["r"], name="r")]
    with pytest.raises(ExportError) as e:
        check_ops(_model(nodes), "10.3")
    msg = e.value.problem
    assert "Unique x2 (listed as unsupported by TensorRT 10.3)" in msg
    assert "FancyOp x1 (not in TensorRT 10.3's operator list)" in msg
    assert "Relu" not in msg


def test_unsupported_op_inside_an_if_branch_is_found():
    from onnx import TensorProto, helper

    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["z"])], "then", [],
                               [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["z2"])], "else", [],
                              [helper.make_tensor_value_info("z2", TensorProto.FLOAT, None)])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)
    with pytest.raises(ExportError, match="Unique x1"):
        check_ops(_model([node], inputs=[cond, helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])]))


def test_asymmetric_and_uint8_qdq_are_refused():
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             helper.make_tensor("zp", TensorProto.UINT8, [], [128])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")]
    with pytest.raises(ExportError) as e:
        check_ops(_model(nodes, inits))
    assert "asymmetric" in e.value.problem and "UINT8" in e.value.problem
    assert "symmetric" in e.value.fix


def test_symmetric_int8_qdq_passes_and_is_counted():
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             helper.make_tensor("zp", TensorProto.INT8, [], [0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")]
    rec = check_ops(_model(nodes, inits))
    assert rec["passed"] and rec["qdq"] == {"nodes": 2, "int8": 2}
    assert rec["ops"] == {"DequantizeLinear": 1, "QuantizeLinear": 1}


def test_int32_bias_dequantize_is_refused():
    """ONNX Runtime's QDQ quantizer stores Conv biases as INT32 + DequantizeLinear; TensorRT refuses those."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [helper.make_tensor("bq", TensorProto.INT32, [4], [1, 2, 3, 4]),
             numpy_helper.from_array(np.full(4, 0.01, np.float32), "bs"),
             helper.make_tensor("bz", TensorProto.INT32, [4], [0, 0, 0, 0]),
             numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")]
    nodes = [helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["b"], name="bias_dq", axis=0),
             helper.make_node("Conv", ["img", "w", "b"], ["y"], name="conv")]
    img = helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])
    with pytest.raises(ExportError) as e:
        check_ops(_model(nodes, inits, inputs=[img]))
    assert "'bias_dq'" in e.value.problem and "INT32" in e.value.problem
    assert "QuantizeBias=False" in e.value.fix


def test_int4_blocked_weights_pass_on_10_and_fail_on_8():
    k, n, block = 64, 32, 32
    model = _int4_dq_model(np.full((k // block, n), 0.05), (k, n), block)
    rec = check_ops(model, "10.3")
    assert rec["qdq"] == {"nodes": 1, "int4": 1, "int4_blocked": 1}
    assert any("opset 21" in w for w in rec["warnings"])      # above 10.3's documented 20, parsed anyway
    with pytest.raises(ExportError, match="INT4 needs TensorRT 10"):
        check_ops(model, "8.6")


def test_int4_rules_negative_scales_and_odd_last_dimension():
    with pytest.raises(ExportError, match="scales <= 0"):
        check_ops(_int4_dq_model(np.full((2, 32), -0.05)), "10.3")
    with pytest.raises(ExportError, match="even last dimension"):
        check_ops(_int4_dq_model(np.full((2, 33), 0.05), (64, 33)), "10.3")


def test_int4_qdq_from_the_quantizer_is_tensorrt_ready(tmp_path):
    import onnx

    from edgevlm.compress import quantize

    quantize.to_int4(_matmul_onnx(tmp_path / "mm.onnx"), tmp_path / "q4.onnx", 32, fmt="qdq")
    check_ops(onnx.load(str(tmp_path / "q4.onnx")), "10.3")


def test_version_tables():
    from onnx import helper

    gelu = _model([helper.make_node("Gelu", ["x"], ["y"])], opset=20)
    assert check_ops(gelu, "10.3.0")["table"] == "10.3"
    with pytest.raises(ExportError, match="Gelu x1"):      # Gelu arrived in TensorRT 10
        check_ops(gelu, "8.6")
    relu = _model([helper.make_node("Relu", ["x"], ["y"])], opset=18)
    assert any("opset 18" in w for w in check_ops(relu, "8.6")["warnings"])   # 8.x documents opset <= 17
    assert check_ops(relu, "10.9")["warnings"]                 # newer 10.x: checked against 10.3, with a warning
    with pytest.raises(ExportError, match="no TensorRT operator table"):
        check_ops(relu, "7.1")


# --- the jetson export through the onnx exporter --------------------------------------------

def _calibration() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((16, 3, 64, 64)).astype(np.float32)


def _ctx(model, precision, workdir):
    from edgevlm.config import QuantConfig
    from edgevlm.exporters.base import ExportContext
    from edgevlm.targets import get_target

    example = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    return ExportContext(model, get_target("jetson"), QuantConfig(precision=precision), workdir, example,
                         calibration=_calibration,
                         log=lambda s: None)


@pytest.fixture(scope="module")
def jetson(fastvit, tmp_path_factory):
    """precision -> (artifact, bundle dir) of a jetson ONNX export, built once per module."""
    from edgevlm.exporters import get_exporter

    done = {}

    def run(precision):
        if precision not in done:
            workdir = tmp_path_factory.mktemp(f"jetson-{precision}")
            (art,) = get_exporter("onnx")(_ctx(fastvit, precision, workdir))
            done[precision] = art, workdir
        return done[precision]

    return run


def _script_arrays(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        for name in ("ARGS", "FALLBACK_ARGS"):
            if line.startswith(f"{name}=("):
                out[name] = shlex.split(line[len(name) + 2:line.rindex(")")])
    return out


FLAGS = {"fp16": ({"--fp16"}, []), "int8": ({"--int8", "--fp16"}, []), "int4": ({"--fp16"}, ["--stronglyTyped"])}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_jetson_export_is_checked_and_ships_a_build_script(jetson, precision):
    art, workdir = jetson(precision)
    rec = art.details["tensorrt"]
    assert rec["version"] == "10.3" and rec["jetpack"] == "6.1" and rec["cuda"] == "12.6"
    check = rec["op_check"]
    assert check["passed"] is True and check["unsupported"] == [] and check["ops"]["Conv"] > 0
    assert rec["engine"] == "model.plan" and rec["build_script"] == "build_engine.sh"
    assert rec["shape_profile"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [8, 3, 64, 64]}

    script = workdir / "build_engine.sh"
    assert script.is_file() and os.access(script, os.X_OK)
    assert script.stat().st_mode & 0o777 == 0o755
    if BASH:
        subprocess.run([BASH, "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    arrays = _script_arrays(text)
    args = arrays["ARGS"]
    assert args == rec["trtexec_args"]
    for a in ("--onnx=model.onnx", "--saveEngine=model.plan", "--minShapes=pixel_values:1x3x64x64",
              "--optShapes=pixel_values:1x3x64x64", "--maxShapes=pixel_values:8x3x64x64",
              "--memPoolSize=workspace:1024M"):
        assert a in args
    flags, fallback = FLAGS[precision]
    assert {a for a in args if a in {"--fp16", "--int8", "--int4", "--best", "--stronglyTyped"}} == flags
    assert arrays["FALLBACK_ARGS"] == fallback == rec["fallback_args"]
    assert "/usr/src/tensorrt/bin/trtexec" in text and 'EXPECTED_TRT="10.3"' in text


@pytest.mark.slow
def test_jetson_int8_is_symmetric_int8_qdq(jetson):
    import onnx
    from onnx import TensorProto, numpy_helper

    art, workdir = jetson("int8")
    model = onnx.load(str(workdir / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len([n for n in qdq if n.op_type == "QuantizeLinear"]) > 10
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8, n.name
        assert not numpy_helper.to_array(zp).any(), f"{n.name} has a non-zero zero point"
    assert art.details["tensorrt"]["op_check"]["qdq"]["int8"] == len(qdq)


@pytest.mark.slow
def test_jetson_int4_without_matmuls_says_so(jetson):
    art, _ = jetson("int4")
    warnings = " ".join(art.details["tensorrt"]["op_check"]["warnings"])
    assert "opset 21" in warnings
    # FastViT is convolutional: only the classifier's Gemm is a matrix multiply TensorRT can run in INT4.
    assert art.details["quantization"]["layers_quantized"] == 1
    assert "of the weights are INT4" in " ".join(art.details["warnings"])


# --- running build_engine.sh against a stand-in trtexec ----------------------------------

FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_TRT:-100300}] # trtexec $*"
[ "${1:-}" = "--help" ] && exit 0
printf '%s\\n' "$@" > "$FAKE_ARGS"
case " $* " in *" ${FAKE_FAIL_ON:-none} "*) echo "fake: cannot build"; exit 3 ;; esac
for a in "$@"; do case "$a" in --saveEngine=*) echo engine > "${a#--saveEngine=}" ;; esac; done
"""


@pytest.fixture
def device(tmp_path):
    """Run a copy of a jetson bundle's script with a stand-in trtexec."""
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)

    logs = tmp_path / "tmp"
    logs.mkdir()

    def run(workdir, *args, **env):
        n = len(list(tmp_path.iterdir()))
        bundle, args_file = tmp_path / f"bundle-{n}", tmp_path / f"args-{n}.txt"
        bundle.mkdir()
        for name in ("build_engine.sh", "model.onnx"):
            shutil.copy2(workdir / name, bundle / name)
        environ = {**os.environ, "TRTEXEC": str(fake), "FAKE_ARGS": str(args_file), "TMPDIR": str(logs), **env}
        proc = subprocess.run([str(bundle / "build_engine.sh"), *args], env=environ, capture_output=True, text=True)
        passed = args_file.read_text().split() if args_file.exists() else []
        return proc, bundle, passed

    return run


@pytest.mark.slow
@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_build_script_builds_checks_version_and_fails_loudly(jetson, device):
    _, fp16 = jetson("fp16")
    proc, bundle, args = device(fp16)
    assert proc.returncode == 0, proc.stderr
    assert (bundle / "model.plan").read_text() == "engine\n"
    # only the engine is added: the manifest's device_files allow model.plan, nothing else
    assert sorted(p.name for p in bundle.iterdir()) == ["build_engine.sh", "model.onnx", "model.plan"]
    assert "--skipInference" in args and "--fp16" in args and "--maxShapes=pixel_values:8x3x64x64" in args
    assert "warning" not in proc.stderr

    proc, _, args = device(fp16, "--benchmark", "--verbose")
    assert proc.returncode == 0 and "--skipInference" not in args and "--verbose" in args

    proc, _, _ = device(fp16, FAKE_TRT="8601")              # TensorRT 8.6 on the device
    assert proc.returncode == 0 and "TensorRT 8.6" in proc.stderr and "warning" in proc.stderr

    proc, bundle, _ = device(fp16, FAKE_FAIL_ON="--fp16")
    assert proc.returncode != 0 and "could not build model.plan" in proc.stderr
    assert not (bundle / "model.plan").exists()

    proc, _, _ = device(fp16, TRTEXEC=str(fp16 / "no-such-trtexec"))
    assert proc.returncode != 0 and "trtexec not found" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_build_script_int4_falls_back_to_strongly_typed(jetson, device):
    _, int4 = jetson("int4")
    proc, bundle, args = device(int4, FAKE_FAIL_ON="--fp16")
    assert proc.returncode == 0, proc.stderr
    assert "retrying with --stronglyTyped" in proc.stderr
    assert "--stronglyTyped" in args and "--fp16" not in args
    assert (bundle / "model.plan").exists()
