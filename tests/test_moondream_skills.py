"""Moondream2's skills (caption, query, detect, point) in a bundle, run by the torch-free runtime: the region heads
as the ``region`` part, the decoder's pre-final-LN ``hidden`` output (through attention fusion, INT8/INT4 and the
INT4 kernel), the ``generation.skills`` block, the refusals and `edgevlm run --skill`."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from vlm_utils import make_image

from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle
from edgevlm.bundle import read_manifest
from edgevlm.errors import BundleError, ConfigError
from edgevlm.manifest import validate_manifest
from edgevlm.modeling.families import load_vlm
from edgevlm.runtime import skills
from edgevlm.runtime.vlm import VLMPipeline

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False

OBJECTS = ("cat", "red square")
MAX_OBJECTS = 5


def _model():
    """moondream2_tiny, random weights with the text model's scaled by 4 (as test_vlm_bundle's sharp_model), so
    greedy tokens vary; its region loop finds objects (asserted where used, so no comparison is vacuous)."""
    vlm = load_vlm("moondream2_tiny", weights="random")
    with torch.no_grad():
        for p in vlm.language_model.parameters():
            p.mul_(4.0)
    return vlm.eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = _model()
    cfg = VLMExportConfig(model="moondream2_tiny", weights="random", precision="fp32",
                          decoder="both" if HAVE_LLAMA else "onnx",
                          out=str(tmp_path_factory.mktemp("md-skills") / "b"), calib_size=4)
    out, manifest = export_vlm_bundle(cfg, quiet=True, model=model)
    return out, manifest, model


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(make_image(180, seed=2)).save(path)
    return path


def test_bundle_carries_the_region_part_hidden_output_and_skills_block(bundle):
    _, m, model = bundle
    region = m["parts"]["region"]
    assert region["path"] == "region.onnx" and region["precision"] == "fp32"
    par = region["parity"]
    assert par["passed"] and {r["output"] for r in par["outputs"]} == {"coord_embed", "size_embed", "coord_logits",
                                                                        "size_logits"}
    assert all(r["max_abs_diff"] < 1e-4 for r in par["outputs"])
    dec = m["parts"]["decoder"]["details"]["export"]
    assert dec["outputs"][-1] == "hidden" and dec["extra_outputs"]["hidden"]["passed"]
    s = m["generation"]["skills"]
    assert s == model.skills_spec() and s["eos_id"] == model.tokens["eos_id"] and s["log_sizes"] is True
    assert set(s["caption"]) == {"short", "normal", "long"}


@pytest.mark.parametrize("kind", ["detect", "point"])
def test_detect_and_point_equal_eager(bundle, image_file, kind):
    out, _, model = bundle
    pipe = VLMPipeline(out, read_manifest(out))
    for obj in OBJECTS:
        for image in (str(image_file), make_image(96, seed=5)):
            eager = getattr(model, kind)(image, obj, max_objects=MAX_OBJECTS)
            got = getattr(pipe, kind)(image, obj, max_objects=MAX_OBJECTS)
            assert eager, f"eager found no {obj!r}: the comparison would be vacuous"
            assert len(got) == len(eager), (kind, obj, got, eager)
            for a, b in zip(got, eager):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 for k in a), (kind, obj, a, b)
    # several objects, not one repeated: the fed-back encodings reach the decoder
    assert len({tuple(sorted(d.items())) for d in got}) > 1
    assert pipe.decoder.n_past == 0                      # the loop leaves no half-filled cache behind


def test_caption_and_query_tokens_equal_eager(bundle, image_file):
    out, _, model = bundle
    pipe = VLMPipeline(out, read_manifest(out))
    for length in ("short", "normal", "long"):
        ids = list(model.tokens["caption"][length])
        eager = model._text(str(image_file), ids, False, 16)
        got = skills.text(pipe, str(image_file), ids, 16)
        assert got.token_ids == eager.token_ids and len(set(eager.token_ids)) > 3, length
        assert pipe.caption(str(image_file), length, max_new_tokens=16) == model.caption(str(image_file), length,
                                                                                        max_new_tokens=16)
    assert "".join(pipe.caption(str(image_file), "short", max_new_tokens=8, stream=True)) == \
        model.caption(str(image_file), "short", max_new_tokens=8)
    q = "How many circles?"
    eager = model._text(str(image_file), model.query_ids(q), False, 16)
    got = pipe.generate(str(image_file), q, max_new_tokens=16)
    assert got.token_ids == eager.token_ids
    assert pipe.query(str(image_file), q, max_new_tokens=16) == model.query(str(image_file), q, max_new_tokens=16)
    # no image: BOS + template only, as eager
    assert skills.text(pipe, None, ids, 8).token_ids == model._text(None, ids, False, 8).token_ids


def test_refusals(bundle, image_file):
    out, _, _ = bundle
    m = read_manifest(out)
    pipe = VLMPipeline(out, m)
    img = str(image_file)
    with pytest.raises(ConfigError, match="caption length 'tiny' is not in this bundle"):
        pipe.caption(img, "tiny")
    with pytest.raises(ConfigError, match="the object is empty"):
        pipe.detect(img, "  ")
    with pytest.raises(ConfigError, match="detect needs an image"):
        pipe.detect(None, "cat")
    with pytest.raises(ConfigError, match="max_objects"):
        pipe.point(img, "cat", max_objects=-1)
    assert pipe.point(img, "cat", max_objects=0) == []
    # a bundle without the region part: caption and query still run, detect/point name the missing part
    no_region = copy.deepcopy(m)
    no_region["parts"].pop("region")
    p2 = VLMPipeline(out, no_region)
    assert isinstance(p2.caption(img, "short", max_new_tokens=3), str)
    for kind in ("detect", "point"):
        with pytest.raises(BundleError, match=f"has no region part .*so it cannot {kind}") as e:
            getattr(p2, kind)(img, "cat")
        assert "re-export" in e.value.fix and "\n" not in str(e.value)
    # a bundle whose model has no skills (every family but Moondream2)
    plain = copy.deepcopy(m)
    plain["generation"].pop("skills")
    p3 = VLMPipeline(out, plain)
    for call in (lambda: p3.detect(img, "cat"), lambda: p3.caption(img), lambda: p3.query(img, "what?")):
        with pytest.raises(ConfigError, match="has no (detect|caption|query) skill"):
            call()
    assert p3.generate(img, "what?", max_new_tokens=2).token_ids      # generate is every bundle's


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'edgevlm[gguf]')")
def test_llama_cpp_decoder_refuses_detect_and_point_but_captions(bundle, image_file):
    from edgevlm import runtime

    out, _, model = bundle
    pipe = runtime.load(out, decoder="llama.cpp")
    for kind in ("detect", "point"):
        with pytest.raises(ConfigError, match="hidden state before its final LayerNorm, which the llama.cpp") as e:
            getattr(pipe, kind)(str(image_file), "cat")
        assert "decoder='onnxruntime'" in e.value.fix
    assert pipe.caption(str(image_file), "short", max_new_tokens=6) == model.caption(str(image_file), "short",
                                                                                     max_new_tokens=6)


def test_hidden_output_survives_fusion_quantization_and_the_int4_kernel(tmp_path):
    """decoder.onnx with the declared ``hidden`` output: the plain graph, after fuse_attention (shared KV buffer),
    INT8 and INT4 quantization, and INT4 with edgevlm's decode kernel all give the pre-final-LN hidden state
    that MoondreamModel._lm_step reads (exact at FP32; close once quantized)."""
    from edgevlm import kernels
    from edgevlm.compress.attention import fuse_attention, rotary_tables
    from edgevlm.exporters import vlm_onnx
    from edgevlm.runtime.vlm import OrtDecoder, _Graph, open_ort_decoder

    model = load_vlm("moondream2_tiny", weights="random").eval()     # unscaled: quantization error stays small
    lm = model.language_model
    facts = vlm_onnx.export_decoder(lm, tmp_path / "fp32.onnx", opset=18, outputs=model.decoder_outputs)
    assert facts["outputs"][-1] == "hidden" and facts["extra_outputs"]["hidden"]["max_abs_diff"] < 1e-5
    with torch.no_grad():
        embeds, n_prefix = model.embed_prompt(make_image(180, seed=2), [10, 10, 47, 25, 99, 11])
        x1, x2 = torch.randn(2, 1, 1, lm.config.hidden_size, generator=torch.Generator().manual_seed(1))
        h0, _, cache = model._lm_step(embeds, None, model.prefill_mask(embeds.shape[1], n_prefix, embeds.dtype))
        h1, _, cache = model._lm_step(x1, cache)
        h2, _, _ = model._lm_step(x2, cache)
    ref = [h.numpy() for h in (h0, h1, h2)]

    def hidden_states(dec):
        assert dec.gives_hidden
        dec.prefill(embeds.numpy()[0], n_prefix)
        out = [dec.last_hidden]
        for x in (x1, x2):
            dec.step_embeds(x.numpy())
            out.append(dec.last_hidden)
        return out

    def diff(dec) -> float:
        return max(float(np.abs(a - b).max() / max(1.0, np.abs(b).max())) for a, b in zip(hidden_states(dec), ref))

    n, h, hd = facts["num_layers"], facts["num_kv_heads"], facts["head_dim"]

    def plain(path):
        return OrtDecoder(_Graph(path, ["CPUExecutionProvider"], "fp32", 2), None, n, h, hd)

    assert diff(plain(tmp_path / "fp32.onnx")) < 1e-5
    att = fuse_attention(tmp_path / "fp32.onnx", lm.config.num_attention_heads, h, hd,
                         dst=tmp_path / "fused.onnx", rotary=rotary_tables(lm, model.max_context))
    assert att["kv_cache"] != "concat"
    fused = plain(tmp_path / "fused.onnx")
    assert fused.shared_kv and diff(fused) < 1e-5
    for prec in ("int8", "int4"):
        vlm_onnx.quantize_decoder(tmp_path / "fused.onnx", tmp_path / f"{prec}.onnx", prec)
        assert diff(plain(tmp_path / f"{prec}.onnx")) < 0.05, prec
    dec = open_ort_decoder(tmp_path / "int4.onnx", ["CPUExecutionProvider"], "int4", 2, None, n, h, hd)
    if kernels.status()[0] is not None:
        assert dec.kernel["decode_kernel"].startswith("edgevlm"), dec.kernel
        assert dec.step_graph is not None and "hidden" in dec.step_graph.outputs
    assert diff(dec) < 0.05


def test_manifest_schema_types_the_skills_block(bundle):
    out, _, _ = bundle
    m = read_manifest(out)
    validate_manifest(m, "m")
    old = copy.deepcopy(m)
    old["generation"].pop("skills")                      # bundles made before the block load as before
    validate_manifest(old, "m")
    bad = [(("eos_id",), "x", "generation.skills.eos_id"), (("caption", "short"), [10, -1], "generation.skills.caption.short[1]"),
           (("caption", "short"), [], "generation.skills.caption.short"), (("detect",), {"suffix": [1]}, "generation.skills.detect.prefix"),
           (("log_sizes",), 1, "generation.skills.log_sizes"), (("max_tokens",), 0, "generation.skills.max_tokens")]
    for keys, value, where in bad:
        b = copy.deepcopy(m)
        node = b["generation"]["skills"]
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        with pytest.raises(BundleError, match=where.replace("[", r"\[").replace("]", r"\]")):
            validate_manifest(b, "m")
    b = copy.deepcopy(m)
    b["generation"]["skills"].pop("eos_id")
    with pytest.raises(BundleError, match="generation.skills.eos_id is missing"):
        validate_manifest(b, "m")


def test_cli_run_skills(bundle, image_file, capsys):
    from edgevlm.cli import main

    out, _, model = bundle
    pipe = VLMPipeline(out, read_manifest(out))
    assert main(["run", str(out), "--image", str(image_file), "--skill", "detect", "--prompt", "cat",
                 "--max-objects", "3", "--json"]) == 0
    boxes = json.loads(capsys.readouterr().out)
    assert boxes and boxes == pipe.detect(str(image_file), "cat", max_objects=3)
    assert main(["run", str(out), "--image", str(image_file), "--skill", "point", "--prompt", "cat",
                 "--max-objects", "2"]) == 0
    table = capsys.readouterr().out
    assert "2 points of 'cat'" in table and f"{pipe.point(str(image_file), 'cat', 2)[0]['x']:.4g}"[:4] in table
    assert main(["run", str(out), "--image", str(image_file), "--skill", "caption", "--prompt", "short",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == model.caption(str(image_file), "short", max_new_tokens=6)
    assert main(["run", str(out), "--image", str(image_file), "--skill", "query", "--prompt", "How many?",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == model.query(str(image_file), "How many?", max_new_tokens=6)
    assert main(["run", str(out), "--image", str(image_file), "--skill", "detect"]) == 2
    err = capsys.readouterr().err
    assert "--skill detect needs the object" in err and "Traceback" not in err
    if HAVE_LLAMA:
        assert main(["run", str(out), "--image", str(image_file), "--skill", "point", "--prompt", "cat",
                     "--decoder-backend", "llama.cpp"]) == 2
        assert "llama.cpp decoder does not give" in capsys.readouterr().err


def test_skills_run_without_torch(bundle, image_file):
    out, _, model = bundle
    code = f"""
import sys, json
sys.modules['torch'] = None          # any torch import fails
from edgevlm import runtime
vlm = runtime.load({str(out)!r})
print(json.dumps(vlm.detect({str(image_file)!r}, "cat", max_objects=3)))
"""
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    eager = model.detect(str(image_file), "cat", max_objects=3)
    assert eager and len(got) == len(eager)
    assert all(abs(a[k] - b[k]) <= 1e-4 for a, b in zip(got, eager) for k in a)
