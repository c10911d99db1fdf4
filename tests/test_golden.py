"""Golden cases in every bundle and `edgevlm verify` (issue 24): eager's answers and the criteria travel with the
bundle; the torch-free runtime checks them on whatever machine runs it.

The criteria are shown to bite (a decoder whose weights were replaced after export, checksums rewritten as an
attacker or a broken copy would, fails) and not to be too tight (criteria derived from the ONNX INT4 decoder alone
pass llama.cpp's decoder of the same bundle)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgevlm import bundle as B
from edgevlm import runtime
from edgevlm.errors import BundleError
from edgevlm.runtime import golden as g

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA = True
except ImportError:
    HAVE_LLAMA = False


def _export(**kw):
    import edgevlm

    return edgevlm.export(quiet=True, overwrite=True, **kw)


def _rewrite_files(d: Path, edit=None) -> None:
    """Refresh the manifest's checksums after an edit (what a tampering party would do)."""
    m = json.loads((d / B.MANIFEST).read_text())
    if edit:
        edit(m)
    m["files"] = B.file_table(d)
    (d / B.MANIFEST).write_text(json.dumps(m, indent=2))


def _randomize_onnx(path: Path, seed: int = 0) -> int:
    """Replace every large initializer with random values of its dtype: a random-weight decoder with the same
    graph. Returns how many tensors changed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    n = 0
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.size < 512:
            continue
        if a.dtype.kind == "f":
            b = (rng.standard_normal(a.shape) * (a.std() + 1e-3)).astype(a.dtype)
        else:
            info = np.iinfo(a.dtype)
            b = rng.integers(info.min, int(info.max) + 1, a.shape).astype(a.dtype)
        t.CopyFrom(numpy_helper.from_array(b, t.name))
        n += 1
    onnx.save(model, str(path))
    return n


def _verify_cli(path: Path, *args) -> tuple[int, dict, bool]:
    code = ("import json, sys\nfrom edgevlm.cli import main\n"
            f"rc = main(['verify', {str(path)!r}, '--json', *{list(args)!r}])\n"
            "print('TORCH', 'torch' in sys.modules)\nsys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    out = p.stdout
    torch_loaded = "TORCH True" in out
    doc = json.loads(out[: out.rindex("TORCH")])
    return p.returncode, doc, torch_loaded


# -- VLM, FP32 -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fp32_vlm(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "vlm-fp32"
    path, m = _export(model="edgevlm_scenes_tiny", weights="random", precision="fp32", out=str(out),
                      decoder="both" if HAVE_LLAMA else "onnx")
    return path, m


def test_fp32_vlm_bundle_carries_golden_cases_that_verify_here_without_torch(fp32_vlm):
    path, m = fp32_vlm
    rec = m["golden"]
    assert rec["path"] == g.GOLDEN_JSON and rec["cases"] == 2 and rec["new_tokens"] == g.NEW_TOKENS
    files = [f for f in m["files"] if f.startswith("golden/")]
    assert sorted(files) == ["golden/case0.png", "golden/case1.png", "golden/golden.json"]   # checksummed
    size = sum(m["files"][f]["size"] for f in files)
    assert size == rec["bytes"] and size <= max(200 * 1024, sum(v["size"] for v in m["files"].values()) // 100)
    doc = json.loads((path / g.GOLDEN_JSON).read_text())
    for case in doc["cases"]:
        assert len(case["eager"]["tokens"]) == g.NEW_TOKENS
        assert len(case["eager"]["top5"]["ids"]) == g.NEW_TOKENS and len(case["eager"]["top5"]["ids"][0]) == 5
        assert [r[0] for r in case["eager"]["top5"]["ids"]] == case["eager"]["tokens"]   # greedy = teacher top-1
        assert case["criteria"] == {"same_greedy_tokens": True, "teacher_forced_top1_agreement_min": 1.0}
    rep = runtime.load(path).verify()
    assert rep.golden and rep.passed and len(rep.rows) == 4
    rc, out, torch_loaded = _verify_cli(path)
    assert rc == 0 and out["passed"] and not torch_loaded
    assert [r["backend"] for r in out["reports"]] == (["onnxruntime", "llama.cpp"] if HAVE_LLAMA else ["onnxruntime"])


def test_perturbed_decoder_fails_verify_even_with_rewritten_checksums(fp32_vlm, tmp_path):
    path, _ = fp32_vlm
    d = tmp_path / "tampered"
    shutil.copytree(path, d)
    assert _randomize_onnx(d / "decoder.onnx") > 0
    _rewrite_files(d)
    rep = runtime.load(d, decoder="onnxruntime").verify()        # loads: the checksums match the new bytes
    assert not rep.passed
    failed = [r for r in rep.rows if not r.passed]
    assert {r.criterion for r in failed} >= {"same_greedy_tokens == True"}
    rc, out, _ = _verify_cli(d, "--decoder-backend", "onnxruntime")
    assert rc == 1 and not out["passed"]
    text = g.format_reports([rep])
    assert "FAIL" in text.splitlines()[-1]


def test_tampered_golden_file_fails_its_checksum(fp32_vlm, tmp_path):
    path, _ = fp32_vlm
    d = tmp_path / "golden-edit"
    shutil.copytree(path, d)
    doc = json.loads((d / g.GOLDEN_JSON).read_text())
    doc["cases"][0]["criteria"]["teacher_forced_top1_agreement_min"] = 0.0
    (d / g.GOLDEN_JSON).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="golden/golden.json"):
        runtime.load(d)


def test_broken_golden_files_give_one_line_errors(fp32_vlm, tmp_path):
    """Checksums rewritten, so only the golden reader stands between bad data and the device check."""
    path, _ = fp32_vlm
    edits = {
        "unknown criterion": lambda doc: doc["cases"][0]["criteria"].update(always=True),
        "criterion type": lambda doc: doc["cases"][0]["criteria"].update(same_greedy_tokens="yes"),
        "id past vocab": lambda doc: doc["cases"][0]["eager"]["top5"]["ids"][0].__setitem__(1, 10**6),
        "rows": lambda doc: doc["cases"][0]["eager"]["top5"]["logsumexp"].pop(),
        "NaN logit": lambda doc: doc["cases"][0]["eager"]["top5"]["logits"][0].__setitem__(0, float("nan")),
        "newer": lambda doc: doc.update(version=99),
        "image outside": lambda doc: doc["cases"][0].update(image="../manifest.json"),
        "other kind": lambda doc: doc.update(kind="classification"),
    }
    for name, edit in edits.items():
        d = tmp_path / name.replace(" ", "-")
        shutil.copytree(path, d)
        doc = json.loads((d / g.GOLDEN_JSON).read_text())
        edit(doc)
        (d / g.GOLDEN_JSON).write_text(json.dumps(doc))
        _rewrite_files(d)
        model = runtime.load(d, decoder="onnxruntime")
        try:
            with pytest.raises(BundleError) as e:
                model.verify()
        finally:
            model.close()
        msg = str(e.value)
        assert "fix:" in msg and "\n" not in msg, (name, msg)


def test_bundle_without_golden_cases_is_verified_by_what_it_has(fp32_vlm, tmp_path):
    path, _ = fp32_vlm
    d = tmp_path / "old"
    shutil.copytree(path, d)
    shutil.rmtree(d / "golden")
    _rewrite_files(d, lambda m: m.pop("golden"))
    rep = runtime.load(d).verify()
    assert not rep.golden and rep.passed and rep.rows == []
    assert "no golden cases" in rep.note and "checksums" in rep.note
    rc, out, _ = _verify_cli(d)
    assert rc == 0 and all(not r["golden"] for r in out["reports"])


# -- VLM, INT4 on the shipped default model: margins neither vacuous nor too tight -----------------------------
@pytest.mark.skipif(not HAVE_LLAMA, reason="the cross-backend check needs llama-cpp-python (the gguf extra)")
def test_int4_criteria_bite_and_cover_another_backend(tmp_path):
    path, m = _export(precision="int4", decoder="both", out=str(tmp_path / "int4"))
    doc = json.loads((path / g.GOLDEN_JSON).read_text())
    figs = doc["measured"]["figures"]
    assert set(figs) == {"onnxruntime", "llama.cpp"}
    reports = g.verify_bundle(path)
    assert [r.backend for r in reports] == ["onnxruntime", "llama.cpp"] and all(r.passed for r in reports)
    for case in doc["cases"]:
        assert case["criteria"]["teacher_forced_top1_agreement_min"] > 0.5      # a real bound, not 0
    # not too tight: criteria derived from the ONNX INT4 decoder alone hold for llama.cpp's decoder
    for i, case in enumerate(doc["cases"]):
        crit = g.vlm_criteria("int4", [figs["onnxruntime"][i]], g.first_near_tie(case["eager"]["top5"]))
        rows = g.judge(case["id"], "llama.cpp", figs["llama.cpp"][i], crit)
        assert all(r.passed for r in rows), [r.to_dict() for r in rows]
    # not vacuous: a random-weight decoder in the same bundle fails
    d = tmp_path / "random-decoder"
    shutil.copytree(path, d)
    assert _randomize_onnx(d / "decoder.onnx", seed=1) > 0
    _rewrite_files(d)
    bad = g.verify_bundle(d, ["onnxruntime"])[0]
    assert not bad.passed
    assert any(not r.passed and r.criterion.startswith("teacher_forced_top1_agreement") for r in bad.rows)


# -- classifiers on every target this machine can run, and the one it cannot ------------------------------------
@pytest.mark.parametrize("target", ["cpu", "jetson", "android"])
def test_classifier_bundles_carry_golden_cases_that_verify(tmp_path, target):
    path, m = _export(model="fastvit_t8", target=target, out=str(tmp_path / target), validate_accuracy=False)
    doc = json.loads((path / g.GOLDEN_JSON).read_text())
    assert doc["kind"] == "classification" and len(doc["cases"]) == 4 and m["golden"]["cases"] == 4
    assert set(doc["measured"]["figures"]) == {"onnxruntime"}
    rep = runtime.load(path).verify()
    assert rep.passed and len(rep.rows) == 8
    art = m["artifacts"][0]["path"]
    if art.endswith(".onnx"):           # android's .ort flatbuffer is not rewritten here
        d = tmp_path / f"{target}-random"     # a classifier whose weights were replaced fails (checksums rewritten)
        shutil.copytree(path, d)
        _randomize_onnx(d / art, seed=2)
        _rewrite_files(d)
        assert not runtime.load(d).verify().passed


def test_ios_classifier_golden_cases_are_measured_and_verified_by_the_reference_interpreter(tmp_path):
    pytest.importorskip("coremltools", reason="the ios target converts with coremltools (the coreml extra)")
    if sys.platform == "darwin":
        pytest.skip("on macOS Core ML runs: this test is about the interpreter that stands in for it elsewhere")
    path, m = _export(model="fastvit_t8", target="ios", out=str(tmp_path / "ios"), validate_accuracy=False)
    doc = json.loads((path / g.GOLDEN_JSON).read_text())
    assert set(doc["measured"]["figures"]) == {"coreml-reference"} and doc["measured"]["note"] is None
    assert not any(c["criteria"].get("basis") == "defaults (not measured)" for c in doc["cases"])
    p = subprocess.run([sys.executable, "-m", "edgevlm", "verify", str(path)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "reference" in p.stdout + p.stderr and "Traceback" not in p.stderr


def test_prefix_bound_stops_at_eagers_first_near_tie_and_int4_kl_has_its_own_slack():
    top = {"logits": [[5.0, 1.0], [3.0, 2.9], [4.0, 0.0]]}      # step 1: eager's top-2 within 0.1 nats
    assert g.first_near_tie(top) == 1 and g.first_near_tie({"logits": [[5.0, 1.0], [3.0, 2.0]]}) is None
    assert g.first_near_tie({"logits": [[2.0, 2.0 - g.TIE_GAP]]}) is None          # exactly TIE_GAP is not a tie
    figs = [{"teacher_forced_top1_agreement": 1.0, "prefix_tokens": 32, "kl_mean": 0.004}]
    free, tied = g.vlm_criteria("int4", figs), g.vlm_criteria("int4", figs, near_tie=4)
    assert free["prefix_tokens_min"] == 16 and tied["prefix_tokens_min"] == 4
    assert g.vlm_criteria("int4", figs, near_tie=30)["prefix_tokens_min"] == 16       # a late tie changes nothing
    # a backend that forks at the near-tie and is otherwise as close as the measured one passes only with the cap
    fork = {"same_greedy_tokens": False, "prefix_tokens": 4, "teacher_forced_top1_agreement": 0.96875,
            "kl_mean": 0.03, "new_tokens": 32}
    assert not all(r.passed for r in g.judge("c", "other", fork, free))
    assert all(r.passed for r in g.judge("c", "other", fork, tied))
    assert free["kl_mean_max"] == pytest.approx(2 * 0.004 + g.KL_SLACK_INT4)
    assert g.vlm_criteria("int8", figs)["kl_mean_max"] == pytest.approx(2 * 0.004 + g.KL_SLACK)
    assert g.KL_SLACK < g.KL_SLACK_INT4


def test_coarse_kl_is_a_lower_bound_of_the_full_kl():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.standard_normal((3, 50)) * 3, rng.standard_normal((3, 50)) * 3
        pa, lb = g.log_softmax(a), g.log_softmax(b)
        full = (np.exp(pa) * (pa - lb)).sum(-1)
        coarse = g.coarse_kl(g.top_k_record(a), b)
        assert np.all(coarse <= full + 1e-9) and np.all(coarse >= 0)
    assert np.allclose(g.coarse_kl(g.top_k_record(a), a), 0, atol=1e-9)


def test_jetson_vlm_bundle_carries_golden_cases_that_verify(tmp_path):
    """The jetson profile's VLM bundle (fp16 by default; its GGUF decoder for llama.cpp and, asked for, the
    TensorRT-ready ONNX one) verifies here on both decoders; its criteria are the measured ones widened by the
    margins, not fp32's exact tokens."""
    path, m = _export(model="edgevlm_scenes_tiny", weights="random", target="jetson", decoder="both",
                      out=str(tmp_path / "jetson"))
    doc = json.loads((path / g.GOLDEN_JSON).read_text())
    assert m["precision"] == "fp16" and set(doc["measured"]["figures"]) == {"onnxruntime", "llama.cpp"}
    assert m["parts"]["decoder_gguf"]["gguf_type"] == "f16"
    assert all("kl_mean_max" in c["criteria"] for c in doc["cases"])
    reports = g.verify_bundle(path, gpu_layers=0)
    assert [r.backend for r in reports] == ["onnxruntime", "llama.cpp"]
    assert all(r.golden and r.passed and len(r.rows) == 6 for r in reports), [r.to_dict() for r in reports]
    assert reports[1].placement.startswith("CPU") and "providers: CPUExecutionProvider" in reports[0].placement
