"""benchmarks/vlm_decode.py end to end at its tiny size: every engine timed, ratios and limits computed.

One run of the script with ``--compression`` (a random 2-layer Phi exported to ONNX and GGUF, then each engine in
its own process, and again at three prompt lengths) shared by the tests below.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "vlm_decode.py"
NEW_TOKENS = 8
ORT_ENGINES = ("eager", "ort-fp32", "ort-int8", "ort-int4", "ort-int4-ortkernel", "ort-int4-b128")
LLAMA_ENGINES = ("edgevlm-q8_0", "edgevlm-q4_k_m", "llamacpp-q8_0", "llamacpp-q4_k_m")
HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("gguf") is not None
NO_LLAMA = "llama-cpp-python / gguf are not installed: the llama.cpp engines are skipped (pip install 'edgevlm[gguf]')"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vlm_decode")
    cmd = [sys.executable, str(SCRIPT), "--size", "tiny", "--runs", "1", "--new-tokens", str(NEW_TOKENS),
           "--compression", "--cache", str(tmp / "cache"), "--out", str(tmp / "out")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    path = tmp / "out" / "vlm_decode-tiny.json"
    assert path.is_file(), r.stdout[-2000:]
    return {"json": json.loads(path.read_text()), "stdout": r.stdout, "stderr": r.stderr, "out": tmp / "out"}


def _rows(res) -> dict:
    return {row["key"]: row for row in res["json"]["rows"]}


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_engine(row: dict) -> None:
    for field in ("decode_tok_s", "ttft_ms", "peak_rss_mib", "weights_mb", "read_mb_per_tok", "limit_tok_s",
                  "pct_of_limit"):
        assert _positive(row.get(field)), (row["engine"], field, row.get(field))
    assert row["runs"] == 1


@pytest.mark.parametrize("key", ORT_ENGINES)
def test_eager_and_onnx_engines_measured(run, key):
    res = run["json"]
    assert not res["failed"], res["failed"]
    row = _rows(run).get(key)
    assert row is not None, f"{key} missing from the results (skipped: {res['skipped'].get(key)})"
    _check_engine(row)


@pytest.mark.parametrize("key", LLAMA_ENGINES)
def test_llama_cpp_engines_measured(run, key):
    res = run["json"]
    if not HAS_LLAMA:
        assert key in res["skipped"] and res["skipped"][key], "a skipped engine must say why"
        pytest.skip(NO_LLAMA)
    assert key not in res["skipped"], res["skipped"][key]
    row = _rows(run).get(key)
    assert row is not None, f"{key} missing from the results (failed: {res['failed'].get(key)})"
    _check_engine(row)


def test_same_model_in_every_engine(run):
    """ONNX Runtime FP32 decodes eager's greedy tokens: both run the same random model on the same prompt."""
    rows = _rows(run)
    assert rows["ort-fp32"]["greedy_prefix_equal_to_eager"] == NEW_TOKENS


def test_engines_run_as_bundles_do(run):
    """edgevlm's engines start as the `edgevlm` command does (huge pages where the OS allows) and INT4 decode steps
    run edgevlm's kernel where it is built; the other engines run as their users start them."""
    from edgevlm import kernels
    from edgevlm.runtime import memory

    rows = _rows(run)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "EDGEVLM_HUGE_PAGES")}
    huge = memory.why_not(env) is None
    for key in ("ort-fp32", "ort-int4", "ort-int4-b128"):
        assert (rows[key]["huge_pages_mib"] > 0) == huge, (key, rows[key]["huge_pages_mib"])
    assert rows["eager"]["huge_pages_mib"] in (0, 0.0, None) or memory.thp_mode() == "always"
    path, why = kernels.status()
    assert "edgevlm's 4-bit decode kernel" in run["stderr"]          # built (or said why not) before timing
    k = rows["ort-int4"]["decode_kernel"]
    if path is None:
        assert k["decode_kernel"] == "onnxruntime" and k["decode_kernel_why"] == why
    else:
        assert k["decode_kernel"] == "edgevlm MatMulQ4" and k["decode_kernel_layers"] == 2 * 4 + 1, k
        assert k["decode_attention"] == "edgevlm DecodeAttention", k
        assert _positive(run["json"]["ratios"]["ort_int4_kernel_vs_ort_kernel_decode"])
    assert rows["ort-int4-ortkernel"]["decode_kernel"]["decode_kernel_why"] == "turned off"
    assert rows["ort-int4-b128"]["decode_kernel"]["decode_kernel"] == k["decode_kernel"]


