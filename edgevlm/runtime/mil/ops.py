"""The op table: MIL op type -> a numpy implementation.

Each function takes an ``Args`` (the op's resolved inputs) and returns one value, or a tuple for
ops with several outputs. The executor rounds every output to the dtype the program declares for
it, so an FP16 program computes op by op in FP16: each op reads FP16 inputs, computes in FP32
(matmul, conv, reductions and norms accumulate in FP32) and its result is rounded to FP16.
Semantics follow coremltools' MIL op reference (iOS15..iOS18 opsets).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...errors import BundleError

OPS: dict[str, Callable] = {}


def op(*names: str):
    def register(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return register


NP_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "bool": np.bool_,
             "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64, "int4": np.int8,
             "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
             "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8, "uint4": np.uint8, "uint6": np.uint8}


def np_dtype(name: str):
    if name not in NP_DTYPES:
        raise BundleError(f"Core ML program: dtype {name} is not supported by the reference interpreter",
                          "re-export with fp16/fp32 activations")
    return NP_DTYPES[name]


class Args:
    """An op's inputs by name (the executor resolves variables and literals), plus its declared outputs."""

    def __init__(self, op, values: dict[str, list], ctx):
        self.op, self.values, self.ctx = op, values, ctx

    def has(self, name: str) -> bool:
        return name in self.values

    def __getitem__(self, name: str):
        if name not in self.values:
            raise BundleError(f"Core ML program: op {self.op.type} has no input {name!r}",
                              "re-export the package; the program is malformed")
        vals = self.values[name]
        return vals[0] if len(vals) == 1 else vals

    def list(self, name: str) -> list:
        return list(self.values.get(name, []))

    def get(self, name: str, default=None):
        return self[name] if name in self.values else default

    def arr(self, name: str, default=None) -> np.ndarray:
        v = self.get(name, default)
        return v if isinstance(v, np.ndarray) else np.asarray(v)

    def int(self, name: str, default=None) -> int:
        v = self.get(name, default)
        return None if v is None else int(np.asarray(v).item())

    def float(self, name: str, default=None) -> float:
        v = self.get(name, default)
        return None if v is None else float(np.asarray(v).item())

    def bool(self, name: str, default=False) -> bool:
        return bool(np.asarray(self.get(name, default)).item())

    def str(self, name: str, default: str = "") -> str:
        v = self.get(name, default)
        return v if isinstance(v, str) else str(np.asarray(v).item())

    def ints(self, name: str, default=None) -> list | None:
        v = self.get(name, default)
        return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]

    def out_dtype(self, i: int = 0):
        t = self.op.outputs[i].type
        return np_dtype(t.dtype) if t.kind == "tensor" else None


# FP32 copies of a loaded program's FP16 weights, widened once (``remember_widened``), by id of the FP16 array; the
# entry keeps that array too, so an id cannot be reused while its entry lives. Entries leave with their program.
_WIDENED: dict[int, tuple[np.ndarray, np.ndarray]] = {}
WIDEN_ONCE_MIN = 1024          # smaller constants are widened at each use (cheap)


def remember_widened(arrays) -> list[int]:
    """Widen these FP16 constants once; returns the keys to forget when their program goes."""
    keys = []
    for x in arrays:
        if isinstance(x, np.ndarray) and x.dtype == np.float16 and x.size >= WIDEN_ONCE_MIN:
            _WIDENED[id(x)] = (x, x.astype(np.float32))
            keys.append(id(x))
    return keys


def forget_widened(keys: list[int]) -> None:
    for k in keys:
        _WIDENED.pop(k, None)


def up(x: np.ndarray) -> np.ndarray:
    """The compute dtype of ``x``: FP16 is widened to FP32 (the result is rounded back by the executor)."""
    x = np.asarray(x)
    if x.dtype != np.float16:
        return x
    hit = _WIDENED.get(id(x))
    return hit[1] if hit is not None and hit[0] is x else x.astype(np.float32)


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(a: Args, name: str, rank: int) -> tuple | None:
    axes = a.ints(name)
    return None if axes is None else tuple(_axis(i, rank) for i in axes)


# ----------------------------------------------------------------------------- elementwise

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


# The most elements one op may make. A package is untrusted input: an op whose output size comes from values
# inside the program (fill's shape, tile's reps, a range, a broadcast of two large operands, an upsample's scale) is
# refused before numpy allocates it, instead of exhausting memory. 2^30 elements (4 GiB at float32) is ~10x the
# largest tensor of a real-size zoo VLM (Moondream2's KV states: 24 x 32 x 2048 x 64).
MAX_ELEMENTS = 1 << 30


def budget(shape, what: str) -> None:
    """Refuse an output of ``shape`` over :data:`MAX_ELEMENTS` (or with a negative dimension), before it is made."""
    n = 1
    for d in shape:
        d = int(d)
        if d < 0:
            raise BundleError(f"Core ML program: op {what} asks for a dimension of {d}", "re-export the package")
        n *= d
    if n > MAX_ELEMENTS:
        raise BundleError(f"Core ML program: op {what} would make {n} elements (at most {MAX_ELEMENTS})",
                          "the package is broken or hostile: re-export it")


def _binary(fn):
    def run(a: Args):
        x, y = up(a["x"]), up(a["y"])
        budget(np.broadcast_shapes(x.shape, y.shape), a.op.type)
        with np.errstate(all="ignore"):
            return fn(x, y)
    return run


for _name, _fn in _BINARY.items():
    OPS[_name] = _binary(_fn)


