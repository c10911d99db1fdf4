"""Attention fusion: the ``attention_fusion`` graph rewrite a target profile names (``vlm.rewrites``).

:func:`fuse_attention` rewrites an exported decoder.onnx (the eager-attention trace of
:func:`edgevlm.exporters.vlm_onnx.export_decoder`) so each layer's attention is one ONNX Runtime
``com.microsoft.GroupQueryAttention`` that appends the new keys and values to a KV buffer shared by
``past_key_values.*`` and ``present.*`` (the runtime binds one buffer to both), instead of copying the whole
cache into a new ``present`` at every step. The graph's additive mask becomes the op's ``attention_bias``, so
causal and bidirectional-prefix (Moondream) masks keep working. New inputs: ``seqlens_k`` (1,) int32 and
``total_sequence_length`` int32; past and present become one KV buffer per layer (1, H_kv, capacity, hd).

With the model's rotary tables (:func:`rotary_tables`) the op applies RoPE itself (partial RoPE too), replacing
the model's RoPE ops (about a dozen small kernels per layer) and, where q, k and v are three projections of the
same input, packing them into one MatMul; that is kept only when the rewritten graph gives the same logits as
the input graph in the runtime's own decoder (a prefill and two steps), else RoPE stays the model's own ops and
the returned facts say why. A graph whose attention does not have the eager trace's shape is left as it is.

It is a compression step (a rewrite of an ONNX graph, like quantization), so it lives here: it reads and writes
ONNX files through :mod:`edgevlm.compress.onnx_io` and checks its result with the torch-free runtime's
``OrtDecoder``; torch is needed only by :func:`rotary_tables`, which reads the tables off the model. Only for
ONNX Runtime's CPU provider.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .onnx_io import file_bytes, load_graph, op_counts, read_initializer, save_streamed


# -- the eager trace's attention cores ----------------------------------------------------------------
_KV_PASSTHROUGH = ("Unsqueeze", "Expand", "Reshape", "Identity")     # transformers' repeat_kv for GQA
# normalizations between the head split and RoPE (Phi's qk_layernorm): the op's RoPE would skip them
_NORMS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "ReduceMean"}


def _const(graph, name: str, producers: dict, base_dir: Path | None = None):
    """A constant's value: an initializer (read from ``base_dir``'s data file when external) or a Constant node's."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return read_initializer(init, base_dir)
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
        crossing one, nor Shape ops): for q and k the tensor RoPE starts from, for v the projection. A
        normalization on the way (Phi's qk_layernorm) is noted in ``normed``."""
        found, stack, seen = [], [(t, 0)], set()
        while stack:
            x, d = stack.pop()
            n = prod.get(x)
            if n is None or id(n) in seen or d > limit or n.op_type == "Shape":
                continue
            seen.add(id(n))
            if n.op_type in _NORMS:
                normed.add(t)
            r = prod.get(n.input[0]) if n.op_type == "Transpose" and perm(n) == [0, 2, 1, 3] else None
            if r is not None and r.op_type == "Reshape":
                found.append((r.input[0], d))
                continue
            stack.extend((i, d + 1) for i in n.input if i)
        return found

    cores, normed = [], set()
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
                      "qk_normed": qk.input[0] in normed or ck.input[1] in normed,
                      "rope_in": {"q": q_in[0][0] if len(q_in) == 1 and q_in[0][1] > 0 else None,
                                  "k": k_in[0][0] if len(k_in) == 1 and k_in[0][1] > 0 else None,
                                  "v": v_in[0][0] if len(v_in) == 1 and v_in[0][1] == 0 else None}})
    return cores


# -- the rewrite ------------------------------------------------------------------------------------
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
                       rotary: tuple[np.ndarray, np.ndarray] | None, base_dir: Path | None = None) -> int:
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
            packed = _pack_qkv(g, ins, prod, f"gqa.{i}.qkv", base_dir)
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


def _pack_qkv(graph, outs: list[str], prod: dict, stem: str, base_dir: Path | None = None):
    """([MatMul, Add], packed output) computing the three projections ``outs`` (q, k, v) as one, when each is
    MatMul(x, W) or MatMul(x, W) + b of the same x with constant W and b; else None."""
    from onnx import helper, numpy_helper

    parts = []
    for t in outs:
        n, bias = prod.get(t), None
        if n is not None and n.op_type == "Add":
            a, b = n.input
            mm, b_name = (a, b) if getattr(prod.get(a), "op_type", None) == "MatMul" else (b, a)
            bias, n = _const(graph, b_name, prod, base_dir), prod.get(mm)
            if bias is None:
                return None
        if n is None or n.op_type != "MatMul":
            return None
        w = _const(graph, n.input[1], prod, base_dir)
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


# -- whether RoPE can move into the op, and the check that it did -------------------------------------
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
    normed = [i for i, c in enumerate(cores) if c["qk_normed"]]
    if normed:
        return (f"layer {normed[0]}: q and k are normalized per head before RoPE (qk_layernorm, as TinyGPT-V's Phi-2); "
                "the op would rotate them unnormalized")
    return None


def runtime_decoder(path: Path):
    """decoder.onnx in the runtime's own ``OrtDecoder`` on the CPU (past/present tensors, or the shared KV
    buffer bound as bundles run it); the KV head count and head size are read off the graph's static shapes.
    Also what :func:`edgevlm.exporters.vlm_onnx.decoder_parity` runs against eager."""
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
            dec = runtime_decoder(path)
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
    model = load_graph(path)                 # the weights stay on disk: those the rewrite reads are read one by one
    g = model.graph
    layers = sum(1 for i in g.input if i.name.startswith("past_key_values.")) // 2
    found = _attention_cores(g, layers) if layers else "no KV-cache inputs"
    if isinstance(found, str):
        return {"kv_cache": "concat", "why": found}
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
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fuse-") as tmp:
        cand = Path(tmp) / out.name                  # same name: its external data file keeps its name
        if why is None:
            packed = _rewrite_attention(model, found, num_heads, kv_heads, head_dim, rotary, path.parent)
            save_streamed(model, cand, path.parent)
            del model, g, found                          # the graph leaves memory before two sessions load
            gc.collect()
            why = _decoders_agree(path, cand, hidden) if hidden else "inputs_embeds has no static width"
            if why is not None:                          # RoPE stays the model's: start again from the file
                model = load_graph(path)
                found = _attention_cores(model.graph, layers)
        if why is not None:
            _rewrite_attention(model, found, num_heads, kv_heads, head_dim, None)
            save_streamed(model, cand, path.parent)
        stale = out.with_name(out.name + ".data")
        if stale.exists() and not cand.with_name(cand.name + ".data").exists():
            stale.unlink()
        for f in (cand, cand.with_name(cand.name + ".data")):
            if f.exists():
                os.replace(f, out.with_name(f.name))
    onnx.checker.check_model(str(out))
    facts = {"kv_cache": "shared buffer (com.microsoft.GroupQueryAttention, ONNX Runtime CPU)", "fused_layers": layers,
             "num_heads": num_heads, "file_bytes": file_bytes(out), "ops": op_counts(out)}
    if why is None:
        facts["rope"] = f"in GroupQueryAttention (do_rotary, rotary dim {2 * rotary[0].shape[1]}, " \
                        f"{rotary[0].shape[0]} positions), checked against the model's RoPE ops"
        facts["packed_qkv_layers"] = packed
    else:
        facts.update(rope="the model's own ops", rope_why=why)
    return facts


__all__ = ["fuse_attention", "rotary_tables", "runtime_decoder"]
