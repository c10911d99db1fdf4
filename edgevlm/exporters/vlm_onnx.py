"""A VLM as ONNX parts with the I/O of /work/notes/vlm_export_contract.md (names are fixed there).

The image-side parts are data each family declares (``model.export_parts``, :mod:`edgevlm.parts`), exported
and checked by :func:`export_part` and :func:`part_parity`; today they are:

    vision_encoder.onnx   pixel_values (V, 3, H, W)               -> image_embeds (1, T, D)
      Moondream instead:  vision_tower.onnx      pixel_values (V, 3, S, S) -> image_features (V, N, C)
                          [runtime: merge_crops_numpy (stitch + pool)] -> (N, 2C)
                          vision_projector.onnx  merged_features (N, 2C)  -> image_embeds (1, N, D)
      LLaVA-Mini also:    prefusion.onnx         inputs_embeds (1, M+N+L, D), keep (M+N+L,) -> fused
    embed_tokens.onnx     input_ids (1, S) int64                  -> inputs_embeds (1, S, D)
    decoder.onnx          inputs_embeds (1, S, D), attention_mask (1, 1, S, P+S) additive,
                          position_ids (1, S), past_key_values.{i}.key/value (1, H_kv, P, hd)
                          -> logits (1, V) of the last position, present.{i}.key/value (1, H_kv, P+S, hd)
      cpu target:         the same after fuse_attention, plus seqlens_k (1,) int32 and total_sequence_length
                          int32; past and present are one KV buffer per layer (1, H_kv, capacity, hd)

The decoder is the transformers causal LM itself (its attention, RoPE and norms), traced with the dynamo
exporter through a wrapper that rebuilds a ``DynamicCache`` from the flat past tensors; the runtime owns
the mask, so causal, bidirectional-prefix (Moondream) and decode steps are one graph.

Nothing at module level needs torch or onnx: :func:`merge_crops_numpy` and :func:`attention_mask` are
numpy only, for the torch-free runtime; they live in ``edgevlm.runtime.vlm_ops`` and are re-exported here.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np

# numpy only and shared with the torch-free runtime, so they live there (the runtime imports nothing from here)
from ..runtime.vlm_ops import MASK_MIN, attention_mask, decoder_io_names, merge_crops_numpy, splice_llava_mini
from .validate import ort_session          # the one exporter-side ONNX Runtime session

# Protobuf cannot serialize a model of 2 GiB or more; above this many bytes of weights (headroom left for
# the graph itself) a graph is saved with its weights in ``<file>.data`` next to it.
EXTERNAL_DATA_BYTES = 1_900_000_000
# Trace sizes: not 0 or 1, which torch.export would specialize the dynamic axes to.
_TRACE_SEQ, _TRACE_PAST = 5, 3


# -- saving and checking ----------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, warnings and optimizer logs (the CLI prints its own log)."""
    import logging

    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export",
                                                  "onnxruntime.quantization", "root")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _file_bytes(path: Path) -> int:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _ops(path: Path) -> dict[str, int]:
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items()))


def _check(path: Path) -> str:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)      # a path: works with external data too
    return "onnx.checker full_check passed"


def save_model(model, path: Path, external_data: bool | None = None) -> bool:
    """Save an ONNX ModelProto; weights go to ``<file>.data`` when ``external_data`` (None: when the
    initializers exceed EXTERNAL_DATA_BYTES). Returns whether external data was written."""
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = sum(i.ByteSize() for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()                     # save_model appends to an existing data file
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return bool(external_data)


def _export(module, args: tuple, path: Path, opset: int, input_names, output_names, dynamic_shapes,
            external_data: bool | None = None, what: str = "model") -> bool:
    """torch.onnx dynamo export of ``module(*args)`` to ``path``; returns whether weights are external."""
    import torch

    from ..errors import ExportError

    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=dynamic_shapes, verbose=False)
            path = Path(path)
            data = path.with_name(path.name + ".data")
            if data.exists():
                data.unlink()
            program.save(str(path), external_data=bool(external_data))
    except Exception as e:
        import re

        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise ExportError(f"torch.onnx could not export the {what}: {first}",
                          "report the model; try --opset 18") from None
    return bool(external_data)


# -- decoder ----------------------------------------------------------------------------------------
# Extra decoder outputs a family may declare (``VisionLanguageModel.decoder_outputs``), after the present KV outputs.
DECODER_EXTRA_OUTPUTS = {"hidden": "the last position's hidden state before the final norm, (1, D) float32"}


def _final_norm(language_model):
    """The causal LM's final norm (Phi: ``final_layernorm``, Llama/Qwen-style: ``norm``), or None."""
    base = getattr(language_model, "model", None)
    for name in ("final_layernorm", "norm"):
        m = getattr(base, name, None)
        if m is not None:
            return m
    return None


