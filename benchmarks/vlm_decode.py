"""VLM decoder speed on this CPU, in one run: transformers eager, edgevlm's ONNX Runtime and llama.cpp decoders,
and llama.cpp's own high-level path as the anchor, against the machine's memory-bandwidth limit.

    python benchmarks/vlm_decode.py [--size 1.3b|0.5b|tiny|smolvlm-500m|smolvlm-tiny] [--runs 3] [--new-tokens 64]
                                    [--image-tokens 64] [--compression] [--cache /work/bench_cache]
                                    [--out benchmarks/results]

Speed does not depend on weight values, so the decoder is a realistic shape with RANDOM weights (normal,
std 0.02). The model family is a property of the size (``SIZE_FAMILY``): it picks the transformers classes the
decoder is built from, its RoPE for the fused attention, and its llama.cpp architecture in the GGUF files.

- ``1.3b``: Moondream2's text model, a Phi-1.5-shaped transformers ``PhiForCausalLM`` (hidden 2048, 24 layers,
  32 heads, MLP 8192, partial rotary 0.5, vocab 51200, 1.42B parameters);
- ``0.5b``: the same Phi family with smaller dims (hidden 1024, 32 layers, 16 heads, MLP 4096: 0.51B);
- ``tiny``: Phi, a seconds-long smoke run;
- ``smolvlm-500m``: SmolVLM-500M-Instruct's text model, SmolLM2-360M, a transformers ``LlamaForCausalLM``
  (models/smolvlm.yaml, recipe ``smolvlm_500m``, ``text_config``: hidden 960, 32 layers, 15 heads, 5 KV heads,
  head_dim 64, MLP 2560 (SiLU-gated), RMSNorm eps 1e-5, rope_theta 100000, vocab 49280, untied head: 0.41B);
  llama.cpp runs it as its ``llama`` architecture;
- ``smolvlm-tiny``: the same Llama family (grouped KV heads too) at tiny dims, a seconds-long smoke run.

Every engine gets the same prompt: ``--image-tokens`` random "image" embedding rows followed by 32 text tokens,
prefilled at once, then ``--new-tokens`` greedy tokens (stop tokens ignored; llama.cpp's own path gets token ids
of the same length, as its high-level API takes no embeddings). Each engine runs in its own fresh process (peak
RSS from getrusage is that engine's), ``--threads`` (2) threads everywhere, one untimed warm-up, median of
``--runs``. Time to first token = prefill of the whole prompt + picking the first token; decode tok/s = the
other new tokens over the time after the first one.

Engines: transformers eager FP32 (prefill + KV-cache loop, as ``generate`` runs it); edgevlm ONNX Runtime
decoder FP32 / INT8 / INT4 (block 32, the default) / INT4 block 128 (``export_decoder`` + ``fuse_attention``
with RoPE in the op + ``quantize_decoder``, as a cpu bundle has it, opened by ``runtime.vlm.open_ort_decoder`` as
a bundle's runtime opens it: INT4 block 32 decode steps in edgevlm's ``MatMulQ4`` kernel when ``edgevlm kernels
build`` has built it here; ``ort-int4-ortkernel`` is the same graph on ONNX Runtime's kernel; new tokens embedded
by ``embed_tokens.onnx``); edgevlm llama.cpp Q8_0 / Q4_K_M (``write_gguf`` F16 +
``quantize_gguf``, run by ``runtime.llamacpp.LlamaCppDecoder``: an embedding-batch prefill, then token steps);
llama.cpp's own path (``llama_cpp.Llama.generate``, greedy) on the same GGUF files. llama.cpp engines share
n_ctx, n_batch (= n_ubatch, the whole prompt in one batch), F16 KV cache and flash attention (``--flash-attn``).

Physical limit: decoding one token reads every weight once (the input embedding table aside: one row), so
tok/s <= memory bandwidth / bytes read per token. Bandwidth is measured here (numpy: copy, and a 1- and
2-thread read of arrays 4x the last-level cache, before and after the engines are timed; the highest figure is the limit: one dip of the VM's
memory speed, seen once at 26 instead of 35-37 GB/s, would otherwise inflate every percentage), bytes per
token from the engine's weight files (``read_mb_per_tok``; ``weights_mb`` is all an engine loads: ONNX
Runtime's includes embed_tokens.onnx). The KV cache read per token is not counted (small next to the weights
at these lengths).

The edgevlm engines run as the ``edgevlm`` command runs them: started with glibc asked for transparent huge pages
(``edgevlm.runtime.memory``; ``huge_pages_mib`` in the table is how much memory got them). transformers and
llama.cpp's own path run as their users start them, without; llama.cpp gains about as much as edgevlm's engines
when started that way (docs/vlm-bundles.md, "Huge pages").

The CPUs' load from other jobs is sampled before timing and recorded; above 25% a warning is printed: on a
shared 2-core machine, engines whose threads wait on each other slow down badly (torch eager at 2 threads
measured 3-7x slower than at 1 thread while another job held a core), so ratios are only meaningful when quiet.

``--compression``: time to first token of LLaVA-Mini-style compressed prompts on the same decoder: 1 and 16
vision tokens against the uncompressed 576 (+ the same 32 text tokens), ONNX INT4 and llama.cpp Q4_K_M.

Artifacts (ONNX, GGUF: ~14 GB for 1.3b) are cached under ``--cache`` and reused; building them runs in
subprocesses (the torch model is freed before anything is timed). Writes a table to stdout,
``<out>/vlm_decode-<size>.json`` and, when matplotlib is installed, ``<out>/vlm_decode-<size>.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # run as a script from anywhere: the repo's edgevlm, not an installed one
    sys.path.insert(0, str(ROOT))

# Each family: the transformers config and causal-LM classes, its rotary embedding (the fused attention's RoPE
# tables), and the config fields every size of it shares (the sizes below add the dimensions).
_PHI = {"partial_rotary_factor": 0.5, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "initializer_range": 0.02, "bos_token_id": 256,
        "eos_token_id": 257, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}
# SmolLM2 (SmolVLM's text model) as models/smolvlm.yaml's smolvlm_500m text_config has it; bos/eos are the
# byte-level GGUF vocabulary's, as for Phi
_LLAMA = {"hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
          "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
          "bos_token_id": 256, "eos_token_id": 257, "attention_dropout": 0.0}
FAMILIES = {
    "phi": {"label": "Phi", "config": "PhiConfig", "model": "PhiForCausalLM",
            "rotary": ("transformers.models.phi.modeling_phi", "PhiRotaryEmbedding"), "fields": _PHI},
    "llama": {"label": "Llama", "config": "LlamaConfig", "model": "LlamaForCausalLM",
              "rotary": ("transformers.models.llama.modeling_llama", "LlamaRotaryEmbedding"), "fields": _LLAMA},
}
SIZES = {
    "1.3b": {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 8192, "vocab_size": 51200},
    "0.5b": {"hidden_size": 1024, "num_hidden_layers": 32, "num_attention_heads": 16, "num_key_value_heads": 16,
             "intermediate_size": 4096, "vocab_size": 51200},
    # every dimension a multiple of 256 so Q4_K_M quantizes every matrix (no fallback types)
    "tiny": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 1024, "vocab_size": 512},
    # models/smolvlm.yaml, smolvlm_500m's text_config (SmolLM2-360M)
    "smolvlm-500m": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
                     "head_dim": 64, "intermediate_size": 2560, "vocab_size": 49280},
    # grouped KV heads as SmolLM2's; every dimension a multiple of 256 (Q4_K_M quantizes every matrix)
    "smolvlm-tiny": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 64, "intermediate_size": 768, "vocab_size": 512},
}
SIZE_FAMILY = {"smolvlm-500m": "llama", "smolvlm-tiny": "llama"}      # every other size: phi
TEXT_TOKENS = 32
COMPRESSION_VISION = (576, 16, 1)          # uncompressed LLaVA-1.5 image, LLaVA-Mini 16 and 1 token(s)

# key -> (label, kind, artifact)
ENGINES = {
    "eager": ("transformers eager FP32", "eager", None),
    "ort-fp32": ("edgevlm ORT FP32", "ort", "onnx_fp32_run"),
    "ort-int8": ("edgevlm ORT INT8", "ort", "onnx_int8"),
    "ort-int4": ("edgevlm ORT INT4", "ort", "onnx_int4"),
    "ort-int4-ortkernel": ("edgevlm ORT INT4, ONNX Runtime's kernel", "ort", "onnx_int4"),
    "ort-int4-b128": ("edgevlm ORT INT4 block 128", "ort", "onnx_int4_b128"),
    "edgevlm-q8_0": ("edgevlm llama.cpp Q8_0", "edgellama", "gguf_q8_0"),
    "edgevlm-q4_k_m": ("edgevlm llama.cpp Q4_K_M", "edgellama", "gguf_q4_k_m"),
    "llamacpp-q8_0": ("llama.cpp own Q8_0", "llama", "gguf_q8_0"),
    "llamacpp-q4_k_m": ("llama.cpp own Q4_K_M", "llama", "gguf_q4_k_m"),
}
# --compression times every shipped engine (the block-128 variant aside) at each prompt length
COMPRESSION_ENGINES = ("eager", "ort-fp32", "ort-int8", "ort-int4", "ort-int4-ortkernel", "edgevlm-q8_0",
                       "edgevlm-q4_k_m", "llamacpp-q8_0", "llamacpp-q4_k_m")
INT8_PEAK_SHAPE = (1024, 4096, 4096)      # M, K, N of the int8 GEMM whose speed is taken as the CPU's int8 peak
REFERENCE_ROWS = ("ort-int4-ortkernel",)   # what edgevlm's own kernel is measured against, not a shipped engine
EDGEVLM_KINDS = ("ort", "edgellama")    # engines run as `edgevlm` runs them: with huge pages where the OS allows
ARTIFACTS = {               # name -> (file, build stage, prerequisites)
    "embed_tokens": ("embed_tokens.onnx", "torch", ()),
    "onnx_fp32": ("decoder.onnx", "torch", ()),
    "gguf_f16": ("decoder.f16.gguf", "torch", ()),
    "onnx_fp32_run": ("decoder.fp32-run.onnx", "fp32_run", ("onnx_fp32",)),   # as a bundle runs it (fused)
    # quantized from the fused FP32 graph, as edgevlm export does for the cpu target
    "onnx_int8": ("decoder.int8.onnx", "int8", ("onnx_fp32_run",)),
    "onnx_int4": ("decoder.int4.onnx", "int4", ("onnx_fp32_run",)),
    "onnx_int4_b128": ("decoder.int4-b128.onnx", "int4_b128", ("onnx_fp32_run",)),
    "gguf_q8_0": ("decoder.q8_0.gguf", "q8_0", ("gguf_f16",)),
    "gguf_q4_k_m": ("decoder.q4_k_m.gguf", "q4_k_m", ("gguf_f16",)),
}
# Cached artifacts made by another version of the exporters are rebuilt (2: decoder.onnx traced with eager
# attention, see edgevlm.exporters.vlm_onnx.export_decoder; 3: the ONNX engines run fuse_attention's graph;
# 4: RoPE inside the fused attention, q/k/v one projection, INT8/INT4 quantized from the fused FP32 graph).
EXPORT_FORMAT = 4
TARGET_INT4_VS_EAGER, TARGET_VS_LLAMACPP, TARGET_PCT_LIMIT = 4.0, 0.9, 50.0
_T0 = float(os.environ.get("VLM_DECODE_T0") or time.time())       # the parent's start: one clock for all stages


def say(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


# -- the model ----------------------------------------------------------------------------------------------
def family(size: str) -> dict:
    """The size's model family (``FAMILIES``): Phi unless ``SIZE_FAMILY`` names another."""
    return FAMILIES[SIZE_FAMILY.get(size, "phi")]