def test_ratios_and_targets(run):
    res = run["json"]
    ratios = res["ratios"]
    assert _positive(ratios["ort_int4_vs_eager_decode"]) and _positive(ratios["ort_int4_b128_vs_eager_decode"])
    names = ["edgevlm_q4_k_m_vs_eager_decode", "edgevlm_vs_llamacpp_q8_0_decode", "edgevlm_vs_llamacpp_q4_k_m_decode",
             "ort_int4_vs_llamacpp_q4_k_m_decode", "edgevlm_vs_llamacpp_q4_k_m_ttft_speed"]
    for name in names:
        if HAS_LLAMA:
            assert _positive(ratios[name]), (name, ratios[name])
        else:
            assert ratios[name] is None
    expected = set(ORT_ENGINES) | (set(LLAMA_ENGINES) if HAS_LLAMA else set())
    assert set(ratios["pct_of_limit"]) == expected
    assert all(_positive(v) for v in ratios["pct_of_limit"].values())
    bw = res["bandwidth"]
    assert bw["bandwidth_gbs"] == max(bw["before_timing_gbs"], bw["after_timing_gbs"]) > 0     # the better of two
    for t in res["targets"]:
        assert t["met"] in (True, False) or (t["met"] is None and not HAS_LLAMA), t
    # the table and every target's verdict are printed
    assert "decode_tok_s" in run["stdout"] and "pct_of_limit" in run["stdout"]
    assert run["stdout"].count("target ") == len(res["targets"]) + len(res["compression"]["targets"])


def test_time_to_first_token_at_every_prompt_length(run):
    """--compression: every engine's time to first token at 1, 16 and 576 vision tokens (+32 text), the prefill's
    tokens/s and its share of the int8 peak measured on this CPU, and the prompt targets judged."""
    comp = run["json"]["compression"]
    peak = comp["int8_peak"]
    assert _positive(peak["int8_gops"]) and "MatMulInteger" in peak["how"]
    want = {"eager", "ort-fp32", "ort-int8", "ort-int4", "ort-int4-ortkernel"} | (set(LLAMA_ENGINES) if HAS_LLAMA
                                                                                 else set())
    got = {(r["key"], r["vision_tokens"]) for r in comp["rows"]}
    assert got == {(k, n) for k in want for n in (1, 16, 576)}
    for r in comp["rows"]:
        assert r["prompt_tokens"] == r["vision_tokens"] + 32
        for field in ("ttft_ms", "prefill_tok_s", "pct_of_int8_peak", "speedup_vs_576"):
            assert _positive(r[field]), (r["key"], field, r[field])
        assert abs(r["prefill_tok_s"] * r["ttft_ms"] / 1000 - r["prompt_tokens"]) < 1e-6 * r["prompt_tokens"]
    names = [t["target"] for t in comp["targets"]]
    assert sum("INT4 TTFT <= ONNX INT8" in n for n in names) == 3
    for t in comp["targets"]:
        assert t["met"] in (True, False) or (t["met"] is None and not HAS_LLAMA and "llama.cpp" in t["target"]), t
    assert "pct_of_int8_peak" in run["stdout"]


def test_settings_recorded(run):
    res = run["json"]
    assert res["settings"]["threads"] == 2 and res["prompt"]["new_tokens"] == NEW_TOKENS
    assert res["prompt"]["image_tokens"] + res["prompt"]["text_tokens"] == 96
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run["out"] / "vlm_decode-tiny.png").is_file()