def _decoder_wrapper(language_model, outputs: tuple[str, ...] = ()):
    import torch
    from torch import nn
    from transformers import DynamicCache

    from ..errors import ExportError

    unknown = [o for o in outputs if o not in DECODER_EXTRA_OUTPUTS]
    if unknown:
        raise ExportError(f"the decoder cannot give the output(s) {', '.join(unknown)}",
                          f"declare only {', '.join(DECODER_EXTRA_OUTPUTS)} in the model's decoder_outputs")
    norm = _final_norm(language_model) if "hidden" in outputs else None
    if "hidden" in outputs and norm is None:
        raise ExportError(f"{type(language_model).__name__} has no final norm (model.final_layernorm or model.norm) "
                          "to read the hidden state before", "report the model")

    class DecoderWithCache(nn.Module):
        """Flat tensors in and out around the causal LM: the past becomes a DynamicCache, the grown
        cache comes back as present.{i}.key/value, logits of the last position only; with ``hidden``
        also the last position's input to the final norm (a forward pre-hook while tracing)."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, inputs_embeds, attention_mask, position_ids, past: tuple):
            if norm is None:
                return self._forward(inputs_embeds, attention_mask, position_ids, past)
            seen = []
            hook = norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            try:
                out = self._forward(inputs_embeds, attention_mask, position_ids, past)
            finally:
                hook.remove()
            return (*out, seen[-1][:, -1, :].float())

        def _forward(self, inputs_embeds, attention_mask, position_ids, past: tuple):
            # float32 I/O whatever the LM's dtype (a no-op for the FP32 export every precision starts from)
            dt = self.lm.get_input_embeddings().weight.dtype
            cache = DynamicCache(ddp_cache_data=[(past[2 * i].to(dt), past[2 * i + 1].to(dt))
                                                 for i in range(len(past) // 2)])
            out = self.lm(inputs_embeds=inputs_embeds.to(dt), attention_mask=attention_mask.to(dt),
                          position_ids=position_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys.float(), layer.values.float()]
            return (out.logits[:, -1, :].float(), *present)

    wrapper = DecoderWithCache(language_model).eval()
    # The sizes are read off a real forward (configs spell head_dim and kv heads differently).
    with torch.no_grad():
        dtype = language_model.get_input_embeddings().weight.dtype
        d = int(language_model.config.hidden_size)
        out = language_model(inputs_embeds=torch.zeros(1, 1, d, dtype=dtype), use_cache=True)
        k = out.past_key_values.layers[0].keys
        sizes = {"num_layers": len(out.past_key_values.layers), "num_kv_heads": int(k.shape[1]),
                 "head_dim": int(k.shape[3]), "hidden_size": d, "vocab_size": int(out.logits.shape[-1])}
    return wrapper, sizes, dtype


def export_decoder(language_model, path, opset: int = 18, external_data: bool | None = None,
                   outputs: tuple[str, ...] = ()) -> dict:
    """The causal LM as decoder.onnx (contract I/O, dynamic S and P, P = 0 for the first prefill).

    torch.onnx's dynamo exporter handles transformers' DynamicCache built from the flat inputs, including
    an empty past: the cache concatenates (1, H, 0, hd) with the new keys and the graph has no branch on P
    (checked by tests at P = 0). ``external_data``: None saves weights to ``decoder.onnx.data`` when the
    model is over ~2 GB (protobuf's limit), True/False forces it. ``outputs``: extra outputs the model declares
    (:data:`DECODER_EXTRA_OUTPUTS`), after the present KV; each is checked against eager on the trace inputs.
    """
    import torch

    path = Path(path)
    outputs = tuple(outputs)
    wrapper, sizes, dtype = _decoder_wrapper(language_model, outputs)
    n, h, hd, d = sizes["num_layers"], sizes["num_kv_heads"], sizes["head_dim"], sizes["hidden_size"]
    s, p = _TRACE_SEQ, _TRACE_PAST
    past = tuple(torch.zeros(1, h, p, hd) for _ in range(2 * n))
    args = (torch.randn(1, s, d), torch.from_numpy(attention_mask(s, p)), torch.arange(p, p + s)[None], past)
    seq, past_len = torch.export.Dim("seq", min=1), torch.export.Dim("past", min=0)
    # the mask's last axis is past + seq; torch.export derives it (AUTO) from the ops that combine them
    dyn = ({1: seq}, {2: seq, 3: torch.export.Dim.AUTO}, {1: seq}, tuple({2: past_len} for _ in past))
    ins, outs = decoder_io_names(n)
    outs = outs + list(outputs)
    # Traced with transformers' eager attention (q @ k^T, mask, softmax, @ v), whatever the model runs with:
    # its k^T is a Transpose ONNX Runtime folds into the matmul, where SDPA's decomposition copies every
    # layer's whole key cache through Reshape/Transpose/Reshape at each step (0.5B Phi INT4 decode in
    # benchmarks/vlm_decode.py: 39.7 vs 36.1 tok/s). Same maths; the parity checks hold it to eager.
    cfg = language_model.config
    attn = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        ext = _export(wrapper, args, path, opset, ins, outs, dyn, external_data, "language model")
        extra = _extra_outputs_check(wrapper, args, path, ins, outs, outputs) if outputs else None
    finally:
        cfg._attn_implementation = attn
    return {**sizes, "opset": opset, "exporter": "torch.onnx dynamo", "attention": "eager (matmul, softmax)",
            "inputs": ins, "outputs": outs, **({"extra_outputs": extra} if extra else {}),
            "dtype": str(dtype).replace("torch.", ""), "external_data": ext, "checker": _check(path),
            "file_bytes": _file_bytes(path), "ops": _ops(path)}


def _extra_outputs_check(wrapper, args, path: Path, ins: list, outs: list, outputs: tuple) -> dict:
    """The declared extra outputs of decoder.onnx against the traced wrapper on the trace inputs (FP32: within
    1e-4 x scale, else ValidationError); {name: parity record}."""
    import torch

    from .validate import compare

    with torch.no_grad():
        ref = wrapper(*args)
    flat = [args[0], args[1], args[2], *args[3]]
    got = ort_session(path).run(None, {n: t.numpy() for n, t in zip(ins, flat)})
    return {o: {**compare(ref[outs.index(o)].numpy(), got[outs.index(o)], "fp32", o),
                "meaning": DECODER_EXTRA_OUTPUTS[o]} for o in outputs}



# -- embeddings -------------------------------------------------------------------------------------
def export_embed_tokens(language_model, path, opset: int = 18) -> dict:
    """input_ids (1, S) int64 -> inputs_embeds (1, S, D) float32: the LM's input embedding table.

    A plain ``nn.Embedding`` is written directly as one Gather (exact, and no tracing); anything else
    (scaled or custom embeddings) goes through the dynamo exporter.
    """
    import torch
    from torch import nn

    path = Path(path)
    emb = language_model.get_input_embeddings()
    w = emb.weight
    if type(emb) is nn.Embedding and emb.max_norm is None:
        from onnx import TensorProto, helper, numpy_helper

        table = numpy_helper.from_array(w.detach().float().cpu().numpy(), "embed_tokens.weight")
        graph = helper.make_graph(
            [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], axis=0)],
            "embed_tokens", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
            [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "seq", int(w.shape[1])])],
            [table])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgevlm")
        ext = save_model(model, path)
        how = "onnx.helper Gather (the embedding table)"
    else:
        class Embed(nn.Module):
            def __init__(self, e):
                super().__init__()
                self.e = e

            def forward(self, input_ids):
                return self.e(input_ids).float()

        dyn = ({1: torch.export.Dim("seq", min=1)},)
        ext = _export(Embed(emb).eval(), (torch.arange(_TRACE_SEQ)[None],), path, opset, ["input_ids"],
                      ["inputs_embeds"], dyn, what="token embeddings")
        how = "torch.onnx dynamo"
    return {"opset": opset, "exporter": how, "vocab_size": int(w.shape[0]), "hidden_size": int(w.shape[1]),
            "external_data": ext, "checker": _check(path), "file_bytes": _file_bytes(path), "ops": _ops(path)}


# -- the family-declared parts (vision, projector, pre-fusion, heads) ------------------------------------
def export_part(spec, folder, opset: int = 18) -> dict:
    """One :class:`edgevlm.parts.PartSpec` as ``folder/<name>.onnx`` (torch.onnx dynamo, the spec's names and
    dynamic axes); returns the facts recorded in the part's manifest record."""
    import torch

    path = Path(folder) / spec.file
    dims: dict[str, object] = {}
    dyn = None
    if spec.dynamic:
        dyn = tuple({ax: dims.setdefault(n, torch.export.Dim(n, min=1)) for ax, n in spec.dynamic.get(i, {}).items()}
                    for i in spec.inputs)
    ext = _export(spec.module, tuple(spec.example), path, opset, spec.inputs, spec.outputs, dyn,
                  what=spec.what or spec.name)
    facts = {"opset": opset, "exporter": "torch.onnx dynamo", "inputs": list(spec.inputs),
             "outputs": list(spec.outputs), "role": str(spec.role), **spec.facts}
    if spec.dynamic:
        facts["dynamic_axes"] = {i: {str(a): n for a, n in ax.items()} for i, ax in spec.dynamic.items()}
    return {**facts, "external_data": ext, "checker": _check(path), "file_bytes": _file_bytes(path), "ops": _ops(path)}


def part_parity(spec, path, precision: str = "fp32") -> dict:
    """The part's graph in ONNX Runtime against its eager module on the spec's example inputs
    (validate.compare: FP32 within 1e-4 x max(1, scale), FP16 within 1e-2 relative, or ValidationError)."""
    import torch

    from .validate import compare

    with torch.inference_mode():
        ref = spec.module(*spec.example)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    feeds = {n: (t.float() if t.is_floating_point() else t).numpy() for n, t in zip(spec.inputs, spec.example)}
    got = ort_session(path).run(None, feeds)
    recs = [compare(r.float().numpy(), g, precision, n) for r, g, n in zip(refs, got, spec.outputs)]
    rec = recs[0] if len(recs) == 1 else {**recs[0], "outputs": recs,
                                          "passed": None if recs[0]["passed"] is None else all(r["passed"] for r in recs)}
    rec["runtime"] = "onnxruntime CPUExecutionProvider"
    return rec


# -- quantization -----------------------------------------------------------------------------------
def _fp32_weights(model) -> int:
    """FP32 weight elements (initializers of rank >= 2): what quantization has not touched."""
    from onnx import TensorProto

    return sum(int(np.prod(i.dims)) for i in model.graph.initializer
               if i.data_type == TensorProto.FLOAT and len(i.dims) >= 2 and not i.name.endswith("_scale"))


def quantize_decoder(src, dst, precision: str, block_size: int = 32, method: str | None = None) -> dict:
    """decoder.onnx at ``precision`` by the target profile's ``method`` (``vlm.decoder_int8`` / ``decoder_int4``):

    - ``int8`` ``dynamic`` (default): INT8 per-channel MatMul weights, activations quantized at run time
      (MatMulInteger; ONNX Runtime); ``weights_qdq``: per-channel symmetric INT8 DequantizeLinear on MatMul
      weights, computed in float (what TensorRT takes)
    - ``int4`` ``matmulnbits`` (default): block-wise symmetric MatMulNBits (ONNX Runtime); ``qdq``: blocked INT4
      DequantizeLinear at opset 21 (TensorRT 10's weight-only INT4)
    - ``fp16``: FP16 weights and compute, FP32 inputs/outputs so the KV cache I/O stays float32.

    Large results are saved with external data. Returns facts: method, layers/weights quantized, weight
    coverage, file size.
    """
    import onnx

    from ..errors import ConfigError

    if precision not in ("int8", "int4", "fp16"):
        raise ConfigError(f"{precision!r} is not a decoder precision here", "use fp16, int8 or int4 (fp32 is "
                          "the exported graph itself)")
    src, dst = Path(src), Path(dst)
    base = onnx.load(str(src))
    total = _fp32_weights(base)
    src_bytes = _file_bytes(src)
    if (precision, method) == ("int8", "weights_qdq"):
        from ..compress.quantize import int8_weights_qdq

        done = int8_weights_qdq(base, ("MatMul", "Gemm"))
        model = base
        save_model(model, dst)
        facts = {"method": "weight-only INT8: per-channel symmetric DequantizeLinear on MatMul/Gemm weights, "
                           "computed in float", "weight_bits": 8, "dequantize_linear": len(done)}
    elif (precision, method) == ("int4", "qdq"):
        from ..compress.quantize import _to_opset, int4_qdq

        model = _to_opset(base, 21)
        done = int4_qdq(model, block_size, ("MatMul", "Gemm"))
        save_model(model, dst)
        facts = {"method": f"block-wise symmetric weight-only INT4 (block {block_size}) as DequantizeLinear "
                           "(opset 21) on MatMul/Gemm weights", "dequantize_linear": len(done)}
    elif method not in (None, "dynamic", "matmulnbits") or (precision, method) in (("int8", "matmulnbits"),
                                                                                   ("int4", "dynamic")):
        raise ConfigError(f"{method!r} is not a {precision} decoder method", "fix the target profile's vlm block "
                          "(decoder_int8: dynamic | weights_qdq, decoder_int4: matmulnbits | qdq)")
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from ..compress.quantize import REDUCE_RANGE      # 7-bit weights: the same answers on CPUs without VNNI

        big = src_bytes / 4 > EXTERNAL_DATA_BYTES
        stale = dst.with_name(dst.name + ".data")
        if stale.exists():
            stale.unlink()                 # the quantizer would append to it
        with _quiet():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=big, reduce_range=REDUCE_RANGE,
                             extra_options={"MatMulConstBOnly": True})
        model = onnx.load(str(dst))
        facts = {"method": "dynamic quantization: INT8 per-channel MatMul weights, activations quantized "
                           "per tensor at run time (onnxruntime quantize_dynamic)", "weight_bits": 7 if REDUCE_RANGE else 8,
                 "matmul_integer": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                                       for n in model.graph.node)}
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        with _quiet():
            q = MatMulNBitsQuantizer(base, block_size=block_size, is_symmetric=True, accuracy_level=4)
            q.process()
        model = q.model.model
        save_model(model, dst)
        facts = {"method": f"block-wise symmetric weight-only INT4 (block {block_size}) as MatMulNBits",
                 "matmulnbits": sum(n.op_type == "MatMulNBits" for n in model.graph.node)}
    elif precision == "fp16":
        # ONNX Runtime's converter, not onnxconverter_common's: that one leaves the exporter's Cast(to=float)
        # nodes in place and the session then refuses the graph (float16 value declared float).
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with _quiet():
            model = convert_float_to_float16(base, keep_io_types=True)
        save_model(model, dst)
        facts = {"method": "float16 weights and compute, float32 inputs/outputs (KV cache I/O float32)"}
    left = _fp32_weights(model)
    return {**facts, "precision": precision, "profile_method": method, "weights_total": total, "weights_quantized": total - left,
            "weight_coverage": round((total - left) / total, 4) if total else 0.0,
            "external_data": dst.with_name(dst.name + ".data").exists(), "file_bytes": _file_bytes(dst),
            "fp32_file_bytes": src_bytes, "ops": _ops(dst)}


