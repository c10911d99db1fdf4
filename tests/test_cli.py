"""The command line: fast help, one-line errors with fixes, non-zero exits."""
import json
import subprocess
import sys

import pytest


def edgevlm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgevlm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_help_imports_nothing_heavy():
    code = ("import sys; from edgevlm.cli import build_parser; build_parser().format_help();"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'timm', 'coremltools') if m in sys.modules];"
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_list_shows_every_variant_as_json():
    r = edgevlm("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    names = {row["model"].rstrip(" *") for row in rows}
    assert {"fastvit_t8", "fastvit_ma36", "tiny_vit_5m_224", "tiny_vit_21m_512"} <= names
    assert sum(row["task"] == "classification" for row in rows) == 12
    vlms = {row["model"] for row in rows if row["task"] == "vlm"}
    assert {"llava_1_5_7b", "llava_tiny"} <= vlms


@pytest.mark.parametrize("args, needle", [
    (["export", "--model", "fastvit_t9"], "Did you mean fastvit_t8"),
    (["export", "--target", "iphone"], "unknown target"),
    (["export", "--quant", "int3"], "choose one of"),
    (["export", "--model", "fastvit_sa12"], "--weights"),
    (["export", "--model", "fastvit_t8", "--weights", "/nonexistent/w.safetensors"], "no checkpoint"),
    (["export", "--model", "fastvit_t8", "--img-size", "100"], "multiple of 32"),
    (["export", "--weights", "/nonexistent/w.safetensors"], "no checkpoint"),
    (["run", "/nonexistent-bundle", "--image", "x.png"], "no bundle"),
])
def test_bad_input_gets_one_line_error(args, needle, tmp_path):
    r = edgevlm(*args, "--out", tmp_path / "o") if args[0] == "export" else edgevlm(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("edgevlm: error:")]
    assert "Traceback" not in r.stderr and len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    assert "fix:" in r.stderr
    assert not (tmp_path / "o").exists()


def test_run_rejects_non_image(tmp_path):
    from edgevlm.build import export_bundle
    from edgevlm.config import ExportConfig, QuantConfig

    out, _ = export_bundle(ExportConfig(model="fastvit_t8", quant=QuantConfig(precision="fp32"), out=tmp_path / "b",
                                        validate_accuracy=False), quiet=True)
    (tmp_path / "x.jpg").write_text("hello")
    r = edgevlm("run", out, "--image", tmp_path / "x.jpg")
    assert r.returncode == 2 and "not a decodable image" in r.stderr and "Traceback" not in r.stderr


def test_export_run_bench_eval_round_trip(tmp_path):
    """The CLI path a user takes: export, run, bench (JSON), eval (same accuracy as the manifest)."""
    out = tmp_path / "b"
    r = edgevlm("export", "--model", "fastvit_t8", "--quant", "fp32", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    from edgevlm.resources import zoo_dir

    r = edgevlm("run", out, "--image", zoo_dir() / "samples" / "digit_7.png", "--json")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    assert preds[0]["label"] == "7" and preds[0]["score"] > 0.5
    r = edgevlm("bench", out, "--runs", "5", "--warmup", "1", "--batch", "2", "--json", tmp_path / "bench.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "bench.json").read_text())
    assert 0 < res["latency_ms_p50"] <= res["latency_ms_p90"] and res["throughput_img_s"] > 0
    assert res["peak_rss_mib"] > 0 and "latency_ms_p50" in r.stdout
    r = edgevlm("eval", out, "--json", tmp_path / "eval.json")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["images"] == 360 and ev["top1"] == manifest["accuracy"]["bundle"]
