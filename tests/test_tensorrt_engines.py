"""jetson VLM bundles: the engine plan, build_engines.sh, `edgevlm build-engines`, engine refusal and the backend
order (native engine, ONNX Runtime's TensorRT/CUDA providers, CPU).

No GPU or TensorRT reaches this machine or CI: engines are never built here. What is tested is everything up to
them: the plan against the graphs, the exact trtexec arguments the script passes (run against a fake trtexec that
records them), the refusals on fake sidecars, and the CPU fallback answering like eager. Tests that need tensorrt
and cuda-python skip with the reason.
"""
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edgevlm.errors import BundleError
from edgevlm.exporters.tensorrt import ENGINES_SCRIPT, FLAG_TRTEXEC, check_ops
from edgevlm.runtime import tensorrt as rt
from edgevlm.targets import get_target

BASH = shutil.which("bash")
ORIN = rt.Machine("10.3", "Orin (nvgpu)", "8.7")


def _export(root: Path, precision: str) -> tuple[Path, dict]:
    import edgevlm

    return edgevlm.export(target="jetson", precision=precision, decoder="onnx", out=root / f"jetson-{precision}",
                          quiet=True)


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    """The default model, exported for jetson at FP16 with the ONNX decoder (about a minute)."""
    return _export(tmp_path_factory.mktemp("trt"), "fp16")


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("trt"), "int4")


@pytest.fixture(params=["fp16", "int4"])
def bundle(request):
    return request.getfixturevalue(request.param)


def _inputs(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in m.graph.input if i.name not in init}


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / bundle.name
    shutil.copytree(bundle, dst)
    return dst


# -- the plan ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fp16_graphs_pass_the_tensorrt_check(fp16):
    """(INT8/INT4 graphs: tests/test_pipeline.py.) Every FP16 graph of the bundle passes the op/Q-DQ check."""
    out, m = fp16
    for part, rec in m["parts"].items():
        assert check_ops(onnx.load(str(out / rec["path"])), m["engines"]["tensorrt"])["passed"], part


@pytest.mark.slow
def test_plan_covers_every_graph_and_input(bundle):
    out, m = bundle
    plan, target = m["engines"], get_target("jetson")
    assert plan["tensorrt"] == target.tensorrt["version"]
    assert plan["workspace_mib"] == target.tensorrt["workspace_mib"]
    assert {g["part"] for g in plan["graphs"]} == {p for p, r in m["parts"].items() if r["format"] == "onnx"}
    assert {"vision_encoder", "embed_tokens", "decoder"} <= {g["part"] for g in plan["graphs"]}
    lim = plan["limits"]
    assert 1 <= lim["max_prompt"] <= lim["context"] <= m["generation"]["context_length"]
    for g in plan["graphs"]:
        assert g["engine"] == f"engines/{g['part']}.plan" and g["sidecar"] == f"engines/{g['part']}.json"
        assert g["onnx"] == m["parts"][g["part"]]["path"]
        assert g["onnx_sha256"] == m["files"][g["onnx"]]["sha256"]
        dims = _inputs(out / g["onnx"])
        assert set(g["shapes"]) == set(dims), g["part"]
        for name, s in g["shapes"].items():
            assert len(s["min"]) == len(s["opt"]) == len(s["max"]) == len(dims[name]), (g["part"], name)
            for d, lo, opt, hi in zip(dims[name], s["min"], s["opt"], s["max"]):
                assert 0 <= lo <= opt <= hi, (g["part"], name, s)
                if isinstance(d, int) and d > 0:
                    assert lo == opt == hi == d, (g["part"], name, s)


