"""The fuzz harnesses of fuzz/ (issue 22, point 4) run for a short time each, so they keep working and a
regression in a reader of untrusted input (an exception other than EdgeVLMError, a native crash) fails CI.

Each harness runs as its users run it (``python fuzz/fuzz_X.py --seconds N``) in a subprocess, with atheris when
it is installed (coverage-guided) and edgevlm's plain random mutator otherwise; its last output line is a JSON
summary. ``EDGEVLM_FUZZ_SECONDS`` changes the time per harness (default 30). The first run exports a tiny VLM bundle
and writes the GGUF/safetensors seeds into ``$EDGEVLM_FUZZ_CACHE`` (default ``~/.cache/edgevlm/fuzz``), about a
minute once; later runs reuse them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECONDS = float(os.environ.get("EDGEVLM_FUZZ_SECONDS", "30"))
NEEDS = {"manifest": ("onnx", "torch"), "bundle": ("onnxruntime", "onnx", "torch", "tokenizers"),
         "gguf": ("gguf", "torch", "transformers"), "safetensors": ("safetensors", "torch"), "images": (),
         "mil": ("coremltools", "torch")}


def run_harness(name: str, out: Path, seconds: float = SECONDS) -> dict:
    cmd = [sys.executable, str(REPO / "fuzz" / f"fuzz_{name}.py"), "--seconds", str(seconds), "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds + 900)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{name}: no summary (exit {p.returncode})\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    summary["returncode"] = p.returncode
    return summary


def _findings(out: Path) -> str:
    texts = sorted((out / "findings").glob("*.txt"))
    shown = "\n\n".join(f"{t.name}:\n{t.read_text()[-1500:]}" for t in texts[:3])
    log = out / "engine.log"
    return shown + (f"\n\nengine.log (end):\n{log.read_text(errors='replace')[-2000:]}" if log.exists() else "")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["manifest", "bundle", "gguf", "safetensors", "images", "mil"])
def test_harness_finds_nothing(name, tmp_path):
    for module in NEEDS[name]:
        pytest.importorskip(module)
    out = tmp_path / name
    s = run_harness(name, out)
    assert s["executions"] > 0, s
    assert s["unexpected"] == 0 and s["crashes"] == 0, f"{json.dumps(s, indent=1)}\n{_findings(out)}"
    assert s["returncode"] == 0, s


def test_mutators_replay_exactly():
    """The structured mutators draw every choice from the input: the same bytes give the same edit (a finding's
    saved input reproduces it)."""
    sys.path.insert(0, str(REPO / "fuzz"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "fuzz"))
    base = {"a": [1, 2, {"b": "x"}], "c": {"d": None}}
    for seed in range(50):
        data = bytes((seed * 7 + i * 13) % 256 for i in range(64))
        one, two = (json.dumps(_common.mutate_json(base, _common.Source(data))) for _ in range(2))
        assert one == two                                              # (NaN != NaN: compare the JSON text)
        assert _common.mutate_bytes(b"abcdef" * 10, _common.Source(data)) == \
            _common.mutate_bytes(b"abcdef" * 10, _common.Source(data))
    assert base == {"a": [1, 2, {"b": "x"}], "c": {"d": None}}       # the seed itself is never edited


# -- the GGUF header reader the harness drives (edgevlm/runtime/gguf_header.py) -------------------------------
def _tiny_gguf(path: Path, **kv) -> bytes:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for k, v in kv.items():
        (w.add_float32 if isinstance(v, float) else w.add_uint32)(k, v)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def test_gguf_header_reads_a_real_file_and_refuses_broken_ones(tmp_path):
    import struct

    from edgevlm.errors import BundleError
    from edgevlm.runtime.gguf_header import read_gguf_header

    good = tmp_path / "good.gguf"
    data = _tiny_gguf(good)
    h = read_gguf_header(good)
    assert h["version"] == 3 and h["alignment"] == 32 and h["metadata"]["general.architecture"] == "llama"
    assert [(t["name"], t["type"], t["shape"], t["nbytes"]) for t in h["tensors"]] == \
        [("token_embd.weight", "F32", [32, 4], 512), ("output_norm.weight", "F32", [32], 128)]

    def refused(name: str, blob: bytes, match: str):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(BundleError, match=match) as e:
            read_gguf_header(p)
        assert name in str(e.value) and "fix:" in str(e.value)

    n_kv_at = 16
    refused("magic.gguf", b"GGUX" + data[4:], "not a GGUF file")
    refused("short.gguf", data[:20], "shorter than a GGUF header")
    refused("version.gguf", data[:4] + struct.pack("<I", 4) + data[8:], "version 4")
    refused("bigendian.gguf", data[:4] + struct.pack(">I", 3) + data[8:], "big-endian")
    refused("kvcount.gguf", data[:n_kv_at] + struct.pack("<Q", 2**40) + data[24:], "key/value pairs")
    refused("tcount.gguf", data[:8] + struct.pack("<Q", 2**40) + data[16:], "tensors")
    refused("truncated.gguf", data[: len(data) - 64], "past the end of the file")
    i = data.index(b"token_embd.weight") + len(b"token_embd.weight")
    refused("dims.gguf", data[:i] + struct.pack("<I", 5) + data[i + 4:], "5 dimensions")
    refused("zero.gguf", data[:i + 4] + struct.pack("<Q", 0) + data[i + 12:], "at least 1")
    refused("type.gguf", data[:i + 20] + struct.pack("<I", 31) + data[i + 24:], "unknown ggml type 31")
    refused("offset.gguf", data[:i + 24] + struct.pack("<Q", 8) + data[i + 32:], "not a multiple of the alignment")
    k = data.index(b"general.architecture") + len(b"general.architecture")
    refused("vtype.gguf", data[:k] + struct.pack("<I", 13) + data[k + 4:], "unknown value type 13")
    refused("strlen.gguf", data[:k + 4] + struct.pack("<Q", 2**50) + data[k + 12:], "past the end of the file")


def test_gguf_header_refuses_what_crashes_llama_cpp(tmp_path):
    """Hyper-parameters llama.cpp asserts on or divides by (found by fuzz/fuzz_gguf.py) and tensors off its 32-byte
    mapping alignment are refused before llama.cpp sees the file."""
    from edgevlm.errors import BundleError
    from edgevlm.runtime.gguf_header import read_gguf_header

    for name, kv, match in [("experts", {"llama.expert_count": 100000}, "expert_count"),
                            ("used", {"llama.expert_count": 4, "llama.expert_used_count": 8}, "expert_used_count"),
                            ("heads", {"llama.attention.head_count": 0}, "head_count"),
                            ("layers", {"llama.block_count": 0}, "block_count"),
                            ("eps", {"llama.attention.layer_norm_rms_epsilon": -1e-5}, "epsilon"),
                            ("nan", {"llama.attention.layer_norm_rms_epsilon": float("nan")}, "epsilon"),
                            ("unused", {"llama.expert_count": 4}, "expert_used_count is 0"),
                            ("align", {"general.alignment": 8}, "not a multiple of 32")]:
        p = tmp_path / f"{name}.gguf"
        if name == "layers":
            kv = {}
        _tiny_gguf(p, **kv)
        if name == "layers":
            data = bytearray(p.read_bytes())
            i = data.index(b"llama.block_count") + len(b"llama.block_count") + 4
            data[i:i + 4] = (0).to_bytes(4, "little")
            p.write_bytes(bytes(data))
        with pytest.raises(BundleError, match=match):
            read_gguf_header(p)


def test_gguf_header_refuses_integer_weights_and_duplicate_tokens(tmp_path):
    """Two more files llama.cpp crashes on (fuzz/fuzz_gguf.py): an I32 weight (SIGSEGV in the first matmul) and a
    vocabulary with a token twice (GGML_ASSERT in llama-vocab.cpp)."""
    import struct

    from edgevlm.errors import BundleError
    from edgevlm.runtime.gguf_header import read_gguf_header

    p = tmp_path / "i32.gguf"
    data = _tiny_gguf(p)
    i = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8
    p.write_bytes(data[:i] + struct.pack("<I", 26) + data[i + 4:])          # F32 -> I32, same size
    with pytest.raises(BundleError, match="type I32, which llama.cpp cannot run"):
        read_gguf_header(p)
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "dup.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_token_list(["a", "b", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BundleError, match="twice"):
        read_gguf_header(p)


# -- the safetensors header reader (edgevlm/modeling/checkpoint.py): what fuzz/fuzz_safetensors.py found --------
@pytest.mark.parametrize("case", ["nan", "surrogate", "overflow", "dtype"])
def test_safetensors_header_refuses_what_safetensors_refuses(case, tmp_path):
    """Each file here made read_safetensors_header raise a TypeError or accept a header the safetensors library
    refuses; now both refuse it, the header reader with a CheckpointError naming the file."""
    import struct

    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file

    from edgevlm.errors import CheckpointError
    from edgevlm.modeling.checkpoint import read_safetensors_header

    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    name, data = "a", b"\0" * 4
    if case == "nan":
        entry["note"] = float("nan")                      # Python's json writes and reads NaN; JSON has none
    elif case == "surrogate":
        name = "\ud800"                                   # a lone surrogate: no UTF-8 for it
    elif case == "overflow":
        entry, data = {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}, b""
    else:
        entry["dtype"] = ["F32"]                          # was a TypeError (unhashable) in the header reader
    header = json.dumps({name: entry}).encode()
    p = tmp_path / f"{case}.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + data)
    with pytest.raises(CheckpointError) as e:
        read_safetensors_header(p)
    assert p.name in str(e.value) and "fix:" in str(e.value)
    with pytest.raises(Exception):
        load_file(str(p))
