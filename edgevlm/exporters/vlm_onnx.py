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
      cpu target:         the same after the attention_fusion rewrite (edgevlm.compress.attention.fuse_attention),
                          plus seqlens_k (1,) int32 and total_sequence_length int32; past and present are one
                          KV buffer per layer (1, H_kv, capacity, hd)

The decoder is the transformers causal LM itself (its attention, RoPE and norms), traced with the dynamo
exporter through a wrapper that rebuilds a ``DynamicCache`` from the flat past tensors; the runtime owns
the mask, so causal, bidirectional-prefix (Moondream) and decode steps are one graph.

What this module holds: the exports (:func:`export_decoder`, :func:`export_embed_tokens`, :func:`export_part`),
the decoder's quantization by the target profile's method (:func:`quantize_decoder`), and the parity checks
against eager (:func:`part_parity`, :func:`eager_reference`, :func:`decoder_parity`). The graph rewrites that come
after the export are compression steps and live in :mod:`edgevlm.compress` (the shared-KV attention rewrite in
:mod:`edgevlm.compress.attention`), as do the ONNX save/inspect helpers (:mod:`edgevlm.compress.onnx_io`).

Nothing at module level needs torch or onnx: :func:`merge_crops_numpy` and :func:`attention_mask` are
numpy only, for the torch-free runtime; they live in ``edgevlm.runtime.vlm_ops`` and are re-exported here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compress.attention import runtime_decoder     # the decoder as the runtime runs it (decoder_parity)
from ..compress.onnx_io import EXTERNAL_DATA_BYTES, check_model, file_bytes, op_counts, quiet, save_model
# numpy only and shared with the torch-free runtime, so they live there (the runtime imports nothing from here)
from ..runtime.vlm_ops import MASK_MIN, attention_mask, decoder_io_names, merge_crops_numpy, splice_llava_mini
from .torch_export import export_module                # the one torch.onnx export wrapper
from .validate import logit_agreement, ort_session     # the one parity implementation and ORT session

# Trace sizes: not 0 or 1, which torch.export would specialize the dynamic axes to.
_TRACE_SEQ, _TRACE_PAST = 5, 3


# -- exporting ----------------------------------------------------------------------------------------
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


def hidden_norm(language_model, outputs: tuple[str, ...]):
    """The final norm whose input is the ``hidden`` output when ``outputs`` asks for it (else None); a one-line
    ExportError for an output no decoder gives, or a model without a final norm."""
    from ..errors import ExportError

    unknown = [o for o in outputs if o not in DECODER_EXTRA_OUTPUTS]
    if unknown:
        raise ExportError(f"the decoder cannot give the output(s) {', '.join(unknown)}",
                          f"declare only {', '.join(DECODER_EXTRA_OUTPUTS)} in the model's decoder_outputs")
    norm = _final_norm(language_model) if "hidden" in outputs else None
    if "hidden" in outputs and norm is None:
        raise ExportError(f"{type(language_model).__name__} has no final norm (model.final_layernorm or model.norm) "
                          "to read the hidden state before", "report the model")
    return norm


def decoder_sizes(language_model) -> tuple[dict, object]:
    """(layers, kv heads, head dim, hidden and vocabulary sizes; the LM's dtype), read off a real one-position
    forward: configs spell head_dim and kv heads differently."""
    import torch

    with torch.no_grad():
        dtype = language_model.get_input_embeddings().weight.dtype
        d = int(language_model.config.hidden_size)
        out = language_model(inputs_embeds=torch.zeros(1, 1, d, dtype=dtype), use_cache=True)
        k = out.past_key_values.layers[0].keys
        sizes = {"num_layers": len(out.past_key_values.layers), "num_kv_heads": int(k.shape[1]),
                 "head_dim": int(k.shape[3]), "hidden_size": d, "vocab_size": int(out.logits.shape[-1])}
    return sizes, dtype


