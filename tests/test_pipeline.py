"""The one export pipeline: the target profile decides each VLM part's format and quantization (no branch on a
target's or a family's name), a family's parts are data, the public ``edgevlm.export`` takes every model kind,
and an option of the other kind is refused."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import onnx
import pytest
import torch

import edgevlm
from edgevlm.api import config_for, options_of
from edgevlm.config import (CalibMethod, DecoderChoice, DecoderInt4, DecoderInt8, ExportConfig, Precision,
                            VLMExportConfig)
from edgevlm.errors import ConfigError
from edgevlm.modeling.families import load_vlm
from edgevlm.parts import PartRole, PartSpec
from edgevlm.targets import VLMProfile, get_target, list_targets

ROOT = Path(__file__).parents[1]
# What TensorRT cannot take (edgevlm.exporters.tensorrt.check_ops refuses them), and what only ONNX Runtime runs.
ORT_ONLY = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits", "GroupQueryAttention"}


def _export(tmp_path, name: str, target: str, precision: str, **kw):
    vlm = load_vlm(name, weights="random")
    with torch.no_grad():                      # random init is flat; scaled weights make greedy tokens vary
        for p in vlm.language_model.parameters():
            p.mul_(4.0)
    cfg = VLMExportConfig(model=name, weights="random", target=target, precision=precision, calib_size=4,
                          out=tmp_path / f"{name}-{target}-{precision}", **kw)
    from edgevlm.api import export_config

    return export_config(cfg, quiet=True, model=vlm.eval())


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


# -- the profile's rules reach every part -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["edgevlm_scenes_tiny", "moondream2_tiny", "llava_tiny", "llava_mini_tiny",
                                  "tinygpt_v_tiny", "smolvlm_tiny"])          # every VLM family
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_jetson_vlm_bundle_is_tensorrt_ready(tmp_path, name, precision):
    """jetson's profile: symmetric INT8 on the parts that read pixels, weight-only DequantizeLinear decoders, no
    ONNX Runtime-only rewrite; every graph passes edgevlm's own TensorRT op check."""
    from edgevlm.exporters.tensorrt import check_ops

    target = get_target("jetson")
    out, m = _export(tmp_path, name, "jetson", precision, decoder="onnx")
    assert m["target"]["vlm"] == target.vlm_dict() and m["target"]["runtime"] == "tensorrt"
    for part, rec in m["parts"].items():
        model = onnx.load(str(out / rec["path"]))
        report = check_ops(model, target.tensorrt["version"])
        assert report["passed"], (part, report)
        assert not (_ops(out / rec["path"]) & ORT_ONLY), part
    dec = m["parts"]["decoder"]["details"]
    assert "attention" not in dec                                   # jetson names no rewrite
    q = dec["quantization"]
    assert q["profile_method"] == {"int8": "weights_qdq", "int4": "qdq"}[precision]
    assert q["weight_coverage"] > 0.9 and "DequantizeLinear" in _ops(out / "decoder.onnx")
    pixels = [r for r in m["parts"].values() if r["details"].get("export", {}).get("role") == "pixels"]
    assert pixels and all(r["precision"] == "int8" for r in pixels)
    for r in pixels:
        assert r["details"]["quantization"]["symmetric_activations"] is True
        assert r["details"]["quantization"]["activations"] == "int8"
        views = r["details"]["quantization"]["calibration_views"]   # the view cap's rule, recorded
        assert views["views_at_most"] == 64 and views["view_gflops"] > 0
        assert r["details"]["quantization"]["calibration_images"] <= views["views_at_most"]
    onnxrt = m["parity"]["results"][0]
    n = len(m["parity"]["eager_tokens"])      # smolvlm_tiny's random weights reach the stop token after 7 (eager too)
    assert onnxrt["backend"] == "onnxruntime" and onnxrt["new_tokens"] == n == (n if name == "smolvlm_tiny" else 32)
    # the quantized decoder still follows eager as closely as the cpu bundle's (a broken dequantization scores near
    # chance on this vocabulary); INT4 of these sharpened random weights is coarse on any target
    if precision == "int8":
        assert onnxrt["teacher_forced_top1_agreement"] >= 0.75, onnxrt
    else:
        cpu = _export(tmp_path, name, "cpu", "int4")[1]["parity"]["results"][0]
        assert onnxrt["teacher_forced_top1_agreement"] >= cpu["teacher_forced_top1_agreement"] - 0.15, (onnxrt, cpu)
        assert onnxrt["kl_mean"] <= 2 * cpu["kl_mean"] + 0.1, (onnxrt, cpu)


