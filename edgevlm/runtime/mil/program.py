"""Load an ML program package and execute its ``main`` function op by op with numpy."""
from __future__ import annotations

import json
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import BundleError
from . import proto
from .blob import BlobFile, decode
from .ops import CONSTEXPR, OPS, Args, forget_widened, np_dtype, remember_widened

_FIX = "re-export the package"


class NotCovered(BundleError):
    """An op the reference interpreter has no implementation for."""

    def __init__(self, op_type: str):
        super().__init__(f"not covered: {op_type}",
                         "the reference interpreter cannot run this program; check it on a Mac with `verify`")
        self.op_type = op_type


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple


class StateRef:
    """A state variable of one predict call: reads and writes go to the caller's state dict."""

    def __init__(self, store: dict, name: str, dtype):
        self.store, self.name, self.dtype = store, name, dtype

    def get(self) -> np.ndarray:
        return self.store[self.name]

    def set(self, value) -> None:
        value = np.asarray(value)
        if value.shape != self.store[self.name].shape:
            raise BundleError(f"Core ML program: state {self.name!r} written with shape {value.shape}, "
                              f"it has {self.store[self.name].shape}", _FIX)
        self.store[self.name][...] = value.astype(self.dtype, copy=False)


def _walk(block: proto.Block):
    for op in block.operations:
        yield op
        for b in op.blocks:
            yield from _walk(b)


def _resolve_root(path: Path) -> tuple[Path, Path]:
    """(model.mlmodel, weights dir) of a .mlpackage directory or of a bare .mlmodel file."""
    if path.is_file():
        return path, path.parent / "weights"
    if not path.is_dir():
        raise BundleError(f"Core ML package {path} does not exist", "pass the path of a .mlpackage directory")
    manifest = path / "Manifest.json"
    model_file = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    if manifest.is_file():
        try:
            info = json.loads(manifest.read_text())
            entry = info["itemInfoEntries"][info["rootModelIdentifier"]]
            model_file = path / "Data" / entry["path"]
        except (ValueError, KeyError, TypeError):
            raise BundleError(f"Core ML package {path.name}: Manifest.json names no root model", _FIX) from None
    root = path.resolve()
    if root not in model_file.resolve().parents:
        raise BundleError(f"Core ML package {path.name}: the root model path leaves the package", _FIX)
    if not model_file.is_file():
        raise BundleError(f"Core ML package {path.name}: {model_file.relative_to(path)} is missing", _FIX)
    return model_file, model_file.parent / "weights"