def _decoder_wrapper(language_model, outputs: tuple[str, ...] = ()):
    from torch import nn
    from transformers import DynamicCache

    norm = hidden_norm(language_model, outputs)

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

    sizes, dtype = decoder_sizes(language_model)
    return DecoderWithCache(language_model).eval(), sizes, dtype


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
        ext = export_module(wrapper, args, path, opset, ins, outs, dyn, external_data, "language model")
        extra = _extra_outputs_check(wrapper, args, path, ins, outs, outputs) if outputs else None
    finally:
        cfg._attn_implementation = attn
    return {**sizes, "opset": opset, "exporter": "torch.onnx dynamo", "attention": "eager (matmul, softmax)",
            "inputs": ins, "outputs": outs, **({"extra_outputs": extra} if extra else {}),
            "dtype": str(dtype).replace("torch.", ""), "external_data": ext, "checker": check_model(path),
            "file_bytes": file_bytes(path), "ops": op_counts(path)}


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
        ext = export_module(Embed(emb).eval(), (torch.arange(_TRACE_SEQ)[None],), path, opset, ["input_ids"],
                      ["inputs_embeds"], dyn, what="token embeddings")
        how = "torch.onnx dynamo"
    return {"opset": opset, "exporter": how, "vocab_size": int(w.shape[0]), "hidden_size": int(w.shape[1]),
            "external_data": ext, "checker": check_model(path), "file_bytes": file_bytes(path), "ops": op_counts(path)}


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
    ext = export_module(spec.module, tuple(spec.example), path, opset, spec.inputs, spec.outputs, dyn,
                  what=spec.what or spec.name)
    facts = {"opset": opset, "exporter": "torch.onnx dynamo", "inputs": list(spec.inputs),
             "outputs": list(spec.outputs), "role": str(spec.role), **spec.facts}
    if spec.dynamic:
        facts["dynamic_axes"] = {i: {str(a): n for a, n in ax.items()} for i, ax in spec.dynamic.items()}
    return {**facts, "external_data": ext, "checker": check_model(path), "file_bytes": file_bytes(path),
            "ops": op_counts(path)}


def part_reference(spec) -> tuple[np.ndarray, ...]:
    """The part's eager outputs on the spec's example inputs, float32 arrays in ``spec.outputs`` order."""
    import torch

    with torch.inference_mode():
        ref = spec.module(*spec.example)
    return tuple(r.float().numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,)))


def part_parity(spec, path, precision: str = "fp32", reference: tuple | None = None) -> dict:
    """The part's graph in ONNX Runtime against its eager module on the spec's example inputs
    (validate.compare: FP32 within 1e-4 x max(1, scale), FP16 within 1e-2 relative, or ValidationError).
    ``reference``: the eager outputs already computed (:func:`part_reference`), once the module's weights are gone."""
    from .validate import compare

    refs = part_reference(spec) if reference is None else reference
    feeds = {n: (t.float() if t.is_floating_point() else t).numpy() for n, t in zip(spec.inputs, spec.example)}
    got = ort_session(path).run(None, feeds)
    recs = [compare(r, g, precision, n) for r, g, n in zip(refs, got, spec.outputs)]
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
    from ..compress.onnx_io import load_graph

    src, dst = Path(src), Path(dst)
    total = _fp32_weights(load_graph(src))        # counted from the graph: the weights stay on disk
    src_bytes = file_bytes(src)
    if (precision, method) == ("int8", "weights_qdq"):
        from ..compress.quantize import int8_weights_qdq

        model = onnx.load(str(src))
        done = int8_weights_qdq(model, ("MatMul", "Gemm"))
        save_model(model, dst)
        facts = {"method": "weight-only INT8: per-channel symmetric DequantizeLinear on MatMul/Gemm weights, "
                           "computed in float", "weight_bits": 8, "dequantize_linear": len(done)}
    elif (precision, method) == ("int4", "qdq"):
        from ..compress.quantize import _to_opset, int4_qdq

        model = _to_opset(onnx.load(str(src)), 21)
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
        with quiet():
            quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, use_external_data_format=big, reduce_range=REDUCE_RANGE,
                             extra_options={"MatMulConstBOnly": True})
        model = load_graph(dst)
        facts = {"method": "dynamic quantization: INT8 per-channel MatMul weights, activations quantized "
                           "per tensor at run time (onnxruntime quantize_dynamic)", "weight_bits": 7 if REDUCE_RANGE else 8,
                 "matmul_integer": sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
                                       for n in model.graph.node)}
    elif precision == "int4":
        from ..compress.quantize import matmulnbits_streamed

        n = matmulnbits_streamed(src, dst, block_size)           # one weight in memory at a time
        model = load_graph(dst)
        facts = {"method": f"block-wise symmetric weight-only INT4 (block {block_size}) as MatMulNBits",
                 "matmulnbits": n}
    elif precision == "fp16":
        # ONNX Runtime's converter, not onnxconverter_common's: that one leaves the exporter's Cast(to=float)
        # nodes in place and the session then refuses the graph (float16 value declared float).
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with quiet():
            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        save_model(model, dst)
        facts = {"method": "float16 weights and compute, float32 inputs/outputs (KV cache I/O float32)"}
    left = _fp32_weights(model)
    return {**facts, "precision": precision, "profile_method": method, "weights_total": total, "weights_quantized": total - left,
            "weight_coverage": round((total - left) / total, 4) if total else 0.0,
            "external_data": dst.with_name(dst.name + ".data").exists(), "file_bytes": file_bytes(dst),
            "fp32_file_bytes": src_bytes, "ops": op_counts(dst)}


