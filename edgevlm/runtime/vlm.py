"""Run a VLM bundle without torch: image -> vision graph -> prompt assembly -> decoder with a KV cache.

>>> from edgevlm import runtime
>>> vlm = runtime.load("bundles/edgevlm_scenes-cpu-int8")
>>> print(vlm.generate("scene.png", "How many circles?"))
>>> for piece in vlm.generate("scene.png", "describe the image.", stream=True):
...     print(piece, end="", flush=True)

The bundle's manifest carries everything besides the graphs (``generation``: image spec, prompt
assembly, stop ids, context length), so preprocessing and prompts are the eager model's, token for
token. Decoders: ONNX Runtime (``decoder.onnx``, KV cache as graph inputs/outputs, in cpu bundles one buffer
per layer bound to both, see :class:`OrtDecoder`) or llama.cpp
(``decoder.gguf`` through llama-cpp-python); the vision encoder and the token embeddings always run
in ONNX Runtime.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import BundleError, ConfigError, first_line
from ..generation import Generation, GenerationConfig, GenerationStats, decode_loop, pick_token
from ..processor import (ImageSpec, PromptPieces, PromptSpec, TextTokenizer, preprocess_image, stream_text,
                         tokenize_prompt)
from . import skills
from .backends import TRT_CACHE, OrtSession, open_part, usable_cpus
from ..bundle import resolve
from .vlm_ops import DECODERS, attention_mask, decoder_backends, merge_crops_numpy, splice_llava_mini



class _Graph:
    """One ONNX part in ONNX Runtime with named inputs (a thin layer over backends.OrtSession).

    ``expect``: the input names the runtime will feed; a graph without them (another part's graph in this part's
    place) is refused at load, and a failing run becomes a :class:`BundleError` naming the file."""

    def __init__(self, path: Path, providers: list[str], precision: str, threads: int | None,
                 expect: tuple[str, ...] = (), **session):
        self.path = Path(path)
        self.ort = OrtSession(path, providers, precision, threads, **session)
        self.session = self.ort.session
        self.outputs = [o.name for o in self.session.get_outputs()]
        have = {i.name for i in self.session.get_inputs()}
        missing = [n for n in expect if n not in have]
        if missing:
            raise BundleError(f"{self.path.name} is not the graph this part needs: it lacks the input(s) "
                              f"{', '.join(missing[:4])} (it takes {', '.join(sorted(have)[:4])})",
                              "re-export the bundle with `edgevlm export`")

    def __call__(self, **feeds) -> list[np.ndarray]:
        try:
            return self.session.run(None, feeds)
        except Exception as e:          # onnxruntime raises its own exception types (Fail, InvalidArgument, ...)
            raise BundleError(f"ONNX Runtime failed running {self.path.name}: {first_line(e)}",
                              "re-export the bundle with `edgevlm export`; if it persists, report it") from None


def _coreml_graph(*args, **kwargs):
    from .coreml import CoreMLGraph

    return CoreMLGraph(*args, **kwargs)


# The session class that runs a VLM bundle's parts, by the part's format (a new format adds its session here).
PART_SESSIONS = {"onnx": _Graph, "ort": _Graph, "coreml": _coreml_graph}

# The inputs each ONNX part of a VLM bundle is fed (see VLMPipeline); the decoder's are checked in OrtDecoder.
PART_INPUTS = {"vision_encoder": ("pixel_values",), "vision_tower": ("pixel_values",),
               "vision_projector": ("merged_features",), "embed_tokens": ("input_ids",),
               "prefusion": ("inputs_embeds", "keep"), "region": ("coord", "size", "coord_hidden", "size_hidden")}
DECODER_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")


class OrtDecoder:
    """decoder.onnx: inputs_embeds + additive mask + positions + past KV -> last logits + present KV.

    Two graph styles (the bundle's decoder says which by its inputs): past/present tensors that grow by a
    copy each call, or (``seqlens_k`` among the inputs, see ``compress.attention.fuse_attention``) one KV
    buffer per layer bound to both past and present, which ONNX Runtime appends to in place; the buffer
    doubles when a sequence outgrows it.

    ``step``: the same decoder with edgevlm's 4-bit kernel (``edgevlm.kernels``), sharing the weights and KV
    buffers, for one-position calls (decode steps) and for prompts of at least ``prompt_rows`` positions (the
    kernel's many-row path); shorter prompts run ``graph`` (see :func:`open_ort_decoder`). ``decode``: the step
    graph with edgevlm's one-position attention (``DecodeAttention``) in place of GroupQueryAttention, for decode
    steps only, when the kernel library has it.

    A decoder exported with the ``hidden`` output (a family that declares it, as Moondream2 for detect/point) also
    keeps the last position's pre-final-norm hidden state of each call in ``last_hidden`` (D,); ``gives_hidden``
    says whether it does.
    """

    name = "onnxruntime"
    FIRST_BUFFER = 256                   # positions of the shared KV buffer before it first grows

    def __init__(self, graph: _Graph, embed: _Graph | None, layers: int, kv_heads: int, head_dim: int,
                 step: _Graph | None = None, kernel: dict | None = None, prompt_rows: int | None = None,
                 decode: _Graph | None = None):
        self.graph, self.embed, self.step_graph = graph, embed, step
        self.decode_graph = decode if step is not None else None
        self.prompt_rows = prompt_rows if step is not None else None
        self.kernel = kernel or {"decode_kernel": "onnxruntime", "decode_kernel_why": "not asked for"}
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.providers = graph.ort.providers
        have = {i.name for i in graph.session.get_inputs()}
        self.shared_kv = "seqlens_k" in have
        self.gives_hidden = "hidden" in graph.outputs
        self._kv_names = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        need = list(DECODER_INPUTS) + [f"past_key_values.{n}" for n in self._kv_names]
        missing = [n for n in need if n not in have]
        if missing:
            raise BundleError(f"{graph.path.name} is not a decoder with {layers} layers: it lacks the input(s) "
                              f"{', '.join(missing[:4])}", "re-export the bundle with `edgevlm export`")
        if step is not None and not self.shared_kv:
            raise ValueError("a step graph needs the shared-KV decoder (fuse_attention)")
        self.reset()

    def reset(self) -> None:
        self.n_past = 0
        self.last_hidden: np.ndarray | None = None
        if self.shared_kv:
            self._buffers, self._bindings, self.capacity = None, {}, 0
        else:
            empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
            self.past = {f"past_key_values.{n}": empty for n in self._kv_names}

    def _grow(self, need: int) -> None:
        """Shared buffers of at least ``need`` positions, keeping what the old ones hold."""
        import onnxruntime as ort

        cap = max(need, 2 * self.capacity, self.FIRST_BUFFER)
        old = self._buffers
        self._buffers = {n: np.zeros((1, self.kv_heads, cap, self.head_dim), np.float32) for n in self._kv_names}
        if old is not None:
            for n, buf in old.items():
                self._buffers[n][:, :, :self.n_past] = buf[:, :, :self.n_past]
        values = {n: ort.OrtValue.ortvalue_from_numpy(buf) for n, buf in self._buffers.items()}
        self._bindings = {}
        for which, g in (("prompt", self.graph), ("step", self.step_graph), ("decode", self.decode_graph)):
            if g is None:
                continue
            b = g.session.io_binding()
            b.bind_output("logits", "cpu")                       # output 0
            if self.gives_hidden:
                b.bind_output("hidden", "cpu")                   # output 1
            for n, v in values.items():                           # ORT writes into the numpy arrays
                b.bind_ortvalue_input(f"past_key_values.{n}", v)
                b.bind_ortvalue_output(f"present.{n}", v)
            self._bindings[which] = (g, b)
        self.capacity = cap

    def _run(self, embeds: np.ndarray, prefix: int = 0, use_step: bool | None = None) -> np.ndarray:
        s = embeds.shape[1]
        mask = attention_mask(s, self.n_past, prefix if self.n_past == 0 else 0)
        pos = np.arange(self.n_past, self.n_past + s, dtype=np.int64)[None]
        x = np.ascontiguousarray(embeds, np.float32)
        if self.shared_kv:
            total = self.n_past + s
            if total > self.capacity:
                self._grow(total)
            if use_step is None:
                use_step = s == 1 or (self.prompt_rows is not None and s >= self.prompt_rows)
            which = "prompt"
            if use_step and "step" in self._bindings:
                which = "decode" if s == 1 and "decode" in self._bindings else "step"
            g, b = self._bindings[which]
            b.bind_cpu_input("inputs_embeds", x)
            b.bind_cpu_input("attention_mask", mask)
            b.bind_cpu_input("position_ids", pos)
            b.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
            b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
            try:
                g.session.run_with_iobinding(b)
            except Exception as e:       # onnxruntime's own exception types
                raise BundleError(f"ONNX Runtime failed running {g.path.name}: {first_line(e)}",
                                  "re-export the bundle with `edgevlm export`; if it persists, report it") from None
            got = b.get_outputs()
            logits = np.array(got[0].numpy())                  # a copy: ORT reuses that memory next call
            if self.gives_hidden:
                self.last_hidden = np.array(got[1].numpy()).reshape(-1)
        else:
            outs = self.graph(inputs_embeds=x, attention_mask=mask, position_ids=pos, **self.past)
            names = self.graph.outputs
            if "logits" not in names:
                raise BundleError(f"{self.graph.path.name} has no logits output", "re-export the bundle")
            logits = outs[names.index("logits")]
            for n in self._kv_names:
                self.past[f"past_key_values.{n}"] = outs[names.index(f"present.{n}")]
            if self.gives_hidden:
                self.last_hidden = outs[names.index("hidden")].reshape(-1)
        self.n_past += s
        return logits.reshape(-1)

    def prefill(self, embeds: np.ndarray, prefix: int = 0) -> np.ndarray:
        """(S, D) or (1, S, D) embeddings -> (V,) logits of the last position."""
        return self._run(embeds.reshape(1, -1, embeds.shape[-1]), prefix)

    def step(self, token: int) -> np.ndarray:
        emb = self.embed(input_ids=np.array([[token]], np.int64))[0]
        return self._run(emb)

    def step_embeds(self, embeds: np.ndarray) -> np.ndarray:
        """One more position from its embedding (1, 1, D) or (D,) -> (V,) logits."""
        return self._run(np.asarray(embeds, np.float32).reshape(1, 1, -1))

    def close(self) -> None:
        self._buffers, self._bindings = None, {}

    def check_step_kernel(self) -> float:
        """Relative max difference of the last logits, step graph vs prompt graph, over a short sequence of
        random embeddings (each position one call) and, when prompts run the kernel too (``prompt_rows``), a
        prompt of ``KERNEL_CHECK_PROMPT`` positions in one call; the larger of the two. Leaves the decoder empty."""
        d = int(self.graph.session.get_inputs()[0].shape[-1])
        rng = np.random.default_rng(0)
        x = rng.normal(0.0, 0.02, (KERNEL_CHECK_POSITIONS, d)).astype(np.float32)
        outs = []
        for use_step in (False, True):
            self.reset()
            for row in x:
                logits = self._run(row.reshape(1, 1, -1), use_step=use_step)
            outs.append(logits)
        diffs = [_rel_diff(*outs)]
        if self.prompt_rows is not None:
            p = rng.normal(0.0, 0.02, (1, max(KERNEL_CHECK_PROMPT, self.prompt_rows), d)).astype(np.float32)
            outs = []
            for use_step in (False, True):
                self.reset()
                outs.append(self._run(p, use_step=use_step))
            diffs.append(_rel_diff(*outs))
        self.reset()
        return max(diffs)


def _rel_diff(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref - got).max() / max(float(np.abs(ref).max()), 1e-12))


KERNEL_CHECK_POSITIONS = 4
KERNEL_CHECK_PROMPT = 32
# Prompts of at least this many positions run the kernel's many-row path, by the kernel's code path; shorter ones
# run ONNX Runtime's MatMulNBits, faster there (the kernel unpacks each 32-column panel of weights once per call).
# AVX-512 VNNI: measured (from 16 rows 1.4-2.4x MatMulNBits on one thread). AVX2: not measured on an AVX2-only
# CPU; on an AVX-512 one it matched MatMulNBits' AVX-512 kernel from 64 rows, so it starts there.
KERNEL_PROMPT_ROWS = {"avx512-vnni": 16, "avx2": 64}
# The load check guards against a kernel gone wrong (a layout or a build that does not match: logits then differ
# by their whole scale), not against rounding: edgevlm's kernel and MatMulNBits (accuracy level 4) both round
# activations to int8 per 32-block and agree to 1e-6 on one product (at larger blocks MatMulNBits rounds per
# block), but a deep random network amplifies that; measured over 4 positions of the random-weight benchmark
# decoders: 0.017 (1.3B) and 0.020 (0.5B) of the logit scale at block 32, 0.024 and 0.033 at block 128.
KERNEL_REL_TOL = 0.1


def open_ort_decoder(path: Path, providers: list[str], precision: str, threads: int | None, embed: _Graph | None,
                     layers: int, kv_heads: int, head_dim: int, kernels: bool | None = None,
                     cache_dir: Path | None = None) -> OrtDecoder:
    """An :class:`OrtDecoder` for ``path``; for 4-bit decoders on the CPU with edgevlm's kernel built here
    (``kernels``: None = when available, False = never; ``EDGEVLM_KERNELS=0`` also turns it off), decode steps and
    prompts of at least ``KERNEL_PROMPT_ROWS[isa]`` positions run ``MatMulQ4``, and decode steps' attention runs
    ``DecodeAttention`` where its GroupQueryAttention fits. The graph's weights move into arrays the sessions
    share, and a check at load compares the rewritten graphs' logits with the bundle's (above ``KERNEL_REL_TOL``
    neither is used). ``decoder.kernel`` says what was decided."""
    why = None
    if kernels is False or os.environ.get("EDGEVLM_KERNELS", "").strip() == "0":
        why = "turned off" + (" (EDGEVLM_KERNELS=0)" if kernels is not False else "")
    elif precision != "int4":
        # DecodeAttention comes with MatMulQ4's graphs only: a decode graph beside an FP32 or INT8 decoder would
        # hold a second copy of the weights ONNX Runtime prepacks for its products (+780 MiB peak at 0.5B INT8,
        # measured); MatMulQ4 reads them as they are
        why = f"a {precision} decoder (the kernel runs 4-bit weights)"
    elif Path(path).suffix == ".ort":
        why = "an ORT-format decoder (the kernel rewrites ONNX graphs; ONNX Runtime Mobile's MatMulNBits runs it)"
    elif _accelerators(providers):
        why = f"{_accelerators(providers)[0]} runs this decoder (the kernel is for the CPU provider)"
    lib = None
    if why is None:
        from .. import kernels as _kernels

        lib, why = _kernels.status()
    if why is None:
        try:
            import onnx
        except ImportError:
            why = "needs the onnx package (pip install onnx)"
    model = None
    if why is None:
        try:
            model = onnx.load(str(path))
        except Exception as e:           # onnx raises DecodeError, ValidationError, OSError ... for a bad file
            raise BundleError(f"{path} is not an ONNX graph onnx can read: {first_line(e, 120)}",
                              "re-export the bundle with `edgevlm export`") from None
        why = _kernel_misfit(model)
    if why is not None:
        model = None
        return OrtDecoder(_Graph(path, providers, precision, threads, cache_dir=cache_dir), embed, layers, kv_heads, head_dim,
                          kernel={"decode_kernel": "onnxruntime", "decode_kernel_why": why})
    attn_why = _attention_misfit(model)
    t = time.perf_counter()
    handed = [model]
    del model                            # _kernel_graphs drops the last reference before the sessions load
    try:
        prompt, step, decode, n, n_attn = _kernel_graphs(handed, path, providers, precision, threads, lib,
                                                         attention=attn_why is None)
    except BundleError as e:             # ONNX Runtime refused a rewritten graph: run the bundle as it is
        return OrtDecoder(_Graph(path, providers, precision, threads, cache_dir=cache_dir), embed, layers, kv_heads, head_dim,
                          kernel={"decode_kernel": "onnxruntime",
                                  "decode_kernel_why": f"the kernel's graphs did not load: {e.problem}"})
    rows = KERNEL_PROMPT_ROWS.get(_kernels.isa() or "")
    dec = OrtDecoder(prompt, embed, layers, kv_heads, head_dim, step=step, prompt_rows=rows, decode=decode)
    diff = dec.check_step_kernel()
    info = {"decode_kernel": f"edgevlm {_kernels.OP}", "decode_kernel_layers": n,
            "decode_attention": f"edgevlm {_kernels.ATTN_OP}" if n_attn else "onnxruntime GroupQueryAttention",
            "decode_kernel_check_rel_diff": round(diff, 6), "decode_kernel_setup_s": round(time.perf_counter() - t, 2)}
    if not n_attn:
        info["decode_attention_why"] = attn_why
    if not diff <= KERNEL_REL_TOL:
        dec.step_graph, dec.decode_graph, dec.prompt_rows = None, None, None
        dec.reset()
        bad = f"its logits differed from ONNX Runtime's by {diff:.3g} of their scale (> {KERNEL_REL_TOL})"
        del info["decode_kernel_layers"]
        info.update(decode_kernel="onnxruntime", decode_kernel_why=bad, decode_attention="onnxruntime GroupQueryAttention",
                    decode_attention_why=bad)
    elif rows is not None:
        info["prompt_kernel_min_positions"] = rows
    dec.kernel = info
    return dec


def _accelerators(providers: list[str]) -> list[str]:
    """The providers besides the CPU's that this machine's ONNX Runtime has."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [p for p in providers if p in have and p != "CPUExecutionProvider"]


PLACEHOLDER = "edgevlm-shared-weights.bin"


def _attention_misfit(model) -> str | None:
    """Why edgevlm's DecodeAttention cannot run ``model``'s decode steps, or None."""
    from .. import kernels as _kernels

    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not nodes or "seqlens_k" not in {i.name for i in model.graph.input}:
        return "the decoder has no fused attention (GroupQueryAttention with a shared KV buffer)"
    reasons = [r for r in map(_kernels.attention_misfit, nodes) if r]
    return f"its GroupQueryAttention does not fit: {reasons[0]}" if reasons else None


def _kernel_misfit(model) -> str | None:
    """Why edgevlm's kernel cannot run ``model``'s decode steps, or None."""
    from .. import kernels as _kernels

    reasons = [_kernels.eligible(n) for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not reasons:
        return "no MatMulNBits in the decoder"
    if all(reasons):
        return f"its MatMulNBits do not fit the kernel: {reasons[0]}"
    if "seqlens_k" not in {i.name for i in model.graph.input}:
        return "the decoder keeps its KV cache as graph outputs (no fused attention)"
    return None


def _kernel_graphs(handed: list, path: Path, providers: list[str], precision: str, threads: int | None, lib: Path,
                   attention: bool = True):
    """(graph for prompts, graph for steps with MatMulQ4, the step graph with DecodeAttention for decode steps or
    None, nodes rewritten to MatMulQ4, to DecodeAttention) over one copy of the weights of the onnx.ModelProto in
    ``handed`` (taken out, so the parsed model is freed before the sessions load).

    The weights move into numpy arrays handed to both sessions (``SessionOptions.add_initializer``, which uses
    the caller's memory as it is); the graphs keep each initializer's name, type and shape as external data in
    an empty sparse file, which ONNX Runtime checks exists and never reads. The graphs and that file live in a
    temporary directory only while the sessions load.
    """
    import onnx

    from .. import kernels as _kernels
    from ..scratch import scratch

    model = handed.pop()
    values, biggest = {}, 0
    for init in model.graph.initializer:
        raw = init.raw_data                  # a copy of the bytes each time it is read: read once
        if len(raw) < 1 << 16:
            continue
        arr = np.frombuffer(raw, dtype=onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).copy()
        del raw
        values[init.name] = arr.reshape(tuple(init.dims))
        biggest = max(biggest, arr.nbytes)
        init.ClearField("raw_data")
        init.data_location = init.EXTERNAL
        for key, value in (("location", PLACEHOLDER), ("offset", "0"), ("length", str(arr.nbytes))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    init = entry = None                  # sub-messages keep the parsed model alive
    import onnxruntime as ort

    shared = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in values.items()}
    with scratch("kernel") as d:
        with open(d / PLACEHOLDER, "wb") as f:
            f.truncate(biggest)
        onnx.save(model, d / path.name)
        n = _kernels.rewrite(model)
        onnx.save(model, d / f"step-{path.name}")
        n_attn = _kernels.rewrite_decode_attention(model) if attention else 0
        if n_attn:
            onnx.save(model, d / f"decode-{path.name}")
        del model
        prompt = _Graph(d / path.name, providers, precision, threads, initializers=shared)
        step = _Graph(d / f"step-{path.name}", providers, precision, threads, custom_ops=(lib,),
                      initializers=shared)
        decode = _Graph(d / f"decode-{path.name}", providers, precision, threads, custom_ops=(lib,),
                        initializers=shared) if n_attn else None
    return prompt, step, decode, n, n_attn


class VLMPipeline:
    """A loaded VLM bundle: ``generate(image, prompt, ...)`` streams or returns a :class:`Generation`. Bundles with
    a ``generation.skills`` block (Moondream2) also have ``caption``, ``query``, ``detect`` and ``point``
    (:mod:`edgevlm.runtime.skills`)."""

    def __init__(self, path: Path, manifest: dict, decoder: str | None = None, threads: int | None = None,
                 providers: list[str] | None = None, gpu_layers: int | None = None):
        self.path, self.manifest = Path(path), manifest
        gen = manifest.get("generation")
        parts = manifest.get("parts")
        if not isinstance(gen, dict) or not isinstance(parts, dict):
            raise BundleError(f"{path} lacks the generation/parts blocks of a VLM bundle", "export it again")
        fmt = manifest["target"].get("format")
        if fmt not in PART_SESSIONS:
            raise BundleError(f"{path} was exported for target {manifest['target'].get('name')!r} ({fmt}), which this "
                              "runtime cannot run here", "export the model again with --target cpu")
        self.spec = gen
        self.image_spec = ImageSpec.from_dict(gen["image"])
        self.context_length = int(gen["context_length"])
        self.stop_ids = tuple(int(i) for i in gen["stop_ids"])
        tok_file = self.file(gen.get("tokenizer", "tokenizer.json"), "the tokenizer")
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tok_file))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:       # tokenizers' errors, and a Rust panic (pyo3's PanicException is a BaseException)
            raise BundleError(f"{tok_file} is not a tokenizer the tokenizers package can read: "
                              f"{first_line(e, 120)}",
                              "re-export the bundle with `edgevlm export`") from None
        self.tokenizer = TextTokenizer(tok, gen["prompt"].get("bos_id"), tuple(gen.get("eos_ids", self.stop_ids)),
                                       str(tok_file))
        providers = list(providers or manifest["target"].get("providers", ["CPUExecutionProvider"]))
        self._providers = providers
        self.threads = threads or usable_cpus()
        self.gpu_layers = gpu_layers             # llama.cpp decoders: None = all where the build can offload
        self.trt_cache = self.path / TRT_CACHE   # ONNX Runtime's TensorRT provider keeps its engines in the bundle

        def graph(name: str) -> _Graph:
            rec = parts.get(name)
            if rec is None:
                raise BundleError(f"{path} has no {name} part", "copy the whole bundle directory again, or re-export")
            if rec.get("format") == "raw":                 # a table read directly (ios: embed_tokens.f16)
                from .coreml import RawEmbedding

                return RawEmbedding(self.file(rec["path"], f"part {name!r}"), rec.get("details") or {})
            expect = PART_INPUTS.get(name, ())
            kind = rec.get("format") if rec.get("format") in PART_SESSIONS else fmt
            return open_part(self.path, manifest, name, lambda: PART_SESSIONS[kind](    # a built TensorRT engine first
                self.file(rec["path"], f"part {name!r}"), providers, rec.get("precision", "fp32"), self.threads,
                expect=expect, cache_dir=self.trt_cache), expect=expect)

        vision = gen.get("vision", {}).get("kind", "encoder")
        if vision == "moondream_crops":
            self.vision_tower, self.vision_projector = graph("vision_tower"), graph("vision_projector")
            self.vision = None
        else:
            self.vision = graph("vision_encoder")
        self.embed = graph("embed_tokens")
        self.prefusion = graph("prefusion") if "prefusion" in gen else None
        self._graph, self._region = graph, None          # optional parts open on first use (region_heads)
        self.decoder = self._open_decoder(decoder, parts, graph)

    # -- backends ---------------------------------------------------------------------------------
    def _open_decoder(self, want: str | None, parts: dict, graph):
        have = decoder_backends(parts)
        if not have:
            raise BundleError(f"{self.path} holds no decoder", "re-export the bundle")
        if want is not None and want not in DECODERS:
            raise ConfigError(f"unknown decoder backend {want!r}", f"use one of: {', '.join(DECODERS)}")
        if want is not None and want not in have:
            raise ConfigError(f"{self.path} has no {want} decoder (it has: {', '.join(have)})",
                              f"re-export with --decoder {'gguf' if want == 'llama.cpp' else 'onnx'}, or pick "
                              f"--decoder-backend {have[0]}")
        choice = want or have[0]
        if choice == "coreml":
            from .coreml import CoreMLDecoder

            return CoreMLDecoder(self.file(parts["decoder_coreml"]["path"], "part 'decoder_coreml'"), self.embed,
                                 self.context_length)
        if choice == "llama.cpp":
            from .llamacpp import LlamaCppDecoder

            rec = parts["decoder_gguf"]
            # F32 bundles keep the KV cache in F32 (llama.cpp then runs attention without its F16 flash kernel),
            # so they reproduce eager greedy tokens; quantized ones use llama.cpp's default F16 cache.
            return LlamaCppDecoder(self.file(rec["path"], "part 'decoder_gguf'"), n_ctx=self.context_length, n_threads=self.threads,
                                   kv_cache="f32" if rec.get("precision") == "fp32" else "f16",
                                   gpu_layers=self.gpu_layers)
        g, rec = self.spec, parts["decoder"]
        engine = open_part(self.path, self.manifest, "decoder", lambda: None)     # a built TensorRT engine first
        if engine is not None:
            dec = OrtDecoder(engine, self.embed, int(g["num_layers"]), int(g["num_kv_heads"]), int(g["head_dim"]),
                             kernel={"decode_kernel": "tensorrt", "decode_kernel_why": "a TensorRT engine runs it"})
            dec.name = engine.name
            return dec
        return open_ort_decoder(self.file(rec["path"], "part 'decoder'"), self._providers, rec.get("precision", "fp32"), self.threads,
                                self.embed, int(g["num_layers"]), int(g["num_kv_heads"]), int(g["head_dim"]),
                                cache_dir=self.trt_cache)

    def verify(self):
        """Run the bundle's golden cases on this pipeline's decoder; a :class:`edgevlm.runtime.golden.Report`
        (``.passed``, ``.rows``)."""
        from .golden import verify

        return verify(self)

    def file(self, rel, what: str) -> Path:
        """A file the manifest names, after the bundle's containment checks (see :func:`edgevlm.bundle.resolve`)."""
        return resolve(self.path, self.manifest, rel, what)

    @property
    def backend(self) -> str:
        return self.decoder.name

    # -- image and prompt -------------------------------------------------------------------------
    def pixel_values(self, image) -> tuple[np.ndarray, tuple[int, int] | None]:
        if self.spec.get("vision", {}).get("kind") == "moondream_crops":
            from ..data.crops import overlap_crops_with_grid
            from ..data.images import load_image

            return overlap_crops_with_grid(load_image(image), self.image_spec)
        return preprocess_image(image, self.image_spec), None

    def encode_image(self, image) -> np.ndarray:
        """(1, T, D) image embeddings, as the eager model's ``encode_image``."""
        pixels, grid = self.pixel_values(image)
        if self.vision is not None:
            return self.vision(pixel_values=pixels.astype(np.float32))[0]
        v = self.spec["vision"]
        feats = self.vision_tower(pixel_values=pixels.astype(np.float32))[0]          # (V, N, C)
        merged = merge_crops_numpy(feats, grid, v["side"], v["margin"])               # (N, 2C)
        return self.vision_projector(merged_features=merged.astype(np.float32))[0]    # (1, N, D)

    def embed_ids(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros((1, 0, int(self.spec["hidden_size"])), np.float32)
        return self.embed(input_ids=np.asarray([ids], np.int64))[0]

    def prompt_pieces(self, prompt: str, with_image: bool) -> PromptPieces:
        p = self.spec["prompt"]
        if p["kind"] == "moondream":
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError("the question is empty", "pass a non-empty question, e.g. 'What is in this image?'")
            text = self.tokenizer.encode((" " if p.get("space_before_text") else "") + prompt)
            ids = list(p["prefix"]) + text + list(p["suffix"])
            bos = [int(p["bos_id"])]
            return PromptPieces(bos, ids, True) if with_image else PromptPieces(bos + ids, [], False)
        spec = PromptSpec(template=p["template"], bos=bool(p.get("bos", False)))
        return tokenize_prompt(self.tokenizer, spec, prompt, with_image=with_image)

    def prepare(self, image, prompt: str) -> tuple[np.ndarray, PromptPieces, int, int]:
        """(inputs_embeds (1, T, D), pieces, image tokens, bidirectional prefix length)."""
        if self.image_spec.mode == "idefics3_tiles":
            return self._prepare_tiles(image, prompt)
        pieces = self.prompt_pieces(prompt, image is not None)
        img = self.encode_image(image) if image is not None else None
        before, after = self.embed_ids(pieces.before), self.embed_ids(pieces.after)
        if img is None:
            return np.concatenate([before, after], 1), pieces, 0, 0
        fuse = self.spec.get("prefusion")
        if fuse is not None:
            return self._prefuse(img, pieces, fuse)
        prefix = before.shape[1] + img.shape[1] if self.spec.get("bidirectional_image_prefix") else 0
        return np.concatenate([before, img, after], 1), pieces, int(img.shape[1]), prefix

    def _prepare_tiles(self, image, prompt: str):
        """SmolVLM / Idefics3 (``image.mode`` idefics3_tiles): each view's embeddings (tiles, then the global view) in
        its own slot between the processor's text runs (data/crops.py, as the eager model assembles them)."""
        from ..data.crops import idefics3_text_runs, idefics3_tiles_with_grid
        from ..data.images import load_image
        from ..generation import check_prompt

        if prompt is None or not check_prompt(prompt).strip():
            raise ConfigError("the prompt is empty", "pass a question or an instruction, e.g. 'Describe this image.'")
        p, grid, img = self.spec["prompt"], None, None
        if image is not None:
            pixels, grid = idefics3_tiles_with_grid(load_image(image), self.image_spec)
            img = self.vision(pixel_values=pixels.astype(np.float32))[0]                  # (1, V*T, D)
        runs = [self.tokenizer.encode(t) if t else [] for t in idefics3_text_runs(p["template"], prompt, grid)]
        if p.get("bos") and self.tokenizer.bos_id is not None:
            runs[0] = [int(self.tokenizer.bos_id)] + runs[0]
        per = img.shape[1] // (len(runs) - 1) if img is not None else 0
        seq = [self.embed_ids(runs[0])]
        for v, run in enumerate(runs[1:]):
            seq += [img[:, v * per:(v + 1) * per], self.embed_ids(run)]
        pieces = PromptPieces(runs[0], [i for run in runs[1:] for i in run], img is not None)
        return np.concatenate(seq, 1), pieces, 0 if img is None else int(img.shape[1]), 0

    def _prefuse(self, img: np.ndarray, pieces: PromptPieces, fuse: dict):
        """LLaVA-Mini: pre-fusion over [M + N image tokens ; text], then [fused text | N tokens | fused text]."""
        ids = pieces.before + pieces.after
        text = self.embed_ids(ids)                                                   # (1, L, D)
        n_img, n = img.shape[1], int(fuse["n_tokens"])
        skip = set(int(i) for i in fuse.get("skip_ids", ()))
        keep = np.ones(n_img + len(ids), dtype=bool)
        keep[[n_img + i for i, t in enumerate(ids) if t in skip]] = False
        # prefusion.onnx passes skipped positions through as their input embedding, as the eager splice does
        x = self.prefusion(inputs_embeds=np.concatenate([img, text], 1).astype(np.float32), keep=keep)[0]
        return splice_llava_mini(x, n_img, n, len(pieces.before)), pieces, n, 0

    # -- generation -------------------------------------------------------------------------------
    def decode_tokens(self, embeds: np.ndarray, cfg: GenerationConfig, stats: GenerationStats,
                      prefix: int = 0) -> Iterator[int]:
        rng = np.random.default_rng(cfg.seed)
        self.decoder.reset()
        yield from decode_loop(lambda: self.decoder.prefill(embeds[0], prefix), self.decoder.step,
                               lambda logits: pick_token(logits, cfg, rng), cfg, stats, int(embeds.shape[1]),
                               self.context_length)

    def start(self, image, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
              top_k: int = 0, seed: int | None = None):
        """Encode and assemble; returns (embeds, config, stats, prefix) for :meth:`decode_tokens`."""
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, top_k, seed, self.stop_ids)
        t0 = time.perf_counter()
        embeds, pieces, n_img, prefix = self.prepare(image, prompt)
        stats = GenerationStats(prompt_tokens=pieces.n_text, image_tokens=n_img)
        stats.encode_s = time.perf_counter() - t0          # image + prompt, before the decoder's prefill
        return embeds, cfg, stats, prefix

    def generate(self, image, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stream: bool = False):
        """Answer ``prompt`` about ``image`` (path, bytes, PIL image or array; None for text only)."""
        embeds, cfg, stats, prefix = self.start(image, prompt, max_new_tokens, temperature, top_p, top_k, seed)
        return self.run_embeds(embeds, cfg, stats, prefix, stream)

    def run_embeds(self, embeds: np.ndarray, cfg: GenerationConfig, stats: GenerationStats, prefix: int = 0,
                   stream: bool = False):
        """Decode after assembled ``embeds``: a :class:`Generation`, or text pieces with ``stream``."""
        if stream:
            return self._stream(embeds, cfg, stats, prefix)
        ids = list(self.decode_tokens(embeds, cfg, stats, prefix))
        stats.time_to_first_token_s += stats.encode_s
        return Generation(self.tokenizer.decode(ids), ids, stats)

    # -- Moondream2's skills (edgevlm.runtime.skills; the bundle's generation.skills block) ----------
    def caption(self, image, length: str = "normal", stream: bool = False, max_new_tokens: int | None = None,
                temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        """A caption of ``length`` (short, normal, long): text, or pieces with ``stream``."""
        return skills.caption(self, image, length, stream, max_new_tokens, temperature, top_p, seed)

    def query(self, image, question: str, stream: bool = False, max_new_tokens: int | None = None,
              temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        """The answer text to ``question`` (or pieces with ``stream``); greedy by default."""
        return skills.query(self, image, question, stream, max_new_tokens, temperature, top_p, seed)

    def detect(self, image, object: str, max_objects: int = 50) -> list[dict]:
        """Boxes of ``object`` as {x_min, y_min, x_max, y_max} in [0, 1] (needs the region part and the ONNX decoder)."""
        return skills.detect(self, image, object, max_objects)

    def point(self, image, object: str, max_objects: int = 50) -> list[dict]:
        """Centre points of ``object`` as {x, y} in [0, 1) (needs the region part and the ONNX decoder)."""
        return skills.point(self, image, object, max_objects)

    def region_heads(self) -> skills.Region:
        """The ``region`` part, opened on first use."""
        if self._region is None:
            self._region = skills.Region(self._graph("region"), int(self.spec["hidden_size"]))
        return self._region

    def _stream(self, embeds, cfg, stats, prefix) -> Iterator[str]:
        self.last_stats = stats
        try:
            yield from stream_text(self.tokenizer, self.decode_tokens(embeds, cfg, stats, prefix))
        finally:
            stats.time_to_first_token_s += stats.encode_s
            self.decoder.reset()        # an interrupted stream leaves no half-filled cache behind

    def close(self) -> None:
        self.decoder.close()