@pytest.mark.slow
def test_decoder_profile_covers_prefill_and_decode(bundle):
    """One profile spans a prompt (seq up to max_prompt, past 0) and every decode step (seq 1, past up to the
    context - 1); the mask's last axis (past + seq) up to the context."""
    _, m = bundle
    plan = m["engines"]
    lim = plan["limits"]
    dec = next(g for g in plan["graphs"] if g["part"] == "decoder")
    s = dec["shapes"]
    L = m["generation"]["num_layers"]
    assert {f"past_key_values.{i}.{kv}" for i in range(L) for kv in ("key", "value")} <= set(s)
    seq = lambda n: (s[n]["min"][1], s[n]["opt"][1], s[n]["max"][1])    
    assert seq("inputs_embeds") == seq("position_ids") == (1, 1, lim["max_prompt"])
    past = s["past_key_values.0.key"]
    assert (past["min"][2], past["max"][2]) == (0, lim["context"] - 1)
    assert s["attention_mask"]["min"][3] == 1 and s["attention_mask"]["max"][3] == lim["context"]
    # the shapes the runtime feeds: a whole prompt, then a step at the end of the context
    assert past["min"][2] == 0 and seq("inputs_embeds")[2] >= m["model"]["vision_tokens"] + 1
    assert s["attention_mask"]["max"][3] >= (lim["context"] - 1) + 1


@pytest.mark.slow
def test_precision_flags_follow_each_graph(fp16, int4):
    flags = lambda m: {g["part"]: (g["flags"], g["fallback_flags"]) for g in m["engines"]["graphs"]}
    f, i = flags(fp16[1]), flags(int4[1])
    assert f["decoder"] == (["fp16"], []) and f["vision_encoder"] == (["fp16"], [])
    assert f["embed_tokens"] == ([], [])                        # an FP32 table lookup stays FP32
    # INT4 weight-only Q/DQ: weakly typed with FP16 enabled, strongly typed if TensorRT refuses that
    assert i["decoder"] == (["fp16"], ["strongly_typed"])
    assert i["vision_encoder"] == (["int8", "fp16"], [])        # the pixel side is INT8 Q/DQ at int4
    for g in int4[1]["engines"]["graphs"]:
        assert [a for a in g["trtexec_args"] if a in FLAG_TRTEXEC.values()] == [FLAG_TRTEXEC[x] for x in g["flags"]]


# -- build_engines.sh ----------------------------------------------------------------------------------------
def _script_calls(script: str) -> dict:
    """part -> (trtexec args, fallback args) from the script's build_one lines."""
    calls = {}
    for line in script.splitlines():
        if not line.startswith("build_one "):
            continue
        words = shlex.split(line)
        part, rest = words[1], words[words.index("--") + 1:]
        if "--FALLBACK--" in rest:
            k = rest.index("--FALLBACK--")
            calls[part] = (rest[:k], rest[k + 1:])
        else:
            calls[part] = (rest, [])
    return calls


@pytest.mark.slow
def test_script_runs_exactly_the_plans_trtexec_lines(bundle):
    out, m = bundle
    plan = m["engines"]
    script = (out / ENGINES_SCRIPT).read_text()
    calls = _script_calls(script)
    assert set(calls) == {g["part"] for g in plan["graphs"]}
    for g in plan["graphs"]:
        args, fb = calls[g["part"]]
        assert args == g["trtexec_args"]
        assert f"--saveEngine={g['engine']}" in args and f"--onnx={g['onnx']}" in args
        assert f"--memPoolSize=workspace:{plan['workspace_mib']}M" in args
        assert f"--timingCacheFile={plan['timing_cache']}" in args
        for k in ("min", "opt", "max"):
            if any(s["min"] != s["max"] for s in g["shapes"].values()):
                want = ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in g["shapes"].items())
                assert f"--{k}Shapes={want}" in args
        if g["fallback_flags"]:
            assert fb[-len(g["fallback_flags"]):] == [FLAG_TRTEXEC[f] for f in g["fallback_flags"]]
            assert not set(fb) & {FLAG_TRTEXEC[f] for f in g["flags"]}
        else:
            assert fb == []
    assert (out / ENGINES_SCRIPT).stat().st_mode & 0o111
    assert subprocess.run([BASH, "-n", str(out / ENGINES_SCRIPT)], check=False).returncode == 0


