"""The reference ML-program interpreter (edgevlm.runtime.mil) against coremltools and eager PyTorch.

1. the protobuf / weight-blob reader against coremltools' own parse of the same package;
2. op by op: small programs built with coremltools' MIL builder, compared with numpy / torch maths
   (FP32 and FP16 programs, compression ops, state ops);
3. converted timm backbones against eager PyTorch (FP32, FP16, INT8, INT4 weights) and a stateful
   decoder converted from edgevlm's tiny VLM;
4. bad packages: one-line BundleError / NotCovered;
5. the interpreter imports neither torch nor coremltools.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.frontend.milproto.load import (
            load as milproto_load,
        )
except ImportError:
    pytest.skip("coremltools is not installed: the reference interpreter is checked against its parse and builder",
                allow_module_level=True)

torch = pytest.importorskip("torch")
F = torch.nn.functional

from edgevlm.errors import BundleError
from edgevlm.runtime.mil import NotCovered, load_package

T18 = ct.target.iOS18
FP32, FP16 = ct.precision.FLOAT32, ct.precision.FLOAT16
RNG = np.random.default_rng(0)


@contextlib.contextmanager
def quiet():
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            log.setLevel(level)


def save(mlmodel, path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    with quiet():
        mlmodel.save(str(path))
    return path


def convert_prog(prog, path: Path, precision=FP32, target=T18) -> Path:
    with quiet():
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target, compute_precision=precision)
    return save(ml, path)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("coreml_ref")


def _timm(name: str):
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model
    torch.manual_seed(0)
    model = reparameterize_model(timm.create_model(name, pretrained=False, num_classes=10).eval())
    return model


@pytest.fixture(scope="module")
def backbones(workdir):
    """{(model, precision): (package path, input, eager output)} for fastvit_t8 and tiny_vit_5m_224."""
    from edgevlm.config import Precision
    from edgevlm.exporters import coreml as C

    out = {}
    for name, size, precisions in (("fastvit_t8", 64, ("fp32", "fp16", "int8", "int4")),
                                   ("tiny_vit_5m_224", 224, ("fp32", "fp16", "int8"))):
        model = _timm(name)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), quiet():
            ref = model(x).numpy()
            traced = torch.jit.trace(model, x)
        for p in precisions:
            ml = C.convert(traced, size, "iOS18", p != "fp32")
            if p in ("int8", "int4"):
                ml = C.quantize(ml, Precision(p), 32)
            out[name, p] = (save(ml, workdir / f"{name}_{p}.mlpackage"), x.numpy(), ref)
    return out


class _Cache(torch.nn.Module):
    """A registered fp16 buffer written by slice assignment at positions given by the inputs' shapes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(1, 8, 4, dtype=torch.float16))

    def forward(self, x, mask):
        end, n = mask.shape[-1], x.shape[1]
        self.cache[:, end - n:end, :] = (x * 2.0).to(torch.float16)
        return self.cache[:, :end, :].float().sum(dim=1) + mask.sum()


@pytest.fixture(scope="module")
def buffer_package(workdir):
    m = _Cache().eval()
    with quiet():
        tr = torch.jit.trace(m, (torch.randn(1, 2, 4), torch.zeros(1, 2)))
        ml = ct.convert(tr, inputs=[ct.TensorType(name="x", shape=(1, ct.RangeDim(1, 8, default=2), 4), dtype=np.float32),
                                    ct.TensorType(name="mask", shape=(1, ct.RangeDim(1, 8, default=2)), dtype=np.float32)],
                        outputs=[ct.TensorType(name="y", dtype=np.float32)],
                        states=[ct.StateType(wrapped_type=ct.TensorType(shape=(1, 8, 4), dtype=np.float16), name="cache")],
                        minimum_deployment_target=T18, convert_to="mlprogram", compute_precision=FP32)
    return save(ml, workdir / "buffer.mlpackage")


# ----------------------------------------------------------------------------- 1. reader vs coremltools

def _spec_ops(block, counter: Counter) -> Counter:
    for op in block.operations:
        counter[op.type] += 1
        for b in op.blocks:
            _spec_ops(b, counter)
    return counter


def _coreml_parse(path: Path):
    with quiet():
        ml = ct.models.MLModel(str(path), skip_model_load=True)
        spec = ml.get_spec()
        prog = milproto_load(spec, spec.specificationVersion, ml.weights_dir)
    return spec, prog


def _feature_shape(f):
    return tuple(f.type.multiArrayType.shape) if f.type.WhichOneof("Type") == "multiArrayType" \
        else tuple(f.type.stateType.arrayType.shape)


@pytest.mark.slow
@pytest.mark.parametrize("key", [("fastvit_t8", "fp16"), ("fastvit_t8", "int4"), ("tiny_vit_5m_224", "int8")])
def test_reader_matches_coremltools_parse(backbones, key):
    path = backbones[key][0]
    _check_reader(path)


def test_reader_matches_coremltools_parse_stateful(buffer_package):
    _check_reader(buffer_package)