# -- attention with a shared KV buffer ---------------------------------------------------------------
_KV_PASSTHROUGH = ("Unsqueeze", "Expand", "Reshape", "Identity")     # transformers' repeat_kv for GQA


def _const(graph, name: str, producers: dict):
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _attention_cores(graph, num_layers: int) -> list[dict] | str:
    """Each layer's attention core in an eager-attention trace: present = Concat(past, new) for K and V,
    softmax(q @ kᵀ * scale + mask) @ v, heads merged by Transpose + Reshape. A reason string when a layer
    does not have exactly that shape (then nothing is rewritten)."""
    prod = {o: n for n in graph.node for o in n.output}
    cons: dict = {}
    for n in graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)

    def only(t: str, op: str | None = None):
        cs = cons.get(t, [])
        return cs[0] if len(cs) == 1 and (op is None or cs[0].op_type == op) else None

    def through(t: str):
        """The single consumer of a cache tensor after repeat_kv's ops (and those ops)."""
        via = []
        while True:
            c = only(t)
            if c is None or c.op_type not in _KV_PASSTHROUGH:
                return c, via
            via.append(c)
            t = c.output[0]

    def perm(n) -> list[int]:
        return [list(a.ints) for a in n.attribute if a.name == "perm"][0] if n is not None else []

    def head_split(t: str, limit: int = 12) -> list[tuple[str, int]]:
        """(X, depth) for each head split Transpose[0,2,1,3](Reshape(X)) among ``t``'s near ancestors (not
        crossing one, nor Shape ops): for q and k the tensor RoPE starts from, for v the projection."""
        found, stack, seen = [], [(t, 0)], set()
        while stack:
            x, d = stack.pop()
            n = prod.get(x)
            if n is None or id(n) in seen or d > limit or n.op_type == "Shape":
                continue
            seen.add(id(n))
            r = prod.get(n.input[0]) if n.op_type == "Transpose" and perm(n) == [0, 2, 1, 3] else None
            if r is not None and r.op_type == "Reshape":
                found.append((r.input[0], d))
                continue
            stack.extend((i, d + 1) for i in n.input if i)
        return found

    cores = []
    for i in range(num_layers):
        ck, cv = prod.get(f"present.{i}.key"), prod.get(f"present.{i}.value")
        if not (ck is not None and cv is not None and ck.op_type == cv.op_type == "Concat"
                and list(ck.input)[:1] == [f"past_key_values.{i}.key"] and len(ck.input) == 2
                and list(cv.input)[:1] == [f"past_key_values.{i}.value"] and len(cv.input) == 2):
            return f"layer {i}: present is not Concat(past, new)"
        tk, via_k = through(ck.output[0])
        if tk is None or tk.op_type != "Transpose" or perm(tk) != [0, 1, 3, 2]:
            return f"layer {i}: the key cache is not transposed for q @ kᵀ"
        qk = only(tk.output[0], "MatMul")
        mul = qk and only(qk.output[0], "Mul")
        add = mul and only(mul.output[0], "Add")
        sm = add and only(add.output[0], "Softmax")
        if sm is None or qk.input[1] != tk.output[0]:
            return f"layer {i}: not softmax(q @ kᵀ * scale + mask)"
        scale = _const(graph, mul.input[1], prod)
        mask = add.input[1] if add.input[0] == mul.output[0] else add.input[0]
        if scale is None or np.size(scale) != 1:
            return f"layer {i}: the attention scale is not a constant"
        pv, via_v = through(cv.output[0])
        if pv is None or pv.op_type != "MatMul" or list(pv.input) != [sm.output[0], (via_v[-1].output[0] if via_v
                                                                                     else cv.output[0])]:
            return f"layer {i}: probabilities are not multiplied by the value cache"
        tr = only(pv.output[0], "Transpose")
        merge = tr and perm(tr) == [0, 2, 1, 3] and only(tr.output[0], "Reshape")
        if not merge:
            return f"layer {i}: heads are not merged by Transpose + Reshape"
        q_in, k_in, v_in = head_split(qk.input[0]), head_split(ck.input[1]), head_split(cv.input[1])
        cores.append({"q": qk.input[0], "k": ck.input[1], "v": cv.input[1], "scale": float(np.reshape(scale, ())),
                      "mask": mask, "out": merge.output[0],
                      "nodes": [ck, cv, tk, qk, mul, add, sm, pv, tr, merge, *via_k, *via_v],
                      # (1, S, heads * hd) before the head split: q and k with ops (RoPE) between, v without
                      "rope_in": {"q": q_in[0][0] if len(q_in) == 1 and q_in[0][1] > 0 else None,
                                  "k": k_in[0][0] if len(k_in) == 1 and k_in[0][1] > 0 else None,
                                  "v": v_in[0][0] if len(v_in) == 1 and v_in[0][1] == 0 else None}})
    return cores


