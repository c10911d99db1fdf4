"""A VLM's parts as Core ML ML Programs (the ios target's ``format: coreml``).

- The image-side parts the family declares (:class:`edgevlm.parts.PartSpec`: vision encoder, Moondream's tower and
  projector and region heads, LLaVA-Mini's pre-fusion) are traced and converted one by one, with the same input and
  output names as the ONNX parts; a declared dynamic axis becomes a flexible dimension (``ct.RangeDim``).
- The token embedding table is written raw (``embed_tokens.f16``: little-endian, row-major (vocab, hidden)), so an
  app looks rows up without a model call.
- The decoder is a **stateful** program (iOS 18): the KV cache lives in two Core ML states, ``key_cache`` and
  ``value_cache`` (layers, 1, kv heads, context, head dim; float16), written in place at the positions of each call.
  Inputs: ``inputs_embeds`` (1, S, D), the additive ``attention_mask`` (1, 1, S, P + S) (``runtime.vlm_ops``), and
  ``position_ids`` (1, S) int32; outputs: the last position's ``logits`` (1, V) (+ ``hidden`` for families that
  declare it). P, the positions already held, is the mask's last axis minus S, as in Apple's stateful LLM recipe.
- Precisions: fp32 computes in FLOAT32; fp16, int8 and int4 compute in FLOAT16, int8/int4 with weights compressed by
  ``coremltools.optimize`` (per-channel INT8, block-wise INT4; :func:`edgevlm.exporters.coreml.quantize`).

Each program is checked twice before the bundle is written: its TorchScript trace against eager PyTorch (the decoder
over a prefill and several steps, against the LM with its own cache), and the saved package through edgevlm's
reference ML-program interpreter (:mod:`edgevlm.runtime.mil`) against eager; then the runtime runs the whole bundle
(parity and golden cases) through the same interpreter.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..config import Precision
from ..errors import ExportError
from .coreml import _coremltools as _ct
from .coreml import _quiet, interpreted, package_size, quantize
from .validate import compare

DECODER_PART = "decoder_coreml"
DECODER_FILE = "decoder.mlpackage"
EMBED_FILE = "embed_tokens.f16"
STATES = ("key_cache", "value_cache")
STATEFUL_TARGET = "iOS18"          # Core ML states (MLState) need iOS 18 / macOS 15
# The additive mask's "masked" (float32 min in runtime.vlm_ops) is clamped to this inside the program: FP16 holds it
# (float32 min would become -inf, and -inf + -inf rows are NaN in a softmax).
MASK_FLOOR = -3.0e4
_TRACE_SEQ, _TRACE_PAST = 5, 3     # the shapes the decoder is traced at; both axes stay flexible


def _trace(module, example: tuple):
    """torch.jit.trace (what coremltools' PyTorch frontend reads), without its warnings: shapes are fixed or declared
    flexible on purpose, and every traced program is checked against eager afterwards."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)          # torch.jit.trace's deprecation notice
        return torch.jit.trace(module, example, check_trace=False)


def deployment_target(target, p: Precision) -> str:
    t = (target.minimum_deployment_target or {}).get(p.value)
    if not t:
        raise ExportError(f"target {target.name} names no Core ML deployment target for {p.value}",
                          f"add it under minimum_deployment_target in export/{target.name}.yaml")
    return t


def _later(a: str, b: str) -> str:
    return max(a, b, key=lambda t: int(t.removeprefix("iOS")))


def _save(mlmodel, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    with _quiet():
        mlmodel.save(str(path))


def _convert(traced, inputs, outputs, p: Precision, target_name: str, states=None, block_size: int = 32):
    """ct.convert + weight compression for ``p``; a one-line ExportError names the part on failure."""
    ct = _ct()
    try:
        with _quiet():
            ml = ct.convert(traced, inputs=inputs, outputs=outputs, states=states or None, convert_to="mlprogram",
                            minimum_deployment_target=ct.target[target_name],
                            compute_precision=ct.precision.FLOAT32 if p == Precision.FP32 else ct.precision.FLOAT16)
    except Exception as e:  # noqa: BLE001 -- coremltools raises whatever its frontend hit
        from ..errors import first_line

        raise ExportError(f"coremltools could not convert it: {first_line(e, 200)}",
                          "report the model; try another --target") from None
    if p in (Precision.INT8, Precision.INT4):
        ml = quantize(ml, p, block_size)
    return ml


def _tensor_type(spec, name: str, example):
    """A ct.TensorType for one input: int64 examples become int32 (Core ML has no int64 inputs); a dynamic axis
    becomes a flexible dimension from 1 to the bound the family declares (``PartSpec.bounds``)."""
    ct = _ct()
    dynamic = spec.dynamic.get(name, {})
    missing = [d for d in dynamic.values() if d not in spec.bounds]
    if missing:
        raise ExportError(f"part {spec.name}: the dynamic axis {missing[0]!r} of {name} has no bound, which Core ML's "
                          "flexible shapes need", "declare it in the family's PartSpec(bounds=...)")
    shape = tuple(ct.RangeDim(1, int(spec.bounds[dynamic[ax]]), default=int(n)) if ax in dynamic else int(n)
                  for ax, n in enumerate(example.shape))
    dtype = np.int32 if str(example.dtype) in ("torch.int64", "torch.int32", "torch.bool") else np.float32
    return ct.TensorType(name=name, shape=shape, dtype=dtype)


def _not_covered(base: dict) -> dict:
    return {"status": "not covered", "passed": None, **base,
            "why": "the reference interpreter has no implementation of these ops; parity is not claimed"}


def interpreter_parity(path: Path, feeds: dict, reference: dict, precision: str) -> dict:
    """The saved package through edgevlm's reference ML-program interpreter against eager outputs (per output)."""
    prog, base = interpreted(path)
    if prog.uncovered:
        return _not_covered(base)
    got = prog.predict(feeds)
    recs = {k: compare(np.asarray(v, np.float32), np.asarray(got[k], np.float32).reshape(np.shape(v)), precision, k)
            for k, v in reference.items()}
    return {"status": "ok", **base, "program_dtype": "fp32" if precision == "fp32" else "fp16", "outputs": recs,
            "max_abs_diff": max(r["max_abs_diff"] for r in recs.values()),
            "max_rel_diff": max(r.get("max_rel_diff", 0.0) for r in recs.values())}


# -- image-side parts ---------------------------------------------------------------------------------------------
def _BoolInputs(module, flags: list[bool]):
    """The part's module taking int32 where it takes bool (Core ML inputs have no bool type): nonzero = True."""
    import torch

    if not any(flags):
        return module

    class BoolInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *xs):
            return self.inner(*(x != 0 if f else x for x, f in zip(xs, flags)))

    return BoolInputs().eval()


def export_image_part(spec, p: Precision, target, work: Path, block_size: int, log) -> dict:
    """One PartSpec as ``<name>.mlpackage``: trace, trace parity, convert, compress, package parity."""
    import torch

    ct = _ct()
    tname = deployment_target(target, p)
    module = _BoolInputs(spec.module.eval(), [x.dtype == torch.bool for x in spec.example])
    example = tuple(x.to(torch.int32) if f else x for x, f in zip(spec.example, (x.dtype == torch.bool
                                                                                  for x in spec.example)))
    with torch.no_grad():
        ref = module(*example)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        try:
            traced = _trace(module, example)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"part {spec.name} ({spec.what or spec.name}) cannot be traced for Core ML: {e}"[:300],
                              "report the model") from None
        got = traced(*example)
        got = got if isinstance(got, (tuple, list)) else (got,)
    traced_parity = compare(ref[0].float().numpy(), got[0].float().numpy(), "fp32", spec.outputs[0])
    inputs = [_tensor_type(spec, n, x) for n, x in zip(spec.inputs, spec.example)]
    outputs = [ct.TensorType(name=n, dtype=np.float32) for n in spec.outputs]
    log(f"  {spec.name} ({spec.what or spec.name}): Core ML {tname}, {p.value}")
    try:
        ml = _convert(traced, inputs, outputs, p, tname, block_size=block_size)
    except ExportError as e:
        raise ExportError(f"part {spec.name}: {e.problem}", e.fix) from None
    path = Path(work) / f"{spec.name}.mlpackage"
    _save(ml, path)
    feeds = {n: x.numpy() for n, x in zip(spec.inputs, example)}
    parity = interpreter_parity(path, feeds, {n: r.float().numpy() for n, r in zip(spec.outputs, ref)}, p.value)
    _log_parity(log, parity)
    return {"path": path.name, "format": "coreml", "precision": p.value,
            "details": {"coreml": _facts(path, ml, tname, p), "facts": dict(spec.facts)},
            "parity": {"traced": traced_parity, "reference_interpreter": parity}}


