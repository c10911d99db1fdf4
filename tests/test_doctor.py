"""`edgevlm doctor`: the machine's facts against what this machine really has (/proc, onnxruntime, llama_cpp), the
switches it reports (EDGEVLM_KERNELS=0, llama-cpp-python hidden), and bundles: every part with a backend, the KV
cache and memory arithmetic, and a non-zero exit naming the backend a part lacks. The doctor runs in subprocesses,
which also check that it imports no torch and nothing of edgevlm's exporters, modeling, compress or train."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
X86_FLAGS = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16"}
ARM_FLAGS = {"asimd", "asimddp", "i8mm"}
STATUSES = {"ok", "missing", "off", "warn"}

# Runs `edgevlm doctor ...` through edgevlm.cli.main; argv[1] "hide-llama" makes `import llama_cpp` fail first.
# On stderr it names the heavy modules the run imported (there must be none).
WRAPPER = r'''
import json, sys
if sys.argv[1] == "hide-llama":
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name == "llama_cpp" or name.startswith("llama_cpp."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            return None
    sys.meta_path.insert(0, _Hide())
from edgevlm.cli import main
rc = main(sys.argv[2:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm", "transformers",
               "coremltools") or m.startswith(("edgevlm.exporters", "edgevlm.modeling", "edgevlm.compress",
                                               "edgevlm.train")))
print("HEAVY " + json.dumps(heavy), file=sys.stderr)
sys.exit(rc)
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EDGEVLM_KERNELS", "EDGEVLM_LLAMA_REPACK", "EDGEVLM_HUGE_PAGES")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.update(extra)
    return env


def run_doctor(*args: str, hide_llama: bool = False, module: bool = False, **env):
    """(exit code, stdout, stderr, heavy modules imported or None) of one doctor run in a fresh interpreter."""
    if module:
        cmd = [sys.executable, "-m", "edgevlm", "doctor", *args]
    else:
        cmd = [sys.executable, "-c", WRAPPER, "hide-llama" if hide_llama else "plain", "doctor", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(**env), timeout=120,
                       check=False)
    heavy = None
    for line in r.stderr.splitlines():
        if line.startswith("HEAVY "):
            heavy = json.loads(line[6:])
    return r.returncode, r.stdout, r.stderr, heavy


def checks(rep: dict, topic: str) -> list[dict]:
    return [c for c in rep["checks"] if c["topic"] == topic]


def have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def machine():
    """`python -m edgevlm doctor --json` (the command as users run it) on this machine."""
    rc, out, err, _ = run_doctor("--json", module=True)
    assert rc == 0, err
    assert "Traceback" not in err
    return json.loads(out)


def _proc_cpuinfo():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return None


def test_machine_facts_are_this_machines(machine):
    rep = machine
    assert rep["exit_code"] == 0 and rep["bundle"] is None
    assert {c["status"] for c in rep["checks"]} <= STATUSES
    flags = _proc_cpuinfo()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags here")
    reported = rep["cpu"]["flags"]
    names = X86_FLAGS if rep["cpu"]["arch_kind"] == "x86" else ARM_FLAGS
    assert set(reported) == names
    assert {k for k, v in reported.items() if v} == names & flags
    if rep["cpu"]["arch_kind"] == "x86":
        assert checks(rep, "AVX2")[0]["status"] == ("ok" if {"avx2", "fma"} <= flags else "warn")
        assert checks(rep, "AVX-512")[0]["status"] == ("ok" if {"avx512f", "avx512bw", "avx512vl"} <= flags
                                                       else "missing")
    assert rep["cpu"]["usable_cpus"] == len(os.sched_getaffinity(0))
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    assert rep["memory"]["total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024


def test_onnxruntime_and_llama_cpp_as_installed(machine):
    ort = pytest.importorskip("onnxruntime")
    rep = machine
    assert rep["onnxruntime"]["installed"] is True
    assert rep["onnxruntime"]["version"] == ort.__version__
    assert rep["onnxruntime"]["providers"] == ort.get_available_providers()
    assert rep["onnxruntime"]["cuda"] == ("CUDAExecutionProvider" in ort.get_available_providers())
    assert checks(rep, "CUDA provider")[0]["status"] == ("ok" if rep["onnxruntime"]["cuda"] else "missing")
    ll = rep["llama_cpp"]
    if have("llama_cpp"):
        import llama_cpp

        assert ll["installed"] is True and ll["version"] == llama_cpp.__version__
        assert ll["gpu_offload"] == bool(llama_cpp.llama_supports_gpu_offload())
        assert isinstance(ll["extra_buffers"], bool) and ll["extra_buffers_why"]
        nvidia = bool(rep["gpu"]["gpus"] or rep["jetson"]["l4t"])
        line = checks(rep, "llama-cpp-python")[0]
        assert line["status"] == ("warn" if nvidia and not ll["gpu_offload"] else "ok")
        assert ("every layer" in line["fact"]) == ll["gpu_offload"]
    else:
        assert ll["installed"] is False
    if sys.platform != "darwin":
        cm = checks(rep, "Core ML")[0]
        assert cm["status"] == "missing" and "macOS/iOS only" in cm["fact"] and rep["coreml"]["available"] is False
    assert rep["kernels"]["state"] != "off"            # the switch below is what turns them off


def test_a_cpu_only_llama_cpp_on_a_gpu_machine_says_how_to_build_it_with_cuda():
    from edgevlm.runtime.doctor import _llama_lines
    from edgevlm.runtime.llamacpp import CUDA_BUILD

    ll = {"installed": True, "version": "0.3.36", "gpu_offload": False, "extra_buffers": True,
          "extra_buffers_why": "x", "extra_buffers_fix": None, "error": None}
    for nvidia, status in ((True, "warn"), (False, "ok")):
        lines: list = []
        _llama_lines(ll, lines, nvidia=nvidia)
        assert lines[0]["status"] == status, lines[0]
        assert (CUDA_BUILD in (lines[0]["fix"] or "")) == nvidia
    lines = []
    _llama_lines({**ll, "gpu_offload": True}, lines, nvidia=True)
    assert lines[0]["status"] == "ok" and "every layer on the GPU" in lines[0]["fact"]


def test_hidden_llama_cpp_is_reported_missing_with_a_fix():
    rc, out, err, heavy = run_doctor("--json", hide_llama=True)
    assert rc == 0, err
    assert "Traceback" not in err
    rep = json.loads(out)
    assert rep["llama_cpp"]["installed"] is False and rep["llama_cpp"]["version"] is None
    line = checks(rep, "llama-cpp-python")[0]
    assert line["status"] == "missing" and "not installed" in line["fact"]
    assert "pip install" in line["fix"]
    assert heavy == []
    rc, text, err, _ = run_doctor(hide_llama=True)       # the lines too
    assert rc == 0 and "Traceback" not in err
    assert any(ln.startswith("missing") and "llama-cpp-python" in ln for ln in text.splitlines())


def test_kernels_switched_off_by_the_environment():
    rc, out, err, _ = run_doctor("--json", EDGEVLM_KERNELS="0")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["kernels"]["state"] == "off" and rep["kernels"]["env"] == "EDGEVLM_KERNELS=0"
    line = checks(rep, "edgevlm kernels")[0]
    assert line["status"] == "off" and "turned off (EDGEVLM_KERNELS=0)" in line["fact"]


def test_cpuinfo_of_an_arm_board():
    from edgevlm.runtime.doctor import parse_cpuinfo

    text = ("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
            "fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU part\t: 0xd42\n\n"
            "processor\t: 1\nFeatures\t: fp\n")
    info = parse_cpuinfo(text)
    assert {"asimd", "asimddp"} <= info["flags"] and "i8mm" not in info["flags"]
    assert "fphp" in info["flags"] and info["flags"] != {"fp"}                  # the first CPU's line
    assert "0xd42" in info["model"]


# -- bundles ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_bundle(tmp_path_factory):
    """A tiny random edgevlm_scenes_tiny bundle, with a GGUF decoder beside the ONNX one where llama.cpp is here."""
    from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle

    decoder = "both" if have("llama_cpp") and have("gguf") else "onnx"
    out = tmp_path_factory.mktemp("doctor") / f"scenes-{decoder}"
    path, manifest = export_vlm_bundle(VLMExportConfig(model="edgevlm_scenes_tiny", weights="random",
                                                       precision="fp32", decoder=decoder, out=str(out),
                                                       parity_tokens=4, calib_size=4), quiet=True)
    return Path(path), manifest


def test_vlm_bundle_parts_backends_kv_and_memory(vlm_bundle):
    path, m = vlm_bundle
    rc, out, err, heavy = run_doctor(str(path), "--json")
    assert rc == 0, err
    assert heavy == []                                  # no torch, no exporters/modeling/compress/train
    rep = json.loads(out)
    b = rep["bundle"]
    assert b["runnable"] is True and b["exit_code"] == 0 and rep["exit_code"] == 0
    parts = {p["name"]: p for p in b["parts"]}
    assert set(parts) == set(m["parts"])
    for name, p in parts.items():
        assert p["backend"], (name, p["why"])
        assert p["file"] == m["parts"][name]["path"] and p["format"] == m["parts"][name]["format"]
        assert p["size_bytes"] == (path / p["file"]).stat().st_size
    assert parts["decoder"]["backend"] == "onnxruntime (CPUExecutionProvider)"
    g = m["generation"]
    kv = 2 * g["num_layers"] * g["num_kv_heads"] * g["head_dim"] * g["context_length"] * 4
    assert parts["decoder"]["kv_cache_bytes"] == kv
    if "decoder_gguf" in parts:
        from edgevlm.runtime.gguf_header import read_gguf_header
        from edgevlm.runtime.llamacpp import kv_cache_bytes

        gguf = path / m["parts"]["decoder_gguf"]["path"]
        assert parts["decoder_gguf"]["backend"] == "llama.cpp (CPU)"
        # an FP32 GGUF decoder runs with an F32 KV cache (VLMPipeline._open_decoder)
        assert parts["decoder_gguf"]["kv_cache_bytes"] == kv_cache_bytes(read_gguf_header(gguf), g["context_length"],
                                                                          "f32")
    mem = b["memory"]
    weights = sum((path / m["parts"][n]["path"]).stat().st_size for n in ("vision_encoder", "embed_tokens", "decoder"))
    assert mem["fits"] is True and mem["weights_bytes"] == weights and mem["kv_cache_bytes"] == kv
    assert mem["need_bytes"] == weights + kv + int(weights * 0.25) <= mem["available_bytes"]
    assert b["decoder"]["backend"] == "onnxruntime"

    rc, text, err, _ = run_doctor(str(path))
    assert rc == 0, err
    fit = next(ln for ln in text.splitlines() if "fits in memory" in ln)
    assert fit.startswith("ok") and "yes" in fit and "25% of the weights for activations" in fit
    assert "this bundle can run here" in text


def _gguf_only(src: Path, dst: Path) -> Path:
    """The bundle without its ONNX decoder: llama.cpp is then the only way to run it."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    rel = m["parts"].pop("decoder")["path"]
    m["artifacts"] = [a for a in m["artifacts"] if a.get("part") != "decoder"]
    del m["files"][rel]
    (dst / rel).unlink()
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