def _check_reader(path: Path):
    spec, pymil = _coreml_parse(path)
    prog = load_package(path)
    assert prog.spec_version == spec.specificationVersion
    func = spec.mlProgram.functions["main"]
    assert prog.opset == func.opset
    assert prog.ops_used == _spec_ops(func.block_specializations[func.opset], Counter())
    assert prog.uncovered == []
    assert [i.name for i in func.inputs if i.type.WhichOneof("type") == "tensorType"] == list(prog.inputs)
    assert [i.name for i in func.inputs if i.type.WhichOneof("type") == "stateType"] == list(prog.states)
    assert prog.outputs == [o.name for o in spec.description.output]
    for f in spec.description.input:
        t = prog.inputs[f.name]
        assert t.dtype == {65568: "fp32", 65552: "fp16", 131104: "int32"}[f.type.multiArrayType.dataType]
        assert len(t.shape) == len(_feature_shape(f))
        fixed = [d for d, r in zip(_feature_shape(f), f.type.multiArrayType.shapeRange.sizeRanges)
                 if r.lowerBound == r.upperBound] if f.type.multiArrayType.HasField("shapeRange") else None
        if fixed is None:
            assert t.shape == _feature_shape(f)
        feature = prog._ranges[f.name]
        assert feature.ranges == ([(r.lowerBound, r.upperBound) for r in f.type.multiArrayType.shapeRange.sizeRanges]
                                  or None)
    for f in spec.description.state:
        assert prog.states[f.name].shape == _feature_shape(f)
        assert prog.states[f.name].dtype == "fp16"
    # every const of coremltools' program (weights, scales, scalars) decodes to the same value; a const that
    # coremltools made from an op's inline literal (a constexpr op's int4 data, ...) is checked below
    checked = 0
    for op in pymil.functions["main"].operations:
        if op.op_type == "const" and op.outputs[0].name in prog._consts:
            _same(prog._consts[op.outputs[0].name], op.outputs[0].val, op.name)
            checked += 1
    assert checked == prog.ops_used["const"]
    ours = {op.outputs[0].name: op for op in prog.block.operations if op.outputs}
    for op in pymil.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            mine = ours[op.outputs[0].name]
            for key, var in op.inputs.items():   # the stored (sub-byte) data, scales, offsets, luts, masks
                binding = mine.inputs[key][0] if key in mine.inputs else None
                got = prog._consts[binding.name] if binding is not None and binding.name else \
                    prog.literal(binding.value if binding is not None else mine.attributes[key])
                _same(got, var.val, f"{op.name}.{key}")
            # and the constexpr output equals coremltools' own decompression, bit for bit
            want = np.asarray(op.materialized_val_inference())
            got = prog._consts[op.outputs[0].name]
            assert got.shape == want.shape and got.dtype == want.dtype, op.name
            np.testing.assert_array_equal(got, want)


def _same(got, want, what):
    if isinstance(want, str):
        assert got == want, what
        return
    want = np.asarray(want)
    assert got.shape == want.shape, what
    assert got.dtype.kind == want.dtype.kind, (what, got.dtype, want.dtype)
    assert np.array_equal(got, want.astype(got.dtype)), what


def test_sub_byte_unpacking_matches_coremltools_blob_writer(tmp_path):
    from coremltools.libmilstoragepython import _BlobStorageWriter

    from edgevlm.runtime.mil.blob import BlobFile
    path = tmp_path / "w.bin"
    values = {"int4": RNG.integers(-8, 8, 37).astype(np.int8), "uint4": RNG.integers(0, 16, 37).astype(np.uint8),
              "uint1": RNG.integers(0, 2, 37).astype(np.uint8), "uint2": RNG.integers(0, 4, 37).astype(np.uint8),
              "uint3": RNG.integers(0, 8, 37).astype(np.uint8), "uint6": RNG.integers(0, 64, 37).astype(np.uint8),
              "int8": RNG.integers(-128, 128, 37).astype(np.int8), "uint8": RNG.integers(0, 256, 37).astype(np.uint8),
              "fp32": RNG.standard_normal(37).astype(np.float32),
              "int32": RNG.integers(-1000, 1000, 37).astype(np.int32)}
    writer = _BlobStorageWriter(str(path))
    offsets = {}
    for dtype, v in values.items():
        fn = {"fp32": "write_float_data"}.get(dtype, f"write_{dtype}_data")
        offsets[dtype] = getattr(writer, fn)(v)
    offsets["fp16"] = writer.write_fp16_data(RNG.standard_normal(37).astype(np.float16).view(np.uint16))
    del writer
    blob = BlobFile(path)
    for dtype, v in values.items():
        np.testing.assert_array_equal(blob.read(offsets[dtype], dtype, (37,)), v, err_msg=dtype)
    assert blob.read(offsets["fp16"], "fp16", (37,)).dtype == np.float16


# ----------------------------------------------------------------------------- 2. op by op

def _run(prog, tmp_path, feeds, precision=FP32, name="p", target=T18):
    path = convert_prog(prog, tmp_path / f"{name}.mlpackage", precision, target)
    p = load_package(path)
    assert p.uncovered == [], p.uncovered
    return p, p.predict(feeds)


def _outs(p, outs):
    return [outs[n] for n in p.outputs]


def test_conv_variants(tmp_path):
    x = RNG.standard_normal((1, 4, 9, 10)).astype(np.float32)
    w = RNG.standard_normal((6, 2, 3, 3)).astype(np.float32)
    w1 = RNG.standard_normal((4, 1, 5, 5)).astype(np.float32)
    b = RNG.standard_normal(6).astype(np.float32)
    wt = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=T18)
    def prog(x):
        return (mb.conv(x=x, weight=w, bias=b, groups=2, pad_type="same", strides=[2, 2]),
                mb.conv(x=x, weight=w, groups=2, pad_type="same_lower", strides=[2, 3]),
                mb.conv(x=x, weight=w, groups=2, pad_type="valid", dilations=[2, 1]),
                mb.conv(x=x, weight=w, groups=2, pad_type="custom", pad=[1, 2, 0, 3], strides=[1, 2]),
                mb.conv(x=x, weight=w1, groups=4, pad_type="same", dilations=[2, 2]),
                mb.conv_transpose(x=x, weight=wt, pad_type="valid", strides=[2, 2]))

    p, outs = _run(prog, tmp_path, {"x": x})
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)

    def same(xx, k, s, d, lower=False):
        pads = []
        for size, kk, ss, dd in zip(xx.shape[2:][::-1], k[::-1], s[::-1], d[::-1]):
            total = max((math.ceil(size / ss) - 1) * ss + (kk - 1) * dd + 1 - size, 0)
            lo, hi = total // 2, total - total // 2
            pads += [hi, lo] if lower else [lo, hi]
        return F.pad(xx, pads)
    want = [F.conv2d(same(tx, (3, 3), (2, 2), (1, 1)), tw, torch.from_numpy(b), stride=2, groups=2),
            F.conv2d(same(tx, (3, 3), (2, 3), (1, 1), lower=True), tw, stride=(2, 3), groups=2),
            F.conv2d(tx, tw, dilation=(2, 1), groups=2),
            F.conv2d(F.pad(tx, (0, 3, 1, 2)), tw, stride=(1, 2), groups=2),
            F.conv2d(same(tx, (5, 5), (1, 1), (2, 2)), torch.from_numpy(w1), dilation=2, groups=4),
            F.conv_transpose2d(tx, torch.from_numpy(wt), stride=2)]
    for got, ref in zip(_outs(p, outs), want):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


