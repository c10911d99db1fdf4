"""android VLM bundles: every part in ORT format, one reduced-operator config for all graphs, tokenizer graphs
(onnxruntime-extensions) equal to tokenizer.json, parity and golden cases through the .ort files."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

pytest.importorskip("onnxruntime_extensions", reason="the android extra (onnxruntime-extensions) is not installed")

from edgevlm.config import VLMExportConfig
from edgevlm.errors import BundleError, ExportError
from edgevlm.exporters import ort_mobile as om
from edgevlm.exporters import tokenizer_graph as tg
from edgevlm.modeling.families import load_vlm
from edgevlm.targets import get_target

# prompts the export's own corpus does not hold: what an app user types
MORE_PROMPTS = ["Is the red circle above the blue square?", "Ünïcödé ✓ — ½ ⅓ ¼", "中文问题：有几个圆？", "🤖 bot?"]


def _export(out: Path, name: str, precision: str):
    """As tests/test_pipeline.py: random weights scaled so greedy tokens vary."""
    from edgevlm.api import export_config

    vlm = load_vlm(name, weights="random")
    with torch.no_grad():
        for p in vlm.language_model.parameters():
            p.mul_(4.0)
    cfg = VLMExportConfig(model=name, weights="random", target="android", precision=precision, calib_size=4, out=out)
    return export_config(cfg, quiet=True, model=vlm.eval())


@pytest.fixture(scope="module")
def scenes_fp32(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("android") / "scenes-fp32", "edgevlm_scenes_tiny", "fp32")


def _check_bundle(out: Path, m: dict, precision: str) -> None:
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    from edgevlm import runtime

    assert m["target"]["format"] == "ort" and m["target"]["vlm"] == get_target("android").vlm_dict()
    # every part is .ort, the ONNX graphs are not shipped (only the tokenizer graphs, which are ONNX by design)
    assert m["parts"] and all(r["format"] == "ort" and r["path"].endswith(".ort") for r in m["parts"].values())
    assert all(a["format"] == "ort" for a in m["artifacts"])
    onnx_files = sorted(p.name for p in out.rglob("*.onnx"))
    assert onnx_files == [tg.DETOKENIZER, tg.TOKENIZER]
    # one ops config covers every op of every graph, read from each .ort with ONNX Runtime's own config writer
    have, _ = parse_config(str(out / om.OPS_CONFIG))
    for name, rec in m["parts"].items():
        for domain, by_opset in om.graph_ops(out / rec["path"], out.parent).items():
            for opset, ops in by_opset.items():
                assert ops <= have[domain][opset], (name, domain, ops - have[domain][opset])
        d = rec["details"]["ort"]
        assert d["size_bytes"] == (out / rec["path"]).stat().st_size and d["nodes"] >= 1
        assert d["nodes"] == om.ort_node_count(out / rec["path"])
        nnapi = d["providers"]["NnapiExecutionProvider"]
        assert nnapi["suitability"] in ("YES", "MAYBE", "NO") and nnapi["nodes"] >= nnapi["supported_nodes"]
        assert d["providers"]["CPUExecutionProvider"]["suitability"] == "YES"
    assert m["ops_config"]["graphs"] == len(m["parts"]) and m["ops_config"]["path"] == om.OPS_CONFIG
    assert om.check_ops_config(out, m["parts"]) == len(m["parts"])
    # parity through the .ort files: FP32 greedy tokens equal eager's
    (res,) = m["parity"]["results"]
    assert res["backend"] == "onnxruntime" and res["precision"] == precision
    if precision == "fp32":
        assert res["same_greedy_tokens"] and res["passed"] is True
    # golden cases verify through the torch-free runtime on the .ort files
    vlm = runtime.load(out)
    assert vlm.decoder.graph.path.suffix == ".ort" and vlm.embed.path.suffix == ".ort"
    report = vlm.verify()
    assert report.passed, report.rows
    # tokenizer graphs equal tokenizers on the corpus and on prompts the export did not see
    proc = m["processing"]
    assert proc["tokenizer"]["path"] == tg.TOKENIZER and proc["detokenizer"]["path"] == tg.DETOKENIZER
    assert proc["tokenizer"]["extensions"] == f"onnxruntime-extensions {tg.extensions_version()}"
    assert proc["checked_prompts"] >= len(tg.CORPUS)
    graphs = tg.GraphTokenizer(out / proc["tokenizer"]["path"], out / proc["detokenizer"]["path"])
    assert (graphs.enc_in, graphs.enc_out, graphs.dec_in, graphs.dec_out) == (
        proc["tokenizer"]["input"], proc["tokenizer"]["output"], proc["detokenizer"]["input"],
        proc["detokenizer"]["output"])
    assert tg.check_graphs(graphs, out / "tokenizer.json", list(tg.CORPUS) + MORE_PROMPTS) == len(tg.CORPUS) + 4


def test_android_fp32_bundle_runs_from_ort_files(scenes_fp32):
    out, m = scenes_fp32
    _check_bundle(out, m, "fp32")
    assert m["parts"]["decoder"]["details"]["attention"]["kv_cache"] != "concat"      # the fusion reached the .ort
    assert "com.microsoft:GroupQueryAttention" in m["ops_config"]["contrib_ops"]


def test_a_tampered_ort_file_fails_its_checksum(scenes_fp32, tmp_path):
    from edgevlm import runtime

    out, _ = scenes_fp32
    bad = tmp_path / "b"
    shutil.copytree(out, bad)
    data = bytearray((bad / "decoder.ort").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "decoder.ort").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="decoder.ort does not match its checksum") as e:
        runtime.load(bad)
    assert "\n" not in str(e.value)


def test_an_op_outside_the_config_is_named_with_its_graph(scenes_fp32, tmp_path):
    out, m = scenes_fp32
    cfg = tmp_path / om.OPS_CONFIG
    lines = (out / om.OPS_CONFIG).read_text().splitlines()
    kept = []
    for ln in lines:            # drop GroupQueryAttention from the com.microsoft line
        if ln.startswith("com.microsoft;"):       # domain;opset;Op{types},Op,...
            ln = re.sub(r',?GroupQueryAttention(\{"inputs": \{[^}]*\}\})?', "", ln).replace(";,", ";")
        kept.append(ln)
    cfg.write_text("\n".join(kept) + "\n")
    assert "GroupQueryAttention" not in cfg.read_text() and "FusedMatMul" in cfg.read_text()
    with pytest.raises(ExportError, match=r"decoder.ort \(part decoder\) needs com.microsoft:GroupQueryAttention") as e:
        om.check_ops_config(out, m["parts"], cfg)
    assert "\n" not in str(e.value)


def test_a_tokenizer_graph_that_disagrees_fails_naming_the_prompt(scenes_fp32, tmp_path):
    """Real graphs of a tokenizer.json whose ids for 'e' and 'o' are swapped, checked against the bundle's own."""
    out, _ = scenes_fp32
    tok = json.loads((out / "tokenizer.json").read_text())
    v = tok["model"]["vocab"]
    v["e"], v["o"] = v["o"], v["e"]
    other = tmp_path / "tokenizer.json"
    other.write_text(json.dumps(tok))
    work = tmp_path / "w"
    work.mkdir()
    pre, post = tg.build_graphs(other, tmp_path)
    onnx.save(pre, work / tg.TOKENIZER)
    onnx.save(post, work / tg.DETOKENIZER)
    graphs = tg.GraphTokenizer(work / tg.TOKENIZER, work / tg.DETOKENIZER)
    with pytest.raises(ExportError, match="the tokenizer graph disagrees with tokenizer.json on the prompt "
                                          "'describe the image.'") as e:
        tg.check_graphs(graphs, out / "tokenizer.json", tg.CORPUS)
    assert "\n" not in str(e.value)