def rotary_tables(module, positions: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The model's own rotary embedding as ONNX Runtime's caches: cos and sin for positions
    0..``positions``-1, shape (positions, rotary_dim / 2). Read from the first transformers
    ``*RotaryEmbedding`` in ``module`` (so scaled RoPE variants come out as the model computes them); None
    when there is none or its tables are not rotate-half style (two equal halves)."""
    import torch

    rot = next((m for _, m in module.named_modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    if rot is None:
        return None
    try:
        with torch.no_grad():
            cos, sin = rot(torch.zeros(1, dtype=torch.float32), torch.arange(int(positions))[None])
    except (TypeError, ValueError, RuntimeError):          # not transformers' (x, position_ids) interface
        return None
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    h = cos.shape[-1] // 2
    if cos.ndim != 2 or not (np.array_equal(cos[:, :h], cos[:, h:]) and np.array_equal(sin[:, :h], sin[:, h:])):
        return None
    return np.ascontiguousarray(cos[:, :h]), np.ascontiguousarray(sin[:, :h])


def _rewrite_attention(model, cores: list[dict], num_heads: int, kv_heads: int, head_dim: int,
                       rotary: tuple[np.ndarray, np.ndarray] | None) -> int:
    """Replace each core by one GroupQueryAttention (see :func:`fuse_attention`), in place. With ``rotary``
    the op also applies RoPE (``do_rotary``, cos/sin caches, the graph's ``position_ids``) and reads q, k, v
    as they come out of their projections, packed into one where they are three of the same input; the
    model's RoPE, head transposes and separate projections are then dead and dropped. Returns how many
    layers got the packed projection."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    gone = {id(n) for c in cores for n in c["nodes"]}
    prod = {o: n for n in g.node for o in n.output}
    n_packed = 0
    at: dict = {}                          # the new nodes of a layer go where its old core ended (topological)
    if rotary is None:
        shapes = {"q": num_heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}
        for name, width in shapes.items():
            g.initializer.append(numpy_helper.from_array(np.array([0, 0, width], np.int64), f"gqa_merge_{name}"))
        rope = ["", "", ""]
    else:
        g.initializer.append(numpy_helper.from_array(rotary[0].astype(np.float32), "gqa_cos_cache"))
        g.initializer.append(numpy_helper.from_array(rotary[1].astype(np.float32), "gqa_sin_cache"))
        rope = ["gqa_cos_cache", "gqa_sin_cache", "position_ids"]
    for i, c in enumerate(cores):
        new = at.setdefault(id(c["nodes"][9]), [])
        if rotary is None:
            ins = []
            for name in ("q", "k", "v"):               # (1, heads, S, hd) -> (1, S, heads * hd)
                t = f"gqa.{i}.{name}"
                new.append(helper.make_node("Transpose", [c[name]], [t + ".bshd"], perm=[0, 2, 1, 3]))
                new.append(helper.make_node("Reshape", [t + ".bshd", f"gqa_merge_{name}"], [t]))
                ins.append(t)
        else:
            ins = [c["rope_in"][name] for name in ("q", "k", "v")]
            packed = _pack_qkv(g, ins, prod, f"gqa.{i}.qkv")
            if packed is not None:                       # one projection for q, k and v: the op's packed input
                new.extend(packed[0])
                ins = [packed[1], "", ""]
                n_packed += 1
        new.append(helper.make_node(
            "GroupQueryAttention",
            [*ins, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "seqlens_k", "total_sequence_length",
             *rope, c["mask"]],
            [c["out"], f"present.{i}.key", f"present.{i}.value"], name=f"gqa.{i}", domain="com.microsoft",
            num_heads=num_heads, kv_num_heads=kv_heads, scale=c["scale"], causal=0,
            do_rotary=int(rotary is not None), rotary_interleaved=0))
    keep = [m for n in g.node for m in (at.get(id(n), []) if id(n) in gone else [n])]
    needed = {o.name for o in g.output}
    alive = []
    for n in reversed(keep):                                         # drop what fed only the old cores
        if any(o in needed for o in n.output):
            alive.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(alive))
    if not any(a.g.node or a.graphs for n in g.node for a in n.attribute):     # no subgraph reads them
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        inits = [t for t in g.initializer if t.name in used]  # packed projections leave their parts unused
        del g.initializer[:]
        g.initializer.extend(inits)
    g.input.extend([helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
                    helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])])
    for vi in [*g.input, *g.output]:
        if vi.name.startswith(("past_key_values.", "present.")):
            vi.type.tensor_type.shape.dim[2].dim_param = "kv_buffer"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return n_packed