def test_pools_norms_resizing(tmp_path):
    x = RNG.standard_normal((1, 3, 7, 9)).astype(np.float32)
    mean, var = RNG.standard_normal(3).astype(np.float32), RNG.random(3).astype(np.float32) + 0.5
    gamma, beta = RNG.standard_normal(3).astype(np.float32), RNG.standard_normal(3).astype(np.float32)
    g9 = RNG.standard_normal(9).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=T18)
    def prog(x):
        return (mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="valid"),
                mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1], ceil_mode=True),
                mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                            exclude_padding_from_average=True),
                mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                            exclude_padding_from_average=False),
                mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=1e-3),
                mb.instance_norm(x=x, gamma=gamma, beta=beta, epsilon=1e-5),
                mb.layer_norm(x=x, axes=[-1], gamma=g9, beta=g9, epsilon=1e-5),
                mb.upsample_bilinear(x=x, scale_factor_height=2.0, scale_factor_width=2.0, align_corners=False),
                mb.upsample_bilinear(x=x, scale_factor_height=2.0, scale_factor_width=2.0, align_corners=True),
                mb.upsample_nearest_neighbor(x=x, scale_factor_height=2.0, scale_factor_width=3.0),
                mb.resize_bilinear(x=x, target_size_height=5, target_size_width=12, sampling_mode="ALIGN_CORNERS"))

    p, outs = _run(prog, tmp_path, {"x": x})
    tx = torch.from_numpy(x)
    want = [F.max_pool2d(tx, 3, 2), F.max_pool2d(tx, 3, 2, padding=1, ceil_mode=True),
            F.avg_pool2d(tx, 3, 2, padding=1, count_include_pad=False),
            F.avg_pool2d(tx, 3, 2, padding=1, count_include_pad=True),
            F.batch_norm(tx, torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(gamma),
                         torch.from_numpy(beta), eps=1e-3),
            F.instance_norm(tx, weight=torch.from_numpy(gamma), bias=torch.from_numpy(beta)),
            F.layer_norm(tx, (9,), torch.from_numpy(g9), torch.from_numpy(g9)),
            F.interpolate(tx, scale_factor=2, mode="bilinear", align_corners=False),
            F.interpolate(tx, scale_factor=2, mode="bilinear", align_corners=True),
            F.interpolate(tx, scale_factor=(2, 3), mode="nearest"),
            F.interpolate(tx, size=(5, 12), mode="bilinear", align_corners=True)]
    for i, (got, ref) in enumerate(zip(_outs(p, outs), want)):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"output {i}")


def test_activations_and_elementwise(tmp_path):
    x = (RNG.standard_normal((2, 3, 5)) * 2).astype(np.float32)
    y = (RNG.random((3, 5)) + 0.5).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=y.shape)], opset_version=T18)
    def prog(x, y):
        return (mb.gelu(x=x, mode="EXACT"), mb.gelu(x=x, mode="TANH_APPROXIMATION"),
                mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"), mb.silu(x=x), mb.relu(x=x), mb.sigmoid(x=x),
                mb.tanh(x=x), mb.softmax(x=x, axis=1), mb.erf(x=x), mb.sqrt(x=y), mb.rsqrt(x=y), mb.exp(x=x),
                mb.log(x=y), mb.sin(x=x), mb.cos(x=x), mb.abs(x=x), mb.clip(x=x, alpha=-0.5, beta=0.7),
                mb.add(x=x, y=y), mb.sub(x=x, y=y), mb.mul(x=x, y=y), mb.real_div(x=x, y=y), mb.pow(x=y, y=x),
                mb.maximum(x=x, y=y), mb.minimum(x=x, y=y), mb.floor_div(x=x, y=y), mb.mod(x=x, y=y),
                mb.select(cond=mb.greater(x=x, y=y), a=x, b=y),
                mb.cast(x=mb.logical_or(x=mb.less_equal(x=x, y=0.0), y=mb.equal(x=x, y=mb.add(x=x, y=0.0))), dtype="int32"),
                mb.cast(x=mb.logical_and(x=mb.less(x=x, y=y), y=mb.not_equal(x=x, y=0.0)), dtype="fp32"),
                mb.leaky_relu(x=x, alpha=0.1), mb.elu(x=x, alpha=1.0), mb.softplus(x=x),
                mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5), mb.cast(x=x, dtype="int32"))

    p, outs = _run(prog, tmp_path, {"x": x, "y": y})
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    want = [F.gelu(tx), F.gelu(tx, approximate="tanh"), tx * torch.sigmoid(1.702 * tx), F.silu(tx), F.relu(tx),
            torch.sigmoid(tx), torch.tanh(tx), torch.softmax(tx, 1), torch.erf(tx), torch.sqrt(ty),
            torch.rsqrt(ty + 1e-12), torch.exp(tx), torch.log(ty), torch.sin(tx), torch.cos(tx), tx.abs(),
            tx.clamp(-0.5, 0.7), tx + ty, tx - ty, tx * ty, tx / ty, ty ** tx, torch.maximum(tx, ty),
            torch.minimum(tx, ty), torch.floor_divide(tx, ty), torch.remainder(tx, ty),
            torch.where(tx > ty, tx, ty.expand_as(tx)), ((tx <= 0) | (tx == tx + 0)).int(),
            ((tx < ty) & (tx != 0)).float(), F.leaky_relu(tx, 0.1), F.elu(tx), F.softplus(tx),
            F.hardsigmoid(tx), tx.int()]
    got = _outs(p, outs)
    assert len(got) == len(want)
    for i, (g, ref) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, ref.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"output {i}")