def _log_parity(log, parity: dict) -> None:
    if parity["status"] == "ok":
        log(f"    reference interpreter: max abs {parity['max_abs_diff']:.2e}, max rel {parity['max_rel_diff']:.2e} "
            "[recorded]")
    else:
        log(f"    reference interpreter: not covered ({', '.join(parity['uncovered'])}) [parity not claimed]")


def _facts(path: Path, ml, tname: str, p: Precision) -> dict:
    ct = _ct()
    spec = ml.get_spec()
    return {"minimum_deployment_target": tname, "spec_version": int(spec.specificationVersion),
            "compute_precision": "FLOAT32" if p == Precision.FP32 else "FLOAT16",
            "weights": {Precision.INT8: "int8 per-channel symmetric", Precision.INT4: "int4 block-wise symmetric"}.get(
                p, "fp32" if p == Precision.FP32 else "fp16"),
            "coremltools_version": ct.__version__, "size_bytes": package_size(path)}


# -- token embedding --------------------------------------------------------------------------------------------
def write_embedding(language_model, work: Path) -> dict:
    """The LM's input embedding table, raw float16 (ios VLM bundles compute in FLOAT16; ``vlm.precisions``)."""
    from torch import nn

    emb = language_model.get_input_embeddings()
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        raise ExportError(f"{type(language_model).__name__}'s input embedding is {type(emb).__name__}, not a plain "
                          "table: Core ML bundles carry the table raw", "export for --target cpu or android")
    weight = emb.weight.detach().float().cpu().numpy()
    table = weight.astype("<f2")
    path = Path(work) / EMBED_FILE
    table.tofile(path)
    return {"path": path.name, "format": "raw", "precision": "fp16",
            "details": {"dtype": "float16", "shape": [int(s) for s in table.shape], "byte_order": "little",
                        "layout": "row-major (vocab, hidden)"},
            "parity": {"max_abs_diff": float(np.abs(table.astype(np.float32) - weight).max()),
                       "what": "the stored table against the model's, element by element"}}


