"""A protobuf wire-format reader and the few Core ML / MIL messages an ML program needs.

Field numbers are those of Apple's Model.proto, FeatureTypes.proto and MIL.proto (coremltools'
``mlmodel/format``); only the fields the interpreter uses are mapped, every other field is skipped.
Any malformed byte string raises ``BundleError`` (never an IndexError or struct.error).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ...bundle import read_varint
from ...errors import BundleError

VARINT, I64, LEN, I32 = 0, 1, 2, 5

# MIL.proto DataType -> the short names coremltools uses (types.builtin_to_string)
DATA_TYPES = {
    1: "bool", 2: "string", 10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16",
    21: "int8", 22: "int16", 23: "int32", 24: "int64", 25: "int4",
    31: "uint8", 32: "uint16", 33: "uint32", 34: "uint64",
    35: "uint4", 36: "uint2", 37: "uint1", 38: "uint6", 39: "uint3",
    40: "fp8e4m3fn", 41: "fp8e5m2",
}
# FeatureTypes.proto ArrayFeatureType.ArrayDataType
ARRAY_TYPES = {65568: "fp32", 65600: "fp64", 131104: "int32", 131080: "int8", 65552: "fp16"}

_FIX = "re-export the package; it is truncated or not a Core ML model"


def _bad(problem: str) -> BundleError:
    return BundleError(f"Core ML model: {problem}", _FIX)


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at ``pos`` (the bundle's protobuf scanner reads them too)."""
    try:
        return read_varint(buf, pos, len(buf))
    except ValueError:
        raise _bad("truncated varint") from None


def fields(buf: bytes) -> list[tuple[int, int, object]]:
    """Every (field number, wire type, value) of one message; LEN values are bytes, the rest ints."""
    out, pos, end = [], 0, len(buf)
    while pos < end:
        key, pos = varint(buf, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise _bad("field number 0")
        if wt == VARINT:
            val, pos = varint(buf, pos)
        elif wt == I64 or wt == I32:
            n = 8 if wt == I64 else 4
            if pos + n > end:
                raise _bad("truncated fixed-width field")
            val, pos = int.from_bytes(buf[pos:pos + n], "little"), pos + n
        elif wt == LEN:
            n, pos = varint(buf, pos)
            if pos + n > end:
                raise _bad(f"field {num} runs {pos + n - end} bytes past the end of its message")
            val, pos = bytes(buf[pos:pos + n]), pos + n
        else:
            raise _bad(f"unsupported wire type {wt} (field {num})")
        out.append((num, wt, val))
    return out


class Msg:
    """The fields of one message grouped by number; accessors decode them by type."""

    def __init__(self, buf: bytes):
        self.by_num: dict[int, list[tuple[int, object]]] = {}
        for num, wt, val in fields(buf):
            self.by_num.setdefault(num, []).append((wt, val))

    def _last(self, num: int, wire: int):
        vals = self.by_num.get(num)
        if not vals:
            return None
        wt, val = vals[-1]
        if wt != wire:
            raise _bad(f"field {num} has wire type {wt}, expected {wire}")
        return val

    def has(self, num: int) -> bool:
        return num in self.by_num

    def int(self, num: int, default: int = 0, signed: bool = True) -> int:
        v = self._last(num, VARINT)
        if v is None:
            return default
        return v - (1 << 64) if signed and v >= 1 << 63 else v

    def str(self, num: int, default: str = "") -> str:
        v = self._last(num, LEN)
        if v is None:
            return default
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"field {num} is not UTF-8") from None

    def bytes(self, num: int) -> bytes:
        v = self._last(num, LEN)
        return b"" if v is None else v

    def msg(self, num: int) -> Msg | None:
        v = self._last(num, LEN)
        return None if v is None else Msg(v)

    def msgs(self, num: int) -> list[Msg]:
        out = []
        for wt, val in self.by_num.get(num, []):
            if wt != LEN:
                raise _bad(f"field {num} has wire type {wt}, expected a message")
            out.append(Msg(val))
        return out

    def strs(self, num: int) -> list[str]:
        return [m.decode("utf-8", "replace") for wt, m in self.by_num.get(num, []) if wt == LEN]

    def packed(self, num: int, kind: str) -> list:
        """A repeated scalar field, packed or not: kind is 'varint', 'sint64', 'int32', 'float' or 'double'."""
        out: list = []
        for wt, val in self.by_num.get(num, []):
            if wt == LEN and kind in ("float", "double"):
                size, fmt = (4, "<f") if kind == "float" else (8, "<d")
                if len(val) % size:
                    raise _bad(f"packed {kind} field {num} of {len(val)} bytes")
                out.extend(x[0] for x in struct.iter_unpack(fmt, val))
            elif wt == LEN:
                pos = 0
                while pos < len(val):
                    v, pos = varint(val, pos)
                    out.append(v)
            elif wt == VARINT and kind not in ("float", "double"):
                out.append(val)
            elif wt == I32 and kind == "float":
                out.append(struct.unpack("<f", val.to_bytes(4, "little"))[0])
            elif wt == I64 and kind == "double":
                out.append(struct.unpack("<d", val.to_bytes(8, "little"))[0])
            else:
                raise _bad(f"repeated field {num} has wire type {wt}")
        if kind in ("sint64", "int32"):
            out = [v - (1 << 64) if v >= 1 << 63 else v for v in out]
        return out

    def map(self, num: int) -> dict[str, Msg]:
        """A ``map<string, Message>`` field (entries: key = 1, value = 2)."""
        out = {}
        for entry in self.msgs(num):
            value = entry.msg(2)
            out[entry.str(1)] = value if value is not None else Msg(b"")
        return out