def test_linear_algebra_and_attention(tmp_path):
    x = RNG.standard_normal((2, 4, 6)).astype(np.float32)
    w = RNG.standard_normal((5, 6)).astype(np.float32)
    b = RNG.standard_normal(5).astype(np.float32)
    q = RNG.standard_normal((1, 2, 4, 8)).astype(np.float32)
    mask = np.triu(np.full((4, 4), -1e4, np.float32), 1)
    e = RNG.standard_normal((1, 8, 4, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape), mb.TensorSpec(shape=q.shape)], opset_version=T18)
    def prog(x, q):
        return (mb.linear(x=x, weight=w, bias=b), mb.matmul(x=x, y=x, transpose_y=True),
                mb.matmul(x=x, y=x, transpose_x=True), mb.einsum(values=(q, e), equation="nchw,nwhu->nchu"),
                mb.scaled_dot_product_attention(query=q, key=q, value=q, attn_mask=mask),
                mb.scaled_dot_product_attention(query=q, key=q, value=q))

    p, outs = _run(prog, tmp_path, {"x": x, "q": q})
    tx, tq = torch.from_numpy(x), torch.from_numpy(q)
    want = [F.linear(tx, torch.from_numpy(w), torch.from_numpy(b)), tx @ tx.transpose(1, 2),
            tx.transpose(1, 2) @ tx, torch.einsum("nchw,nwhu->nchu", tq, torch.from_numpy(e)),
            F.scaled_dot_product_attention(tq, tq, tq, attn_mask=torch.from_numpy(mask)),
            F.scaled_dot_product_attention(tq, tq, tq)]
    for i, (g, ref) in enumerate(zip(_outs(p, outs), want)):
        np.testing.assert_allclose(g, ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"output {i}")


def test_shape_and_indexing_ops(tmp_path):
    x = RNG.standard_normal((2, 6, 5)).astype(np.float32)
    idx = np.array([[0, 2], [5, 1]], np.int32)
    along = RNG.integers(0, 6, (2, 3, 5)).astype(np.int32)
    nd = np.array([[0, 1], [1, 5], [1, 0]], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=T18)
    def prog(x):
        s = mb.split(x=x, split_sizes=[2, 4], axis=1)
        return (mb.reshape(x=x, shape=[3, -1, 5]), mb.reshape(x=x, shape=[2, -1]),
                mb.transpose(x=x, perm=[2, 0, 1]), mb.concat(values=(x, x), axis=-1),
                s[0], s[1], mb.split(x=x, num_splits=3, axis=1)[2],
                mb.slice_by_index(x=x, begin=[0, 1, 0], end=[2, 6, 5], stride=[1, 2, 1], end_mask=[True, False, True]),
                mb.slice_by_index(x=x, begin=[1, 0, 4], end=[2, 0, 0], stride=[1, 1, -1],
                                  end_mask=[False, True, True], squeeze_mask=[True, False, False]),
                mb.slice_by_size(x=x, begin=[0, 2, 1], size=[-1, 3, 2]),
                mb.gather(x=x, indices=idx, axis=1), mb.gather_along_axis(x=x, indices=along, axis=1),
                mb.gather_nd(x=x, indices=nd), mb.expand_dims(x=x, axes=[0, -1]),
                mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]),
                mb.reduce_sum(x=x, axes=[1], keep_dims=True), mb.reduce_mean(x=x, axes=[-1]),
                mb.reduce_max(x=x, axes=[0, 2]), mb.reduce_min(x=x), mb.reduce_prod(x=x, axes=[2]),
                mb.reduce_argmax(x=x, axis=1), mb.reduce_l2_norm(x=x, axes=[2]),
                mb.reduce_log_sum_exp(x=x, axes=[1]),
                mb.tile(x=x, reps=[1, 2, 1]), mb.pad(x=x, pad=[1, 2, 0, 1], mode="constant", constant_val=0.5),
                mb.pad(x=x, pad=[1, 2], mode="reflect"), mb.pad(x=x, pad=[2, 1], mode="replicate"),
                mb.cumsum(x=x, axis=1), mb.cumsum(x=x, axis=1, exclusive=True, reverse=True),
                mb.band_part(x=x, lower=1, upper=0), mb.fill_like(ref_tensor=x, value=3.0),
                mb.shape(x=x), mb.range_1d(start=1, end=mb.gather(x=mb.shape(x=x), indices=1), step=2),
                mb.fill(shape=mb.shape(x=x), value=2.0),
                mb.topk(x=x, k=2, axis=1)[0], mb.topk(x=x, k=2, axis=1)[1], mb.argsort(x=x, axis=-1, ascending=True),
                mb.stack(values=(x, x), axis=1))

    p, outs = _run(prog, tmp_path, {"x": x})
    t = torch.from_numpy(x)
    rev = x[1, :, ::-1]
    want = [x.reshape(3, -1, 5), x.reshape(2, 30), x.transpose(2, 0, 1), np.concatenate([x, x], -1),
            x[:, :2], x[:, 2:], x[:, 4:], x[:, 1:6:2], rev, x[:, 2:5, 1:3],
            np.take(x, idx, axis=1), np.take_along_axis(x, along.astype(np.int64), 1), x[nd[:, 0], nd[:, 1]],
            x[None, ..., None], x, x.sum(1, keepdims=True), x.mean(-1), x.max((0, 2)), x.min(), x.prod(2),
            x.argmax(1), np.sqrt((x * x).sum(2)), torch.logsumexp(t, 1).numpy(), np.tile(x, (1, 2, 1)),
            np.pad(x, [(0, 0), (1, 2), (0, 1)], constant_values=0.5), np.pad(x, [(0, 0), (0, 0), (1, 2)], "reflect"),
            np.pad(x, [(0, 0), (0, 0), (2, 1)], "edge"), np.cumsum(x, 1),
            np.flip(np.cumsum(np.flip(x, 1), 1), 1) - x, np.triu(np.tril(x, 0), -1), np.full_like(x, 3.0),
            np.array(x.shape), np.arange(1, 6, 2), np.full_like(x, 2.0),
            torch.topk(t, 2, dim=1).values.numpy(), torch.topk(t, 2, dim=1).indices.numpy(),
            np.argsort(x, -1, kind="stable"), np.stack([x, x], 1)]
    got = _outs(p, outs)
    assert len(got) == len(want)
    for i, (g, ref) in enumerate(zip(got, want)):
        assert g.shape == np.shape(ref), (i, g.shape, np.shape(ref))
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5, err_msg=f"output {i}")