def _pack_qkv(graph, outs: list[str], prod: dict, stem: str):
    """([MatMul, Add], packed output) computing the three projections ``outs`` (q, k, v) as one, when each is
    MatMul(x, W) or MatMul(x, W) + b of the same x with constant W and b; else None."""
    from onnx import helper, numpy_helper

    parts = []
    for t in outs:
        n, bias = prod.get(t), None
        if n is not None and n.op_type == "Add":
            a, b = n.input
            mm, b_name = (a, b) if getattr(prod.get(a), "op_type", None) == "MatMul" else (b, a)
            bias, n = _const(graph, b_name, prod), prod.get(mm)
            if bias is None:
                return None
        if n is None or n.op_type != "MatMul":
            return None
        w = _const(graph, n.input[1], prod)
        if w is None or w.ndim != 2 or (bias is not None and bias.shape != (w.shape[1],)):
            return None
        parts.append((n.input[0], w, bias))
    if len({x for x, _, _ in parts}) != 1 or len({w.dtype for _, w, _ in parts}) != 1:
        return None
    w = np.concatenate([w for _, w, _ in parts], 1)
    biased = any(b is not None for _, _, b in parts)
    graph.initializer.append(numpy_helper.from_array(w, f"{stem}.weight"))
    nodes = [helper.make_node("MatMul", [parts[0][0], f"{stem}.weight"], [f"{stem}.mm" if biased else stem],
                              name=f"{stem}.matmul")]
    if biased:
        b = np.concatenate([bb if bb is not None else np.zeros(ww.shape[1], ww.dtype) for _, ww, bb in parts])
        graph.initializer.append(numpy_helper.from_array(b.astype(w.dtype), f"{stem}.bias"))
        nodes.append(helper.make_node("Add", [f"{stem}.mm", f"{stem}.bias"], [stem], name=f"{stem}.add"))
    return nodes, stem