# -- parity -----------------------------------------------------------------------------------------
def eager_reference(language_model, prompt_embeds, n_new: int = 32, bidirectional_prefix: int = 0) -> dict:
    """Eager transformers' greedy decode through the one decode loop (:func:`edgevlm.generation.decode_loop`, as
    VisionLanguageModel.decode_tokens runs it): prefill (the bidirectional-prefix mask when
    ``bidirectional_prefix`` > 1, else causal), then one token per step on its cache, no stop tokens. Returns
    {"tokens": [n_new ints], "logits": (n_new, V) float32, ...}."""
    import torch

    from ..generation import GenerationConfig, GenerationStats, decode_loop, pick_token

    lm = language_model.eval()
    dtype = lm.get_input_embeddings().weight.dtype
    emb = prompt_embeds if isinstance(prompt_embeds, torch.Tensor) else torch.from_numpy(np.asarray(prompt_embeds))
    emb = emb.detach().to(dtype)
    s, prefix = int(emb.shape[1]), int(bidirectional_prefix)
    cfg = GenerationConfig(max_new_tokens=n_new, stop_ids=())
    logits, state = [], {}

    def prefill():
        kwargs = {}
        if prefix > 1:
            kwargs["attention_mask"] = torch.from_numpy(attention_mask(s, 0, prefix)).to(dtype)
        out = lm(inputs_embeds=emb, use_cache=True, logits_to_keep=1, **kwargs)
        state["cache"] = out.past_key_values
        return out.logits[0, -1].float().numpy().copy()

    def step(tok: int):
        out = lm(input_ids=torch.tensor([[tok]]), past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values
        return out.logits[0, -1].float().numpy().copy()

    def pick(step_logits: np.ndarray) -> int:
        logits.append(step_logits)
        return pick_token(step_logits, cfg, None)

    with torch.inference_mode():
        tokens = list(decode_loop(prefill, step, pick, cfg, GenerationStats(), s, s + n_new))
    return {"tokens": tokens, "logits": np.stack(logits), "prompt_embeds": emb.float().numpy(),
            "bidirectional_prefix": prefix}


def decoder_parity(language_model, path, prompt_embeds, n_new: int = 32, bidirectional_prefix: int = 0,
                   embed_path=None, reference: dict | None = None) -> dict:
    """Greedy decode in ONNX Runtime against eager transformers, ``n_new`` steps from ``prompt_embeds``.

    Eager is :func:`eager_reference` (pass one as ``reference`` to compare several graphs against one
    eager run). The runtime's ``OrtDecoder`` runs the graph as bundles do (past/present tensors, or the shared
    KV buffer of :func:`edgevlm.compress.attention.fuse_attention`): a prefill with the 4-D mask (bidirectional
    for the first ``bidirectional_prefix`` positions when > 1), then one token per step, teacher-forced on
    eager's greedy tokens, so every step compares logits under the same context: ``first_divergence`` is the
    first step whose ONNX argmax differs (the free-running ONNX greedy sequence equals eager's up to there; None = all
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
    dec = runtime_decoder(path)
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
    agree = logit_agreement(e, o)                                 # the one parity implementation (validate.py)
    return {"steps": n_new, "prompt_tokens": s, "bidirectional_prefix": prefix, "eager_tokens": list(eager_tokens),
            "onnx_tokens": onnx_tokens, "token_agreement": agree["top1_agreement"],
            "first_divergence": agree["first_argmax_divergence"], "max_logit_abs_diff": agree["logits_max_abs_diff"],
            "mean_kl": agree["kl_mean"], "max_kl": agree["kl_max"], "kl_uniform_baseline": agree["kl_uniform_baseline"],
            "runtime": "onnxruntime CPUExecutionProvider", "teacher_forced": True}


__all__ = ["MASK_MIN", "attention_mask", "decoder_io_names", "decoder_parity", "eager_reference", "export_decoder",
           "export_embed_tokens", "export_part", "merge_crops_numpy", "part_parity", "part_reference", "quantize_decoder",
           "splice_llava_mini"]