def test_quantize_ops_and_depth_to_space(tmp_path):
    x = RNG.standard_normal((1, 8, 2, 3)).astype(np.float32)
    scale = np.float32(0.05)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=T18)
    def prog(x):
        q = mb.quantize(input=x, scale=scale, zero_point=np.int8(3), output_dtype="int8")
        return (mb.dequantize(input=q, scale=scale, zero_point=np.int8(3)),
                mb.depth_to_space(x=x, block_size=2), mb.space_to_depth(x=mb.depth_to_space(x=x, block_size=2),
                                                                         block_size=2),
                mb.pixel_shuffle(x=x, upscale_factor=2))

    p, outs = _run(prog, tmp_path, {"x": x})
    deq, d2s, back, shuffled = _outs(p, outs)
    want = (np.clip(np.rint(x / scale + 3), -128, 127) - 3) * scale
    np.testing.assert_allclose(deq, want, atol=1e-6)
    # depth_to_space taken as TensorFlow's DCR order (coremltools maps tf.nn.depth_to_space onto it);
    # torch's pixel_shuffle (CRD order) has its own op
    dcr = x.reshape(1, 2, 2, 2, 2, 3).transpose(0, 3, 4, 1, 5, 2).reshape(1, 2, 4, 6)
    np.testing.assert_array_equal(d2s, dcr)
    np.testing.assert_array_equal(shuffled, F.pixel_shuffle(torch.from_numpy(x), 2).numpy())
    np.testing.assert_array_equal(back, x)


def test_fp16_program_rounds_every_op_to_fp16(tmp_path):
    """An FP16 program computes op by op in FP16: equal to numpy float16 arithmetic, not to FP32."""
    x = RNG.standard_normal((3, 64)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=T18)
    def prog(x):
        y = mb.mul(x=x, y=np.float32(3.3))
        y = mb.add(x=y, y=np.float32(1e-3))
        y = mb.exp(x=mb.mul(x=y, y=np.float32(0.5)))
        return mb.sub(x=y, y=np.float32(1.0))

    p, outs = _run(prog, tmp_path, {"x": x}, precision=FP16)
    assert "cast" in p.ops_used and p.inputs["x"].dtype == "fp32"
    h = np.float16
    y = x.astype(h) * h(3.3)
    y = y + h(1e-3)
    y = np.exp(y * h(0.5))
    want = (y - h(1.0)).astype(np.float32)
    got = outs[p.outputs[0]]
    np.testing.assert_array_equal(got, want)
    fp32 = np.exp((x * 3.3 + 1e-3) * 0.5) - 1
    assert np.abs(got - fp32).max() > 0      # it really is FP16


def _quantized_linear(tmp_path, name, quantize, target=T18, shape=(64, 48)):
    """A linear + conv program whose weights coremltools compresses; returns (package, pymil weights)."""
    w = RNG.standard_normal(shape).astype(np.float32)
    wc = RNG.standard_normal((32, 8, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, shape[1])), mb.TensorSpec(shape=(1, 8, 6, 6))],
                opset_version=target)
    def prog(x, y):
        return mb.linear(x=x, weight=w), mb.conv(x=y, weight=wc, pad_type="same")

    with quiet():
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target, compute_precision=FP16)
        ml = quantize(ml)
    path = save(ml, tmp_path / f"{name}.mlpackage")
    _, pymil = _coreml_parse(path)
    dense = {}
    for op in pymil.functions["main"].operations:
        children = op.outputs[0].child_ops
        if op.op_type.startswith("constexpr_") and children and all(c.op_type in ("linear", "conv") for c in children):
            dense[op.outputs[0].child_ops[0].op_type] = np.asarray(op.materialized_val_inference())
    return path, dense


@pytest.mark.parametrize("kind", ["int8_per_channel", "int4_per_block", "palettize_4bit", "palettize_grouped",
                                  "sparse", "int8_ios16", "palettize_ios16", "sparse_palettized", "sparse_quantized"])