_math_erf = np.frompyfunc(math.erf, 1, 1)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to double precision (math.erf); evaluated once per distinct value (an FP16 tensor has few)."""
    x = np.asarray(x, np.float64)
    if x.size > 4096:
        vals, inverse = np.unique(x, return_inverse=True)
        if vals.size < x.size // 4:
            return _math_erf(vals).astype(np.float64)[inverse].reshape(x.shape)
    return _math_erf(x).astype(np.float64)


def _sigmoid(x):
    return np.where(x >= 0, 1 / (1 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1 + np.exp(-np.abs(x))))


_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "acosh": np.arccosh, "asinh": np.arcsinh, "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh,
    "exp": np.exp, "exp2": np.exp2, "floor": np.floor, "round": np.round, "sign": np.sign, "sin": np.sin,
    "sinh": np.sinh, "sqrt": np.sqrt, "square": np.square, "tan": np.tan, "tanh": np.tanh,
    "logical_not": np.logical_not, "erf": _erf, "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": _sigmoid, "silu": lambda x: x * _sigmoid(x),
    "softsign": lambda x: x / (1 + np.abs(x)), "softplus": lambda x: np.logaddexp(0, x),
}


def _unary(fn):
    def run(a: Args):
        with np.errstate(all="ignore"):
            return fn(up(a["x"]))
    return run


for _name, _fn in _UNARY.items():
    OPS[_name] = _unary(_fn)


@op("inverse")
def _inverse(a):
    x = up(a["x"])
    return 1 / (x + a.float("epsilon", 1e-4))


@op("log")
def _log(a):
    x = up(a["x"])
    with np.errstate(all="ignore"):
        return np.log(x + np.asarray(a.float("epsilon", 1e-45), x.dtype))


@op("rsqrt")
def _rsqrt(a):
    x = up(a["x"])
    with np.errstate(all="ignore"):
        return 1 / np.sqrt(x + a.float("epsilon", 1e-12))


@op("clip")
def _clip(a):
    return np.minimum(np.maximum(up(a["x"]), a.float("alpha")), a.float("beta"))


@op("threshold")
def _threshold(a):
    return np.maximum(up(a["x"]), a.float("alpha"))


@op("gelu")
def _gelu(a):
    x = up(a["x"]).astype(np.float64)
    mode = a.str("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    raise BundleError(f"Core ML program: gelu mode {mode!r} is unknown", "re-export the package")


@op("elu")
def _elu(a):
    x = up(a["x"])
    return np.where(x > 0, x, a.float("alpha", 1.0) * (np.exp(np.minimum(x, 0)) - 1))


@op("leaky_relu")
def _leaky_relu(a):
    x = up(a["x"])
    return np.where(x >= 0, x, a.float("alpha", 0.01) * x)


@op("prelu")
def _prelu(a):
    x, alpha = up(a["x"]), up(a["alpha"])
    alpha = alpha.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, alpha * x)


@op("sigmoid_hard")
def _sigmoid_hard(a):
    return np.clip(a.float("alpha", 0.2) * up(a["x"]) + a.float("beta", 0.5), 0, 1)


@op("linear_activation")
def _linear_activation(a):
    return a.float("alpha") * up(a["x"]) + a.float("beta", 0.0)


@op("scaled_tanh")
def _scaled_tanh(a):
    return a.float("alpha", 1.0) * np.tanh(a.float("beta", 1.0) * up(a["x"]))


@op("clamped_relu")
def _clamped_relu(a):
    x = up(a["x"])
    return np.minimum(np.where(x >= 0, x, a.float("alpha") * x), a.float("beta"))


@op("thresholded_relu")
def _thresholded_relu(a):
    x = up(a["x"])
    return np.where(x > a.float("alpha", 1.0), x, 0)


@op("softmax")
def _softmax(a):
    x = up(a["x"])
    axis = a.int("axis", -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


@op("cast")
def _cast(a):
    x = a.arr("x")
    return x.astype(np_dtype(a.str("dtype")))


@op("select")
def _select(a):
    return np.where(a.arr("cond").astype(bool), up(a["a"]), up(a["b"]))


@op("identity")
def _identity(a):
    return a["x"]


# ----------------------------------------------------------------------------- linear algebra

@op("matmul")
def _matmul(a):
    x, y = up(a["x"]), up(a["y"])
    if a.bool("transpose_x") and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if a.bool("transpose_y") and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("linear")
def _linear(a):
    x, w = up(a["x"]), up(a["weight"])
    out = np.matmul(x, w.T)
    return out + up(a["bias"]) if a.has("bias") else out


@op("einsum")
def _einsum(a):
    return np.einsum(a.str("equation"), *[up(v) for v in a.list("values")], optimize=True)


# ----------------------------------------------------------------------------- conv and pooling

def _pads(a: Args, spatial: list[int], kernel: list[int], strides: list[int], dil: list[int],
          ceil_mode: bool = False) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim for pad_type valid / same / same_lower / custom."""
    kind = a.str("pad_type", "valid")
    n = len(spatial)
    if kind == "valid":
        return [(0, 0)] * n
    if kind == "custom":
        p = a.ints("pad", [0] * 2 * n)
        return [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if kind in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(spatial, kernel, strides, dil):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if kind == "same" else (big, small))
        return out
    raise BundleError(f"Core ML program: pad_type {kind!r} is unknown", "re-export the package")