def test_gguf_decoder_without_llama_cpp_cannot_run(vlm_bundle, tmp_path):
    path, m = vlm_bundle
    if "decoder_gguf" not in m["parts"]:
        pytest.skip("llama-cpp-python or gguf is not installed: the bundle has no GGUF decoder")
    only = _gguf_only(path, tmp_path / "gguf-only")
    rc, out, err, _ = run_doctor(str(only), "--json")                       # with llama.cpp: it runs
    assert rc == 0, err
    assert json.loads(out)["bundle"]["decoder"]["backend"] == "llama.cpp"

    rc, out, err, heavy = run_doctor(str(only), "--json", hide_llama=True)
    assert rc == 1, err
    assert "Traceback" not in err and heavy == []
    b = json.loads(out)["bundle"]
    part = {p["name"]: p for p in b["parts"]}["decoder_gguf"]
    assert part["backend"] is None and "llama-cpp-python" in part["why"] and "pip install" in part["fix"]
    assert b["runnable"] is False and any("no decoder can run here" in p for p in b["problems"])
    rc, text, err, _ = run_doctor(str(only), hide_llama=True)
    assert rc == 1
    assert any(ln.startswith("missing") and "part decoder_gguf" in ln and "llama-cpp-python" in ln
               for ln in text.splitlines())
    assert "this bundle cannot run here" in text