def test_compression_ops(tmp_path, kind):
    import coremltools.optimize as cto
    c = cto.coreml
    target = ct.target.iOS16 if kind.endswith("ios16") else T18
    cfgs = {
        "int8_per_channel": c.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                      weight_threshold=0),
        "int4_per_block": c.OpLinearQuantizerConfig(mode="linear", dtype="int4", granularity="per_block",
                                                    block_size=8, weight_threshold=0),
        "palettize_4bit": c.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=0),
        "palettize_grouped": c.OpPalettizerConfig(mode="uniform", nbits=2, granularity="per_grouped_channel",
                                                  group_size=8, weight_threshold=0),
        "sparse": c.OpMagnitudePrunerConfig(target_sparsity=0.6, weight_threshold=0),
        "int8_ios16": c.OpLinearQuantizerConfig(mode="linear", dtype="uint8", weight_threshold=0),
        "palettize_ios16": c.OpPalettizerConfig(mode="kmeans", nbits=2, weight_threshold=0),
    }
    prune = c.OptimizationConfig(global_config=c.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=0))
    cfgs["sparse_palettized"] = c.OpPalettizerConfig(mode="kmeans", nbits=2, weight_threshold=0)
    cfgs["sparse_quantized"] = c.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)
    cfg = c.OptimizationConfig(global_config=cfgs[kind])
    if kind.startswith("sparse_"):   # joint compression: prune, then palettize / quantize the nonzero values
        fn = c.palettize_weights if kind == "sparse_palettized" else c.linear_quantize_weights

        def compress(m):
            return fn(c.prune_weights(m, prune), cfg, joint_compression=True)
    else:
        fn = {"int8": c.linear_quantize_weights, "int4": c.linear_quantize_weights, "palettize": c.palettize_weights,
              "sparse": c.prune_weights}[kind.split("_")[0]]

        def compress(m):
            return fn(m, cfg)
    path, dense = _quantized_linear(tmp_path, kind, compress, target)
    p = load_package(path)
    compression = {t for t in p.ops_used if t.startswith("constexpr_")}
    expected = {"int8_per_channel": "constexpr_blockwise_shift_scale", "int4_per_block": "constexpr_blockwise_shift_scale",
                "palettize_4bit": "constexpr_lut_to_dense", "palettize_grouped": "constexpr_lut_to_dense",
                "sparse": "constexpr_sparse_to_dense", "int8_ios16": "constexpr_affine_dequantize",
                "palettize_ios16": "constexpr_lut_to_dense", "sparse_palettized": "constexpr_lut_to_sparse",
                "sparse_quantized": "constexpr_sparse_blockwise_shift_scale"}[kind]
    assert expected in compression, p.ops_used
    assert set(dense) == {"linear", "conv"}
    x = RNG.standard_normal((2, 48)).astype(np.float32)
    y = RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)
    outs = p.predict({"x": x, "y": y})
    lin, conv = _outs(p, outs)
    w = dense["linear"].astype(np.float32)
    ref_lin = x.astype(np.float16).astype(np.float32) @ w.T
    ref_conv = F.conv2d(torch.from_numpy(y.astype(np.float16).astype(np.float32)),
                        torch.from_numpy(dense["conv"].astype(np.float32)), padding=1).numpy()
    assert rel(lin, ref_lin) < 2e-3 and rel(conv, ref_conv) < 2e-3, (compression, rel(lin, ref_lin), rel(conv, ref_conv))
    # the dequantized weights themselves are bit-exact against coremltools' decompression
    for op in p.block.operations:
        if op.type in ("linear", "conv"):
            wname = op.inputs["weight"][0].name
            np.testing.assert_array_equal(p._consts[wname], dense[op.type])


def test_constexpr_cast(tmp_path):
    w = RNG.standard_normal((4, 3)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.linear(x=x, weight=mb.constexpr_cast(source_val=w, output_dtype="fp32"))

    x = RNG.standard_normal((2, 3)).astype(np.float32)
    p, outs = _run(prog, tmp_path, {"x": x}, target=ct.target.iOS16)
    assert "constexpr_cast" in p.ops_used
    np.testing.assert_allclose(outs[p.outputs[0]], x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- states

def test_mil_builder_state_program(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3)),
                             mb.StateTensorSpec(shape=(2, 3), dtype=ct.converters.mil.mil.types.fp16)],
                opset_version=T18)
    def prog(x, acc):
        old = mb.read_state(input=acc)
        new = mb.add(x=old, y=mb.cast(x=x, dtype="fp16"))
        new = mb.coreml_update_state(state=acc, value=new)
        return mb.mul(x=new, y=np.float16(2.0))

    path = convert_prog(prog, tmp_path / "acc.mlpackage", FP16)
    p = load_package(path)
    assert p.states == {"acc": p.states["acc"]} and p.states["acc"].dtype == "fp16"
    assert {"read_state", "write_state"} <= set(p.ops_used)
    state = p.new_state()
    total = np.zeros((2, 3), np.float16)
    for _ in range(3):
        x = RNG.standard_normal((2, 3)).astype(np.float32)
        total = total + x.astype(np.float16)
        out = p.predict({"x": x}, state)[p.outputs[0]]
        np.testing.assert_array_equal(out, total * np.float16(2))
        np.testing.assert_array_equal(state["acc"], total)
    with pytest.raises(BundleError, match="stateful"):
        p.predict({"x": x})


def test_torch_buffer_slice_assignment(buffer_package):
    p = load_package(buffer_package)
    assert "slice_update" in p.ops_used and p.states["cache"].shape == (1, 8, 4)
    m = _Cache().eval()
    state = p.new_state()
    for n, end in ((2, 2), (1, 3), (3, 6), (1, 7)):
        x = torch.randn(1, n, 4)
        mask = torch.zeros(1, end)
        with torch.no_grad():
            ref = m(x, mask).numpy()
        out = p.predict({"x": x.numpy(), "mask": mask.numpy()}, state)["y"]
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(state["cache"], m.cache.numpy())
    with pytest.raises(BundleError, match="shape"):
        p.predict({"x": np.zeros((1, 9, 4), np.float32), "mask": np.zeros((1, 2), np.float32)}, state)


# ----------------------------------------------------------------------------- 3. real models