def model_config(size: str) -> dict:
    """The decoder's whole transformers config (the size's dimensions and its family's shared fields)."""
    return {**SIZES[size], **family(size)["fields"]}


def head_dim(size: str) -> int:
    c = SIZES[size]
    return c.get("head_dim", c["hidden_size"] // c["num_attention_heads"])


def build_lm(size: str):
    """The random-weight decoder of the size's family (seeded: every process builds the same weights)."""
    import torch
    import transformers

    fam = family(size)
    torch.manual_seed(0)
    cfg = getattr(transformers, fam["config"])(**model_config(size))
    lm = getattr(transformers, fam["model"])(cfg).eval()
    lm.requires_grad_(False)
    return lm


def n_params(size: str) -> int:
    """Parameters of the decoder, from its shape (no torch)."""
    c = model_config(size)
    d, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    if SIZE_FAMILY.get(size, "phi") == "llama":
        q, kv = c["num_attention_heads"] * head_dim(size), c["num_key_value_heads"] * head_dim(size)
        # q, k, v, o (no biases), gate + up + down, two RMSNorms; final RMSNorm; the head unless tied
        layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        return v * d + n * layer + d + (0 if c["tie_word_embeddings"] else d * v)
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    layer = (d * d + d) * 2 + (d * kv + kv) * 2 + (d * f + f) + (f * d + d) + 2 * d
    return v * d + n * layer + 2 * d + (d * v + v)


# -- building artifacts (each stage in its own process) -----------------------------------------------------
def _fuse(size: str, path: Path, dst: Path | None = None) -> str:
    """The CPU bundles' attention (one ONNX Runtime op appending to a shared KV buffer, applying the model's
    RoPE), as edgevlm export writes it; returns what the graph got."""
    import importlib

    import transformers

    from edgevlm.compress.attention import fuse_attention, rotary_tables

    fam, c = family(size), model_config(size)
    rotary = getattr(importlib.import_module(fam["rotary"][0]), fam["rotary"][1])
    say(f"  fusing attention in {(dst or path).name} (RoPE checked against the model's own ops)")
    tables = rotary_tables(rotary(config=getattr(transformers, fam["config"])(**c)), c["max_position_embeddings"])
    f = fuse_attention(path, c["num_attention_heads"], c["num_key_value_heads"], head_dim(size), dst=dst,
                       rotary=tables)
    return (f["kv_cache"] + (f" ({f['why']})" if "why" in f else "")
            + (f"; RoPE {f['rope']}" if "rope" in f else "") + (f" ({f['rope_why']})" if "rope_why" in f else ""))


def prepare_stage(stage: str, size: str, cache: Path) -> dict:
    """Build one stage's artifacts in ``cache``; returns {artifact: facts}."""
    out: dict = {}
    if stage == "torch":
        import gc

        from edgevlm.errors import EdgeVLMError
        from edgevlm.exporters.vlm_onnx import export_decoder, export_embed_tokens

        say(f"building the random {size} {family(size)['label']} decoder (torch)")
        lm = build_lm(size)
        say(f"  {sum(p.numel() for p in lm.parameters()) / 1e9:.3f}B parameters; exporting decoder.onnx "
            "(torch.onnx dynamo)")
        f = export_decoder(lm, cache / ARTIFACTS["onnx_fp32"][0])
        out["onnx_fp32"] = {k: f[k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size",
                                               "external_data", "file_bytes")}
        say(f"  decoder.onnx: {f['file_bytes'] / 1e6:.1f} MB (external data: {f['external_data']}); "
            "exporting embed_tokens.onnx")
        f = export_embed_tokens(lm, cache / ARTIFACTS["embed_tokens"][0])
        out["embed_tokens"] = {"file_bytes": f["file_bytes"]}
        try:
            from edgevlm.exporters.gguf import write_gguf
            from edgevlm.processor import TextTokenizer

            say("  writing decoder.f16.gguf")
            tok = TextTokenizer.bytes_only(SIZES[size]["vocab_size"])
            f = write_gguf(lm, tok, cache / ARTIFACTS["gguf_f16"][0], ftype="f16",
                           name=f"edgevlm-bench-{SIZE_FAMILY.get(size, 'phi')}-{size}")
            out["gguf_f16"] = {"file_bytes": f["file_size"], "arch": f["arch"], "params": f["params"]}
        except (ImportError, EdgeVLMError) as e:     # no gguf package: the llama.cpp engines are skipped
            out["gguf_f16"] = {"error": f"{type(e).__name__}: {e}"}
        del lm
        gc.collect()
    elif stage in ("int8", "int4", "int4_b128"):
        from edgevlm.exporters.vlm_onnx import quantize_decoder

        prec, block = stage.split("_b")[0], int(stage.split("_b")[1]) if "_b" in stage else 32
        say(f"quantizing decoder.fp32-run.onnx to {prec.upper()}{f' (block {block})' if prec == 'int4' else ''} (onnxruntime)")
        f = quantize_decoder(cache / ARTIFACTS["onnx_fp32_run"][0], cache / ARTIFACTS[f"onnx_{stage}"][0], prec,
                             block_size=block)
        out[f"onnx_{stage}"] = {"file_bytes": f["file_bytes"], "method": f["method"],
                                "weight_coverage": f["weight_coverage"],
                                "attention": "as decoder.fp32-run.onnx (quantized from it)"}
    elif stage == "fp32_run":
        out["onnx_fp32_run"] = {"attention": _fuse(size, cache / ARTIFACTS["onnx_fp32"][0],
                                                   cache / ARTIFACTS["onnx_fp32_run"][0])}
    elif stage in ("q8_0", "q4_k_m"):
        from edgevlm.exporters.gguf import quantize_gguf

        say(f"quantizing decoder.f16.gguf to {stage.upper()} (llama.cpp)")
        f = quantize_gguf(cache / ARTIFACTS["gguf_f16"][0], cache / ARTIFACTS[f"gguf_{stage}"][0], stage)
        out[f"gguf_{stage}"] = {"file_bytes": f["file_size"], "tensor_types": f["tensor_types"],
                                "fallbacks": len(f["fallbacks"])}
    else:
        raise SystemExit(f"unknown stage {stage}")
    return out


def _sub(args: list[str], threads: int, stream_err: bool = True, huge_pages: bool = False) -> dict:
    """Run this script in a fresh process; its last stdout line is JSON. ``huge_pages``: started as the ``edgevlm``
    command starts itself (glibc asked for transparent huge pages, ``edgevlm.runtime.memory``)."""
    from edgevlm.runtime.memory import huge_page_env

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "VLM_DECODE_T0": str(_T0)}
    if huge_pages:
        env = huge_page_env(env) or env
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE,
                       stderr=None if stream_err else subprocess.PIPE, text=True, env=env, check=False)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = (r.stderr or "")[-800:] if not stream_err else "(see its output above)"
        raise RuntimeError(f"`{' '.join(args[:2])}` exited with {r.returncode}: {tail.strip()}")
    return json.loads(lines[-1])