def test_weight_only_int8_dequantizes_to_the_weights():
    """int8_weights_qdq: per output channel, |w - dequantized| <= scale / 2, and the graph computes x @ w'."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgevlm.compress.quantize import int8_weights_qdq

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, 8)) * np.linspace(0.01, 3, 8)).astype(np.float32)    # channels of very different range
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    assert int8_weights_qdq(model) == {"mm": 128}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert set(inits) == {"w_int8", "w_int8_scale"} and inits["w_int8"].dtype == np.int8
    scale = inits["w_int8_scale"]
    deq = inits["w_int8"].astype(np.float32) * scale
    assert scale.shape == (8,) and np.all(np.abs(deq - w) <= scale / 2 + 1e-7)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    # the graph's own semantics (ONNX Runtime's extended CPU optimizations instead run DQ -> MatMul as a dynamically
    # quantized MatMul, activations in 8 bits too: what the jetson parity record measures on a desktop CPU)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    assert np.allclose(y, x @ deq, rtol=1e-5, atol=1e-5) and not np.allclose(y, x @ w, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_cpu_vlm_bundle_keeps_its_onnx_runtime_graphs(tmp_path):
    """cpu's profile: the attention fusion it names, MatMulNBits INT4 — what the cpu bundle was before."""
    out, m = _export(tmp_path, "edgevlm_scenes_tiny", "cpu", "int4")
    dec = m["parts"]["decoder"]["details"]
    assert dec["attention"]["kv_cache"] != "concat", dec["attention"]
    assert dec["quantization"]["profile_method"] == "matmulnbits"
    assert {"MatMulNBits", "GroupQueryAttention"} <= _ops(out / "decoder.onnx")
    assert m["target"]["vlm"]["rewrites"] == ["attention_fusion"]