@pytest.mark.slow
@pytest.mark.parametrize("name,precision,bound", [
    ("fastvit_t8", "fp32", 1e-4), ("fastvit_t8", "fp16", 1e-2), ("fastvit_t8", "int8", 0.1), ("fastvit_t8", "int4", 0.5),
    ("tiny_vit_5m_224", "fp32", 1e-4), ("tiny_vit_5m_224", "fp16", 1e-2), ("tiny_vit_5m_224", "int8", 0.1)])
def test_backbones_against_eager(backbones, name, precision, bound):
    """Relative max error vs eager FP32; INT8/INT4 also carry the weight quantization error."""
    path, x, ref = backbones[name, precision]
    p = load_package(path)
    assert p.uncovered == []
    out = p.predict({"pixel_values": x})["logits"]
    err = rel(out, ref)
    print(f"{name} {precision}: max |diff| / max |eager| = {err:.2e}")
    assert err < bound


CACHE = 64


def _stateful_decoder():
    """edgevlm_scenes_tiny's language model wrapped as the ios exporter wraps it (``coreml_vlm.decoder_module``): its
    KV cache in two registered fp16 buffers (L, 1, H, CACHE, HD), written by slice assignment at positions taken from
    the mask's shape."""
    from edgevlm.exporters.coreml_vlm import decoder_module
    from edgevlm.modeling.families import load_vlm
    torch.manual_seed(0)
    lm = load_vlm("edgevlm_scenes_tiny", weights="random").eval().language_model
    lm.config._attn_implementation = "eager"
    m, sizes = decoder_module(lm, CACHE)
    return m, sizes["hidden_size"], (sizes["num_layers"], 1, sizes["num_kv_heads"], CACHE, sizes["head_dim"])


def build_decoder(path: Path, fp16: bool = False):
    """(package, 5 successive inputs_embeds, the torch module's logits for each) of the stateful decoder."""
    from edgevlm.runtime.vlm_ops import attention_mask
    m, hidden, cache_shape = _stateful_decoder()
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((1, 6, hidden)).astype(np.float32)] + \
        [rng.standard_normal((1, 1, hidden)).astype(np.float32) for _ in range(4)]
    ref, past = [], 0
    with torch.no_grad(), quiet():
        for x in seqs:
            s = x.shape[1]
            ref.append(m(torch.from_numpy(x), torch.from_numpy(attention_mask(s, past)),
                         torch.arange(past, past + s, dtype=torch.int32)[None]).numpy())
            past += s
        m.key_cache.zero_()
        m.value_cache.zero_()
        s, p = 5, 3
        traced = torch.jit.trace(m, (torch.randn(1, s, hidden), torch.from_numpy(attention_mask(s, p)),
                                     torch.arange(p, p + s, dtype=torch.int32)[None]), check_trace=False)
        traced.key_cache.zero_()
        traced.value_cache.zero_()
        S, E = ct.RangeDim(1, CACHE, default=s), ct.RangeDim(1, CACHE, default=s + p)
        ml = ct.convert(
            traced, convert_to="mlprogram", minimum_deployment_target=T18, compute_precision=FP16 if fp16 else FP32,
            inputs=[ct.TensorType(name="inputs_embeds", shape=(1, S, hidden), dtype=np.float32),
                    ct.TensorType(name="attention_mask", shape=(1, 1, S, E), dtype=np.float32),
                    ct.TensorType(name="position_ids", shape=(1, S), dtype=np.int32)],
            outputs=[ct.TensorType(name="logits", dtype=np.float32)],
            states=[ct.StateType(wrapped_type=ct.TensorType(shape=cache_shape, dtype=np.float16), name=n)
                    for n in ("key_cache", "value_cache")])
    return save(ml, path), seqs, ref


@pytest.mark.slow
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_stateful_decoder_against_eager(workdir, fp16):
    """edgevlm's tiny VLM decoder with key/value caches as Core ML states: a prefill of 6 then 4 one-token
    steps. FP32 program: max |diff| <= 1e-4 x max |logit|. FP16 program: <= 2e-2, and the same argmax
    wherever eager's top-2 logit gap exceeds 0.05 (an FP16 tie may fork)."""
    pytest.importorskip("transformers")
    from edgevlm.runtime.vlm_ops import attention_mask
    path, seqs, ref = build_decoder(workdir / f"decoder_{'fp16' if fp16 else 'fp32'}.mlpackage", fp16=fp16)
    _check_reader(path)      # inputs with shape ranges, states, ops and every const as coremltools parses them
    p = load_package(path)
    assert p.uncovered == [] and set(p.states) == {"key_cache", "value_cache"}
    assert {"read_state", "write_state", "slice_update"} <= set(p.ops_used)
    state, past = p.new_state(), 0
    for x, want in zip(seqs, ref):
        s = x.shape[1]
        out = p.predict({"inputs_embeds": x, "attention_mask": attention_mask(s, past),
                         "position_ids": np.arange(past, past + s, dtype=np.int32)[None]}, state)["logits"]
        past += s
        err = rel(out, want)
        print(f"decoder {'fp16' if fp16 else 'fp32'} after {past} positions: rel {err:.2e}")
        assert err < (2e-2 if fp16 else 1e-4)
        top = np.sort(want[0])[::-1]
        if top[0] - top[1] > 0.05:
            assert out.argmax() == want.argmax()


# ----------------------------------------------------------------------------- 4. bad input

@pytest.fixture()
def small_package(tmp_path):
    w = RNG.standard_normal((8, 300)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 300))], opset_version=T18)
    def prog(x):
        return mb.gelu(x=mb.linear(x=x, weight=w))

    return convert_prog(prog, tmp_path / "small.mlpackage")


def _one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text
    return text


def test_truncated_model_file(small_package):
    f = small_package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    data = f.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 7):
        f.write_bytes(data[:cut])
        with pytest.raises(BundleError) as e:
            load_package(small_package)
        assert "Core ML model" in _one_line(e.value)