def ensure_artifacts(size: str, cache: Path, wanted: set[str], threads: int) -> tuple[dict, dict]:
    """Build what ``wanted`` needs unless cached; returns (meta artifacts, {artifact: reason unavailable})."""
    cache.mkdir(parents=True, exist_ok=True)
    meta_path = cache / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    shape = model_config(size)
    if meta.get("config") != shape or meta.get("export") != EXPORT_FORMAT:
        meta = {"config": shape, "export": EXPORT_FORMAT, "artifacts": {}}
    arts = meta["artifacts"]
    need, stack = set(), list(wanted)
    while stack:
        a = stack.pop()
        if a not in need:
            need.add(a)
            stack.extend(ARTIFACTS[a][2])
    unavailable: dict[str, str] = {}

    def have(a: str) -> bool:
        return a in arts and "error" not in arts[a] and (cache / ARTIFACTS[a][0]).is_file()

    for stage in ("torch", "fp32_run", "int8", "int4", "int4_b128", "q8_0", "q4_k_m"):
        todo = [a for a in need if ARTIFACTS[a][1] == stage and not have(a)]
        if not todo:
            continue
        if stage == "torch":
            todo = [a for a in ARTIFACTS if ARTIFACTS[a][1] == "torch"]   # one model build makes all three
        missing = [p for a in todo for p in ARTIFACTS[a][2] if not have(p)]
        if missing:
            for a in todo:
                unavailable[a] = f"needs {', '.join(missing)}: {arts.get(missing[0], {}).get('error', 'not built')}"
            continue
        if stage in ("q8_0", "q4_k_m"):
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                for a in todo:
                    unavailable[a] = "llama-cpp-python is not installed (llama.cpp's quantizer)"
                continue
        try:
            arts.update(_sub(["--prepare", stage, "--size", size, "--cache", str(cache.parent)], threads))
        except RuntimeError as e:
            for a in todo:
                arts[a] = {"error": str(e)}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    for a in need:
        if not have(a) and a not in unavailable:
            unavailable[a] = arts.get(a, {}).get("error", "not built")
    return arts, unavailable