def _classifier_bundle(out: Path, ios: bool) -> Path:
    """A small classification bundle: an ONNX graph for target cpu, or a Core ML package for target ios."""
    from edgevlm.bundle import file_table

    out.mkdir()
    if ios:
        pkg = out / "model.mlpackage" / "Data" / "com.apple.CoreML"
        pkg.mkdir(parents=True)
        (pkg / "model.mlmodel").write_bytes(b"\x08\x07" * 64)
        art, target = {"path": "model.mlpackage", "format": "coreml"}, {"name": "ios", "format": "coreml",
                                                                         "runtime": "coreml"}
    else:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["pixel_values"], ["logits"])], "tiny",
                                  [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 8, 8])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 1, 1])])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(out / "model.onnx"))
        art, target = {"path": "model.onnx", "format": "onnx"}, {"name": "cpu", "format": "onnx",
                                                                 "providers": ["CPUExecutionProvider"]}
    m = {"kind": "edgevlm-bundle", "schema_version": 1, "task": "classification", "weights": {"source": "random"},
         "target": target, "precision": "fp16", "accuracy": {"status": "not measured"},
         "model": {"name": "tiny", "input_size": 8, "num_classes": 3}, "preprocessing": {"input_size": 8},
         "labels": ["a", "b", "c"], "artifacts": [{**art, "precision": "fp16", "role": "classifier", "parity": {}}],
         "files": file_table(out)}
    (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_core_ml_bundle_runs_off_apple_through_the_reference_interpreter(tmp_path):
    rc, out, err, _ = run_doctor(str(_classifier_bundle(tmp_path / "cpu", ios=False)), "--json")
    assert rc == 0, err                                 # the same bundle for cpu runs
    assert json.loads(out)["bundle"]["parts"][0]["backend"] == "onnxruntime (CPUExecutionProvider)"

    ios = _classifier_bundle(tmp_path / "ios", ios=True)
    rc, out, err, heavy = run_doctor(str(ios), "--json")
    assert rc == 0, err
    assert heavy == []                                  # coremltools (which imports torch) was not imported
    part = json.loads(out)["bundle"]["parts"][0]
    assert "reference ML-program interpreter" in part["backend"] and part["size_bytes"] == 128
    rc, text, _, _ = run_doctor(str(ios))
    assert rc == 0
    assert any(ln.startswith("missing") and "Core ML" in ln and "macOS/iOS only" in ln and "reference" in ln
               for ln in text.splitlines())


def test_a_bundle_larger_than_memory_and_no_bundle_at_all(vlm_bundle, tmp_path, monkeypatch):
    from edgevlm.runtime import doctor

    path, _ = vlm_bundle
    rep = doctor.report(path)
    assert rep["exit_code"] == 0 and rep["bundle"]["memory"]["fits"] is True
    real = doctor.memory_facts
    monkeypatch.setattr(doctor, "memory_facts", lambda: {**real(), "usable_bytes": 100_000})
    rep = doctor.report(path)
    mem = rep["bundle"]["memory"]
    assert mem["fits"] is False and mem["available_bytes"] == 100_000 and rep["exit_code"] == 1
    text = doctor.format_report(rep)
    fit = next(ln for ln in text.splitlines() if "fits in memory" in ln)
    assert fit.startswith("missing") and "no:" in fit
    assert "cannot run here" in text and text.rstrip().endswith("the bundle cannot run here")

    rep = doctor.report(tmp_path / "nothing")
    assert rep["exit_code"] == 2 and rep["bundle"]["readable"] is False
    assert "no bundle at" in doctor.format_report(rep)