class Program:
    """A loaded ML program: its interface, op inventory and a numpy ``predict``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        model_file, self._weights_dir = _resolve_root(self.path)
        self._model_dir = model_file.parent
        model = proto.model(model_file.read_bytes())
        if model.program is None:
            raise BundleError(f"Core ML package {self.path.name} holds a {model.kind} model, not an ML program",
                              "convert with convert_to='mlprogram'")
        if "main" not in model.program.functions:
            raise BundleError(f"Core ML package {self.path.name}: the program has no 'main' function", _FIX)
        self.spec_version = model.spec_version
        self.description = model
        self.function = model.program.functions["main"]
        self.opset = self.function.opset
        self.block = self.function.block
        self.inputs: dict[str, TensorType] = {}
        self.states: dict[str, TensorType] = {}
        for named in self.function.inputs:
            t = named.type
            if t.kind == "state":
                inner = t.inner[0]
                self.states[named.name] = TensorType(inner.dtype, inner.shape)
            elif t.kind == "tensor":
                self.inputs[named.name] = TensorType(t.dtype, t.shape)
            else:
                raise BundleError(f"Core ML package {self.path.name}: input {named.name!r} is a {t.kind}", _FIX)
        self.outputs = list(self.block.outputs)
        self._check_names()
        self.ops_used = Counter(op.type for op in _walk(self.block))
        self.uncovered = sorted(t for t in self.ops_used if t not in OPS and t != "const")
        self._ranges = {f.name: f for f in model.inputs}
        self._blobs: dict[Path, BlobFile] = {}
        self._consts = self._materialize()
        # FP16 weights widened to FP32 once, not at every op call (the arithmetic is the same); dropped with the program
        weakref.finalize(self, forget_widened, remember_widened(self._consts.values()))

    def _check_names(self) -> None:
        """Every variable an op reads, and every block output, is defined before it is used."""
        defined = {n.name for n in self.function.inputs}
        for op in self.block.operations:
            for bindings in op.inputs.values():
                for b in bindings:
                    if b.name is not None and b.name not in defined:
                        raise BundleError(f"Core ML program: op {op.type} reads {b.name!r} before it is defined", _FIX)
            defined.update(o.name for o in op.outputs)
        missing = [n for n in self.block.outputs if n not in defined]
        if missing:
            raise BundleError(f"Core ML program: output {missing[0]!r} is computed by no op", _FIX)

    # ------------------------------------------------------------------ constants

    def _blob(self, name: str) -> BlobFile:
        rel = name.replace("@model_path/", "", 1) if name.startswith("@model_path/") else name
        try:
            path = (self._model_dir / rel).resolve()
        except (ValueError, OSError):
            raise BundleError(f"Core ML package {self.path.name}: weight file name {name!r} is invalid", _FIX) from None
        if self.path.resolve() not in path.parents and self._model_dir.resolve() not in path.parents:
            raise BundleError(f"Core ML package {self.path.name}: weight file {name!r} leaves the package", _FIX)
        if path not in self._blobs:
            self._blobs[path] = BlobFile(path)
        return self._blobs[path]

    def literal(self, v: proto.Value):
        """A literal Value as numpy (tensors), str (string scalars) or list (tuples and lists)."""
        t = v.type
        if t.kind in ("tuple", "list"):
            return [self.literal(x) for x in v.data]
        if t.kind != "tensor":
            raise BundleError(f"Core ML program: a {t.kind} literal is not supported", _FIX)
        shape = t.shape or ()
        if None in shape:
            raise BundleError("Core ML program: a literal with an unknown dimension", _FIX)
        if isinstance(v.data, proto.Blob):
            return self._blob(v.data.file).read(v.data.offset, t.dtype, shape)
        if t.dtype == "string":
            if shape == () and v.data:
                return v.data[0]
            strings = np.asarray(v.data, dtype=object)
            if strings.size != int(np.prod(shape, dtype=np.int64)):     # found by fuzz/fuzz_mil.py
                raise BundleError(f"Core ML program: a string literal holds {strings.size} values, its type "
                                  f"{tuple(shape)}", _FIX)
            return strings.reshape(shape)
        if v.raw:
            return decode(v.data, t.dtype, shape)
        try:
            arr = np.asarray(v.data, dtype=np_dtype(t.dtype))
        except (OverflowError, ValueError, TypeError):
            raise BundleError(f"Core ML program: literal values do not fit its dtype {t.dtype}", _FIX) from None
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise BundleError(f"Core ML program: literal holds {arr.size} values for shape {shape}", _FIX)
        return arr.reshape(shape)

    def _materialize(self) -> dict:
        """Every const and constexpr_* output of the main block, decoded once at load."""
        consts: dict = {}
        for op in self.block.operations:
            if op.type == "const":
                if "val" not in op.attributes or not op.outputs:
                    raise BundleError("Core ML program: a const op without a value", _FIX)
                consts[op.outputs[0].name] = self._cast(op, 0, self.literal(op.attributes["val"]))
            elif op.type in CONSTEXPR and all(b.name is None or b.name in consts
                                              for bs in op.inputs.values() for b in bs):
                self._run_op(op, consts, None)
        return consts

    # ------------------------------------------------------------------ execution

    def _cast(self, op: proto.Operation, i: int, value):
        t = op.outputs[i].type
        if t.kind != "tensor" or isinstance(value, (str, StateRef)) or t.dtype == "string":
            return value
        arr = np.asarray(value)
        arr = arr.astype(np_dtype(t.dtype), copy=False)
        if t.shape is not None and None not in t.shape and arr.shape != tuple(t.shape):
            raise BundleError(f"Core ML program: op {op.type} ({op.outputs[i].name}) gave shape {arr.shape}, "
                              f"the program declares {tuple(t.shape)}", _FIX)
        return arr

    def _run_op(self, op: proto.Operation, env: dict, ctx) -> None:
        fn = OPS.get(op.type)
        if fn is None:
            raise NotCovered(op.type)
        values = {}
        for name, bindings in op.inputs.items():
            vals = []
            for b in bindings:
                if b.name is not None:
                    if b.name not in env:
                        raise BundleError(f"Core ML program: op {op.type} reads {b.name!r} before it is defined", _FIX)
                    vals.append(env[b.name])
                else:
                    vals.append(self.literal(b.value))
            values[name] = vals
        for name, v in op.attributes.items():   # iOS16 constexpr ops carry their parameters as attributes
            if name not in values and name != "name":
                values[name] = [self.literal(v)]
        try:
            with np.errstate(all="ignore"):
                result = fn(Args(op, values, ctx))
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 -- numpy errors inside an op: one line, naming the op
            raise BundleError(f"Core ML program: op {op.type} ({op.outputs[0].name if op.outputs else '?'}) "
                              f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                              _FIX) from None
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(op.outputs):
            raise BundleError(f"Core ML program: op {op.type} gave {len(results)} outputs, "
                              f"the program declares {len(op.outputs)}", _FIX)
        for i, (out, val) in enumerate(zip(op.outputs, results)):
            env[out.name] = self._cast(op, i, val)

    def new_state(self) -> dict[str, np.ndarray]:
        """Zero-filled state tensors in the states' dtypes and shapes."""
        for name, t in self.states.items():
            if t.shape is None or None in t.shape or int(np.prod(t.shape, dtype=np.float64)) > 1 << 34:
                raise BundleError(f"Core ML program: state {name!r} has shape {t.shape}", _FIX)
        return {name: np.zeros(t.shape, np_dtype(t.dtype)) for name, t in self.states.items()}

    def _feed(self, name: str, value) -> np.ndarray:
        t = self.inputs[name]
        arr = np.asarray(value).astype(np_dtype(t.dtype), copy=False)
        ok = t.shape is None or (arr.ndim == len(t.shape) and all(d is None or d == s for d, s in zip(t.shape, arr.shape)))
        feature = self._ranges.get(name)
        if ok and feature is not None and feature.ranges:
            ok = all(lo <= s and (hi < 0 or s <= hi) for (lo, hi), s in zip(feature.ranges, arr.shape))
        if ok and feature is not None and feature.enumerated:
            ok = tuple(arr.shape) in {tuple(s) for s in feature.enumerated}
        if not ok:
            want = "x".join("?" if d is None else str(d) for d in (t.shape or ()))
            raise BundleError(f"Core ML input {name!r} has shape {tuple(arr.shape)}, the program takes [{want}]"
                              + (f" with ranges {feature.ranges}" if feature is not None and feature.ranges else ""),
                              "feed a tensor of the declared shape")
        return arr

    def predict(self, feeds: dict, state: dict | None = None) -> dict[str, np.ndarray]:
        if self.uncovered:
            raise NotCovered(self.uncovered[0])
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise BundleError(f"Core ML program: no value fed for input {missing[0]!r}",
                              f"feed all of {sorted(self.inputs)}")
        env = dict(self._consts)
        for name in self.inputs:
            env[name] = self._feed(name, feeds[name])
        if self.states:
            if state is None:
                raise BundleError("Core ML program is stateful: predict needs a state",
                                  "pass state=prog.new_state() and reuse it between calls")
            for name, t in self.states.items():
                if name not in state or np.shape(state[name]) != tuple(t.shape):
                    raise BundleError(f"Core ML state {name!r} is missing or has the wrong shape",
                                      "pass state=prog.new_state()")
                env[name] = StateRef(state, name, np_dtype(t.dtype))
        for op in self.block.operations:
            if op.outputs and all(o.name in self._consts for o in op.outputs):
                continue
            self._run_op(op, env, self)
        return {name: np.asarray(env[name]) for name in self.outputs}


def load_package(path) -> Program:
    return Program(Path(path))


def run_package(path, feeds: dict, state: dict | None = None) -> dict[str, np.ndarray]:
    return load_package(path).predict(feeds, state)