def test_the_default_precision_is_the_profiles(tmp_path):
    """No --quant: jetson's profile says fp16 (the VLM pipeline once said int8 for every target)."""
    from edgevlm.build_vlm import vlm_job

    job = vlm_job(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", target="jetson"))
    assert job.out.name == "edgevlm_scenes_tiny-jetson-fp16"
    job = vlm_job(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", target="cpu"))
    assert job.out.name == f"edgevlm_scenes_tiny-cpu-{get_target('cpu').default_precision.value}"


@pytest.mark.parametrize("target", [t.name for t in list_targets() if t.vlm is None])
def test_targets_without_a_vlm_block_refuse_vlms_by_data(tmp_path, target):
    with pytest.raises(ConfigError, match=f"target {target}.*no vlm block"):
        _export(tmp_path, "edgevlm_scenes_tiny", target, "fp32")
    assert not any(tmp_path.iterdir())


def test_whether_a_target_takes_vlms_is_its_profiles_vlm_block():
    """android's profile gained a vlm block (ORT-format parts, tests/test_android_vlm.py) and takes VLMs; the refusal
    above is data-driven, and the targets it covers are exactly those whose profile has no vlm block."""
    from edgevlm.build_vlm import vlm_job

    takes = {t.name for t in list_targets() if t.vlm is not None}
    assert {"cpu", "jetson", "android", "ios"} <= takes
    job = vlm_job(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", target="android", precision="fp32"))
    assert job.out.name == "edgevlm_scenes_tiny-android-fp32"
    for t in list_targets():
        if t.vlm is None:
            with pytest.raises(ConfigError, match="no vlm block"):
                t.require_vlm()


def test_a_decoder_the_profile_does_not_list_is_refused():
    prof = VLMProfile.from_dict({"decoders": ["onnx"]}, "x")
    assert prof.default_decoder is DecoderChoice.ONNX
    with pytest.raises(ConfigError, match="x does not take a GGUF decoder.*use --decoder onnx"):
        prof.check_decoder(DecoderChoice.BOTH, "x")


def test_the_default_decoder_is_the_profiles(tmp_path):
    """No --decoder: jetson's profile says GGUF (llama.cpp with CUDA is what Jetson users run), cpu's says ONNX;
    the bundle name carries the decoder only when it is not the profile's default."""
    from edgevlm.build_vlm import vlm_job

    assert get_target("jetson").vlm.default_decoder is DecoderChoice.GGUF
    assert get_target("cpu").vlm.default_decoder is DecoderChoice.ONNX
    out, m = _export(tmp_path, "edgevlm_scenes_tiny", "jetson", "int4")
    assert set(m["parts"]) >= {"vision_encoder", "embed_tokens", "decoder_gguf"} and "decoder" not in m["parts"]
    assert m["parts"]["decoder_gguf"]["gguf_type"] == "q4_k_m" and m["target"]["vlm"]["default_decoder"] == "gguf"
    assert [r["backend"] for r in m["parity"]["results"]] == ["llama.cpp"]
    # TinyGPT-V's Phi-2 with qk-layernorm has no llama.cpp graph: jetson's default gives way to the ONNX decoder
    out, m = _export(tmp_path, "tinygpt_v_tiny", "jetson", "fp16")
    assert "decoder" in m["parts"] and "decoder_gguf" not in m["parts"]
    note = m["target"]["decoder_note"]
    assert note["default"] == "gguf" and note["written"] == "onnx" and "qk_layernorm" in note["why"]
    with pytest.raises(edgevlm.errors.ExportError, match="qk_layernorm"):      # asked for: refused, not replaced
        _export(tmp_path / "asked", "tinygpt_v_tiny", "jetson", "fp16", decoder="gguf")
    job = vlm_job(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", target="jetson", decoder="onnx"))
    assert job.out.name == "edgevlm_scenes_tiny-jetson-fp16-onnx"
    job = vlm_job(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", target="cpu", decoder="gguf"))
    assert job.out.name.endswith("-gguf")


def test_vlm_profile_is_checked():
    assert VLMProfile.from_dict({"decoders": ["onnx"], "decoder_int4": "qdq"}, "x").decoder_int4 is DecoderInt4.QDQ
    for bad in ({"decoders": ["onnx"], "decoder_int8": "fast"}, {"decoders": ["both"]}, {"decoders": []},
                {"decoders": ["onnx"], "rewrites": ["inline_everything"]}, {"decoders": ["onnx"], "quant": "x"},
                {"decoders": ["onnx"], "default_decoder": "gguf"}):
        with pytest.raises(ConfigError):
            VLMProfile.from_dict(bad, "x")


# -- parts are data -----------------------------------------------------------------------------------------
def test_families_declare_their_parts():
    from vlm_utils import make_image

    img = make_image(96)
    names = {}
    for model in ("edgevlm_scenes_tiny", "llava_tiny", "moondream2_tiny", "llava_mini_tiny"):
        specs = load_vlm(model, weights="random").export_parts(img)
        assert all(isinstance(s, PartSpec) for s in specs)
        names[model] = [(s.name, s.role) for s in specs]
    assert names["llava_tiny"] == [("vision_encoder", PartRole.PIXELS)]
    assert names["moondream2_tiny"][:2] == [("vision_tower", PartRole.PIXELS), ("vision_projector", PartRole.FEATURES)]
    assert names["llava_mini_tiny"] == [("vision_encoder", PartRole.PIXELS), ("prefusion", PartRole.FEATURES)]
    with pytest.raises(ValueError, match="2 inputs but 1 example"):
        PartSpec("x", None, ("a", "b"), ("y",), (torch.zeros(1),))


def _string_compares(tree: ast.AST) -> list[str]:
    """``x.target == "cpu"``, ``family in ("a", "b")``, ...: comparisons of a target/family name with literals."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        text = " ".join(ast.unparse(s) for s in sides)
        literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides) or any(
            isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(isinstance(e, ast.Constant) for e in s.elts)
            for s in sides)
        if literal and any(w in text for w in ("target", "family", "runtime ==")):
            found.append(ast.unparse(node))
    return found


def test_no_target_or_family_branches_in_the_pipeline_and_exporters():
    files = [ROOT / "edgevlm" / f for f in ("pipeline.py", "api.py", "build.py", "build_vlm.py")]
    files += sorted((ROOT / "edgevlm" / "exporters").glob("*.py"))
    hits = {str(f.relative_to(ROOT)): h for f in files if (h := _string_compares(ast.parse(f.read_text())))}
    assert not hits, hits
    # the check itself finds such a branch
    assert _string_compares(ast.parse('if cfg.target == "cpu": pass\nif m.family in ("moondream2",): pass')) == [
        "cfg.target == 'cpu'", "m.family in ('moondream2',)"]


# -- one entry, typed options ---------------------------------------------------------------------------------
def test_public_export_takes_a_vlm(tmp_path):
    out, m = edgevlm.export("edgevlm_scenes_tiny", precision="fp32", weights="random", calib_size=4,
                            out=tmp_path / "b", quiet=True)
    assert out == tmp_path / "b" and m["task"] == "vlm" and (out / "decoder.onnx").exists()
    assert m["parity"]["results"][0]["passed"] is True


def test_options_of_the_other_kind_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="num_classes do not apply to edgevlm_scenes_tiny, a vision-language"):
        edgevlm.export("edgevlm_scenes_tiny", num_classes=3, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="decoder do not apply to fastvit_t8, a vision backbone"):
        edgevlm.export("fastvit_t8", decoder="gguf", out=tmp_path / "y")
    with pytest.raises(ConfigError, match="unknown decoder 'llama'"):
        config_for("edgevlm_scenes_tiny", decoder="llama")
    assert not any(tmp_path.iterdir())
    cfg = config_for("fastvit_t8", precision="int8", calib_size=8, num_classes=3)
    assert isinstance(cfg, ExportConfig) and cfg.quant.calib_size == 8 and cfg.quant.precision is Precision.INT8
    assert {"decoder", "revision", "parity_tokens"} <= options_of(VLMExportConfig)
    assert not {"decoder", "revision"} & options_of(ExportConfig)


def test_cli_choices_come_from_the_enums_and_profiles():
    from edgevlm.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["export"]
    shown = {a.dest: a.metavar for a in sub._actions if a.metavar}
    assert shown["decoder"] == "|".join(d.value for d in DecoderChoice)
    assert shown["quant"] == "|".join(p.value for p in Precision)
    assert shown["calib_method"] == "|".join(c.value for c in CalibMethod)
    assert shown["target"] == "|".join(t.name for t in list_targets())
    assert {f.name for f in dataclasses.fields(VLMExportConfig)} - {"model", "precision", "parity_tokens"} <= {
        a.dest for a in sub._actions}
    assert DecoderInt8.parse("weights_qdq") is DecoderInt8.WEIGHTS_QDQ


def test_cli_refuses_a_bad_decoder_and_a_flag_of_the_other_kind(tmp_path):
    import subprocess
    import sys

    for args, needle in ((["--decoder", "llama"], "unknown decoder 'llama'"),
                         (["--num-classes", "3"], "--num-classes does not apply to edgevlm_scenes")):
        r = subprocess.run([sys.executable, "-m", "edgevlm", "export", *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and needle in r.stderr and "fix:" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_calibration_session_is_bounded_and_restored():
    """INT8 calibration runs ONNX Runtime's calibrator without its memory arena and patterns, and only for the call."""
    import onnxruntime
    from onnxruntime.quantization import calibrate

    from edgevlm.compress.quantize import _bounded_calibration_memory

    original = calibrate.CalibraterBase.create_inference_session
    seen = {}

    class Probe:
        augmented_model_path, execution_providers = None, ["CPUExecutionProvider"]

    real = onnxruntime.InferenceSession
    try:
        onnxruntime.InferenceSession = lambda path, sess_options, providers: seen.update(
            arena=sess_options.enable_cpu_mem_arena, pattern=sess_options.enable_mem_pattern)
        with _bounded_calibration_memory():
            calibrate.CalibraterBase.create_inference_session(Probe())
            assert calibrate.CalibraterBase.create_inference_session is not original
    finally:
        onnxruntime.InferenceSession = real
    assert seen == {"arena": False, "pattern": False}
    assert calibrate.CalibraterBase.create_inference_session is original


def _conv_net_onnx(path: Path, external: bool) -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                              torch.nn.Flatten(1), torch.nn.Linear(8 * 6 * 6, 5), torch.nn.Softmax(-1)).eval()
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), input_names=["pixel_values"],
                      output_names=["probs"], dynamic_axes={"pixel_values": {0: "n"}}, dynamo=False)
    if external:              # as a tower over protobuf's 2 GB is saved: the weights in <file>.data
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)


@pytest.mark.parametrize("external", [False, True])
def test_streamed_minmax_calibration_is_onnxruntimes(tmp_path, external):
    """The streamed MinMax calibrator (weights read once, ranges merged batch by batch) gives the ranges ONNX
    Runtime's MinMaxCalibrater gives for the same views, and to_int8 writes the graph quantize_static writes with
    ORT's own calibrator; the augmented graph it writes next to the model is gone afterwards."""
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator

    from edgevlm.compress import quantize

    src = tmp_path / "net.onnx"
    _conv_net_onnx(src, external)
    data = np.random.default_rng(0).normal(size=(7, 3, 8, 8)).astype(np.float32)
    data[3] *= 5                                      # one view widens the ranges: the merge must keep it
    calls = []
    ours = quantize._calibrate_minmax(src, "pixel_values", data, 2, None, lambda d, t: calls.append((d, t)))
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["net.onnx"] + (["net.onnx.data"] if external else []))

    (tmp_path / "aug").mkdir()
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))         # what quantize_static asks its calibrator for
    cal = create_calibrator(src, ops, augmented_model_path=str(tmp_path / "aug" / "a.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external)
    cal.collect_data(quantize._Reader("pixel_values", data, 2))
    theirs = cal.compute_data()
    del cal
    assert set(theirs.keys()) == set(ours) and len(ours) >= 6
    for name in theirs:
        lo, hi = theirs[name].range_value
        np.testing.assert_allclose(ours[name][0], np.ravel(lo), rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(ours[name][1], np.ravel(hi), rtol=1e-6, err_msg=name)

    # the whole INT8 step against quantize_static calibrating by itself
    dst, ref = tmp_path / "ours.onnx", tmp_path / "ref.onnx"
    quantize.to_int8(src, dst, data, batch=2)
    with quantize._bounded_calibration_memory():
        quantize_static(str(src), str(ref), quantize._Reader("pixel_values", data, 2), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=quantize.REDUCE_RANGE,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": True},
                        use_external_data_format=external)
    a, b = onnx.load(str(dst)), onnx.load(str(ref))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert sum(n.op_type == "QuantizeLinear" for n in a.graph.node) >= 3
    scales = lambda m: {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer  # noqa: E731
                        if i.name.endswith("_scale")}
    sa, sb = scales(a), scales(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, err_msg=k)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_streamed_calibration_frees_each_activation(tmp_path):
    """The streamed calibrator's memory does not grow with the graph's depth: each activation is reduced and freed
    where it is made. 40 MLP layers over 4096x512 activations calibrate about 120 tensors of 8 MiB (0.9 GiB if
    all stayed alive, as under ONNX Runtime's default execution order); the run must add under 200 MiB."""
    import subprocess
    import sys

    net = torch.nn.Sequential(*[m for _ in range(40) for m in (torch.nn.Linear(512, 512), torch.nn.GELU())]).eval()
    torch.onnx.export(net, (torch.randn(1, 4096, 512),), str(tmp_path / "deep.onnx"), input_names=["x"],
                      output_names=["y"], dynamo=False)
    code = f"""
import numpy as np, onnxruntime
from pathlib import Path
from edgevlm.compress import quantize
# peak resident memory of this process (ru_maxrss would carry the parent's peak across exec)
rss = lambda: next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                   if l.startswith("VmHWM:"))
Real = onnxruntime.InferenceSession
seen = {{}}
class Spy(Real):
    def run(self, *a, **k):
        seen.setdefault("before", rss())
        out = super().run(*a, **k)
        seen["after"] = rss()
        return out
onnxruntime.InferenceSession = Spy
data = np.random.default_rng(0).normal(size=(2, 4096, 512)).astype(np.float32)
ranges = quantize._calibrate_minmax(Path({str(tmp_path / "deep.onnx")!r}), "x", data, 1, None, None)
print(len(ranges), seen["after"] - seen["before"])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    n, grown = map(int, r.stdout.split())
    assert n >= 120
    assert grown < 200 * 2**20, f"calibration added {grown / 2**20:.0f} MiB"


def test_calibration_views_follow_the_towers_compute():
    """A vision tower is calibrated on a fixed compute budget, not a fixed count: the per-view FLOPs are counted on
    shapes alone (a Linear's 2·M·K·N, per view of a batched example) and a tower 3.6x Moondream2's gets fewer
    views, never under the floor nor over the ceiling."""
    from edgevlm import build_vlm as bv

    lin = torch.nn.Linear(64, 32)
    spec = PartSpec("p", lin, ("x",), ("y",), (torch.randn(4, 10, 64),))
    assert bv.view_flops(spec) == 2 * 10 * 64 * 32
    assert bv.calibration_view_cap(int(0.6e12)) == bv.MAX_CALIB_VIEWS          # Moondream2's 413M tower
    assert bv.calibration_view_cap(int(2.2e12)) == 18                          # TinyGPT-V's 1B EVA tower
    assert bv.calibration_view_cap(int(1e15)) == bv.MIN_CALIB_VIEWS
    assert bv.calibration_view_cap(1) == bv.MAX_CALIB_VIEWS


def test_context_sets_what_the_bundle_holds_and_is_checked(tmp_path):
    """--context N: the manifest's context, the GGUF decoder's own context_length and the runtime's KV cache hold N
    positions; longer than the model takes, or not a sane count, is a one-line error; the CLI leaves --decoder to the
    profile."""
    import argparse

    from edgevlm import runtime
    from edgevlm.cli import _export_config
    from edgevlm.runtime.gguf_header import read_gguf_header

    out, m = _export(tmp_path, "edgevlm_scenes_tiny", "cpu", "fp32", decoder="both", context=96)
    assert m["generation"]["context_length"] == 96
    meta = read_gguf_header(out / m["parts"]["decoder_gguf"]["path"])["metadata"]
    assert meta[f"{meta['general.architecture']}.context_length"] == 96
    vlm = runtime.load(out, decoder="llama.cpp")
    assert vlm.context_length == 96 and vlm.decoder.n_ctx == 96
    vlm.close()
    with pytest.raises(ConfigError, match="--context 1000000 is longer than the .* positions"):
        _export(tmp_path / "long", "edgevlm_scenes_tiny", "cpu", "fp32", context=1_000_000)
    for bad in (8, 1.5, True):
        with pytest.raises(ConfigError, match="--context must be"):
            VLMExportConfig(model="edgevlm_scenes_tiny", context=bad)
    args = argparse.Namespace(model="edgevlm_scenes_tiny", weights=None, revision=None, target="jetson", quant=None,
                              decoder=None, out=None, overwrite=False, calib=None, block_size=32, opset=None,
                              device=None, context=None, calib_size=None)
    assert _export_config(args).decoder is None            # the profile's default decides (jetson: gguf)


# -- real sizes fit: the eager weights leave memory before the graphs are quantized --------------------------
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_released_weights_leave_resident_memory(tmp_path):
    from edgevlm.build_vlm import release_weights

    from edgevlm.exporters.torch_export import export_module

    big = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 4096), torch.nn.LayerNorm(4096))
    big[0].weight.data.normal_()                    # touched: 2 x 64 MiB resident
    big[1].weight.data.normal_()
    keep = big[2]
    # exported first, as in the pipeline: torch.onnx's export must not keep the weights alive afterwards
    # (onnxscript's global rewrite rules held on to the last graph and, through it, every parameter)
    export_module(big.eval(), (torch.randn(1, 4096),), tmp_path / "big.onnx", 18, ["x"], ["y"], None, True, "test")
    before = _rss_bytes()
    freed = release_weights(big, lambda *_: None, keep=keep)
    after = _rss_bytes()
    assert freed == 2 * (4096 * 4096 + 4096) * 4
    assert before - after > 0.8 * freed, (before, after, freed)
    assert big[0].weight.device.type == "meta" and big[0].weight.shape == (4096, 4096)
    assert keep.weight.device.type == "cpu"         # what `keep` holds stays


def test_an_owned_model_is_released_before_quantization_and_a_callers_is_not(tmp_path, monkeypatch):
    """The pipeline drops the eager weights it loaded itself once every part that reads them is exported, so a
    real-size model and the quantizer of its decoder never share memory; a model the caller passes stays whole."""
    import edgevlm.build_vlm as bv
    from edgevlm.exporters import vlm_onnx

    seen: dict = {}
    release = bv.release_weights

    def spy_release(model, log, **kw):
        seen.setdefault("model", model)
        return release(model, log, **kw)

    quantize = vlm_onnx.quantize_decoder

    def spy_quantize(*a, **kw):
        if "model" in seen:
            seen["live_at_quantize"] = [n for n, p in seen["model"].named_parameters() if p.device.type != "meta"]
        return quantize(*a, **kw)

    monkeypatch.setattr(bv, "release_weights", spy_release)
    monkeypatch.setattr(vlm_onnx, "quantize_decoder", spy_quantize)
    out, m = edgevlm.export("edgevlm_scenes_tiny", precision="int8", weights="random", calib_size=4,
                            out=tmp_path / "owned", quiet=True)
    assert seen["live_at_quantize"] == []               # no eager weight left when the decoder is quantized
    assert m["golden"]["cases"] and m["parity"]["results"][0]["backend"]   # golden and parity from the kept refs
    assert m["parts"]["vision_encoder"]["parity_fp32"]["passed"] is True

    seen.clear()
    vlm = load_vlm("edgevlm_scenes_tiny", weights="random").eval()
    cfg = VLMExportConfig(model="edgevlm_scenes_tiny", weights="random", target="cpu", precision="int8", calib_size=4,
                          out=tmp_path / "given")
    from edgevlm.api import export_config

    export_config(cfg, quiet=True, model=vlm)
    assert "model" not in seen                          # never released
    assert all(p.device.type == "cpu" for p in vlm.parameters())     # (its tower reparameterized, as ever)
    from edgevlm.build_vlm import eager_trace, parity_inputs

    assert eager_trace(vlm, *parity_inputs(vlm), 3)["ids"]              # still runs


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_image_parts_over_protobufs_limit_keep_their_weights_file(tmp_path, monkeypatch, precision):
    """A vision tower over protobuf's 2 GB (TinyGPT-V's 1B EVA) is exported, calibrated and moved into the bundle
    with its weights in ``<part>.onnx.data``: the threshold is lowered here so that a tiny tower crosses it. The
    real-size export once failed in ONNX Runtime's calibrator ("Failed to serialize proto") and would have moved the
    graph without its weights."""
    import edgevlm.compress.onnx_io as oio
    import edgevlm.compress.quantize as q
    import edgevlm.exporters.torch_export as te
    import edgevlm.runtime as rt

    for mod in (oio, q, te):
        monkeypatch.setattr(mod, "EXTERNAL_DATA_BYTES", 50_000)
    out, m = _export(tmp_path, "edgevlm_scenes_tiny", "cpu", precision)
    rec = m["parts"]["vision_encoder"]
    assert (out / "vision_encoder.onnx.data").is_file() and "vision_encoder.onnx.data" in m["files"]
    assert rec["precision"] == precision and rec.get("parity_fp32", rec["parity"])["passed"] is True
    assert not [p.name for p in out.iterdir() if p.name.endswith(".data") and not p.name.startswith(
        ("vision_encoder.onnx", "decoder.onnx", "embed_tokens.onnx"))]            # no stray weights files
    report = rt.load(out).verify()                 # checksums, then the golden cases on the moved files
    assert report.passed, report