def _windows(x: np.ndarray, kernel, strides, dil, pads, fill, ceil_mode=False) -> np.ndarray:
    """[N, C, *out, *kernel] sliding windows of x [N, C, *spatial] after padding with ``fill``."""
    n = len(kernel)
    if ceil_mode:   # extend the end so that a last partial window (starting inside the input) is kept
        extra = []
        for size, k, s, (pb, pe) in zip(x.shape[2:], kernel, strides, pads):
            span = size + pb + pe
            out = -(-(span - k) // s) + 1
            if (out - 1) * s >= size + pb:
                out -= 1
            extra.append(max((out - 1) * s + k - span, 0))
        pads = [(pb, pe + e) for (pb, pe), e in zip(pads, extra)]
    x = np.pad(x, [(0, 0), (0, 0)] + list(pads), constant_values=fill)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    w = sliding_window_view(x, span, axis=tuple(range(2, 2 + n)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dil)
    return w[index]


def _spatial_params(a: Args, n: int, kernel: list[int]):
    strides = a.ints("strides", [1] * n)
    dil = a.ints("dilations", [1] * n)
    return strides, dil


@op("conv")
def _conv(a):
    x, w = up(a["x"]), up(a["weight"])
    n = x.ndim - 2
    kernel = list(w.shape[2:])
    strides, dil = _spatial_params(a, n, kernel)
    groups = a.int("groups", 1)
    pads = _pads(a, list(x.shape[2:]), kernel, strides, dil)
    win = _windows(x, kernel, strides, dil, pads, 0)               # [N, C, *out, *k]
    N, C = x.shape[:2]
    out_sp = win.shape[2:2 + n]
    co = w.shape[0]
    win = win.reshape((N, groups, C // groups) + out_sp + tuple(kernel))
    wg = w.reshape((groups, co // groups, C // groups) + tuple(kernel))
    letters = "hijk"[:n]
    kl = "pqrs"[:n]
    y = np.einsum(f"ngc{letters}{kl},goc{kl}->ngo{letters}", win, wg, optimize=True)
    y = y.reshape((N, co) + out_sp)
    if a.has("bias"):
        y = y + up(a["bias"]).reshape((1, -1) + (1,) * n)
    return y


@op("conv_transpose")
def _conv_transpose(a):
    x, w = up(a["x"]), up(a["weight"])      # weight [C_in, C_out / groups, *k]
    n = x.ndim - 2
    kernel = list(w.shape[2:])
    strides, dil = _spatial_params(a, n, kernel)
    groups = a.int("groups", 1)
    N, C = x.shape[:2]
    co_g = w.shape[1]
    # dilate the input by the stride, pad by (k-1)*d, and run a plain conv with the flipped kernel
    sp = [(s - 1) * st + 1 for s, st in zip(x.shape[2:], strides)]
    xd = np.zeros((N, C) + tuple(sp), x.dtype)
    xd[(slice(None), slice(None)) + tuple(slice(None, None, st) for st in strides)] = x
    full = [(k - 1) * d for k, d in zip(kernel, dil)]
    xd = np.pad(xd, [(0, 0), (0, 0)] + [(f, f) for f in full])
    wf = np.flip(w, axis=tuple(range(2, 2 + n)))
    wf = wf.reshape((groups, C // groups, co_g) + tuple(kernel)).swapaxes(1, 2).reshape(
        (groups * co_g, C // groups) + tuple(kernel))
    win = _windows(xd, kernel, [1] * n, dil, [(0, 0)] * n, 0)
    out_sp = win.shape[2:2 + n]
    win = win.reshape((N, groups, C // groups) + out_sp + tuple(kernel))
    letters, kl = "hijk"[:n], "pqrs"[:n]
    y = np.einsum(f"ngc{letters}{kl},goc{kl}->ngo{letters}", win,
                  wf.reshape((groups, co_g, C // groups) + tuple(kernel)), optimize=True)
    y = y.reshape((N, groups * co_g) + out_sp)
    kind = a.str("pad_type", "valid")
    if kind == "custom":
        p = a.ints("pad", [0] * 2 * n)
        y = y[(slice(None), slice(None)) + tuple(slice(p[2 * i], y.shape[2 + i] - p[2 * i + 1]) for i in range(n))]
    elif kind in ("same", "same_lower"):
        want = [s * st for s, st in zip(x.shape[2:], strides)]
        cut = [y.shape[2 + i] - want[i] for i in range(n)]
        y = y[(slice(None), slice(None)) + tuple(
            slice(c // 2 if kind == "same" else c - c // 2, y.shape[2 + i] - (c - c // 2 if kind == "same" else c // 2))
            for i, c in enumerate(cut))]
    if a.has("output_shape"):
        shape = a.ints("output_shape")[2:]
        y = np.pad(y, [(0, 0), (0, 0)] + [(0, max(s - y.shape[2 + i], 0)) for i, s in enumerate(shape)])
        y = y[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape)]
    if a.has("bias"):
        y = y + up(a["bias"]).reshape((1, -1) + (1,) * n)
    return y


def _pool_setup(a: Args, x: np.ndarray):
    kernel = a.ints("kernel_sizes")
    n = len(kernel)
    strides = a.ints("strides", [1] * n)
    pads = _pads(a, list(x.shape[x.ndim - n:]), kernel, strides, [1] * n)
    return kernel, strides, pads, a.bool("ceil_mode", False)


def _pool_input(x: np.ndarray, n: int) -> tuple[np.ndarray, tuple]:
    """Pools take rank n+1 (no batch) or n+2 inputs: bring x to [N, C, *spatial]."""
    lead = x.shape[:x.ndim - n]
    return x.reshape((-1, 1) + x.shape[x.ndim - n:]) if len(lead) != 2 else x, lead


@op("max_pool")
def _max_pool(a):
    x = up(a["x"])
    kernel, strides, pads, ceil_mode = _pool_setup(a, x)
    n = len(kernel)
    xx, lead = _pool_input(x, n)
    fill = -np.inf if np.issubdtype(xx.dtype, np.floating) else np.iinfo(xx.dtype).min
    win = _windows(xx, kernel, strides, [1] * n, pads, fill, ceil_mode)
    y = win.max(axis=tuple(range(-n, 0)))
    return y.reshape(lead + y.shape[2:])


@op("avg_pool", "l2_pool")
def _avg_pool(a):
    x = up(a["x"])
    kernel, strides, pads, ceil_mode = _pool_setup(a, x)
    n = len(kernel)
    xx, lead = _pool_input(x, n)
    axes = tuple(range(-n, 0))
    if a.op.type == "l2_pool":
        win = _windows(xx * xx, kernel, strides, [1] * n, pads, 0, ceil_mode)
        y = np.sqrt(win.sum(axis=axes))
        return y.reshape(lead + y.shape[2:])
    win = _windows(xx, kernel, strides, [1] * n, pads, 0, ceil_mode)
    # divisor: the window's cells inside the input (exclude_padding) or inside input + explicit padding
    exclude = a.bool("exclude_padding_from_average", False)
    ones = np.ones((1, 1) + xx.shape[2:], np.float32)
    mask_pads = pads if exclude else [(0, 0)] * n
    if not exclude:
        ones = np.pad(ones, [(0, 0), (0, 0)] + list(pads), constant_values=1)
    count = _windows(ones, kernel, strides, [1] * n, mask_pads, 0, ceil_mode)
    if not exclude:   # the windows of the pre-padded ones must line up with those of x
        count = count[(slice(None), slice(None)) + tuple(slice(0, s) for s in win.shape[2:2 + n])]
    y = win.sum(axis=axes) / np.maximum(count.sum(axis=axes), 1)
    return y.reshape(lead + y.shape[2:])


# ----------------------------------------------------------------------------- normalization

def _channel(v: np.ndarray, rank: int) -> np.ndarray:
    return up(v).reshape((1, -1) + (1,) * (rank - 2))


@op("batch_norm")
def _batch_norm(a):
    x = up(a["x"])
    mean, var = _channel(a["mean"], x.ndim), _channel(a["variance"], x.ndim)
    y = (x - mean) / np.sqrt(var + a.float("epsilon", 1e-5))
    if a.has("gamma"):
        y = y * _channel(a["gamma"], x.ndim)
    if a.has("beta"):
        y = y + _channel(a["beta"], x.ndim)
    return y


@op("instance_norm")
def _instance_norm(a):
    x = up(a["x"])
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + a.float("epsilon", 1e-5))
    if a.has("gamma"):
        y = y * _channel(a["gamma"], x.ndim)
    if a.has("beta"):
        y = y + _channel(a["beta"], x.ndim)
    return y


def _affine_shape(v: np.ndarray, rank: int, axes: tuple) -> np.ndarray:
    shape = [1] * rank
    for ax, size in zip(sorted(axes), np.shape(v)):
        shape[ax] = size
    return up(v).reshape(shape)


@op("layer_norm")
def _layer_norm(a):
    x = up(a["x"])
    axes = _axes(a, "axes", x.ndim)
    axes = tuple(range(x.ndim)) if axes is None else axes
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + a.float("epsilon", 1e-5))
    if a.has("gamma"):
        y = y * _affine_shape(a["gamma"], x.ndim, axes)
    if a.has("beta"):
        y = y + _affine_shape(a["beta"], x.ndim, axes)
    return y


@op("l2_norm")
def _l2_norm(a):
    x = up(a["x"])
    axes = _axes(a, "axes", x.ndim)
    axes = tuple(range(1, x.ndim)) if axes is None else axes
    return x / np.sqrt((x * x).sum(axis=axes, keepdims=True) + a.float("epsilon", 1e-6))


# ----------------------------------------------------------------------------- reductions

_REDUCE = {
    "reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: _logsumexp(x, axis, keepdims),
}


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    y = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return y if keepdims else np.squeeze(y, axis=axis)


def _reduce(fn):
    def run(a: Args):
        x = up(a["x"])
        axes = _axes(a, "axes", x.ndim)
        return fn(x, axis=axes, keepdims=a.bool("keep_dims", False))
    return run


for _name, _fn in _REDUCE.items():
    OPS[_name] = _reduce(_fn)


@op("reduce_argmax", "reduce_argmin")
def _argmax(a):
    x = up(a["x"])
    axis = _axis(a.int("axis", -1), x.ndim)
    fn = np.argmax if a.op.type == "reduce_argmax" else np.argmin
    y = fn(x, axis=axis)
    return np.expand_dims(y, axis) if a.bool("keep_dims", False) else y


@op("cumsum")
def _cumsum(a):
    x = up(a["x"])
    axis = _axis(a.int("axis", 0), x.ndim)
    if a.bool("reverse"):
        x = np.flip(x, axis)
    y = np.cumsum(x, axis=axis)
    if a.bool("exclusive"):
        y = y - x
    return np.flip(y, axis) if a.bool("reverse") else y


@op("topk")
def _topk(a):
    x = up(a["x"])
    axis = _axis(a.int("axis", -1), x.ndim)
    k = a.int("k", 1)
    ascending = a.bool("ascending", False)
    order = np.argsort(x if ascending else -x, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    if not a.bool("sort", True):
        idx = np.sort(idx, axis=axis)
    vals = np.take_along_axis(x, idx, axis=axis)
    return (vals, idx) if len(a.op.outputs) > 1 else vals


@op("argsort")
def _argsort(a):
    x = up(a["x"])
    return np.argsort(x if a.bool("ascending", False) else -x, axis=a.int("axis", -1), kind="stable")


# ----------------------------------------------------------------------------- shapes and indexing

@op("reshape")
def _reshape(a):
    x = np.asarray(a["x"])
    shape = a.ints("shape")
    zeros = [i for i, s in enumerate(shape) if s == 0]
    if zeros:   # 0 copies the input dim right-aligned with it (iOS17); out of range -> 1
        for i in zeros:
            j = x.ndim - (len(shape) - i)
            shape[i] = x.shape[j] if 0 <= j < x.ndim else 1
    return x.reshape(shape)


@op("transpose")
def _transpose(a):
    return np.transpose(a["x"], a.ints("perm"))


@op("expand_dims")
def _expand_dims(a):
    x = np.asarray(a["x"])
    axes = a.ints("axes")
    rank = x.ndim + len(axes)
    for ax in sorted(_axis(i, rank) for i in axes):
        x = np.expand_dims(x, ax)
    return x


@op("squeeze")
def _squeeze(a):
    x = np.asarray(a["x"])
    axes = _axes(a, "axes", x.ndim)
    return np.squeeze(x, axis=axes)


@op("flatten2d")
def _flatten2d(a):
    x = np.asarray(a["x"])
    axis = _axis(a.int("axis", 1), x.ndim)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


@op("concat")
def _concat(a):
    vals = [np.asarray(v) for v in a.list("values")]
    if any(v.ndim == 0 for v in vals):   # the serialized program may concat scalars as [1] tensors
        vals = [np.atleast_1d(v) for v in vals]
    axis = a.int("axis")
    if a.bool("interleave", False):
        ax = _axis(axis, vals[0].ndim)
        stacked = np.stack(vals, axis=ax + 1)
        shape = list(vals[0].shape)
        shape[ax] *= len(vals)
        return stacked.reshape(shape)
    return np.concatenate(vals, axis=axis)


@op("stack")
def _stack(a):
    return np.stack([np.asarray(v) for v in a.list("values")], axis=a.int("axis"))


@op("split")
def _split(a):
    x = np.asarray(a["x"])
    axis = _axis(a.int("axis"), x.ndim)
    sizes = a.ints("split_sizes")
    if sizes is None:
        n = a.int("num_splits")
        size = -(-x.shape[axis] // n)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _slices(a: Args, x: np.ndarray):
    """The index tuple of slice_by_index / slice_update (masks, strides, squeeze)."""
    r = x.ndim
    begin, end = a.ints("begin"), a.ints("end")
    stride = a.ints("stride", [1] * r)
    bm = [bool(v) for v in a.arr("begin_mask", [False] * r).reshape(-1)]
    em = [bool(v) for v in a.arr("end_mask", [False] * r).reshape(-1)]
    sq = [bool(v) for v in a.arr("squeeze_mask", [False] * r).reshape(-1)]
    index = []
    for i in range(r):
        if sq[i]:
            b = begin[i] + x.shape[i] if begin[i] < 0 else begin[i]
            index.append(b)
        else:
            index.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]))
    return tuple(index)


@op("slice_by_index")
def _slice_by_index(a):
    x = np.asarray(a["x"])
    return x[_slices(a, x)]


@op("slice_by_size")
def _slice_by_size(a):
    x = np.asarray(a["x"])
    begin, size = a.ints("begin"), a.ints("size")
    index = []
    for i, (b, s) in enumerate(zip(begin, size)):
        b = b + x.shape[i] if b < 0 else b
        index.append(slice(b, x.shape[i] if s == -1 else b + s))
    return x[tuple(index)]


@op("slice_update")
def _slice_update(a):
    x = np.array(a["x"], copy=True)
    index = _slices(a, x)
    upd = np.asarray(a["update"])
    target = x[index]
    x[index] = upd.reshape(target.shape)
    return x


@op("reverse")
def _reverse(a):
    x = np.asarray(a["x"])
    axes = _axes(a, "axes", x.ndim)
    return np.flip(x, axis=axes)


@op("tile")
def _tile(a):
    x, reps = np.asarray(a["x"]), a.ints("reps")
    d = max(len(reps), x.ndim)                  # np.tile pads the shorter of shape and reps with leading 1s
    budget([n * r for n, r in zip((1,) * (d - x.ndim) + x.shape, (1,) * (d - len(reps)) + tuple(reps))], "tile")
    return np.tile(x, reps)


@op("pad")
def _pad(a):
    x = np.asarray(a["x"])
    p = a.ints("pad")
    k = len(p) // 2
    widths = [(0, 0)] * (x.ndim - k) + [(p[2 * i], p[2 * i + 1]) for i in range(k)]
    budget([n + lo + hi for n, (lo, hi) in zip(x.shape, widths)], "pad")
    mode = a.str("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, constant_values=a.float("constant_val", 0.0))
    return np.pad(x, widths, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@op("shape")
def _shape(a):
    return np.asarray(np.shape(a["x"]), np.int32)


@op("fill")
def _fill(a):
    budget(a.ints("shape"), "fill")
    return np.full(a.ints("shape"), a.get("value", 0.0))


@op("fill_like")
def _fill_like(a):
    return np.full(np.shape(a["ref_tensor"]), a.get("value", 0.0))


@op("range_1d")
def _range_1d(a):
    start, end, step = (np.asarray(a[k]).item() for k in ("start", "end", "step"))
    if step == 0 or not all(math.isfinite(float(v)) for v in (start, end, step)):
        raise BundleError(f"Core ML program: range_1d({start}, {end}, {step}) has no length", "re-export the package")
    budget([max(0, math.ceil((end - start) / step))], "range_1d")
    return np.arange(start, end, step)


@op("band_part")
def _band_part(a):
    x = np.asarray(a["x"])
    lower, upper = a.int("lower", -1), a.int("upper", -1)
    m, n = x.shape[-2:]
    i, j = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@op("one_hot")
def _one_hot(a):
    idx = np.asarray(a["indices"]).astype(np.int64)
    depth = a.int("one_hot_vector_size")
    budget([*idx.shape, depth], "one_hot")
    axis = a.int("axis", -1)
    on, off = a.get("on_value", 1), a.get("off_value", 0)
    hot = np.arange(depth) == idx[..., None]
    return np.moveaxis(np.where(hot, on, off), -1, _axis(axis, idx.ndim + 1))


@op("non_zero")
def _non_zero(a):
    return np.transpose(np.nonzero(a["x"]))


@op("pixel_shuffle")
def _pixel_shuffle(a):
    x = np.asarray(a["x"])
    f = a.int("upscale_factor")
    n, c, h, w = x.shape
    return x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, c // (f * f), h * f, w * f)


@op("pixel_unshuffle")
def _pixel_unshuffle(a):
    x = np.asarray(a["x"])
    f = a.int("downscale_factor")
    n, c, h, w = x.shape
    return x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * f * f, h // f, w // f)


# ----------------------------------------------------------------------------- gather / scatter

def _wrap(idx: np.ndarray, size: int) -> np.ndarray:
    idx = np.asarray(idx).astype(np.int64)
    return np.where(idx < 0, idx + size, idx)


@op("gather")
def _gather(a):
    x = np.asarray(a["x"])
    axis = _axis(a.int("axis", 0), x.ndim)
    idx = _wrap(a["indices"], x.shape[axis])
    b = a.int("batch_dims", 0)
    if b == 0:
        return np.take(x, idx, axis=axis)
    lead = x.shape[:b]
    xs = x.reshape((-1,) + x.shape[b:])
    ids = idx.reshape((-1,) + idx.shape[b:])
    out = np.stack([np.take(xs[i], ids[i], axis=axis - b) for i in range(xs.shape[0])])
    return out.reshape(lead + out.shape[1:])


@op("gather_along_axis")
def _gather_along_axis(a):
    x = np.asarray(a["x"])
    axis = _axis(a.int("axis", 0), x.ndim)
    return np.take_along_axis(x, _wrap(a["indices"], x.shape[axis]), axis=axis)


@op("gather_nd")
def _gather_nd(a):
    x = np.asarray(a["x"])
    idx = np.asarray(a["indices"]).astype(np.int64)
    b = a.int("batch_dims", 0)
    if b:
        lead = x.shape[:b]
        xs, ids = x.reshape((-1,) + x.shape[b:]), idx.reshape((-1,) + idx.shape[b:])
        out = np.stack([xs[i][tuple(np.moveaxis(ids[i], -1, 0))] for i in range(xs.shape[0])])
        return out.reshape(lead + out.shape[1:])
    return x[tuple(np.moveaxis(idx, -1, 0))]


_SCATTER = {"update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
            "max": np.maximum, "min": np.minimum}


def _scatter_apply(data, index, updates, mode):
    fn = _SCATTER.get(mode, "?")
    if fn == "?":
        raise BundleError(f"Core ML program: scatter mode {mode!r} is unknown", "re-export the package")
    if fn is None:
        data[index] = updates
    else:
        fn.at(data, index, updates)
    return data


@op("scatter")
def _scatter(a):
    data = np.array(up(a["data"]), copy=True)
    axis = _axis(a.int("axis", 0), data.ndim)
    idx = _wrap(a["indices"], data.shape[axis])
    upd = up(a["updates"])
    moved = np.moveaxis(data, axis, 0)
    _scatter_apply(moved, idx, np.moveaxis(upd, axis, 0) if upd.ndim == data.ndim else upd, a.str("mode", "add"))
    return data


@op("scatter_along_axis")
def _scatter_along_axis(a):
    data = np.array(up(a["data"]), copy=True)
    axis = _axis(a.int("axis", 0), data.ndim)
    idx = _wrap(a["indices"], data.shape[axis])
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    return _scatter_apply(data, tuple(grid), up(a["updates"]), a.str("mode", "add"))


@op("scatter_nd")
def _scatter_nd(a):
    data = np.array(up(a["data"]), copy=True)
    idx = np.asarray(a["indices"]).astype(np.int64)
    return _scatter_apply(data, tuple(np.moveaxis(idx, -1, 0)), up(a["updates"]), a.str("mode", "add"))


# ----------------------------------------------------------------------------- resizing

def _grid(size_in: int, size_out: int, mode: str) -> np.ndarray:
    i = np.arange(size_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if size_out == 1:
            g = np.full(1, (size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            g = i * (size_in - 1) / (size_out - 1)
    elif mode == "DEFAULT":
        g = i * (size_in - size_in / size_out) / (size_out - 1) if size_out > 1 else np.zeros(1)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        g = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        g = (i + 0.5) * size_in / size_out - 0.5
    else:
        raise BundleError(f"Core ML program: sampling mode {mode!r} is unknown", "re-export the package")
    return np.clip(g, 0, size_in - 1)


def _bilinear(x: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    budget([*x.shape[:-2], out_h, out_w], "a bilinear resize")
    for axis, size in ((-2, out_h), (-1, out_w)):
        g = _grid(x.shape[axis], size, mode)
        lo = np.floor(g).astype(np.int64)
        hi = np.minimum(lo + 1, x.shape[axis] - 1)
        t = (g - lo).astype(x.dtype)
        shape = [1] * x.ndim
        shape[axis] = size
        t = t.reshape(shape)
        x = np.take(x, lo, axis=axis) * (1 - t) + np.take(x, hi, axis=axis) * t
    return x


@op("upsample_bilinear")
def _upsample_bilinear(a):
    x = up(a["x"])
    sh, sw = a.float("scale_factor_height", 1.0), a.float("scale_factor_width", 1.0)
    align = a.bool("align_corners", True)
    half = a.bool("half_pixel_centers", not align)
    mode = "STRICT_ALIGN_CORNERS" if align else ("UNALIGN_CORNERS" if half else "ASYMMETRIC")
    h, w = math.floor(x.shape[-2] * sh), math.floor(x.shape[-1] * sw)
    budget([*x.shape[:-2], h, w], "upsample_bilinear")
    if mode == "ASYMMETRIC":   # align_corners=False, half_pixel_centers=False: grid = i / scale
        return _asymmetric_bilinear(x, h, w, sh, sw)
    return _bilinear(x, h, w, mode)


def _asymmetric_bilinear(x, h, w, sh, sw):
    for axis, size, s in ((-2, h, sh), (-1, w, sw)):
        g = np.clip(np.arange(size) / s, 0, x.shape[axis] - 1)
        lo = np.floor(g).astype(np.int64)
        hi = np.minimum(lo + 1, x.shape[axis] - 1)
        shape = [1] * x.ndim
        shape[axis] = size
        t = (g - lo).astype(x.dtype).reshape(shape)
        x = np.take(x, lo, axis=axis) * (1 - t) + np.take(x, hi, axis=axis) * t
    return x


@op("resize_bilinear")
def _resize_bilinear(a):
    x = up(a["x"])
    return _bilinear(x, a.int("target_size_height", 1), a.int("target_size_width", 1),
                     a.str("sampling_mode", "DEFAULT"))


@op("upsample_nearest_neighbor")
def _upsample_nearest(a):
    x = np.asarray(a["x"])
    for axis, s in ((-2, a.float("scale_factor_height", 1.0)), (-1, a.float("scale_factor_width", 1.0))):
        size = math.floor(x.shape[axis] * s)
        out = list(x.shape)
        out[axis] = size
        budget(out, "upsample_nearest_neighbor")
        idx = np.minimum(np.floor(np.arange(size) / s).astype(np.int64), x.shape[axis] - 1)
        x = np.take(x, idx, axis=axis)
    return x


@op("resize_nearest_neighbor")
def _resize_nearest(a):
    x = np.asarray(a["x"])
    for axis, size in ((-2, a.int("target_size_height", 1)), (-1, a.int("target_size_width", 1))):
        idx = np.minimum(np.floor(np.arange(size) * x.shape[axis] / size).astype(np.int64), x.shape[axis] - 1)
        x = np.take(x, idx, axis=axis)
    return x


# ----------------------------------------------------------------------------- attention

@op("scaled_dot_product_attention")
def _sdpa(a):
    q, k, v = up(a["query"]), up(a["key"]), up(a["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / math.sqrt(q.shape[-1])
    if a.has("attn_mask"):
        mask = np.asarray(a["attn_mask"])
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + up(mask)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return np.matmul(e / e.sum(axis=-1, keepdims=True), v)


# ----------------------------------------------------------------------------- activation quantization (iOS17)

@op("quantize")
def _quantize(a):
    x = up(a["input"])
    axis = a.int("axis", 0)
    scale = _along(a["scale"], axis, x.ndim).astype(np.float32)
    zp = _along(a.get("zero_point", 0), axis, x.ndim).astype(np.float32)
    dtype = np_dtype(a.str("output_dtype"))
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale + zp), info.min, info.max).astype(dtype)


@op("dequantize")
def _dequantize(a):
    q = np.asarray(a["input"])
    axis = a.int("axis", 0)
    zp = _along(a.get("zero_point", 0), axis, q.ndim).astype(np.float32)
    return (q.astype(np.float32) - zp) * _along(a["scale"], axis, q.ndim).astype(np.float32)


@op("depth_to_space")
def _depth_to_space(a):
    x = np.asarray(a["x"])
    b = a.int("block_size")
    n, c, h, w = x.shape
    return x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2).reshape(n, c // (b * b), h * b, w * b)


@op("space_to_depth")
def _space_to_depth(a):
    x = np.asarray(a["x"])
    b = a.int("block_size")
    n, c, h, w = x.shape
    return x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4).reshape(n, c * b * b, h // b, w // b)


# ----------------------------------------------------------------------------- states

@op("read_state")
def _read_state(a):
    ref = a["input"]
    return np.array(ref.get(), copy=True)


@op("write_state")
def _write_state(a):
    """What the serializer writes for ``coreml_update_state`` (followed by a read_state when used)."""
    a["input"].set(a["data"])
    return ()


@op("coreml_update_state")
def _update_state(a):
    ref = a["state"]
    ref.set(a["value"])
    return np.array(a["value"], copy=True)


# ----------------------------------------------------------------------------- compression (constexpr)

def _along(v: np.ndarray, axis: int, rank: int) -> np.ndarray:
    v = np.asarray(v)
    if v.ndim == 0 or v.size == 1:
        return v.reshape(())
    shape = [1] * rank
    shape[_axis(axis, rank)] = -1
    return v.reshape(shape)


@op("constexpr_affine_dequantize")
def _affine_dequantize(a):
    q = np.asarray(a["quantized_data"])
    scale = np.asarray(a["scale"])
    axis = a.int("axis", 0)
    zp = _along(a["zero_point"], axis, q.ndim).astype(np.float32)
    return (q.astype(np.float32) - zp) * _along(scale, axis, q.ndim).astype(np.float32)


def _blocks(v: np.ndarray, shape: tuple) -> np.ndarray:
    """Repeat a per-block tensor (same rank, dims dividing ``shape``) to ``shape``."""
    for axis, (full, part) in enumerate(zip(shape, v.shape)):
        if part and full != part:
            v = np.repeat(v, full // part, axis=axis)
    return v


def _shift_scale(data: np.ndarray, scale: np.ndarray, offset) -> np.ndarray:
    x = data.astype(np.float32)
    if offset is not None:
        x = x - _blocks(np.asarray(offset).astype(np.float32), data.shape)
    return x * _blocks(np.asarray(scale).astype(np.float32), data.shape)


@op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a):
    return _shift_scale(np.asarray(a["data"]), a["scale"], a.get("offset"))


def _lut_dense(indices: np.ndarray, lut: np.ndarray, vector_axis) -> np.ndarray:
    """iOS18 palettization: lut [*blocks, palette, vector], indices already unpacked to their values."""
    vector = lut.shape[-1]
    axis = _axis(vector_axis or 0, indices.ndim) if vector > 1 else None
    if axis is not None:
        indices = np.swapaxes(indices, -1, axis)
        lut = np.swapaxes(lut, -3, axis)
    # split every dim into (block, within block) so one lut block broadcasts over its elements
    split, lut_shape = [], []
    for full, nblk in zip(indices.shape, lut.shape[:-2]):
        split += [nblk, full // nblk]
        lut_shape += [nblk, 1]
    idx = indices.astype(np.int64).reshape([*split, 1, 1])
    out = np.take_along_axis(lut.reshape(lut_shape + list(lut.shape[-2:])), idx, axis=-2)
    out = out.reshape(indices.shape[:-1] + (indices.shape[-1] * vector,))
    return np.swapaxes(out, -1, axis) if axis is not None else out


@op("constexpr_lut_to_dense")
def _lut_to_dense(a):
    lut = np.asarray(a["lut"])
    indices = np.asarray(a["indices"])
    if a.has("shape"):   # iOS16: a flat lut, indices packed LSB first into uint8 at log2(len(lut)) bits
        shape = tuple(a.ints("shape"))
        nbits = int(math.log2(lut.size))
        count = int(np.prod(shape))
        bits = np.unpackbits(indices.astype(np.uint8), bitorder="little")[: count * nbits]
        idx = (bits.reshape(count, nbits).astype(np.int64) << np.arange(nbits)).sum(1)
        return lut.reshape(-1)[idx].reshape(shape)
    return _lut_dense(indices, lut, a.int("vector_axis"))


def _dense(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, nonzero.dtype)
    out[mask != 0] = nonzero.reshape(-1)
    return out


@op("constexpr_sparse_to_dense")
def _sparse_to_dense(a):
    data = np.asarray(a["nonzero_data"])
    mask = np.asarray(a["mask"])
    if a.has("shape"):   # iOS16: a flat bit mask packed into uint8
        shape = tuple(a.ints("shape"))
        mask = np.unpackbits(mask.astype(np.uint8), bitorder="little")[: int(np.prod(shape))].reshape(shape)
    return _dense(data, mask)


@op("constexpr_lut_to_sparse")
def _lut_to_sparse(a):
    """Joint sparse + palettized: (mask, de-palettized nonzero values)."""
    mask = np.asarray(a["indices_mask"])
    lut = np.asarray(a["lut"])
    axis = a.int("vector_axis")
    dense = _lut_dense(_dense(np.asarray(a["indices_nonzero_data"]), mask), lut, axis)
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=_axis(axis, mask.ndim))
    return mask, dense[mask != 0].reshape(-1)


@op("constexpr_sparse_blockwise_shift_scale")
def _sparse_shift_scale(a):
    """Joint sparse + quantized: (mask, dequantized nonzero values)."""
    mask = np.asarray(a["data_mask"])
    dense = _shift_scale(_dense(np.asarray(a["nonzero_data"]), mask), a["scale"], a.get("offset"))
    return mask, dense[mask != 0].reshape(-1)


@op("constexpr_cast")
def _constexpr_cast(a):
    return np.asarray(a["source_val"]).astype(np_dtype(a.str("output_dtype")))


CONSTEXPR = {name for name in OPS if name.startswith("constexpr_")}
