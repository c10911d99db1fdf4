"""The whole header of a GGUF file, parsed and checked before llama.cpp's own parser sees the file.

llama.cpp's native GGUF reader has had memory-safety bugs on malformed files, and a bundle is untrusted input,
so :func:`read_gguf_header` reads the header in Python (standard library only: no numpy, no ``gguf`` package)
and refuses, as a :class:`~edgevlm.errors.BundleError` naming the file and the problem, anything the GGUF
specification (ggml/docs/gguf.md) or llama.cpp's reader would not accept:

- the magic ``GGUF``, version 2 or 3 (little-endian; a byte-swapped, big-endian file is named as such);
- tensor and key/value counts that the file's size can hold;
- every key (a non-empty UTF-8 string, at most 65535 bytes, no duplicates), every value type, and every string
  and array length within the file (arrays of arrays are refused, as llama.cpp does);
- ``general.alignment`` (when present): a UINT32 power of two;
- every tensor info: a UTF-8 name shorter than 64 bytes (GGML_MAX_NAME), unique; 1 to 4 dimensions
  (GGML_MAX_DIMS), each > 0, the first a multiple of the type's block size, the element count within int64; a
  known ggml type; a data offset aligned to the alignment (and to 32 bytes in the file, which llama.cpp asserts
  when it maps the tensors), and offset + size within the file, tensors not overlapping; a type llama.cpp can run as
  weights (:data:`NOT_WEIGHT_TYPES` are refused); no duplicate entries in ``tokenizer.ggml.tokens``;
- a few hyper-parameters that llama.cpp divides by, sizes arrays with or asserts on (:data:`_HPARAM_RULES`,
  :data:`_FLOAT_RULES`): found by fuzzing llama.cpp with headers this reader accepted (fuzz/fuzz_gguf.py).

The tables below are the GGUF specification's (they match ``gguf/constants.py`` of the ``gguf`` package).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

from ..errors import BundleError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # GGML_MAX_DIMS
TENSOR_ALIGNMENT = 32             # llama.cpp maps the file and asserts every tensor's data is 32-byte aligned
MAX_NAME = 64                     # GGML_MAX_NAME: a tensor name must be shorter (it is stored with its NUL)
MAX_KEY = 65535                   # the GGUF spec's limit on a key's length
MAX_KEPT_STRING = 1 << 16         # longer string values are checked but not kept in ``metadata``
MAX_KEPT_ARRAY = 1024             # integer arrays up to this length keep their values (per-layer hyper-parameters)
INT64_MAX = (1 << 63) - 1
_FIX = "re-export the bundle with `edgevlm export` (or download the GGUF again); never edit it by hand"

# GGUFValueType -> (name, size in bytes of one value; None: a string or an array)
VALUE_TYPES = {
    0: ("UINT8", 1), 1: ("INT8", 1), 2: ("UINT16", 2), 3: ("INT16", 2), 4: ("UINT32", 4), 5: ("INT32", 4),
    6: ("FLOAT32", 4), 7: ("BOOL", 1), 8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", 8),
    11: ("INT64", 8), 12: ("FLOAT64", 8),
}
_SCALAR_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
                  12: "<d"}
STRING, ARRAY = 8, 9
UNIQUE_STRING_ARRAYS = ("tokenizer.ggml.tokens",)   # llama.cpp asserts id_to_token.size() == token_to_id.size()

# GGMLQuantizationType -> (name, block size in elements, bytes per block): GGML_QUANT_SIZES
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}

# Types a tensor of a model llama.cpp runs may have: float and quantized weights. The integer types, F64 and the
# activation-only Q8_1 / Q8_K have no CPU matrix kernels (an I32 weight makes llama.cpp jump to a null kernel:
# SIGSEGV on the first matmul, found by fuzz/fuzz_gguf.py).
NOT_WEIGHT_TYPES = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}

# Hyper-parameters llama.cpp divides by or sizes per-layer arrays with before it checks them (a 0 there is a
# division by zero in native code): ``{arch}.<suffix>`` -> (least, most). LLAMA_MAX_LAYERS is 512.
_HPARAM_RULES = {
    "block_count": (1, 512),
    "embedding_length": (1, 1 << 20),
    "attention.head_count": (1, 1 << 16),
    "attention.head_count_kv": (1, 1 << 16),
    "attention.key_length": (1, 1 << 16),
    "attention.value_length": (1, 1 << 16),
    "context_length": (1, 1 << 24),
    "feed_forward_length": (1, 1 << 24),
    "rope.dimension_count": (1, 1 << 16),
    "vocab_size": (1, 1 << 24),
    "expert_count": (0, 256),             # llama.cpp asserts n_expert <= LLAMA_MAX_EXPERTS (256 to 512 by version)
    "expert_used_count": (0, 256),        # ... and the rest of its expert asserts, see _check_experts
    "expert_group_count": (0, 256),
    "expert_group_used_count": (0, 256),
}


# Float hyper-parameters llama.cpp asserts on (``GGML_ASSERT(eps >= 0.0f)`` in its norms) or that make every
# logit NaN: ``{arch}.<suffix>`` -> (least, most, least excluded), finite.
_FLOAT_RULES = {
    "attention.layer_norm_rms_epsilon": (0.0, 1.0, False),
    "attention.layer_norm_epsilon": (0.0, 1.0, False),
    "rope.freq_base": (0.0, 1e12, True),
    "rope.scaling.factor": (0.0, 1e6, False),
}


def _fail(path: Path, problem: str):
    raise BundleError(f"{path} is not a valid GGUF file: {problem}", _FIX)


class _Reader:
    """Little-endian reads from the mapped file, each checked against its end."""

    def __init__(self, buf, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            _fail(self.path, f"{what} at byte {self.pos:,} needs {n:,} bytes, past the end of the file "
                             f"({self.size:,} bytes; truncated?)")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string_bytes(self, what: str, limit: int | None = None) -> bytes:
        start = self.pos
        n = self.u64(f"the length of {what}")
        if limit is not None and n > limit:
            _fail(self.path, f"{what} at byte {start:,} is {n:,} bytes long (at most {limit:,} allowed)")
        self.need(n, what)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n


def _text(path: Path, b: bytes, what: str) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        _fail(path, f"{what} {b[:40]!r} is not UTF-8")


def _show(key: str) -> str:
    return repr(key if len(key) <= 80 else key[:77] + "...")


def _value(r: _Reader, vtype: int, key: str):
    """One value of ``vtype``: scalars and strings as Python values, arrays as ``{"type", "length"}`` (their
    elements are checked to lie within the file, not kept)."""
    shown = f"the value of key {_show(key)}"
    if vtype not in VALUE_TYPES:
        _fail(r.path, f"key {_show(key)} has unknown value type {vtype} (known: 0..12)")
    if vtype == STRING:
        if r.pos + 8 <= r.size and struct.unpack_from("<Q", r.buf, r.pos)[0] > MAX_KEPT_STRING:
            n = r.u64(f"the length of {shown}")
            r.skip(n, shown)
            return {"type": "STRING", "length": n}           # checked, not kept (e.g. a long chat template)
        return r.string_bytes(shown).decode("utf-8", "replace")
    if vtype != ARRAY:
        v = r.unpack(_SCALAR_FORMAT[vtype], shown)
        return bool(v) if vtype == 7 else v
    at = r.pos
    itype = r.u32(f"the element type of {shown}")
    n = r.u64(f"the length of {shown}")
    if itype not in VALUE_TYPES:
        _fail(r.path, f"the array of key {_show(key)} has unknown element type {itype} (known: 0..12)")
    if itype == ARRAY:
        _fail(r.path, f"key {_show(key)} holds an array of arrays (at byte {at:,}), which llama.cpp does not read")
    if itype == STRING:
        if n > (r.size - r.pos) // 8:         # each string is at least its 8-byte length
            _fail(r.path, f"the array of key {_show(key)} claims {n:,} strings, more than the rest of the file "
                          f"({r.size - r.pos:,} bytes) can hold")
        seen = set() if key in UNIQUE_STRING_ARRAYS else None
        for i in range(n):
            length = r.u64(f"the length of string {i} of {shown}")
            r.need(length, f"string {i} of {shown}")
            if seen is not None:
                s = bytes(r.buf[r.pos:r.pos + length])
                if s in seen:
                    _fail(r.path, f"{_show(key)} holds {s[:40]!r} twice (entry {i}); llama.cpp aborts on a "
                                  "vocabulary with duplicate tokens")
                seen.add(s)
            r.skip(length, f"string {i} of {shown}")
    else:
        size = VALUE_TYPES[itype][1]
        if n > (r.size - r.pos) // size:
            _fail(r.path, f"the array of key {_show(key)} claims {n:,} {VALUE_TYPES[itype][0]} values "
                          f"({n * size:,} bytes), more than the rest of the file ({r.size - r.pos:,} bytes)")
        if itype in _SCALAR_FORMAT and itype not in (6, 12) and n <= MAX_KEPT_ARRAY:   # small integer arrays
            fmt = _SCALAR_FORMAT[itype][1]
            values = list(struct.unpack_from(f"<{n}{fmt}", r.buf, r.pos))
            r.skip(n * size, shown)
            return {"type": VALUE_TYPES[itype][0], "length": n, "values": values}
        r.skip(n * size, shown)
    return {"type": VALUE_TYPES[itype][0], "length": n}


def _check_hparams(path: Path, metadata: dict, types: dict) -> None:
    arch = metadata.get("general.architecture")
    if "general.architecture" in metadata and not isinstance(arch, str):
        _fail(path, "general.architecture is not a string")
    if not isinstance(arch, str):
        return
    for suffix, (lo, hi) in _HPARAM_RULES.items():
        key = f"{arch}.{suffix}"
        if key not in metadata:
            continue
        v = metadata[key]
        if isinstance(v, dict):                  # a per-layer array (llama.cpp's get_key_or_arr)
            if v["type"] in ("STRING", "FLOAT32", "FLOAT64", "BOOL"):
                _fail(path, f"{_show(key)} is an array of {v['type']}, not of integers")
            bad = [x for x in v.get("values", ()) if not 0 <= x <= hi]      # 0: a layer without (e.g. recurrent)
            if bad:
                _fail(path, f"{_show(key)} holds {bad[0]}, outside 0..{hi}")
            continue
        if types[key] in ("STRING", "FLOAT32", "FLOAT64", "BOOL"):
            _fail(path, f"{_show(key)} is a {types[key]} value, not an integer")
        if not lo <= v <= hi:
            _fail(path, f"{_show(key)} is {v}, outside {lo}..{hi}")
    for suffix, (lo, hi, open_lo) in _FLOAT_RULES.items():
        key = f"{arch}.{suffix}"
        if key not in metadata:
            continue
        v = metadata[key]
        if types[key] not in ("FLOAT32", "FLOAT64"):
            _fail(path, f"{_show(key)} is a {types[key]} value, not a float")
        if not (math.isfinite(v) and (v > lo if open_lo else v >= lo) and v <= hi):
            _fail(path, f"{_show(key)} is {v}, outside {'(' if open_lo else '['}{lo:g}, {hi:g}]")
    heads = metadata.get(f"{arch}.attention.head_count")
    kv = metadata.get(f"{arch}.attention.head_count_kv")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        _fail(path, f"{arch}.attention.head_count ({heads}) is not a multiple of head_count_kv ({kv})")
    _check_experts(path, arch, metadata)


def _check_experts(path: Path, arch: str, metadata: dict) -> None:
    """llama.cpp's GGML_ASSERTs on mixture-of-experts hyper-parameters (llama-model.cpp, load_hparams), which
    abort the process: used experts (per layer: their maximum) <= experts, at least one used when there are
    experts and none otherwise; expert groups fewer than experts, dividing them, with 0 < groups used < groups."""
    def scalar(suffix: str):
        v = metadata.get(f"{arch}.{suffix}", 0)
        if isinstance(v, dict):
            if "values" not in v:
                _fail(path, f"{arch}.{suffix} is an array of {v['length']:,} {v['type']} values, not per-layer counts")
            return max(v["values"], default=0)
        return v

    experts, used = scalar("expert_count"), scalar("expert_used_count")
    groups, groups_used = scalar("expert_group_count"), scalar("expert_group_used_count")
    if not all(isinstance(v, int) for v in (experts, used, groups, groups_used)):
        return                                  # a float or string here was refused by _check_hparams
    if used > experts:
        _fail(path, f"{arch}.expert_used_count ({used}) is more than {arch}.expert_count ({experts})")
    if experts > 0:
        if used == 0:
            _fail(path, f"{arch}.expert_count is {experts} but {arch}.expert_used_count is 0 or missing")
        if groups >= experts:
            _fail(path, f"{arch}.expert_group_count ({groups}) is not less than {arch}.expert_count ({experts})")
        if groups > 1 and (experts % groups or not 0 < groups_used < groups):
            _fail(path, f"{arch}.expert_group_count ({groups}) must divide expert_count ({experts}) and "
                        f"expert_group_used_count ({groups_used}) lie between 1 and {groups - 1}")
    elif used or groups:
        _fail(path, f"{arch} has no experts but expert_used_count {used} / expert_group_count {groups}")


def read_gguf_header(path) -> dict:
    """The checked header of the GGUF file at ``path``:

    ``{"version", "alignment", "data_offset", "metadata": {key: value}, "tensors": [{"name", "type", "shape",
    "offset", "nbytes"}]}`` — array values (and strings over 64 KiB) as ``{"type", "length"}``; ``offset``: from the
    start of the data section (``data_offset``). Any problem is a :class:`BundleError` naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                head = f.read(4)
                if head != MAGIC:
                    raise BundleError(f"{path} is not a GGUF file (it starts with {head!r})", _FIX)
                _fail(path, f"it is {size} bytes long, shorter than a GGUF header (24 bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, size, path)
    except OSError as e:
        raise BundleError(f"cannot read the GGUF file {path} ({e.strerror or e})",
                          "check that the bundle is complete and readable") from None


def _parse(buf, size: int, path: Path) -> dict:
    r = _Reader(buf, size, path)
    head = bytes(buf[:4])
    if head != MAGIC:
        raise BundleError(f"{path} is not a GGUF file (it starts with {head!r})", _FIX)
    r.pos = 4
    version = r.u32("the version")
    if version not in VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in VERSIONS:
            _fail(path, f"it is a big-endian GGUF (version {swapped} byte-swapped); llama.cpp here reads "
                        "little-endian files")
        _fail(path, f"version {version} (this reader and llama.cpp read versions 2 and 3)")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the key/value count")
    rest = size - r.pos
    if n_kv > rest // 13:                      # key length 8 + at least 1 byte of key + type 4 ... at least 13
        _fail(path, f"it claims {n_kv:,} key/value pairs, more than its {size:,} bytes can hold")
    if n_tensors > rest // 32:                 # name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8
        _fail(path, f"it claims {n_tensors:,} tensors, more than its {size:,} bytes can hold")

    metadata: dict = {}
    types: dict = {}
    for i in range(n_kv):
        at = r.pos
        key = _text(path, r.string_bytes(f"the key of pair {i}", MAX_KEY), f"the key of pair {i} (byte {at:,})")
        if not key:
            _fail(path, f"key/value pair {i} (byte {at:,}) has an empty key")
        if key in metadata:
            _fail(path, f"key {_show(key)} appears twice (again at byte {at:,})")
        vtype = r.u32(f"the value type of key {_show(key)}")
        metadata[key] = _value(r, vtype, key)
        types[key] = VALUE_TYPES[vtype][0]

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        if types["general.alignment"] != "UINT32":
            _fail(path, f"general.alignment is a {types['general.alignment']} value, not UINT32")
        alignment = metadata["general.alignment"]
        if alignment == 0 or alignment & (alignment - 1):
            _fail(path, f"general.alignment is {alignment}, not a power of two")
    _check_hparams(path, metadata, types)

    tensors, names = [], set()
    for i in range(n_tensors):
        at = r.pos
        name = _text(path, r.string_bytes(f"the name of tensor {i}", MAX_NAME - 1),
                     f"the name of tensor {i} (byte {at:,})")
        if name in names:
            _fail(path, f"tensor name {_show(name)} appears twice (again at byte {at:,})")
        names.add(name)
        shown = f"tensor {_show(name)}"
        n_dims = r.u32(f"the dimension count of {shown}")
        if not 1 <= n_dims <= MAX_DIMS:
            _fail(path, f"{shown} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = [r.u64(f"dimension {d} of {shown}") for d in range(n_dims)]
        gtype = r.u32(f"the type of {shown}")
        offset = r.u64(f"the data offset of {shown}")
        if gtype not in GGML_TYPES:
            _fail(path, f"{shown} has unknown ggml type {gtype}")
        tname, block, type_size = GGML_TYPES[gtype]
        if tname in NOT_WEIGHT_TYPES:
            _fail(path, f"{shown} has type {tname}, which llama.cpp cannot run as model weights (float and "
                        "quantized types only)")
        n = 1
        for d in shape:
            if d < 1 or d > INT64_MAX:
                _fail(path, f"{shown} has shape {shape}: every dimension must be at least 1")
            n *= d
            if n > INT64_MAX:
                _fail(path, f"{shown} has shape {shape}, over 2^63 elements")
        if shape[0] % block:
            _fail(path, f"{shown} ({tname}) has {shape[0]} columns, not a multiple of its block of {block}")
        if offset % alignment:
            _fail(path, f"{shown} starts at data offset {offset:,}, not a multiple of the alignment {alignment}")
        tensors.append({"name": name, "type": tname, "shape": shape, "offset": offset,
                        "nbytes": n // block * type_size})

    data_offset = -(-r.pos // alignment) * alignment
    data_size = size - data_offset
    if tensors and data_size < 0:
        _fail(path, f"its data section would start at byte {data_offset:,}, past the end of the file "
                    f"({size:,} bytes; truncated?)")
    end = 0
    for t in tensors:
        if (data_offset + t["offset"]) % TENSOR_ALIGNMENT:
            _fail(path, f"tensor {_show(t['name'])} starts at byte {data_offset + t['offset']:,} of the file, not a "
                        f"multiple of {TENSOR_ALIGNMENT} (llama.cpp maps tensor data at {TENSOR_ALIGNMENT}-byte "
                        f"boundaries; general.alignment is {alignment})")
    for t in sorted(tensors, key=lambda t: (t["offset"], t["nbytes"])):
        if t["offset"] < end:
            _fail(path, f"tensor {_show(t['name'])} (data offset {t['offset']:,}) overlaps the tensor before it "
                        f"(which ends at {end:,})")
        end = t["offset"] + t["nbytes"]
        if end > data_size:
            _fail(path, f"tensor {_show(t['name'])} ({t['type']} {t['shape']}) ends at byte {data_offset + end:,}, "
                        f"past the end of the file ({size:,} bytes; truncated?)")
    return {"version": version, "alignment": alignment, "data_offset": data_offset, "metadata": metadata,
            "tensors": tensors}
