"""edgevlm.kernels: the MatMulQ4 custom op against ONNX Runtime's MatMulNBits and an exact int8 reference, the
graph rewrite, and a 4-bit decoder whose decode steps run it."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgevlm import kernels
from edgevlm.errors import ConfigError


def _need_kernel():
    path, why = kernels.status()
    if path is None:
        if os.environ.get("EDGEVLM_REQUIRE_KERNELS") == "1" and "CPU lacks" not in why:
            pytest.fail(f"edgevlm's kernel must run in CI: {why}")
        pytest.skip(f"edgevlm's kernel cannot run here: {why}")
    return path


def _quantized_matmul(k: int, n: int, block: int = 32, symmetric: bool = True, seed: int = 0) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", n])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    q = MatMulNBitsQuantizer(m, block_size=block, is_symmetric=symmetric, accuracy_level=4)
    q.process()
    return q.model.model


def _int8_reference(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """What the kernel computes, in float64: activations rounded to int8 per 32-block (scale max|a| / 127),
    weights (q - 8) * their block's scale, per-32-block dot products scaled by both scales."""
    k, n = a.shape[0], b.shape[0]
    blocks = a.reshape(k // 32, 32).astype(np.float64)
    amax = np.abs(blocks).max(1, keepdims=True)
    a_scale = amax / 127.0
    qa = np.rint(np.divide(blocks, a_scale, out=np.zeros_like(blocks), where=a_scale > 0))
    qw = np.stack([b & 15, b >> 4], -1).reshape(n, k // 32, 32).astype(np.float64) - 8
    per_block = np.einsum("nbj,bj->nb", qw, qa)
    w_scale = np.repeat(s.reshape(n, -1), k // 32 // s.reshape(n, -1).shape[1], axis=1)
    return (per_block * w_scale * a_scale[:, 0]).sum(1)


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("k,n,block", [(64, 5, 32), (2048, 100, 32), (4096, 33, 32), (256, 7, 64),
                                       (2048, 40, 128), (4096, 9, 256)])
def test_gemv_equals_the_int8_reference(k, n, block, isa, monkeypatch):
    """Both code paths (AVX-512 VNNI where the CPU has it, and AVX2) compute the same exact int8 products, for
    blocks of 32 and of multiples of 64."""
    _need_kernel()
    if isa == "avx2":
        monkeypatch.setenv("EDGEVLM_Q4_ISA", "avx2")
    rng = np.random.default_rng(k + n)
    b = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    s = rng.uniform(0.001, 0.02, (n, k // block)).astype(np.float32)
    a = rng.standard_normal(k).astype(np.float32)
    a[:32] = 0.0                                  # an all-zero block (scale 0) too
    y = kernels.gemv(a, b, s, k, n, block)
    ref = _int8_reference(a, b, s)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(y - ref).max()
    # and the whole computation is the 4-bit weights' product up to activation rounding
    w = (np.stack([b & 15, b >> 4], -1).reshape(n, k // block, block) - 8.0) * s[..., None]
    exact = w.reshape(n, k) @ a.astype(np.float64)
    assert np.abs(y - exact).max() <= 2e-2 * np.abs(exact).max()


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("m,k,n,block", [(4, 64, 5, 32), (7, 2048, 100, 32), (33, 1024, 64, 32), (9, 256, 7, 64),
                                         (13, 2048, 40, 128), (5, 4096, 70, 256), (6, 128, 96, 64)])
def test_many_rows_equal_the_int8_reference(m, k, n, block, isa, monkeypatch):
    """The many-row path (prompts: unpacked 32-column panels, rows a register tile at a time, both code paths)
    computes each row's exact int8 products: full panels and a partial last one, every remainder of rows past
    the last full tile (AVX-512: a narrower tile of 1-3 rows; AVX2: padded to its tile of 2)."""
    _need_kernel()
    if isa == "avx2":
        monkeypatch.setenv("EDGEVLM_Q4_ISA", "avx2")
    rng = np.random.default_rng(m * k + n)
    b = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
    s = rng.uniform(0.001, 0.02, (n, k // block)).astype(np.float32)
    a = rng.standard_normal((m, k)).astype(np.float32)
    a[0, :32] = 0.0
    a[-1, -64:] *= 1000.0                         # rows of very different scales
    y = kernels.gemm(a, b, s, k, n, block)
    assert y.shape == (m, n)
    for row, got in zip(a, y):
        ref = _int8_reference(row, b, s)
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(got - ref).max()
        # and the one-row path (decode steps) gives the same products
        one = kernels.gemv(row, b, s, k, n, block)
        assert np.abs(got - one).max() <= 1e-5 * np.abs(one).max()


@pytest.mark.parametrize("block", [32, 128])
def test_the_op_gives_matmulnbits_results_for_any_leading_shape(block):
    """Block 32: MatMulNBits' results (both round activations to int8 per 32). Larger blocks: MatMulNBits rounds
    activations per weight block, the kernel still per 32, so it lands at least as close to the exact product."""
    import onnxruntime as ort

    lib = _need_kernel()
    m = _quantized_matmul(512, 96, block=block)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    node = m.graph.node[0]
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    b, s = inits[node.input[1]], inits[node.input[2]].reshape(96, -1)
    w = ((np.stack([b & 15, b >> 4], -1).reshape(96, -1, block) - 8.0) * s[..., None]).reshape(96, 512)
    mine = onnx.ModelProto()
    mine.CopyFrom(m)
    assert kernels.rewrite(mine) == 1
    assert [n.op_type for n in mine.graph.node] == ["MatMulQ4"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(mine.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 512), (2, 3, 512), (1, 0, 512), (1, 37, 512), (3, 16, 512)]:   # the last two: many rows
        x = rng.standard_normal(shape).astype(np.float32)
        want, got = ref.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
        assert got.shape == want.shape == shape[:2] + (96,)
        if not x.size:
            continue
        exact = x.astype(np.float64) @ w.T
        err_mine, err_ort = np.abs(got - exact).max(), np.abs(want - exact).max()
        if block == 32:
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()
        else:
            assert err_mine <= err_ort, (err_mine, err_ort)
        assert err_mine <= 1e-2 * np.abs(exact).max()


def _with_bias(m: onnx.ModelProto, n: int, bias_const: bool = True, reuse: bool = False) -> onnx.ModelProto:
    """``m`` (x -> MatMulNBits -> y) with ``y = product + bias`` after it: a constant [n] bias, or a second graph
    input; ``reuse``: the product also feeds a second output, so the Add cannot go into the op."""
    g = m.graph
    node = g.node[0]
    node.output[0] = "prod"
    bias = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    if bias_const:
        g.initializer.append(numpy_helper.from_array(bias, "bias"))
    else:
        g.input.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [n]))
    g.node.append(helper.make_node("Add", ["prod", "bias"], ["y"]))
    if reuse:
        g.node.append(helper.make_node("Identity", ["prod"], ["raw"]))
        g.output.append(helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["B", "S", n]))
    return m


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_a_bias_add_after_the_product_goes_into_the_op(isa, monkeypatch):
    """A linear layer's bias (a constant [N] Add right after the product) is folded into MatMulQ4 (one node less
    per layer and step) and added by both paths; an Add of a non-constant, or after a product something else
    reads too, stays."""
    import onnxruntime as ort

    lib = _need_kernel()
    if isa == "avx2":
        monkeypatch.setenv("EDGEVLM_Q4_ISA", "avx2")
    m = _with_bias(_quantized_matmul(512, 96), 96)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    mine = onnx.ModelProto()
    mine.CopyFrom(m)
    assert kernels.rewrite(mine) == 1
    assert [n.op_type for n in mine.graph.node] == ["MatMulQ4"]
    assert list(mine.graph.node[0].input)[3] == "bias" and list(mine.graph.node[0].output) == ["y"]
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(mine.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    for shape in [(1, 1, 512), (1, 37, 512), (2, 2, 512), (1, 70, 512)]:    # one row, many rows, a few rows
        x = rng.standard_normal(shape).astype(np.float32)
        want, got = ref.run(None, {"x": x})[0], sess.run(None, {"x": x})[0]
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()
    for model in (_with_bias(_quantized_matmul(512, 96), 96, bias_const=False),
                  _with_bias(_quantized_matmul(512, 96), 96, reuse=True)):
        assert kernels.rewrite(model) == 1
        assert [n.op_type for n in model.graph.node][:2] == ["MatMulQ4", "Add"]
        assert len(model.graph.node[0].input) == 3
    # the library's test entries add it too, on both paths
    node = m.graph.node[0]
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    b, s, bias = inits[node.input[1]], inits[node.input[2]].reshape(96, -1), inits["bias"]
    a = rng.standard_normal((9, 512)).astype(np.float32)
    plain = kernels.gemm(a, b, s, 512, 96)
    assert np.allclose(kernels.gemm(a, b, s, 512, 96, bias=bias), plain + bias, rtol=0, atol=1e-5)
    assert np.allclose(kernels.gemv(a[0], b, s, 512, 96, bias=bias), kernels.gemv(a[0], b, s, 512, 96) + bias,
                       rtol=0, atol=1e-5)


def _gqa_graph(op: str, heads: int, kv: int, d: int, packed: bool, rotary: bool, cap: int, table: int = 64):
    """One attention node (ONNX Runtime's GroupQueryAttention, or edgevlm's DecodeAttention) with every input a
    graph input, as edgevlm's fused decoders call it."""
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", f, [1, "S", (heads + 2 * kv) * d if packed else heads * d])]
    names = ["q", "", ""]
    if not packed:
        ins += [helper.make_tensor_value_info(n, f, [1, "S", kv * d]) for n in ("k", "v")]
        names = ["q", "k", "v"]
    ins += [helper.make_tensor_value_info(n, f, [1, kv, cap, d]) for n in ("pk", "pv")]
    ins += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    rope = ["", "", ""]
    if rotary:
        ins += [helper.make_tensor_value_info(n, f, [table, d // 4]) for n in ("cos", "sin")]
        ins += [helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "S"])]
        rope = ["cos", "sin", "pos"]
    ins.append(helper.make_tensor_value_info("bias", f, [1, 1, "S", "T"]))
    outs = [helper.make_tensor_value_info("out", f, None), helper.make_tensor_value_info("present_k", f, None),
            helper.make_tensor_value_info("present_v", f, None)]
    node = helper.make_node(op, [*names, "pk", "pv", "seqlens_k", "total", *rope, "bias"],
                            ["out", "present_k", "present_v"], domain="com.microsoft" if op != kernels.ATTN_OP
                            else kernels.DOMAIN, num_heads=heads, kv_num_heads=kv, scale=0.3, do_rotary=int(rotary),
                            rotary_interleaved=0)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(node.domain, 1)]
    return helper.make_model(helper.make_graph([node], "g", ins, outs), opset_imports=opsets)


@pytest.mark.parametrize("heads,kv,packed,rotary,past", [(4, 2, True, True, 9), (2, 2, False, False, 0),
                                                         (4, 1, False, True, 300)])
def test_decode_attention_gives_group_query_attentions_step(heads, kv, packed, rotary, past):
    """DecodeAttention (one decode step) against ONNX Runtime's GroupQueryAttention on the same inputs: grouped
    heads, packed or separate q/k/v, RoPE on half the head or none, an additive bias that masks a position, a
    past of 0, 9 or 300 positions (the last: its heads run on the thread pool) in a buffer larger than needed;
    the output and the present key/value (the past copied, the new position appended) agree."""
    import onnxruntime as ort

    lib = _need_kernel()
    d, cap = 32, 512                                  # RoPE on 16 of 32 dims (ORT wants a multiple of 8)
    rng = np.random.default_rng(heads + past)
    total = past + 1
    feeds = {"q": rng.standard_normal((1, 1, (heads + 2 * kv) * d if packed else heads * d)).astype(np.float32),
             "pk": np.zeros((1, kv, cap, d), np.float32), "pv": np.zeros((1, kv, cap, d), np.float32),
             "seqlens_k": np.array([past], np.int32), "total": np.array(total, np.int32)}
    feeds["pk"][:, :, :past] = rng.standard_normal((1, kv, past, d))
    feeds["pv"][:, :, :past] = rng.standard_normal((1, kv, past, d))
    if not packed:
        feeds["k"], feeds["v"] = (rng.standard_normal((1, 1, kv * d)).astype(np.float32) for _ in range(2))
    if rotary:
        ang = np.outer(np.arange(cap), 1.0 / 10000 ** (np.arange(d // 4) / (d // 4)))
        feeds["cos"], feeds["sin"] = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        feeds["pos"] = np.array([[past]], np.int64)
    bias = np.zeros((1, 1, 1, total), np.float32)
    if past:
        bias[..., past // 2] = -1e9                       # one masked position
    feeds["bias"] = bias
    ref = ort.InferenceSession(_gqa_graph("GroupQueryAttention", heads, kv, d, packed, rotary, cap,
                                          cap).SerializeToString(), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    mine = ort.InferenceSession(_gqa_graph(kernels.ATTN_OP, heads, kv, d, packed, rotary, cap, cap)
                                .SerializeToString(), so, providers=["CPUExecutionProvider"])
    want, got = ref.run(None, feeds), mine.run(None, feeds)
    assert got[0].shape == want[0].shape == (1, 1, heads * d)
    assert np.abs(got[0] - want[0]).max() <= 1e-5 * max(1.0, np.abs(want[0]).max())
    for w, g in zip(want[1:], got[1:]):
        assert g.shape == w.shape
        assert np.abs(g[:, :, :total] - w[:, :, :total]).max() <= 1e-5
    with pytest.raises(Exception, match="one position"):                # a prompt is not its job
        two = dict(feeds, q=np.concatenate([feeds["q"]] * 2, 1), bias=np.zeros((1, 1, 2, total + 1), np.float32),
                   seqlens_k=np.array([past + 1], np.int32), total=np.array(total + 1, np.int32))
        if not packed:
            two.update(k=np.concatenate([feeds["k"]] * 2, 1), v=np.concatenate([feeds["v"]] * 2, 1))
        if rotary:
            two["pos"] = np.array([[past, past + 1]], np.int64)
        mine.run(None, two)


def test_decode_attention_rewrite_takes_every_node_or_none():
    m = _gqa_graph("GroupQueryAttention", 4, 2, 16, True, True, 64)
    assert kernels.rewrite_decode_attention(m) == 1 and m.graph.node[0].op_type == kernels.ATTN_OP
    odd = _gqa_graph("GroupQueryAttention", 4, 2, 16, True, True, 64)
    odd.graph.node[0].attribute.append(helper.make_attribute("local_window_size", 8))
    assert "local window" in kernels.attention_misfit(odd.graph.node[0])
    assert kernels.rewrite_decode_attention(odd) == 0 and odd.graph.node[0].op_type == "GroupQueryAttention"


def test_rewrite_leaves_what_the_kernel_does_not_do():
    for model, reason in [(_quantized_matmul(256, 64, block=16), "block 16"),
                          (_quantized_matmul(256, 64, symmetric=False), "zero points"),
                          (_quantized_matmul(96, 64), "multiple of 64")]:
        node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
        assert reason in kernels.eligible(node)
        assert kernels.rewrite(model) == 0 and model.graph.node[0].op_type == "MatMulNBits"


def test_headers_come_from_a_debian_package_or_a_named_directory(tmp_path, monkeypatch):
    # a .deb is an ar archive whose data.tar holds the files; _unpack_deb takes out one directory of it
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, text in [("./usr/include/onnxruntime/onnxruntime_c_api.h", b"// api"), ("./usr/lib/x.so", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    body = data.getvalue()
    header = f"{'data.tar.xz':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
    deb = b"!<arch>\n" + header + body + (b"\n" if len(body) % 2 else b"")
    kernels._unpack_deb(deb, "usr/include/onnxruntime", tmp_path / "x")
    assert (tmp_path / "x/usr/include/onnxruntime/onnxruntime_c_api.h").read_bytes() == b"// api"
    assert not (tmp_path / "x/usr/lib").exists()
    with pytest.raises(ValueError, match="ar header"):
        kernels._unpack_deb(b"PK\x03\x04", "usr", tmp_path / "y")
    monkeypatch.setenv("EDGEVLM_ORT_INCLUDE", str(tmp_path))
    with pytest.raises(ConfigError, match="onnxruntime_c_api.h"):
        kernels.header_dir()
    monkeypatch.setenv("EDGEVLM_ORT_INCLUDE", str(tmp_path / "x/usr/include/onnxruntime"))
    assert kernels.header_dir() == tmp_path / "x/usr/include/onnxruntime"


def _int4_phi(tmp_path, seed: int):
    """A tiny Phi decoder as cpu bundles have it: fused attention with RoPE in the op, then INT4 block 32."""
    import torch
    import transformers

    from edgevlm.compress.attention import fuse_attention, rotary_tables
    from edgevlm.exporters import vlm_onnx

    torch.manual_seed(seed)
    cfg = transformers.PhiConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, partial_rotary_factor=0.5, max_position_embeddings=64)
    lm = transformers.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(4.0)
    d = tmp_path / f"phi{seed}"
    d.mkdir()
    f = vlm_onnx.export_decoder(lm, d / "decoder.onnx")
    fuse_attention(d / "decoder.onnx", 2, f["num_kv_heads"], f["head_dim"], dst=d / "fused.onnx",
                   rotary=rotary_tables(lm, 64))
    vlm_onnx.quantize_decoder(d / "fused.onnx", d / "int4.onnx", "int4")
    return d / "int4.onnx", f


def _open(path, f, **kw):
    from edgevlm.runtime.vlm import open_ort_decoder

    return open_ort_decoder(path, ["CPUExecutionProvider"], "int4", 2, None, f["num_layers"], f["num_kv_heads"],
                            f["head_dim"], **kw)


def _greedy(dec, table: np.ndarray, prompt: np.ndarray, steps: int):
    dec.reset()
    logits = [dec.prefill(prompt)]
    for _ in range(steps):
        logits.append(dec.step_embeds(table[int(logits[-1].argmax())]))
    return [int(x.argmax()) for x in logits], np.stack(logits)


def test_int4_decode_steps_run_the_kernel_and_keep_the_tokens(tmp_path, monkeypatch):
    from edgevlm.runtime import vlm

    _need_kernel()
    assert vlm.KERNEL_PROMPT_ROWS == {"avx512-vnni": 16, "avx2": 64}
    # prompts from 16 positions on run the kernel here, on either code path (this decoder holds 64 positions)
    monkeypatch.setattr(vlm, "KERNEL_PROMPT_ROWS", {"avx512-vnni": 16, "avx2": 16})
    path, f = _int4_phi(tmp_path, 0)
    mine, stock = _open(path, f), _open(path, f, kernels=False)
    k = mine.kernel
    assert k["decode_kernel"] == "edgevlm MatMulQ4" and k["decode_kernel_layers"] == 9, k   # 2 x 4 + lm_head
    assert k["decode_attention"] == "edgevlm DecodeAttention" and mine.decode_graph is not None, k
    assert k["decode_kernel_check_rel_diff"] <= 1e-3, k
    assert stock.kernel == {"decode_kernel": "onnxruntime", "decode_kernel_why": "turned off"}
    rng = np.random.default_rng(0)
    table = rng.normal(0, 0.5, (96, 128)).astype(np.float32)
    assert k["prompt_kernel_min_positions"] == mine.prompt_rows == 16 and stock.prompt_rows is None
    for n in (6, 24):                     # 6: ONNX Runtime's MatMulNBits reads the prompt; 24: the kernel's many-row path
        prompt = rng.normal(0, 0.5, (n, 128)).astype(np.float32)
        a_tokens, a_logits = _greedy(mine, table, prompt, 16)
        b_tokens, b_logits = _greedy(stock, table, prompt, 16)
        assert a_tokens == b_tokens and len(set(a_tokens)) > 1
        # the two kernels agree to ~1e-6 of the logit scale; an activation that one of them rounds to the other
        # int8 value (a tie: the kernel multiplies by 127/max, MatMulNBits divides by max/127) moves a position's
        # logits by up to ~2e-3 of their scale (seen once, the 24-row prompt's)
        assert np.abs(a_logits - b_logits).max() <= 5e-3 * np.abs(b_logits).max()
        # which graph read the prompt: the default call gives exactly one of the two graphs' logits
        first = []
        for use_step in (None, False, True):
            mine.reset()
            first.append(mine._run(prompt[None], use_step=use_step))
        assert np.array_equal(first[0], first[2 if n >= 16 else 1]), n
        assert not np.array_equal(first[1], first[2])
    monkeypatch.setenv("EDGEVLM_KERNELS", "0")
    assert _open(path, f).kernel["decode_kernel_why"] == "turned off (EDGEVLM_KERNELS=0)"


def test_the_load_check_tells_a_wrong_step_graph(tmp_path, monkeypatch):
    """The check compares the step graph's logits with the prompt graph's: another model's graph as the step
    graph is caught, and open_ort_decoder then keeps ONNX Runtime's kernel."""
    from edgevlm.runtime import vlm

    _need_kernel()
    path, f = _int4_phi(tmp_path, 0)
    other, _ = _int4_phi(tmp_path, 1)
    dec = _open(path, f, kernels=False)
    wrong = vlm.OrtDecoder(dec.graph, None, f["num_layers"], f["num_kv_heads"], f["head_dim"],
                           step=vlm._Graph(other, ["CPUExecutionProvider"], "int4", 2))
    assert wrong.check_step_kernel() > vlm.KERNEL_REL_TOL
    monkeypatch.setattr(vlm.OrtDecoder, "check_step_kernel", lambda self: 0.5)
    k = _open(path, f).kernel
    assert k["decode_kernel"] == "onnxruntime" and "differed from ONNX Runtime's by 0.5" in k["decode_kernel_why"]


def test_cli_reports_the_kernel(capsys):
    from edgevlm.cli import main

    path, why = kernels.status()
    assert main(["kernels", "status"]) == 0
    out = capsys.readouterr().out
    assert (f"ready ({kernels.isa()}), {path}" if path else f"not used: {why}") in out


def test_build_compiles_into_the_cache_and_records_the_api(tmp_path, monkeypatch):
    """`edgevlm kernels build` end to end into a fresh cache (headers from the machine's cache or a system
    install), and the runtime refuses a library built for a newer C API than the installed ONNX Runtime."""
    try:
        inc = kernels.header_dir(download=False, log=lambda *_: None)
    except ConfigError as e:
        if os.environ.get("EDGEVLM_REQUIRE_KERNELS") == "1":
            raise
        pytest.skip(f"no ONNX Runtime headers here: {e}")
    if kernels._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("EDGEVLM_ORT_INCLUDE", str(inc))
    monkeypatch.setenv("EDGEVLM_CACHE", str(tmp_path))
    lines = []
    out = kernels.build(log=lines.append)
    assert out == kernels.library_path() and out.is_file() and str(tmp_path) in str(out)
    api = int(out.with_suffix(".api").read_text())
    assert api >= 16 and any(line.startswith("+ ") for line in lines)
    assert kernels.build(log=lines.append) == out and lines[-1] == f"already built: {out}"
    monkeypatch.setattr(kernels, "_api_version", lambda lib: 99)
    path, why = kernels.status()
    assert path is None and "needs onnxruntime >= 1.99" in why


def test_a_rewritten_graph_that_does_not_load_leaves_the_bundle_as_it_is(tmp_path, monkeypatch):
    from edgevlm.errors import BundleError
    from edgevlm.runtime import vlm

    _need_kernel()
    path, f = _int4_phi(tmp_path, 0)

    def refuse(*args, **kw):
        raise BundleError("ONNX Runtime cannot load step-int4.onnx: no", "upgrade")

    monkeypatch.setattr(vlm, "_kernel_graphs", refuse)
    dec = _open(path, f)
    assert dec.kernel["decode_kernel"] == "onnxruntime" and dec.step_graph is None
    assert "did not load: ONNX Runtime cannot load step-int4.onnx" in dec.kernel["decode_kernel_why"]
    assert dec.prefill(np.zeros((3, 128), np.float32)).shape == (96,)