# ----------------------------------------------------------------------------- MIL.proto

@dataclass
class ValueType:
    """A MIL ValueType: a tensor (dtype + shape, None = unknown dim), a state wrapping one, a list or a tuple."""

    kind: str                                   # tensor, state, list, tuple, dict
    dtype: str | None = None
    shape: tuple | None = None                  # None when the rank itself is unknown
    inner: list = field(default_factory=list)   # wrapped / element / member types


def value_type(m: Msg | None) -> ValueType:
    if m is None:
        raise _bad("a value without a type")
    if m.has(1):                                # tensorType
        t = m.msg(1)
        code = t.int(1)
        if code not in DATA_TYPES:
            raise BundleError(f"Core ML model: unknown MIL data type {code}",
                              "re-export with the coremltools version edgevlm supports")
        dims = t.msgs(3)
        rank = t.int(2)
        shape = tuple(d.msg(1).int(1, signed=False) if d.has(1) else None for d in dims) \
            if dims or rank == 0 else None
        return ValueType("tensor", DATA_TYPES[code], shape)
    if m.has(5):                                # stateType
        return ValueType("state", inner=[value_type(m.msg(5).msg(1))])
    if m.has(2):                                # listType
        return ValueType("list", inner=[value_type(m.msg(2).msg(1))])
    if m.has(3):                                # tupleType
        return ValueType("tuple", inner=[value_type(t) for t in m.msg(3).msgs(1)])
    if m.has(4):
        return ValueType("dict")
    raise _bad("a value type of unknown kind")


@dataclass
class Named:
    name: str
    type: ValueType


def named(m: Msg) -> Named:
    return Named(m.str(1), value_type(m.msg(2)))


@dataclass
class Blob:
    file: str
    offset: int


@dataclass
class Value:
    """A literal: ``data`` is a flat Python list, raw bytes (``raw``), a Blob, or a list of Values (tuple/list)."""

    type: ValueType
    data: object
    raw: bool = False


def tensor_value(t: Msg) -> tuple[object, bool]:
    """(flat values, whether they are raw bytes) of a TensorValue."""
    if t.has(1):
        return t.msg(1).packed(1, "float"), False
    if t.has(2):
        return t.msg(2).packed(1, "int32"), False
    if t.has(3):
        return [bool(v) for v in t.msg(3).packed(1, "varint")], False
    if t.has(4):
        return t.msg(4).strs(1), False
    if t.has(5):
        return t.msg(5).packed(1, "sint64"), False
    if t.has(6):
        return t.msg(6).packed(1, "double"), False
    if t.has(7):
        return t.msg(7).bytes(1), True
    return [], False


def value(m: Msg | None) -> Value:
    if m is None:
        raise _bad("an argument binding with neither a name nor a value")
    vt = value_type(m.msg(2))
    if m.has(5):                                # blobFileValue
        b = m.msg(5)
        return Value(vt, Blob(b.str(1), b.int(2, signed=False)))
    imm = m.msg(3)
    if imm is None:
        raise _bad("a value with neither an immediate value nor a blob")
    if imm.has(1):
        data, raw = tensor_value(imm.msg(1))
        return Value(vt, data, raw)
    if imm.has(2) or imm.has(3):                # tuple / list of values
        return Value(vt, [value(v) for v in (imm.msg(2) or imm.msg(3)).msgs(1)])
    if imm.has(4):
        return Value(vt, {})
    return Value(vt, [], False)