FAKE_TRTEXEC = """#!/usr/bin/env bash
# a stand-in for trtexec: prints TensorRT's banner, records its arguments, writes --saveEngine
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{code}] [b1] # trtexec $*"
[ "${{1:-}}" = "--help" ] && exit 0
printf '%s\\n' "$*" >>"$FAKE_LOG"
for a in "$@"; do case "$a" in --saveEngine=*) echo engine >"${{a#--saveEngine=}}" ;; esac; done
"""


def _fake_trtexec(tmp_path: Path, code: int) -> Path:
    p = tmp_path / "bin" / "trtexec"
    p.parent.mkdir(exist_ok=True)
    p.write_text(FAKE_TRTEXEC.format(code=code))
    p.chmod(0o755)
    return p


def _run_script(bundle: Path, tmp_path: Path, trtexec: Path | None):
    env = {"PATH": "/usr/bin:/bin", "FAKE_LOG": str(tmp_path / "calls.txt"), "TMPDIR": str(tmp_path),
           "HOME": str(tmp_path)}
    if trtexec is not None:
        env["TRTEXEC"] = str(trtexec)
    return subprocess.run([BASH, str(bundle / ENGINES_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_script_refuses_without_trtexec_and_on_another_tensorrt(fp16, tmp_path):
    out = _copy(fp16[0], tmp_path)
    r = _run_script(out, tmp_path, None)
    assert r.returncode != 0 and "trtexec not found" in r.stderr and "apt install" in r.stderr
    r = _run_script(out, tmp_path, _fake_trtexec(tmp_path, 100600))           # TensorRT 10.6, plan says 10.3
    assert r.returncode != 0
    assert "TensorRT 10.6" in r.stderr and "TensorRT 10.3" in r.stderr, r.stderr
    assert not (tmp_path / "calls.txt").exists() and not list(out.glob("engines/*.plan"))


@pytest.mark.slow
@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_script_builds_every_engine_with_the_plans_arguments(int4, tmp_path):
    out, m = _copy(int4[0], tmp_path), int4[1]
    r = _run_script(out, tmp_path, _fake_trtexec(tmp_path, 100300))
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == [" ".join(g["trtexec_args"] + ["--skipInference"]) for g in m["engines"]["graphs"]]
    for g in m["engines"]["graphs"]:
        side = json.loads((out / g["sidecar"]).read_text())
        assert (out / g["engine"]).is_file()
        assert side["tensorrt"] == "10.3" and side["onnx_sha256"] == g["onnx_sha256"]
        assert side["precision"] == g["precision"] and side["part"] == g["part"]
        # the sidecar says what it was built on; with no GPU here the compute capability is unknown, so the
        # runtime refuses it on Orin
        with pytest.raises(BundleError, match="sm unknown"):
            rt.check_engine(out, g, ORIN)


@pytest.mark.slow
@pytest.mark.skipif(BASH is None, reason="bash is not installed")
def test_script_refuses_a_changed_onnx(fp16, tmp_path):
    out = _copy(fp16[0], tmp_path)
    with open(out / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    r = _run_script(out, tmp_path, _fake_trtexec(tmp_path, 100300))
    assert r.returncode != 0 and "decoder.onnx changed since export" in r.stderr


# -- edgevlm build-engines -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_build_engines_without_tensorrt_names_how_to_install(fp16, monkeypatch, capsys):
    from edgevlm.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)            # `import tensorrt` raises ImportError
    assert main(["build-engines", str(fp16[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tensorrt Python package is not installed" in err and "pip install tensorrt" in err
    assert not (fp16[0] / "engines").exists()


def test_build_engines_refuses_a_bundle_without_a_plan(tmp_path):
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError):
        rt.build_engines(tmp_path / "b")


# -- refusal on fake sidecars --------------------------------------------------------------------------------
def _fake_engine(out: Path, g: dict, **side) -> None:
    (out / "engines").mkdir(exist_ok=True)
    (out / g["engine"]).write_bytes(b"not an engine")
    rec = rt.sidecar_record(g, ORIN, "test", g["flags"], 0.0)
    rec.update(side)
    (out / g["sidecar"]).write_text(json.dumps(rec))


@pytest.mark.slow
def test_engine_refusal_names_both_sides(fp16, tmp_path):
    out = _copy(fp16[0], tmp_path)
    g = rt.plan_graph(fp16[1], "decoder")
    _fake_engine(out, g)
    assert rt.check_engine(out, g, ORIN) == out / g["engine"]
    with pytest.raises(BundleError) as e:
        rt.check_engine(out, g, rt.Machine("10.7", "Thor", "8.7"))
    assert "built for TensorRT 10.3 on sm 8.7, this machine has TensorRT 10.7 on sm 8.7" in e.value.problem
    assert f"edgevlm build-engines {out}" in e.value.fix and "\n" not in str(e.value)
    with pytest.raises(BundleError, match="TensorRT 10.3 on sm 8.7, this machine has TensorRT 10.3 on sm 8.9"):
        rt.check_engine(out, g, rt.Machine("10.3", "RTX 4090", "8.9"))
    _fake_engine(out, g, onnx_sha256="0" * 64)
    with pytest.raises(BundleError, match="built from another decoder.onnx"):
        rt.check_engine(out, g, ORIN)
    _fake_engine(out, g)
    with open(out / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="decoder.onnx changed since export"):
        rt.check_engine(out, g, ORIN)
    (out / g["sidecar"]).unlink()
    with pytest.raises(BundleError, match="no sidecar"):
        rt.check_engine(out, g, ORIN)


@pytest.mark.slow
def test_runtime_refuses_a_mismatched_engine_before_deserializing(fp16, tmp_path, monkeypatch):
    """With tensorrt and cuda-python present (faked here), a built engine for another TensorRT stops the load with
    one line; nothing is deserialized and there is no silent fallback."""
    from edgevlm import runtime
    from edgevlm.runtime import backends

    out = _copy(fp16[0], tmp_path)
    _fake_engine(out, rt.plan_graph(fp16[1], "vision_encoder"))
    monkeypatch.setattr(rt, "native_available", lambda: None)
    monkeypatch.setattr(rt, "probe", lambda: rt.Machine("10.7", "Thor", "11.0"))

    def no_deserialize(*a, **k):
        raise AssertionError("an engine was deserialized before its sidecar was checked")

    monkeypatch.setattr(rt, "TrtSession", no_deserialize)
    assert backends.part_backend(out, fp16[1], "vision_encoder")["backend"] == "tensorrt engine"
    with pytest.raises(BundleError, match=r"vision_encoder.plan was built for TensorRT 10.3 on sm 8.7, this machine "
                                          r"has TensorRT 10.7 on sm 11.0"):
        runtime.load(out)


# -- the backend order: without engines, ONNX Runtime (CPU here), answering like eager -------------------------
@pytest.mark.slow
def test_without_engines_onnx_runtime_runs_every_part_and_passes_golden(bundle):
    from edgevlm import runtime
    from edgevlm.runtime import backends

    out, m = bundle
    for g in m["engines"]["graphs"]:
        b = backends.part_backend(out, m, g["part"])
        assert b["backend"] == "onnxruntime" and "not built" in b["why"], b
    vlm = runtime.load(out)
    assert vlm.backend == "onnxruntime"
    assert vlm.decoder.providers[-1] == "CPUExecutionProvider"
    assert not isinstance(vlm.vision, rt.TrtSession) and not isinstance(vlm.embed, rt.TrtSession)
    report = vlm.verify()
    assert report.passed, report.rows


@pytest.mark.slow
def test_engines_are_skipped_without_tensorrt_even_when_built(fp16, tmp_path, monkeypatch):
    """An engine file present but no tensorrt/cuda-python here: ONNX Runtime runs the part, and says why."""
    from edgevlm import runtime
    from edgevlm.runtime import backends

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = _copy(fp16[0], tmp_path)
    _fake_engine(out, rt.plan_graph(fp16[1], "decoder"))
    b = backends.part_backend(out, fp16[1], "decoder")
    assert b["backend"] == "onnxruntime" and "tensorrt" in b["why"]
    vlm = runtime.load(out)
    assert vlm.backend == "onnxruntime"
    assert vlm.generate(None, "how many circles?", max_new_tokens=3).stats.new_tokens >= 1


def test_engine_plan_is_checked_by_the_manifest_schema():
    from edgevlm.manifest import ENGINES, check_block

    g = {"part": "decoder", "onnx": "decoder.onnx", "onnx_sha256": "a" * 64, "engine": "engines/decoder.plan",
         "sidecar": "engines/decoder.json", "precision": "fp16", "flags": ["fp16"],
         "shapes": {"x": {"min": [1, 1], "opt": [1, 4], "max": [1, 8]}}}
    plan = {"version": 1, "tensorrt": "10.3", "workspace_mib": 1024, "timing_cache": "engines/timing.cache",
            "graphs": [g]}
    check_block(ENGINES, plan, "plan")
    for bad in ({"flags": ["--fp16"]}, {"engine": "/abs/decoder.plan"}, {"shapes": {"x": {"min": [1]}}}):
        with pytest.raises(BundleError):
            check_block(ENGINES, {**plan, "graphs": [{**g, **bad}]}, "plan")


# -- on a device with TensorRT and a GPU (skipped elsewhere, as in CI) ------------------------------------------
@pytest.mark.slow
def test_native_engines_build_and_answer_like_eager(fp16, tmp_path):
    pytest.importorskip("tensorrt", reason="needs TensorRT (a Jetson or an NVIDIA GPU); engines are never built in CI")
    pytest.importorskip("cuda.bindings.runtime" if _has_cuda_bindings() else "cuda.cudart",
                        reason="needs cuda-python for the native engine session")
    from edgevlm import runtime

    out = _copy(fp16[0], tmp_path)
    built = rt.build_engines(out, log=lambda s: None)
    assert {b["part"] for b in built} == {g["part"] for g in fp16[1]["engines"]["graphs"]}
    vlm = runtime.load(out)
    assert vlm.backend == rt.TrtSession.name
    assert vlm.verify().passed


def _has_cuda_bindings() -> bool:
    try:
        import cuda.bindings  # noqa: F401
    except ImportError:
        return False
    return True


def test_doctor_says_which_parts_have_engines_and_why_not(fp16, tmp_path, monkeypatch):
    """`edgevlm doctor BUNDLE` reports, per ONNX part of a jetson bundle, whether its engine runs and why not."""
    from edgevlm.runtime import doctor

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = _copy(fp16[0], tmp_path)
    rep = doctor.report(out)
    parts = {p["name"]: p for p in rep["bundle"]["parts"]}
    assert set(parts) == {g["part"] for g in fp16[1]["engines"]["graphs"]} >= {"vision_encoder", "decoder"}
    for p in parts.values():
        assert p["engine"]["engine"] is None and "build-engines" in p["engine"]["why"], p
        assert p["backend"].startswith("onnxruntime")
    _fake_engine(out, rt.plan_graph(fp16[1], "decoder"))
    dec = {p["name"]: p for p in doctor.report(out)["bundle"]["parts"]}["decoder"]
    assert "tensorrt" in dec["engine"]["why"] and dec["backend"].startswith("onnxruntime")
    lines = [c for c in doctor.report(out)["checks"] if c["topic"] == "part decoder"]
    assert lines and "TensorRT engine not used" in lines[0]["fact"]