def test_blob_offset_out_of_range(small_package):
    f = small_package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(BundleError) as e:
        load_package(small_package)
    assert "outside" in _one_line(e.value) or "past the end" in str(e.value)
    f.write_bytes(b"\0" * 10)
    with pytest.raises(BundleError, match="shorter than its header"):
        load_package(small_package)


def test_unknown_op_is_not_covered(small_package):
    f = small_package / "Data" / "com.apple.CoreML" / "model.mlmodel"
    data = f.read_bytes()
    assert data.count(b"\x04gelu") == 1
    f.write_bytes(data.replace(b"\x04gelu", b"\x04gelv"))
    p = load_package(small_package)
    assert p.uncovered == ["gelv"]
    with pytest.raises(NotCovered) as e:
        p.predict({"x": np.zeros((1, 300), np.float32)})
    assert _one_line(e.value).startswith("not covered: gelv")


def test_bad_feeds_and_paths(small_package, tmp_path):
    p = load_package(small_package)
    bare = load_package(small_package / "Data" / "com.apple.CoreML" / "model.mlmodel")   # + its weights/ folder
    x = RNG.standard_normal((1, 300)).astype(np.float32)
    np.testing.assert_array_equal(bare.predict({"x": x})[bare.outputs[0]], p.predict({"x": x})[p.outputs[0]])
    with pytest.raises(BundleError) as e:
        p.predict({"x": np.zeros((1, 301), np.float32)})
    assert "shape" in _one_line(e.value)
    with pytest.raises(BundleError, match="no value fed"):
        p.predict({})
    manifest = small_package / "Manifest.json"
    info = json.loads(manifest.read_text())
    root = info["rootModelIdentifier"]
    info["itemInfoEntries"][root]["path"] = "../../../etc/passwd"
    manifest.write_text(json.dumps(info))
    with pytest.raises(BundleError, match="leaves the package"):
        load_package(small_package)
    with pytest.raises(BundleError, match="does not exist"):
        load_package(tmp_path / "nope.mlpackage")


def test_mutated_packages_fail_with_bundle_errors_only(small_package, buffer_package, tmp_path):
    """Random byte flips in model.mlmodel / weight.bin: load + predict either work or raise BundleError."""
    rng = np.random.default_rng(0)
    for src in (small_package, buffer_package):
        work = tmp_path / "mutated" / src.name
        shutil.copytree(src, work)
        spec = work / "Data" / "com.apple.CoreML" / "model.mlmodel"
        weights = work / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
        orig, worig = spec.read_bytes(), weights.read_bytes() if weights.exists() else None
        for _ in range(150):
            data = bytearray(orig)
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] = rng.integers(256)
            spec.write_bytes(bytes(data))
            if worig is not None:
                wdata = bytearray(worig)
                wdata[rng.integers(min(len(wdata), 256))] = rng.integers(256)
                weights.write_bytes(bytes(wdata))
            try:
                p = load_package(work)
                feeds = {k: np.zeros(tuple(2 if d is None else d for d in v.shape), np.float32)
                         for k, v in p.inputs.items()}
                p.predict(feeds, p.new_state() or None)
            except BundleError as e:
                _one_line(e)


def test_wire_decoder_rejects_garbage():
    from edgevlm.runtime.mil import proto
    for junk in (b"\x0a\xff", b"\x08", b"\x0b\x00", b"\x00\x00", b"\x12\x05ab", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"):
        with pytest.raises(BundleError):
            proto.model(junk)
    m = proto.Msg(b"\x08\x96\x01\x12\x03abc\x1a\x03\x01\x02\x03")
    assert m.int(1) == 150 and m.str(2) == "abc" and m.packed(3, "varint") == [1, 2, 3]


# ----------------------------------------------------------------------------- 5. torch-free

def test_interpreter_imports_neither_torch_nor_coremltools(small_package):
    code = (
        "import sys, numpy as np\n"
        "import edgevlm.runtime.mil as mil\n"
        f"p = mil.load_package({str(small_package)!r})\n"
        "out = p.predict({'x': np.ones((1, 300), np.float32)})\n"
        "assert list(out) == p.outputs\n"
        "bad = [m for m in ('torch', 'coremltools', 'edgevlm.exporters', 'timm') if m in sys.modules]\n"
        "print('IMPORTED', bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "IMPORTED []" in res.stdout


def test_an_op_asking_for_a_huge_array_is_refused_before_numpy_allocates_it(tmp_path):
    """A package is untrusted input: fill with a shape from inside the program, a tile, a range and a broadcast of
    two operands whose product is huge are refused with one line (runtime.mil.ops.MAX_ELEMENTS), not run."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    from edgevlm.runtime.mil import ops as mil_ops

    # the shape is an input, so coremltools cannot fold the fill at conversion (which would allocate it here)
    @mb.program(input_specs=[mb.TensorSpec(shape=(2,), dtype=types.int32)], opset_version=ct.target.iOS16)
    def prog(s):
        return mb.reduce_sum(x=mb.fill(shape=s, value=1.0), axes=[0, 1], keep_dims=False)

    with quiet():
        ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                        compute_precision=ct.precision.FLOAT32)
    path = save(ml, tmp_path / "fill.mlpackage")
    p = load_package(path)
    (name,) = p.inputs
    assert float(np.asarray(list(p.predict({name: np.array([3, 4], np.int32)}).values())[0])) == 12.0
    with pytest.raises(BundleError, match="would make 4900000000 elements"):
        p.predict({name: np.array([70000, 70000], np.int32)})
    for shape in ([2, -1], [1 << 16, 1 << 16]):
        with pytest.raises(BundleError):
            mil_ops.budget(shape, "t")
    mil_ops.budget([1 << 15, 1 << 15], "t")                        # 2^30: allowed