@dataclass
class Binding:
    name: str | None            # a variable, or
    value: Value | None         # an inline literal


@dataclass
class Operation:
    type: str
    inputs: dict[str, list[Binding]]
    outputs: list[Named]
    blocks: list[Block]
    attributes: dict[str, Value]


@dataclass
class Block:
    inputs: list[Named]
    outputs: list[str]
    operations: list[Operation]


@dataclass
class Function:
    inputs: list[Named]
    opset: str
    blocks: dict[str, Block]

    @property
    def block(self) -> Block:
        if self.opset not in self.blocks:
            raise _bad(f"function has no block for its opset {self.opset!r}")
        return self.blocks[self.opset]


def operation(m: Msg) -> Operation:
    inputs = {}
    for name, arg in m.map(2).items():
        inputs[name] = [Binding(b.str(1), None) if b.has(1) else Binding(None, value(b.msg(2)))
                        for b in arg.msgs(1)]
    return Operation(m.str(1), inputs, [named(o) for o in m.msgs(3)], [block(b) for b in m.msgs(4)],
                     {k: value(v) for k, v in m.map(5).items()})


def block(m: Msg) -> Block:
    return Block([named(i) for i in m.msgs(1)], m.strs(2), [operation(o) for o in m.msgs(3)])


def function(m: Msg) -> Function:
    return Function([named(i) for i in m.msgs(1)], m.str(2), {k: block(v) for k, v in m.map(3).items()})


@dataclass
class Program:
    version: int
    functions: dict[str, Function]


def program(m: Msg) -> Program:
    return Program(m.int(1), {k: function(v) for k, v in m.map(2).items()})


# ----------------------------------------------------------------------------- Model.proto

@dataclass
class Feature:
    """A model input, output or state: a multi-array (dtype, shape, flexible shapes) or another kind."""

    name: str
    kind: str                                  # multiArray, state, image, ...
    dtype: str | None = None
    shape: tuple = ()
    ranges: list | None = None                 # [(lower, upper or -1)] per dim for a shape range
    enumerated: list | None = None             # [shape, ...] for enumerated shapes
    optional: bool = False


_FEATURE_KINDS = {1: "int64", 2: "double", 3: "string", 4: "image", 5: "multiArray", 6: "dictionary",
                  7: "sequence", 8: "state"}


def _array(feature: Feature, a: Msg) -> Feature:
    code = a.int(2)
    feature.dtype = ARRAY_TYPES.get(code, f"unknown({code})")
    feature.shape = tuple(a.packed(1, "sint64"))
    if a.has(31):
        feature.ranges = [(r.int(1, signed=False), r.int(2)) for r in a.msg(31).msgs(1)]
    if a.has(21):
        feature.enumerated = [tuple(s.packed(1, "sint64")) for s in a.msg(21).msgs(1)]
    return feature


def feature(m: Msg) -> Feature:
    t = m.msg(3) or Msg(b"")
    kinds = [k for k in _FEATURE_KINDS if t.has(k)]
    f = Feature(m.str(1), _FEATURE_KINDS[kinds[0]] if kinds else "none", optional=bool(t.int(1000)))
    if t.has(5):
        return _array(f, t.msg(5))
    if t.has(8):
        inner = t.msg(8).msg(1)
        if inner is not None:
            _array(f, inner)
    return f


@dataclass
class Model:
    spec_version: int
    inputs: list[Feature]
    outputs: list[Feature]
    states: list[Feature]
    program: Program | None
    kind: str


def model(buf: bytes) -> Model:
    """The parts of a ``CoreML.Specification.Model`` the interpreter needs; BundleError when malformed."""
    try:
        return _model(buf)
    except RecursionError:
        raise _bad("messages nested too deeply") from None


def _model(buf: bytes) -> Model:
    m = Msg(buf)
    desc = m.msg(2) or Msg(b"")
    prog = m.msg(502)
    kinds = sorted(n for n in m.by_num if n >= 200)
    kind = "mlProgram" if prog is not None else (f"field {kinds[0]}" if kinds else "empty")
    return Model(m.int(1), [feature(f) for f in desc.msgs(1)], [feature(f) for f in desc.msgs(10)],
                 [feature(f) for f in desc.msgs(13)], program(prog) if prog is not None else None, kind)