# -- what a token costs -------------------------------------------------------------------------------------
def onnx_weight_bytes(path: Path) -> tuple[int, int]:
    """(all initializer bytes, bytes of tables only gathered from, i.e. not read whole per token)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    size = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size[t.name] = int(ext["length"]) if "length" in ext else (
            len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes)
    users: dict[str, set] = {}
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            if name in size:
                users.setdefault(name, set()).add((n.op_type, i))
    gathered = sum(size[k] for k, u in users.items() if u == {("Gather", 0)})
    return sum(size.values()), gathered


def gguf_weight_bytes(path: Path) -> tuple[int, int]:
    """(all tensor bytes, bytes of token_embd, which decoding reads one row of; 0 when the file has no output.weight:
    llama.cpp's llama graph then reads token_embd whole as the head)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in r.tensors)
    if not any(t.name == "output.weight" for t in r.tensors):
        return total, 0
    embd = sum(int(t.n_bytes) for t in r.tensors if t.name == "token_embd.weight")
    return total, embd


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` while this benchmark sleeps (other jobs on the machine)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])          # idle + iowait, total (guest time is inside user)

    try:
        i0, t0 = sample()
        time.sleep(seconds)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1.0 - (i1 - i0) / max(t1 - t0, 1), 3)


def last_level_cache_mib() -> float | None:
    """The largest CPU cache this machine reports (Linux sysfs), in MiB."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        t = f.read_text().strip()
        unit = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(t[-1:], None)
        try:
            sizes.append(float(t[:-1]) * unit if unit else float(t) / 2**20)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def bandwidth_array_mib() -> int:
    """STREAM's rule: each array at least 4x the last-level cache, so the figure is memory's, not the cache's
    (this VM reports a 480 MiB L3; 2-thread reads measured 47.6 GB/s on 64 MiB arrays, 34-37 GB/s on 256 MiB to
    4 GiB ones); at least 256 MiB, at most 4 GiB."""
    llc = last_level_cache_mib() or 0
    return int(min(4096, max(256, 4 * llc)))


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``, after one untimed call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def measure_bandwidth(mib: int | None = None, repeats: int = 7) -> dict:
    """GB/s (1e9 bytes/s): copy (read + write counted), and read (a sum over uint64) on 1 and 2 threads."""
    from concurrent.futures import ThreadPoolExecutor

    mib = mib or bandwidth_array_mib()
    n = mib * 2**20
    a = np.ones(n // 8, np.uint64)
    b = np.empty_like(a)
    halves = np.array_split(a, 2)

    with ThreadPoolExecutor(2) as ex:
        res = {"copy_gbs": 2 * n / best_time(lambda: np.copyto(b, a), repeats) / 1e9,
               "read_1thread_gbs": n / best_time(lambda: a.sum(), repeats) / 1e9,
               "read_2threads_gbs": n / best_time(lambda: list(ex.map(np.sum, halves)), repeats) / 1e9}
    res = {k: round(v, 2) for k, v in res.items()}
    res["bandwidth_gbs"] = max(res.values())
    res["array_mib"], res["repeats"] = mib, repeats
    return res


def measure_int8_peak(threads: int, repeats: int = 7) -> dict:
    """The CPU's int8 matrix-product peak as a tuned library reaches it: ONNX Runtime's MatMulInteger (MLAS, which
    uses AVX-512 VNNI / AVX-VNNI / AMX where present) on uint8 x int8 matrices of ``INT8_PEAK_SHAPE``, ``threads``
    threads, best of ``repeats``; in int8 operations (2 per multiply-add) per second."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = INT8_PEAK_SHAPE
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "peak",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    best = best_time(lambda: sess.run(None, {"a": a}), repeats)
    return {"int8_gops": round(2 * m * k * n / best / 1e9, 1), "shape_mkn": [m, k, n], "threads": threads,
            "how": "ONNX Runtime MatMulInteger (uint8 x int8 -> int32), best of "
                   f"{repeats}: the speed a tuned int8 GEMM reaches on this CPU"}


# -- engines (run inside a measuring subprocess) ------------------------------------------------------------
class _Eager:
    def __init__(self, size: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.lm = build_lm(size)
        w = self.lm.get_input_embeddings().weight
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.lm.parameters())
        head = self.lm.get_output_embeddings()
        tied = head is not None and head.weight is w           # a tied head reads the whole table per token
        self.read_bytes = self.weight_bytes - (0 if tied else w.numel() * w.element_size())
        self.attn = getattr(self.lm.config, "_attn_implementation", None)
        self.past = None

    def reset(self):
        self.past = None

    def prefill(self, embeds: np.ndarray):
        with self.torch.inference_mode():
            out = self.lm(inputs_embeds=self.torch.from_numpy(embeds[None]), use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[0, -1]

    def step(self, tok: int):
        with self.torch.inference_mode():
            out = self.lm(input_ids=self.torch.tensor([[tok]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1]


class _Ort:
    def __init__(self, size: str, cache: Path, artifact: str, threads: int, kernels: bool | None = None):
        from edgevlm.runtime.vlm import _Graph, open_ort_decoder

        c = SIZES[size]
        prec = artifact.split("_")[1]
        cpu = ["CPUExecutionProvider"]
        embed = _Graph(cache / ARTIFACTS["embed_tokens"][0], cpu, "fp32", threads)
        # as a bundle's runtime opens it (runtime.vlm.open_ort_decoder: edgevlm's kernel for 4-bit decode steps
        # when built here), or with ONNX Runtime's kernels only (kernels=False)
        self.dec = open_ort_decoder(cache / ARTIFACTS[artifact][0], cpu, prec, threads, embed,
                                    c["num_hidden_layers"], c["num_key_value_heads"], head_dim(size),
                                    kernels=kernels)
        self.reset, self.step = self.dec.reset, self.dec.step
        self.providers = self.dec.providers

    def prefill(self, embeds: np.ndarray):
        return self.dec.prefill(embeds)


class _EdgeLlama:
    def __init__(self, cache: Path, artifact: str, threads: int, n_ctx: int, flash_attn: bool):
        from edgevlm.runtime.llamacpp import LlamaCppDecoder

        self.dec = LlamaCppDecoder(cache / ARTIFACTS[artifact][0], n_ctx=n_ctx, n_threads=threads, n_batch=n_ctx,
                                   flash_attn=flash_attn)
        self.reset, self.step = self.dec.reset, self.dec.step

    def prefill(self, embeds: np.ndarray):
        return self.dec.prefill(embeds)


def _drive(engine, embeds: np.ndarray, n_new: int) -> tuple[float, float, list[int]]:
    """(time to first token s, decode tok/s, tokens) of one greedy run of an embeddings-in engine."""
    engine.reset()
    t0 = time.perf_counter()
    tok = int(engine.prefill(embeds).argmax())
    t1 = time.perf_counter()
    toks = [tok]
    for _ in range(n_new - 1):
        tok = int(engine.step(tok).argmax())
        toks.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, (n_new - 1) / max(t2 - t1, 1e-9), toks


class _LlamaOwn:
    """llama-cpp-python's high-level API: ``Llama.generate`` (prefill of the ids, then greedy sampling)."""

    def __init__(self, cache: Path, artifact: str, threads: int, n_ctx: int, flash_attn: bool):
        import llama_cpp
        import llama_cpp.llama_cpp as low

        from edgevlm.runtime.llamacpp import extra_buffers_choice

        # The same weight buffers as edgevlm's runtime: repacked unless llama.cpp would use its AMX buffers, which
        # crash (see edgevlm/runtime/llamacpp.py). The high-level API has no switch for it, so its default model
        # parameters are adjusted while it loads.
        default = low.llama_model_default_params
        self.extra_buffers, _ = extra_buffers_choice()

        def same_buffers():
            mp = default()
            mp.use_extra_bufts = self.extra_buffers
            return mp

        low.llama_model_default_params = same_buffers
        try:
            self.llm = llama_cpp.Llama(str(cache / ARTIFACTS[artifact][0]), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                                       flash_attn=flash_attn, logits_all=False, verbose=False)
        finally:
            low.llama_model_default_params = default

    def run(self, ids: list[int], n_new: int) -> tuple[float, float, list[int]]:
        self.llm.reset()                   # no KV-cache prefix reuse between runs: every run prefills everything
        t0 = time.perf_counter()
        gen = self.llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True)
        toks = [next(gen)]
        t1 = time.perf_counter()
        for _ in range(n_new - 1):
            toks.append(next(gen))
        t2 = time.perf_counter()
        gen.close()
        return t1 - t0, (n_new - 1) / max(t2 - t1, 1e-9), [int(t) for t in toks]


def open_engine(key: str, size: str, cache: Path, threads: int, n_ctx: int, flash_attn: bool):
    _, kind, art = ENGINES[key]
    if kind == "eager":
        return _Eager(size, threads)
    if kind == "ort":
        return _Ort(size, cache, art, threads, kernels=False if key.endswith("-ortkernel") else None)
    if kind == "edgellama":
        return _EdgeLlama(cache, art, threads, n_ctx, flash_attn)
    return _LlamaOwn(cache, art, threads, n_ctx, flash_attn)


def _run(engine, prompt: dict, n_new: int):
    if isinstance(engine, _LlamaOwn):
        return engine.run(prompt["ids"], n_new)
    return _drive(engine, prompt["embeds"], n_new)


def _load_prompt(path: str) -> dict:
    z = np.load(path)
    return {"embeds": np.ascontiguousarray(z["embeds"], np.float32), "ids": [int(i) for i in z["ids"]]}


def measure(key: str, size: str, cache: Path, prompt_path: str, runs: int, n_new: int, threads: int, n_ctx: int,
            flash_attn: bool) -> dict:
    """Warm-up + ``runs`` timed greedy runs of one engine, in this (fresh) process."""
    t = time.perf_counter()
    engine = open_engine(key, size, cache, threads, n_ctx, flash_attn)
    load_s = time.perf_counter() - t
    prompt = _load_prompt(prompt_path)
    ttft, tps, tokens = [], [], None
    for i in range(runs + 1):
        a, b, toks = _run(engine, prompt, n_new)
        if i:
            ttft.append(a)
            tps.append(b)
        tokens = tokens or toks
    from edgevlm.runtime.memory import status

    res = {"ttft_s": ttft, "tok_s": tps, "load_s": load_s, "peak_rss_mib": round(peak_mib(), 1),
           "first_tokens": tokens[:8], "n_new": len(tokens), **status()}
    if isinstance(engine, _Eager):
        res.update(weight_bytes=engine.weight_bytes, read_bytes=engine.read_bytes, attention=engine.attn)
    if isinstance(engine, _Ort):
        res["providers"] = engine.providers
        res["decode_kernel"] = engine.dec.kernel
    if isinstance(engine, _EdgeLlama):
        res.update(extra_buffers=engine.dec.extra_buffers, weight_buffers=engine.dec.weight_buffers,
                   extra_buffers_why=engine.dec.extra_buffers_why)
    if isinstance(engine, _LlamaOwn):
        res["extra_buffers"] = engine.extra_buffers
    return res


def measure_ttft(key: str, size: str, cache: Path, prompt_paths: list[str], runs: int, threads: int, n_ctx: int,
                 flash_attn: bool) -> dict:
    """Time to first token for several prompts on one engine (warm-up + ``runs`` each)."""
    engine = open_engine(key, size, cache, threads, n_ctx, flash_attn)
    out = {}
    for p in prompt_paths:
        prompt = _load_prompt(p)
        ts = [_run(engine, prompt, 1)[0] for _ in range(runs + 1)][1:]
        out[p] = ts
    return {"ttft_s": out, "peak_rss_mib": round(peak_mib(), 1)}


# -- prompts ------------------------------------------------------------------------------------------------
def make_prompt(cache: Path, size: str, n_img: int, n_text: int = TEXT_TOKENS) -> Path:
    """``n_img`` random image rows + ``n_text`` byte-token embeddings (from embed_tokens.onnx), and token ids of
    the same length for llama.cpp's own path; saved as .npz in the cache."""
    path = cache / "prompts" / f"prompt-{n_img}img-{n_text}txt.npz"
    if path.is_file():
        return path
    import onnxruntime as ort

    d = SIZES[size]["hidden_size"]
    text_ids = np.random.default_rng(1234).integers(0, 256, n_text)          # byte tokens of the GGUF vocab
    rng = np.random.default_rng(n_img)
    img = rng.normal(0.0, 0.02, (n_img, d)).astype(np.float32)              # the embedding table's scale
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(cache / ARTIFACTS["embed_tokens"][0]), so, providers=["CPUExecutionProvider"])
    txt = sess.run(None, {"input_ids": text_ids[None].astype(np.int64)})[0][0]
    embeds = np.concatenate([img, txt]).astype(np.float32)
    ids = np.concatenate([rng.integers(0, 256, n_img), text_ids]).astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part.npz")
    np.savez(tmp, embeds=embeds, ids=ids)
    os.replace(tmp, path)
    return path


# -- report -------------------------------------------------------------------------------------------------
def _ratio(a, b):
    return float(a) / float(b) if a and b else None


def _target(name: str, value, goal: float, unit: str = "x") -> dict:
    """met: True / False, or None when an engine it needs was not measured."""
    met = None if value is None else bool(value >= goal)
    shown = "-" if value is None else (f"{value:.2f}{unit}" if unit == "x" else f"{value:.1f}{unit}")
    return {"target": name, "value": value, "goal": goal, "met": met, "shown": shown}


def _plot(rows: list[dict], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    rows = [r for r in rows if r.get("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(rows))
    colors = ["#888888" if r["kind"] == "eager" else "#3b75af" if r["kind"] == "ort" else
              "#e1812c" if r["kind"] == "edgellama" else "#c03d3e" for r in rows]
    ax.bar(x, [r["decode_tok_s"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        if r.get("limit_tok_s"):
            ax.hlines(r["limit_tok_s"], i - 0.4, i + 0.4, colors="black", linestyles="dashed", linewidth=1)
        ax.annotate(f"{r['decode_tok_s']:.1f}", (i, r["decode_tok_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [r["engine"] for r in rows], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title(title + "\n(dashed: bandwidth limit = bandwidth / weight bytes per token)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


# -- the parent run, stage by stage (main) ------------------------------------------------------------------
@dataclass
class Plan:
    """What the parent run times, settled before timing: engines (and why others are skipped), artifacts, context."""
    cache: Path
    engines: list[str]
    comp_engines: list[str]
    skipped: dict[str, str]
    llama_version: str | None
    arts: dict = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    n_ctx: int = 0
    prompt: Path | None = None


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line (the run's options and the worker modes' hidden ones): (parser, arguments)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="1.3b")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per engine (after one warm-up)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--image-tokens", type=int, default=64, help="random image embedding rows before the text")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--engines", nargs="*", default=list(ENGINES), choices=list(ENGINES),
                    help="engines to time (default: all; none with --compression: only that)")
    ap.add_argument("--no-kernel-build", action="store_true",
                    help="do not build edgevlm's 4-bit decode kernel first (INT4 then runs whatever is built here)")
    ap.add_argument("--compression", action="store_true",
                    help="also: time to first token with 1 / 16 / 576 vision tokens (ONNX INT4, llama.cpp Q4_K_M)")
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on",
                    help="llama.cpp flash attention for both llama.cpp paths (edgevlm's default 'auto' is on for CPU)")
    ap.add_argument("--cache", type=Path, default=Path("/work/bench_cache"), help="artifacts, reused when present")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="results directory (created if missing): vlm_decode-<size>.json and .png are written into it "
                         "(vlm_decode-<size>-compression.json for --compression without engines)")
    ap.add_argument("--prepare", help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--measure-ttft", help=argparse.SUPPRESS)
    ap.add_argument("--measure-bandwidth", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure-int8-peak", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, help=argparse.SUPPRESS)
    return ap, ap.parse_args(argv)


def run_worker(args, cache: Path) -> bool:
    """A worker mode (one stage in a fresh process the parent started) prints its JSON line; False for the parent."""
    fa = args.flash_attn == "on"
    if args.prepare:
        print(json.dumps(prepare_stage(args.prepare, args.size, cache)))
    elif args.measure_bandwidth:
        print(json.dumps(measure_bandwidth()))
    elif args.measure_int8_peak:
        print(json.dumps(measure_int8_peak(args.threads)))
    elif args.measure:
        print(json.dumps(measure(args.measure, args.size, cache, args.prompt[0], args.runs, args.new_tokens,
                                 args.threads, args.n_ctx, fa)))
    elif args.measure_ttft:
        print(json.dumps(measure_ttft(args.measure_ttft, args.size, cache, args.prompt, args.runs, args.threads,
                                      args.n_ctx, fa)))
    else:
        return False
    return True


def plan_run(args, cache: Path, fail) -> Plan:
    """Check the options, pick the engines (llama.cpp's skipped without llama-cpp-python), announce the run."""
    if args.new_tokens < 2:
        fail("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    # --out is a directory (several files, named by size), checked now rather than after the timing
    if not args.out.is_dir() and (args.out.exists() or args.out.suffix == ".json"):
        fail(f"--out {args.out}: give the results directory (vlm_decode-<size>.json and .png are written into it), "
             "not a file")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"--out {args.out}: {e.strerror or e}")
    engines = list(dict.fromkeys(args.engines))
    skipped: dict[str, str] = {}
    try:
        import llama_cpp
        llama_version = getattr(llama_cpp, "__version__", "?")
    except ImportError:
        llama_version = None
        for k in list(engines):
            if ENGINES[k][1] in ("edgellama", "llama"):
                skipped[k] = "llama-cpp-python is not installed (pip install 'edgevlm[gguf]')"
                engines.remove(k)
    comp_engines = [k for k in COMPRESSION_ENGINES if k not in skipped] if args.compression else []
    if args.compression and llama_version is None:
        for k in [k for k in comp_engines if ENGINES[k][1] in ("edgellama", "llama")]:
            skipped.setdefault(k, "llama-cpp-python is not installed")
            comp_engines.remove(k)
    say(f"vlm_decode: size {args.size} ({n_params(args.size) / 1e9:.3f}B params, random weights), "
        f"{args.image_tokens} image rows + {TEXT_TOKENS} text tokens, {args.new_tokens} new tokens, "
        f"{args.runs} runs, {args.threads} threads; cache {cache}")
    return Plan(cache, engines, comp_engines, skipped, llama_version)


def build_artifacts(args, plan: Plan) -> None:
    """Build (or reuse from the cache) the engines' artifacts in subprocesses; engines without theirs are skipped."""
    wanted = {"embed_tokens"} | {ENGINES[k][2] for k in plan.engines + plan.comp_engines if ENGINES[k][2]}
    plan.arts, plan.unavailable = ensure_artifacts(args.size, plan.cache, wanted, args.threads)
    for k in list(plan.engines):
        art = ENGINES[k][2]
        if art in plan.unavailable:
            plan.skipped[k] = f"{ARTIFACTS[art][0]} unavailable: {plan.unavailable[art]}"
            plan.engines.remove(k)
    plan.comp_engines = [k for k in plan.comp_engines if ENGINES[k][2] not in plan.unavailable]
    if "embed_tokens" in plan.unavailable:
        raise SystemExit(f"embed_tokens.onnx could not be built: {plan.unavailable['embed_tokens']}")


def context_and_prompt(args, plan: Plan, fail) -> None:
    """The context every engine gets (longest prompt + new tokens, rounded up to 256) and the prompt's file."""
    n_prompt = args.image_tokens + TEXT_TOKENS
    need = n_prompt + args.new_tokens + 1
    if plan.comp_engines:
        need = max(need, max(COMPRESSION_VISION) + TEXT_TOKENS + 1)
    plan.n_ctx = -(-need // 256) * 256
    max_pos = model_config(args.size)["max_position_embeddings"]
    if plan.n_ctx > max_pos:
        fail(f"the prompt and new tokens need {need} positions; the decoder holds {max_pos}")
    plan.prompt = make_prompt(plan.cache, args.size, args.image_tokens)


def prepare_machine(args, plan: Plan) -> tuple[float | None, dict]:
    """Before timing: other jobs' CPU load, edgevlm's 4-bit kernel built, memory bandwidth; (busy, bandwidth)."""
    busy = cpu_busy()
    if busy is not None:
        say(f"other jobs keep {100 * busy:.0f}% of the CPUs busy")
    if any(ENGINES[k][1] == "ort" for k in plan.engines) and not args.no_kernel_build:
        from edgevlm import kernels
        from edgevlm.errors import EdgeVLMError

        say("edgevlm's 4-bit decode kernel (edgevlm kernels build, once per machine)")
        try:
            kernels.build(log=lambda m: say("  " + m))
        except EdgeVLMError as e:
            say(f"  not built, INT4 decodes on ONNX Runtime's kernel: {e}")
    say("measuring memory bandwidth (numpy)")
    bw = _sub(["--measure-bandwidth"], args.threads)
    say(f"  bandwidth {bw['bandwidth_gbs']:.1f} GB/s (copy {bw['copy_gbs']}, read 1 thread {bw['read_1thread_gbs']}, "
        f"2 threads {bw['read_2threads_gbs']})")
    return busy, bw


def _common_args(args, plan: Plan) -> list[str]:
    """The options every measuring subprocess gets."""
    return ["--size", args.size, "--cache", str(args.cache), "--threads", str(args.threads),
            "--n-ctx", str(plan.n_ctx), "--flash-attn", args.flash_attn]


def time_engines(args, plan: Plan) -> tuple[dict, dict]:
    """Each engine in its own fresh process: warm-up + ``--runs`` greedy runs; ({key: timings}, {key: failure})."""
    results, failed = {}, {}
    for k in plan.engines:
        say(f"timing {ENGINES[k][0]}: warm-up + {args.runs} runs of {args.new_tokens} tokens, fresh process")
        try:
            results[k] = _sub(["--measure", k, "--prompt", str(plan.prompt), "--runs", str(args.runs),
                               "--new-tokens", str(args.new_tokens), *_common_args(args, plan)], args.threads,
                              stream_err=False, huge_pages=ENGINES[k][1] in EDGEVLM_KINDS)
            r = results[k]
            say(f"  ttft {1000 * np.median(r['ttft_s']):.0f} ms, {np.median(r['tok_s']):.2f} tok/s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB")
            if "extra_buffers" in r:
                bufs = ", ".join(f"{n} {mib:.0f} MiB" for n, mib in r.get("weight_buffers", {}).items())
                say(f"  llama.cpp extra (repacked) weight buffers {'on' if r['extra_buffers'] else 'off'}"
                    + (f": {bufs}" if bufs else "") + (f" ({r['extra_buffers_why']})" if "extra_buffers_why" in r
                                                       else ""))
        except RuntimeError as e:
            failed[k] = str(e)
            say(f"  FAILED: {e}")
    return results, failed


def bandwidth_after(args, bw: dict) -> dict:
    """The bandwidth measured again after timing; the higher figure is the limit, both are recorded."""
    say("measuring memory bandwidth again (numpy)")
    bw2 = _sub(["--measure-bandwidth"], args.threads)
    say(f"  bandwidth {bw2['bandwidth_gbs']:.1f} GB/s")
    return {**(bw if bw["bandwidth_gbs"] >= bw2["bandwidth_gbs"] else bw2),
            "before_timing_gbs": bw["bandwidth_gbs"], "after_timing_gbs": bw2["bandwidth_gbs"]}


def engine_rows(args, plan: Plan, results: dict, bw: dict) -> list[dict]:
    """One table row per engine: weights, bytes read per token, bandwidth limit, timings, agreement/speed vs eager."""
    cache, rows = plan.cache, []
    for k in plan.engines:
        label, kind, art = ENGINES[k]
        r = results.get(k)
        if kind == "eager":
            wb = rb = None
            if r:
                wb, rb = r["weight_bytes"], r["read_bytes"]
            else:
                p, c = n_params(args.size), model_config(args.size)
                wb, rb = 4 * p, 4 * (p - (0 if c.get("tie_word_embeddings") else c["vocab_size"] * c["hidden_size"]))
        elif kind == "ort":
            total, gathered = onnx_weight_bytes(cache / ARTIFACTS[art][0])
            emb_total, _ = onnx_weight_bytes(cache / ARTIFACTS["embed_tokens"][0])
            wb, rb = total + emb_total, total - gathered
        else:
            total, embd = gguf_weight_bytes(cache / ARTIFACTS[art][0])
            wb, rb = total, total - embd
        limit = bw["bandwidth_gbs"] * 1e9 / rb
        row = {"engine": label, "key": k, "kind": kind, "weights_mb": wb / 1e6, "read_mb_per_tok": rb / 1e6,
               "limit_tok_s": limit}
        if r:
            tps, ttft = float(np.median(r["tok_s"])), float(np.median(r["ttft_s"]))
            row.update(ttft_ms=1000 * ttft, decode_tok_s=tps, pct_of_limit=100 * tps / limit,
                       peak_rss_mib=r["peak_rss_mib"], load_s=r["load_s"], runs=len(r["tok_s"]),
                       ttft_ms_all=[1000 * t for t in r["ttft_s"]], tok_s_all=r["tok_s"],
                       first_tokens=r["first_tokens"],
                       huge_pages_mib=r.get("huge_pages_mib"), huge_pages_why_not=r.get("huge_pages_why_not"),
                       **{x: r[x] for x in ("attention", "extra_buffers", "weight_buffers", "decode_kernel") if x in r})
        rows.append(row)
    by = {r["key"]: r for r in rows}
    ref = by.get("eager", {}).get("first_tokens")
    for r in rows:      # a sanity check that every engine runs the same model (quantized ones drift, llama.cpp's
        if ref and r.get("first_tokens") and r["kind"] != "llama":      # own path gets ids, not image rows)
            r["greedy_prefix_equal_to_eager"] = next((i for i, (a, b) in enumerate(zip(ref, r["first_tokens"]))
                                                      if a != b), min(len(ref), len(r["first_tokens"])))
    eager = by.get("eager", {}).get("decode_tok_s")
    for r in rows:
        r["x_decode_vs_eager"] = _ratio(r.get("decode_tok_s"), eager)
    return rows


def ratios_and_targets(rows: list[dict]) -> tuple[dict, list[dict]]:
    """The speed ratios between engines, and the targets they are held to (met / not met / not measured)."""
    by = {r["key"]: r for r in rows}
    eager = by.get("eager", {}).get("decode_tok_s")

    def tps(k):
        return by.get(k, {}).get("decode_tok_s")

    def ttft(k):
        return by.get(k, {}).get("ttft_ms")

    ratios = {
        "ort_int4_vs_eager_decode": _ratio(tps("ort-int4"), eager),
        "ort_int4_kernel_vs_ort_kernel_decode": _ratio(tps("ort-int4"), tps("ort-int4-ortkernel")),
        "ort_int4_b128_vs_eager_decode": _ratio(tps("ort-int4-b128"), eager),
        "edgevlm_q4_k_m_vs_eager_decode": _ratio(tps("edgevlm-q4_k_m"), eager),
        "edgevlm_vs_llamacpp_q8_0_decode": _ratio(tps("edgevlm-q8_0"), tps("llamacpp-q8_0")),
        "edgevlm_vs_llamacpp_q4_k_m_decode": _ratio(tps("edgevlm-q4_k_m"), tps("llamacpp-q4_k_m")),
        "edgevlm_vs_llamacpp_q8_0_ttft_speed": _ratio(ttft("llamacpp-q8_0"), ttft("edgevlm-q8_0")),
        "edgevlm_vs_llamacpp_q4_k_m_ttft_speed": _ratio(ttft("llamacpp-q4_k_m"), ttft("edgevlm-q4_k_m")),
        "ort_int4_vs_llamacpp_q4_k_m_decode": _ratio(tps("ort-int4"), tps("llamacpp-q4_k_m")),
        "ort_int4_vs_llamacpp_q4_k_m_ttft_speed": _ratio(ttft("llamacpp-q4_k_m"), ttft("ort-int4")),
        "pct_of_limit": {r["key"]: r.get("pct_of_limit") for r in rows},
    }
    targets = [
        _target("edgevlm ONNX INT4 decode / eager FP32 decode >= 4x", ratios["ort_int4_vs_eager_decode"],
                TARGET_INT4_VS_EAGER),
        _target("edgevlm ONNX INT4 block 128 decode / eager FP32 decode >= 4x",
                ratios["ort_int4_b128_vs_eager_decode"], TARGET_INT4_VS_EAGER),
        _target("edgevlm llama.cpp Q4_K_M decode / eager FP32 decode >= 4x", ratios["edgevlm_q4_k_m_vs_eager_decode"],
                TARGET_INT4_VS_EAGER),
        _target("edgevlm llama.cpp / llama.cpp own, Q8_0 decode >= 0.9x", ratios["edgevlm_vs_llamacpp_q8_0_decode"],
                TARGET_VS_LLAMACPP),
        _target("edgevlm llama.cpp / llama.cpp own, Q4_K_M decode >= 0.9x",
                ratios["edgevlm_vs_llamacpp_q4_k_m_decode"], TARGET_VS_LLAMACPP),
    ]
    for r in rows:       # edgevlm's engines as bundles run them (ort-int4-ortkernel is a reference row)
        if r["kind"] in EDGEVLM_KINDS and r["key"] not in REFERENCE_ROWS:
            targets.append(_target(f"{r['engine']} >= 50% of its bandwidth limit", r.get("pct_of_limit"),
                                   TARGET_PCT_LIMIT, "%"))
    return ratios, targets


def time_compression(args, plan: Plan) -> dict:
    """--compression: time to first token with 1 / 16 / 576 vision tokens, each engine in a fresh process, and
    the prefill's throughput against the CPU's int8 peak (:func:`measure_int8_peak`)."""
    compression = {"vision_tokens": list(COMPRESSION_VISION), "text_tokens": TEXT_TOKENS, "rows": [],
                   "skipped": {k: plan.skipped.get(k) or plan.unavailable.get(ENGINES[k][2], "")
                               for k in COMPRESSION_ENGINES if k not in plan.comp_engines}}
    paths = {n: make_prompt(plan.cache, args.size, n) for n in COMPRESSION_VISION}
    say("measuring the CPU's int8 peak (ONNX Runtime MatMulInteger "
        f"{'x'.join(map(str, INT8_PEAK_SHAPE))}, {args.threads} threads)")
    peak = _sub(["--measure-int8-peak", "--threads", str(args.threads)], args.threads)
    say(f"  {peak['int8_gops']:.0f} int8 GOPS")
    compression["int8_peak"] = peak
    c = model_config(args.size)
    table_params = c["vocab_size"] * c["hidden_size"]
    # matrix products per prompt position: every weight but the input table, the head only for the last position
    per_pos = n_params(args.size) - table_params * (1 if c.get("tie_word_embeddings") else 2)
    for k in plan.comp_engines:
        say(f"compression: time to first token of {ENGINES[k][0]} at {', '.join(map(str, COMPRESSION_VISION))} "
            "vision tokens, fresh process")
        try:
            res = _sub(["--measure-ttft", k, "--prompt", *[str(p) for p in paths.values()], "--runs",
                        str(args.runs), *_common_args(args, plan)], args.threads, stream_err=False,
                       huge_pages=ENGINES[k][1] in EDGEVLM_KINDS)
        except RuntimeError as e:
            compression["skipped"][k] = str(e)
            say(f"  FAILED: {e}")
            continue
        base = float(np.median(res["ttft_s"][str(paths[max(COMPRESSION_VISION)])]))
        for n, p in paths.items():
            t = float(np.median(res["ttft_s"][str(p)]))
            ops = 2.0 * (per_pos * (n + TEXT_TOKENS) + table_params)
            compression["rows"].append({"engine": ENGINES[k][0], "key": k, "vision_tokens": n,
                                        "prompt_tokens": n + TEXT_TOKENS, "ttft_ms": 1000 * t,
                                        "speedup_vs_576": base / t, "prefill_tok_s": (n + TEXT_TOKENS) / t,
                                        "pct_of_int8_peak": 100 * ops / t / (peak["int8_gops"] * 1e9),
                                        "peak_rss_mib": res["peak_rss_mib"]})
        say("  " + ", ".join(f"{r['vision_tokens']}: {r['ttft_ms']:.0f} ms" for r in compression["rows"]
                             if r["engine"] == ENGINES[k][0]))
    compression["targets"] = compression_targets(compression["rows"])
    return compression


def compression_targets(rows: list[dict]) -> list[dict]:
    """Issue 29's prompt targets: the INT4 bundle's TTFT at most the INT8 bundle's at every prompt length, and at
    576 vision tokens at least 3x faster than llama.cpp's own Q4_K_M."""
    at = {(r["key"], r["vision_tokens"]): r["ttft_ms"] for r in rows}
    out = []
    for n in COMPRESSION_VISION:
        out.append(_target(f"ONNX INT4 TTFT <= ONNX INT8 TTFT at {n} vision tokens (INT8 / INT4 >= 1x)",
                           _ratio(at.get(("ort-int8", n)), at.get(("ort-int4", n))), 1.0))
    n = max(COMPRESSION_VISION)
    out.append(_target(f"ONNX INT4 TTFT >= 3x faster than llama.cpp own Q4_K_M at {n} vision tokens",
                       _ratio(at.get(("llamacpp-q4_k_m", n)), at.get(("ort-int4", n))), 3.0))
    return out


def print_report(args, plan: Plan, busy, bw: dict, rows: list[dict], ratios: dict, targets: list[dict],
                 failed: dict, compression: dict | None) -> str:
    """The table, ratios, targets, skipped/failed engines and a busy-CPU warning on stdout; returns the title."""
    from edgevlm.report import table

    cpu = platform.processor() or platform.machine()
    title = (f"VLM decoder {args.size} ({family(args.size)['label']}-shaped, {n_params(args.size) / 1e9:.2f}B params, "
             "random weights), "
             f"{cpu}, {args.threads} threads; prompt {args.image_tokens} image rows + {TEXT_TOKENS} text tokens, "
             f"{args.new_tokens} new tokens, median of {args.runs}; bandwidth {bw['bandwidth_gbs']:.1f} GB/s")
    cols = ["engine", "weights_mb", "read_mb_per_tok", "ttft_ms", "decode_tok_s", "limit_tok_s", "pct_of_limit",
            "x_decode_vs_eager", "peak_rss_mib", "huge_pages_mib"]
    if rows:
        print(table(rows, cols, title=title))
        print()
        for name, v in ratios.items():
            if name != "pct_of_limit":
                print(f"  {name:42s} {'-' if v is None else f'{v:.2f}x'}")
        print()
        for t in targets:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            print(f"  target {t['target']:62s} {t['shown']:>8s}  {verdict}")
    for k, why in {**plan.skipped, **failed}.items():
        print(f"  {ENGINES[k][0]}: {'skipped' if k in plan.skipped else 'FAILED'}: {why}")
    if busy is not None and busy > 0.25:
        print(f"  WARNING: other jobs kept {100 * busy:.0f}% of the CPUs busy before timing; engines whose "
              f"{args.threads} threads wait on each other (torch's OpenMP, llama.cpp) lose the most: these numbers "
              "and ratios are not reliable, re-run on a quiet machine")
    if compression:
        print()
        peak = compression.get("int8_peak", {})
        print(table(compression["rows"], ["engine", "vision_tokens", "prompt_tokens", "ttft_ms", "speedup_vs_576",
                                          "prefill_tok_s", "pct_of_int8_peak"],
                    title=f"Time to first token (prefill + first token) at 1 / 16 / 576 vision tokens "
                          f"+{TEXT_TOKENS} text tokens, median of {args.runs}; int8 peak "
                          f"{peak.get('int8_gops', '?')} GOPS ({peak.get('how', '')})"))
        for t in compression.get("targets", []):
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            print(f"  target {t['target']:78s} {t['shown']:>8s}  {verdict}")
        for k, why in compression["skipped"].items():
            print(f"  {ENGINES[k][0]}: skipped: {why}")
    return title


def write_results(args, plan: Plan, busy, bw: dict, rows: list[dict], ratios: dict, targets: list[dict],
                  failed: dict, compression: dict | None) -> Path:
    """Everything measured, with settings and versions, as ``<out>/vlm_decode-<size>[-compression].json``."""
    import onnxruntime as ort

    from edgevlm.report import write_json

    versions = {"onnxruntime": ort.__version__, "llama_cpp_python": plan.llama_version, "numpy": np.__version__}
    try:
        import torch
        import transformers

        versions.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    # a --compression run without engines gets its own file (it does not overwrite the engines' results)
    out = args.out / f"vlm_decode-{args.size}{'' if args.engines else '-compression'}.json"
    write_json(out, {
        "size": args.size, "model": f"transformers {family(args.size)['model']}, random weights (normal std 0.02)",
        "config": model_config(args.size), "params": n_params(args.size),
        "prompt": {"image_tokens": args.image_tokens, "text_tokens": TEXT_TOKENS, "new_tokens": args.new_tokens,
                   "stop_tokens": "ignored", "greedy": True},
        "settings": {"runs": args.runs, "warmup_runs": 1, "threads": args.threads, "n_ctx_llama_cpp": plan.n_ctx,
                     "n_batch_llama_cpp": plan.n_ctx, "flash_attn_llama_cpp": args.flash_attn == "on",
                     "kv_cache_llama_cpp": "f16", "one_process_per_engine": True,
                     "ttft": "prefill of the whole prompt + picking the first token",
                     "decode_tok_s": "(new tokens - 1) / time after the first token"},
        "cpu_busy_before_timing": busy, "bandwidth": bw, "rows": rows, "ratios": ratios, "targets": targets,
        "skipped": plan.skipped, "failed": failed, "compression": compression, "artifacts": plan.arts,
        "cache": str(plan.cache), "machine": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
        "versions": versions, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    print(f"wrote {out}")
    return out


def main(argv=None) -> int:
    """Time every engine at one size and report it; in a process the parent started, run that one stage."""
    ap, args = parse_args(argv)
    cache = args.cache / f"vlm_decode-{args.size}"
    if run_worker(args, cache):                         # a stage the parent run started in a fresh process
        return 0
    plan = plan_run(args, cache, ap.error)
    build_artifacts(args, plan)
    context_and_prompt(args, plan, ap.error)
    busy, bw = prepare_machine(args, plan)
    results, failed = time_engines(args, plan)
    bw = bandwidth_after(args, bw)
    rows = engine_rows(args, plan, results, bw)
    ratios, targets = ratios_and_targets(rows)
    compression = time_compression(args, plan) if args.compression else None
    title = print_report(args, plan, busy, bw, rows, ratios, targets, failed, compression)
    out = write_results(args, plan, busy, bw, rows, ratios, targets, failed, compression)
    if any(r.get("decode_tok_s") for r in rows):
        print(_plot(rows, out.with_suffix(".png"), title.split(";")[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