# ops whose activations are quantized at run time: a rounding-level change upstream flips their rounding
_RUNTIME_ROUNDED = {"MatMulNBits", "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul",
                    "MatMulIntegerToFloat", "QLinearMatMul", "QuantizeLinear"}


def _rotary_problem(cores: list[dict], rotary, head_dim: int) -> str | None:
    """Why RoPE cannot move into the attention op (None: it can be tried)."""
    missing = [i for i, c in enumerate(cores) if None in c["rope_in"].values()]
    if missing:
        return f"layer {missing[0]}: q, k or v is not a projection split into heads (with RoPE on q and k)"
    cos, sin = rotary
    if cos.ndim != 2 or cos.shape != sin.shape or not 0 < 2 * cos.shape[1] <= head_dim:
        return f"rotary tables of shape {cos.shape} do not fit a head of {head_dim}"
    if cos.shape[1] % 8:
        return (f"ONNX Runtime's GroupQueryAttention rotates a multiple of 16 dimensions; this model rotates "
                f"{2 * cos.shape[1]}")
    return None


def _runtime_decoder(path: Path):
    """decoder.onnx in the runtime's own ``OrtDecoder`` on the CPU (past/present tensors, or the shared KV
    buffer bound as bundles run it); the KV head count and head size are read off the graph's static shapes."""
    from ..runtime.backends import usable_cpus
    from ..runtime.vlm import OrtDecoder, _Graph

    graph = _Graph(Path(path), ["CPUExecutionProvider"], "fp32", usable_cpus())
    past = [i for i in graph.session.get_inputs() if i.name.startswith("past_key_values.")]
    return OrtDecoder(graph, None, len(past) // 2, int(past[0].shape[1]), int(past[0].shape[3]))


def _decoders_agree(reference: Path, candidate: Path, hidden: int, tol: float = 1e-3) -> str | None:
    """Run both decoder graphs as the runtime does (a 5-position prefill, then two steps) on the same random
    embeddings; None when the logits agree to ``tol`` of their scale, else what differs."""
    x = np.random.default_rng(0).standard_normal((1, 7, hidden)).astype(np.float32)
    outs = []
    for path in (reference, candidate):
        try:
            dec = _runtime_decoder(path)
            outs.append(np.stack([dec.prefill(x[:, :5]), dec.step_embeds(x[:, 5]), dec.step_embeds(x[:, 6])]))
            dec.close()
        except Exception as e:     # any refusal by ONNX Runtime (its error types vary) means: keep the model's ops
            return f"ONNX Runtime: {str(e).strip().splitlines()[0][:160]}"
        del dec                                       # one session at a time
    diff, scale = float(np.abs(outs[0] - outs[1]).max()), float(np.abs(outs[0]).max())
    if not np.isfinite(outs[1]).all() or diff > tol * max(scale, 1.0):
        return f"logits differ from the input graph's (the model's own RoPE ops) by {diff:.3g} (scale {scale:.3g})"
    return None


def fuse_attention(path, num_heads: int, kv_heads: int, head_dim: int, dst=None, rotary=None) -> dict:
    """Rewrite decoder.onnx (in place, or into ``dst``) so each layer's attention is one ONNX Runtime
    ``com.microsoft.GroupQueryAttention`` that appends the new keys and values to a KV buffer shared by
    ``past_key_values.*`` and ``present.*`` (the runtime binds one buffer to both), instead of copying the
    whole cache into a new ``present`` at every step. The graph's additive mask becomes the op's
    ``attention_bias``, so causal and bidirectional-prefix masks keep working.
    New inputs: ``seqlens_k`` (1,) int32 = positions after this call - 1, ``total_sequence_length`` int32.

    ``rotary`` (:func:`rotary_tables`): the op applies RoPE itself (partial RoPE too) from these caches and
    the graph's ``position_ids``, replacing the model's RoPE ops (about a dozen small kernels per layer);
    kept only when the rewritten graph gives the same logits as the input graph on a prefill and two
    steps, else RoPE stays the model's own ops and the facts say why. Only for ONNX Runtime's CPU provider.
    A graph whose attention does not have the eager trace's shape is left as it is: the returned facts
    say ``kv_cache: concat`` and why.
    """
    import gc
    import os
    import tempfile

    import onnx

    path = Path(path)
    out = Path(dst) if dst is not None else path
    model = onnx.load(str(path))
    g = model.graph
    layers = sum(1 for i in g.input if i.name.startswith("past_key_values.")) // 2
    found = _attention_cores(g, layers) if layers else "no KV-cache inputs"
    if isinstance(found, str):
        return {"kv_cache": "concat", "why": found}
    external = path.with_name(path.name + ".data").exists()
    hidden = next((int(i.type.tensor_type.shape.dim[2].dim_value) for i in g.input if i.name == "inputs_embeds"), 0)
    quantized = sorted({n.op_type for n in g.node} & _RUNTIME_ROUNDED)
    if rotary is None:
        why = "no rotary tables (no rotate-half transformers RoPE module in the model)"
    elif quantized:
        why = (f"the graph is already quantized ({', '.join(quantized)}: activations rounded at run time), so "
               "moving RoPE cannot be checked exactly; fuse the FP32 graph, then quantize it")
    else:
        why = _rotary_problem(found, rotary, head_dim)
    packed = 0
    if why is None:
        packed = _rewrite_attention(model, found, num_heads, kv_heads, head_dim, rotary)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fuse-") as tmp:
            cand = Path(tmp) / out.name                  # same name: its external data file keeps its name
            save_model(model, cand, external_data=external)
            del model, g, found                          # the weights leave memory before two sessions load
            gc.collect()
            why = _decoders_agree(path, cand, hidden) if hidden else "inputs_embeds has no static width"
            if why is None:
                stale = out.with_name(out.name + ".data")
                if not external and stale.exists():
                    stale.unlink()
                for f in (cand, cand.with_name(cand.name + ".data")):
                    if f.exists():
                        os.replace(f, out.with_name(f.name))
        if why is not None:                              # RoPE stays the model's: start again from the file
            model = onnx.load(str(path))
            found = _attention_cores(model.graph, layers)
    if why is not None:
        _rewrite_attention(model, found, num_heads, kv_heads, head_dim, None)
        save_model(model, out, external_data=external)
    onnx.checker.check_model(str(out))
    facts = {"kv_cache": "shared buffer (com.microsoft.GroupQueryAttention, ONNX Runtime CPU)", "fused_layers": layers,
             "num_heads": num_heads, "file_bytes": _file_bytes(out), "ops": _ops(out)}
    if why is None:
        facts["rope"] = f"in GroupQueryAttention (do_rotary, rotary dim {2 * rotary[0].shape[1]}, " \
                        f"{rotary[0].shape[0]} positions), checked against the model's RoPE ops"
        facts["packed_qkv_layers"] = packed
    else:
        facts.update(rope="the model's own ops", rope_why=why)
    return facts


# -- parity -----------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def eager_reference(language_model, prompt_embeds, n_new: int = 32, bidirectional_prefix: int = 0) -> dict:
    """Eager transformers' greedy decode, as VisionLanguageModel.decode_tokens runs it: prefill (the
    bidirectional-prefix mask when ``bidirectional_prefix`` > 1, else causal), then one token per step
    on its cache, no stop tokens. Returns {"tokens": [n_new ints], "logits": (n_new, V) float32, ...}."""
    import torch

    lm = language_model.eval()
    dtype = lm.get_input_embeddings().weight.dtype
    emb = prompt_embeds if isinstance(prompt_embeds, torch.Tensor) else torch.from_numpy(np.asarray(prompt_embeds))
    emb = emb.detach().to(dtype)
    s, prefix = int(emb.shape[1]), int(bidirectional_prefix)
    logits, tokens = [], []
    with torch.inference_mode():
        kwargs = {}
        if prefix > 1:
            kwargs["attention_mask"] = torch.from_numpy(attention_mask(s, 0, prefix)).to(dtype)
        out = lm(inputs_embeds=emb, use_cache=True, logits_to_keep=1, **kwargs)
        for step in range(n_new):
            step_logits = out.logits[0, -1].float().numpy().copy()
            tokens.append(int(np.argmax(step_logits)))
            logits.append(step_logits)
            if step + 1 < n_new:
                out = lm(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                         use_cache=True)
    return {"tokens": tokens, "logits": np.stack(logits), "prompt_embeds": emb.float().numpy(),
            "bidirectional_prefix": prefix}


def decoder_parity(language_model, path, prompt_embeds, n_new: int = 32, bidirectional_prefix: int = 0,
                   embed_path=None, reference: dict | None = None) -> dict:
    """Greedy decode in ONNX Runtime against eager transformers, ``n_new`` steps from ``prompt_embeds``.

    Eager is :func:`eager_reference` (pass one as ``reference`` to compare several graphs against one
    eager run). The runtime's ``OrtDecoder`` runs the graph as bundles do (past/present tensors, or the shared
    KV buffer of :func:`fuse_attention`): a prefill with the 4-D mask (bidirectional for the first
    ``bidirectional_prefix`` positions when > 1), then one token per step, teacher-forced on eager's greedy
    tokens, so every step compares logits under the same context: ``first_divergence`` is the first step
    whose ONNX argmax differs (the free-running ONNX greedy sequence equals eager's up to there; None = all
    ``n_new`` tokens equal), ``token_agreement`` the fraction of steps whose argmax agrees. KL(eager || onnx)
    is averaged over steps; ``kl_uniform_baseline`` is KL(eager || uniform), what a model that knows nothing
    scores. New tokens are embedded by ``embed_path`` (embed_tokens.onnx) or the LM's embedding table.
    """
    from ..errors import ValidationError

    ref = reference or eager_reference(language_model, prompt_embeds, n_new, bidirectional_prefix)
    eager_tokens, e = ref["tokens"][:n_new], ref["logits"][:n_new]
    n_new, prefix, x0 = len(eager_tokens), int(ref["bidirectional_prefix"]), ref["prompt_embeds"]
    s = int(x0.shape[1])
    table = None if embed_path else language_model.get_input_embeddings().weight.detach().float().numpy()
    embed = ort_session(embed_path) if embed_path else None
    dec = _runtime_decoder(path)
    onnx_logits = [dec.prefill(x0, prefix).astype(np.float32)]
    for step in range(n_new - 1):
        tok = eager_tokens[step]                                  # teacher-forced on eager's greedy token
        if embed is not None:
            x = embed.run(None, {"input_ids": np.array([[tok]], np.int64)})[0]
        else:
            x = table[tok][None, None]
        onnx_logits.append(dec.step_embeds(x).astype(np.float32))
    dec.close()
    o = np.stack(onnx_logits)
    if not np.isfinite(o).all():
        raise ValidationError("decoder.onnx produced NaN or Inf logits", "export at fp32, or report the model")
    onnx_tokens = [int(t) for t in o.argmax(-1)]
    agree = [a == b for a, b in zip(eager_tokens, onnx_tokens)]
    le, lo = _log_softmax(e), _log_softmax(o)
    pe = np.exp(le)
    kl = (pe * (le - lo)).sum(-1)
    kl_uniform = (pe * (le + np.log(e.shape[-1]))).sum(-1)
    return {"steps": n_new, "prompt_tokens": s, "bidirectional_prefix": prefix, "eager_tokens": list(eager_tokens),
            "onnx_tokens": onnx_tokens, "token_agreement": float(np.mean(agree)),
            "first_divergence": next((i for i, a in enumerate(agree) if not a), None),
            "max_logit_abs_diff": float(np.abs(e.astype(np.float64) - o).max()),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "kl_uniform_baseline": float(kl_uniform.mean()),
            "runtime": "onnxruntime CPUExecutionProvider", "teacher_forced": True}


__all__ = ["MASK_MIN", "attention_mask", "decoder_io_names", "decoder_parity", "eager_reference", "export_decoder",
           "export_embed_tokens", "export_part", "merge_crops_numpy", "part_parity",
           "quantize_decoder", "fuse_attention", "rotary_tables", "save_model", "splice_llava_mini"]