def test_a_tokenizer_that_cannot_be_expressed_is_recorded_not_written(tmp_path):
    tok = {"model": {"type": "Unigram", "vocab": []}, "added_tokens": []}
    f = tmp_path / "tokenizer.json"
    f.write_text(json.dumps(tok))
    block = tg.write_tokenizer_graphs(f, tmp_path, tmp_path, tg.CORPUS, lambda s: None)
    assert block["tokenizer"] is None and block["detokenizer"] is None and "Unigram" in block["not_expressed"]
    assert not (tmp_path / tg.TOKENIZER).exists()
    from edgevlm.manifest import PROCESSING, check_block

    check_block(PROCESSING, block, "processing")          # the manifest schema takes the record


def test_int4_tensors_are_held_as_int8_in_the_ort_format(tmp_path):
    """Blocked INT4 DequantizeLinear weights (no ORT-format type): widened to INT8, same values, converted and run."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, size=(8, 4)).astype(np.int8)
    scale = (rng.random((2, 4)) + 0.5).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], axis=0, block_size=4),
         helper.make_node("MatMul", ["x", "wf"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("w", TensorProto.INT4, [8, 4], w.ravel().tolist()),
         helper.make_tensor("s", TensorProto.FLOAT, [2, 4], scale.ravel().tolist())])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    src = tmp_path / "part.onnx"
    onnx.save(model, src)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    held = om.hold_in_ort_format(src)
    assert held["tensors"] == {"int4->int8": 1}
    assert om.hold_in_ort_format(src) is None                     # nothing left to hold otherwise
    out = tmp_path / "o"
    out.mkdir()
    ort_file, _ = om.convert_to_ort(src, out)
    got = ort.InferenceSession(str(ort_file), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_android_quantized_bundles(tmp_path, precision):
    out, m = _export(tmp_path / f"scenes-{precision}", "edgevlm_scenes_tiny", precision)
    _check_bundle(out, m, precision)
    if precision == "int4":
        assert "com.microsoft:MatMulNBits" in m["ops_config"]["contrib_ops"]
        assert m["parts"]["decoder"]["details"]["quantization"]["profile_method"] == "matmulnbits"
        # edgevlm's 4-bit kernel rewrites ONNX graphs, not ORT flatbuffers: ONNX Runtime's MatMulNBits runs it
        from edgevlm import runtime

        vlm = runtime.load(out)
        assert vlm.decoder.kernel["decode_kernel"] == "onnxruntime"
        assert "ORT-format" in vlm.decoder.kernel["decode_kernel_why"]
        vlm.close()
    else:       # the Fixed CPU conversion computes FP16 graphs in FP32 (Casts around the ops): recorded, not hidden
        d = m["parts"]["vision_encoder"]["details"]["ort"]
        assert "Cast" in d["float16_ops"] and "MatMul" not in d["float16_ops"] and "Conv" not in d["float16_ops"]
        assert d["precision_held_as"]["computes_in"] == "fp32"


@pytest.mark.slow
def test_android_smolvlm_bundle(tmp_path):
    """SmolVLM's tiled bundle in ORT format: parts, ops config, parity and golden cases through the .ort files (the
    Kotlin library's tile layout, Crops.kt, is compared with Python in tests/test_apps_android.py)."""
    out, m = _export(tmp_path / "smolvlm-fp32", "smolvlm_tiny", "fp32")
    _check_bundle(out, m, "fp32")
    assert m["generation"]["image"]["mode"] == "idefics3_tiles"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_android_moondream2_bundle(tmp_path, precision):
    out, m = _export(tmp_path / f"moondream-{precision}", "moondream2_tiny", precision)
    _check_bundle(out, m, precision)
    assert {"vision_tower", "vision_projector", "region", "embed_tokens", "decoder"} <= set(m["parts"])