# -- decoder ----------------------------------------------------------------------------------------------------
def decoder_module(language_model, context: int, outputs: tuple[str, ...] = ()):
    """The causal LM wrapped for a stateful Core ML program (see the module docstring); returns (module, sizes)."""
    import torch
    from torch import nn
    from transformers.cache_utils import Cache, CacheLayerMixin

    from .vlm_onnx import decoder_sizes, hidden_norm

    norm = hidden_norm(language_model, outputs)
    sizes, _ = decoder_sizes(language_model)
    n, h, hd = sizes["num_layers"], sizes["num_kv_heads"], sizes["head_dim"]

    class StateLayer(CacheLayerMixin):
        """One layer's view of the two state buffers: ``update`` writes the call's keys and values at positions
        [P, P + S) and returns positions [0, P + S) for attention (no empty tensor, even at P = 0)."""

        is_sliding = False
        is_compileable = False

        def __init__(self, owner, i: int):
            super().__init__()
            self.owner, self.i, self.is_initialized = owner, i, True

        def lazy_initialization(self, key_states):
            pass

        def update(self, key_states, value_states, cache_kwargs=None):
            o, i = self.owner, self.i
            o.key_cache[i, :, :, o.past:o.end] = key_states.to(o.key_cache.dtype)
            o.value_cache[i, :, :, o.past:o.end] = value_states.to(o.value_cache.dtype)
            return (o.key_cache[i, :, :, :o.end].to(key_states.dtype),
                    o.value_cache[i, :, :, :o.end].to(value_states.dtype))

        def get_mask_sizes(self, cache_position):
            return self.owner.end, 0

        def get_seq_length(self):
            return self.owner.past

        def get_max_cache_shape(self):
            return context

    class StatefulDecoder(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            self.register_buffer(STATES[0], torch.zeros(n, 1, h, context, hd, dtype=torch.float16))
            self.register_buffer(STATES[1], torch.zeros(n, 1, h, context, hd, dtype=torch.float16))

        def forward(self, inputs_embeds, attention_mask, position_ids):
            self.end = attention_mask.shape[-1]
            self.past = self.end - inputs_embeds.shape[1]
            cache = Cache(layers=[StateLayer(self, i) for i in range(n)])
            pos = position_ids.long()
            dtype = self.lm.get_input_embeddings().weight.dtype
            seen = []
            hook = norm.register_forward_pre_hook(lambda m, a: seen.append(a[0])) if norm is not None else None
            try:
                out = self.lm(inputs_embeds=inputs_embeds.to(dtype),
                              attention_mask=attention_mask.clamp(min=MASK_FLOOR).to(dtype), position_ids=pos,
                              cache_position=pos[0], past_key_values=cache, use_cache=True, logits_to_keep=1)
            finally:
                if hook is not None:
                    hook.remove()
            logits = out.logits[:, -1, :].float()
            return (logits, seen[-1][:, -1, :].float()) if norm is not None else logits

    return StatefulDecoder(language_model).eval(), sizes


def _steps(d: int, seed: int = 0) -> list[np.ndarray]:
    """The decoder check's calls: a prefill of 6 positions, then 4 single steps."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 6, d)).astype(np.float32)] + \
        [rng.standard_normal((1, 1, d)).astype(np.float32) for _ in range(4)]


def _feeds(x: np.ndarray, past: int) -> dict:
    from ..runtime.vlm_ops import attention_mask

    s = x.shape[1]
    return {"inputs_embeds": x, "attention_mask": attention_mask(s, past),
            "position_ids": np.arange(past, past + s, dtype=np.int32)[None]}


def _eager_steps(language_model, calls: list[np.ndarray], outputs: tuple[str, ...]) -> list[dict]:
    """The LM with its own (float32, dynamic) cache over the same calls: the reference every check compares with."""
    import torch

    from .vlm_onnx import _decoder_wrapper

    wrapper, sizes, _ = _decoder_wrapper(language_model, outputs)
    n, h, hd = sizes["num_layers"], sizes["num_kv_heads"], sizes["head_dim"]
    past = tuple(torch.zeros(1, h, 0, hd) for _ in range(2 * n))
    refs, done = [], 0
    with torch.no_grad():
        for x in calls:
            f = _feeds(x, done)
            out = wrapper(torch.from_numpy(x), torch.from_numpy(f["attention_mask"]),
                          torch.from_numpy(f["position_ids"]).long(), past)
            past = tuple(out[1:1 + 2 * n])
            refs.append({"logits": out[0].numpy(), **({"hidden": out[-1].numpy()} if outputs else {})})
            done += x.shape[1]
    return refs


def export_decoder(model, p: Precision, target, context: int, work: Path, block_size: int, log) -> dict:
    """``decoder.mlpackage``: the stateful decoder, checked over a prefill and 4 steps against the eager LM."""
    import torch

    ct = _ct()
    lm = model.language_model
    outputs = tuple(model.decoder_outputs)
    attn = lm.config._attn_implementation
    lm.config._attn_implementation = "eager"          # matmul/softmax attention, as the ONNX decoder
    try:
        module, sizes = decoder_module(lm, context, outputs)
        d, n, h, hd = sizes["hidden_size"], sizes["num_layers"], sizes["num_kv_heads"], sizes["head_dim"]
        calls = _steps(d)
        refs = _eager_steps(lm, calls, outputs)
        s, past = _TRACE_SEQ, _TRACE_PAST
        f = _feeds(np.zeros((1, s, d), np.float32), past)
        with torch.no_grad():
            traced = _trace(module, tuple(torch.from_numpy(f[k]) for k in ("inputs_embeds", "attention_mask",
                                                                            "position_ids")))
            traced_parity = _trace_parity(traced, calls, refs)
    finally:
        lm.config._attn_implementation = attn
    log(f"  decoder (stateful, {n} layers, KV states {n}x{h}x{context}x{hd} fp16): trace over 5 calls, "
        f"max abs {traced_parity['max_abs_diff']:.2e} against the eager LM")
    seq, end = ct.RangeDim(1, context, default=s), ct.RangeDim(1, context, default=s + past)
    inputs = [ct.TensorType(name="inputs_embeds", shape=(1, seq, d), dtype=np.float32),
              ct.TensorType(name="attention_mask", shape=(1, 1, seq, end), dtype=np.float32),
              ct.TensorType(name="position_ids", shape=(1, seq), dtype=np.int32)]
    outs = [ct.TensorType(name=o, dtype=np.float32) for o in ("logits", *outputs)]
    shape = (n, 1, h, context, hd)
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=x) for x in STATES]
    tname = _later(deployment_target(target, p), STATEFUL_TARGET)
    log(f"  decoder: Core ML {tname}, {p.value}")
    try:
        ml = _convert(traced, inputs, outs, p, tname, states=states, block_size=block_size)
    except ExportError as e:
        raise ExportError(f"decoder: {e.problem}", e.fix) from None
    path = Path(work) / DECODER_FILE
    _save(ml, path)
    parity = decoder_interpreter_parity(path, calls, refs, p.value)
    _log_parity(log, parity)
    return {"path": path.name, "format": "coreml", "precision": p.value,
            "details": {"coreml": _facts(path, ml, tname, p), "export": sizes, "context_length": int(context),
                        "max_prefill": int(context), "states": {x: list(shape) for x in STATES},
                        "state_dtype": "float16", "inputs": [i.name for i in inputs],
                        "outputs": ["logits", *outputs], "mask_floor": MASK_FLOOR},
            "parity": {"traced": traced_parity, "reference_interpreter": parity}}


def _trace_parity(traced, calls, refs) -> dict:
    """The traced stateful module (its own buffers, zeroed first) over the calls against the eager LM."""
    import torch

    for b in STATES:
        getattr(traced, b).zero_()
    done, recs = 0, []
    with torch.no_grad():
        for x, ref in zip(calls, refs):
            f = _feeds(x, done)
            got = traced(*(torch.from_numpy(f[k]) for k in ("inputs_embeds", "attention_mask", "position_ids")))
            got = got[0] if isinstance(got, tuple) else got
            recs.append(compare(ref["logits"], got.numpy(), "fp16", "logits"))
            done += x.shape[1]
    for b in STATES:
        getattr(traced, b).zero_()
    worst = max(r["max_abs_diff"] for r in recs)
    return {"calls": [x.shape[1] for x in calls], "max_abs_diff": worst,
            "max_rel_diff": max(r.get("max_rel_diff", 0.0) for r in recs),
            "what": "traced module (float16 KV states) against the eager LM (float32 cache), logits per call"}


def decoder_interpreter_parity(path: Path, calls, refs, precision: str) -> dict:
    """The saved stateful package through the reference interpreter over the same calls, one state throughout."""
    prog, base = interpreted(path)
    if prog.uncovered:
        return _not_covered(base)
    state, done, recs, top1 = prog.new_state(), 0, [], []
    for x, ref in zip(calls, refs):
        got = prog.predict(_feeds(x, done), state)
        top1.append(int(np.argmax(got["logits"])) == int(np.argmax(ref["logits"])))
        recs.append({k: compare(v, np.asarray(got[k], np.float32).reshape(v.shape), precision, k) for k, v in ref.items()})
        done += x.shape[1]
    flat = [r for rec in recs for r in rec.values()]
    return {"status": "ok", **base, "calls": [x.shape[1] for x in calls], "max_abs_diff": max(r["max_abs_diff"] for r in flat),
            "max_rel_diff": max(r.get("max_rel_diff", 0.0) for r in flat),
            "top1_agreement": float(np.mean(top1)), "per_call": recs}


# -- the pipeline's hook ------------------------------------------------------------------------------------------
def build_parts(model, image, p: Precision, cfg, target, work: Path, scratch: Path, log, formats) -> tuple[dict, dict]:
    """Every part of a Core ML VLM bundle; returns (parts, the decoder's sizes for the ``generation`` block)."""
    parts: dict = {}
    for spec in model.export_parts(image):
        parts[spec.name] = export_image_part(spec, p, target, work, cfg.block_size, log)
    log("  token embedding table (raw)")
    parts["embed_tokens"] = write_embedding(model.language_model, work)
    dec = export_decoder(model, p, target, int(model.max_context), work, cfg.block_size, log)
    parts[DECODER_PART] = dec
    return parts, {k: dec["details"]["export"][k] for k in ("num_layers", "num_kv_heads", "head_dim")}
