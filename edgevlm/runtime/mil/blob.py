"""The MIL weight blob file (``weights/weight.bin``) and sub-byte unpacking.

Layout (little-endian): a 64-byte header (uint32 count, uint32 version = 2, reserved), then per
tensor a 64-byte metadata record -- uint32 sentinel 0xDEADBEEF, uint32 storage dtype, uint64 size
in bytes, uint64 offset of the data in the file, uint64 padding bits of a sub-byte tensor's last
byte, reserved -- followed by the data. A ``BlobFileValue``'s offset points at the metadata record.
Sub-byte values (int4, uint1..uint6) are packed least significant bit first.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ...errors import BundleError

SENTINEL = 0xDEADBEEF
HEADER = 64
# storage dtype code -> MIL dtype name
STORAGE_TYPES = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16", 7: "uint16", 8: "int4",
                 9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6", 14: "int32", 15: "uint32"}
BYTE_TYPES = {"fp16": np.float16, "fp32": np.float32, "uint8": np.uint8, "int8": np.int8, "int16": np.int16,
              "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32}
SUB_BYTE = {"int4": 4, "uint4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint6": 6}
_FIX = "re-export the package; its weight file is damaged or does not belong to this model"


def unpack_bits(raw: bytes, dtype: str, count: int) -> np.ndarray:
    """``count`` sub-byte values packed LSB first: int8 for int4, uint8 for the unsigned types."""
    nbits = SUB_BYTE[dtype]
    if len(raw) * 8 < count * nbits:
        raise BundleError(f"Core ML weights: {len(raw)} bytes cannot hold {count} {dtype} values", _FIX)
    bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: count * nbits]
    vals = (bits.reshape(count, nbits).astype(np.int16) << np.arange(nbits, dtype=np.int16)).sum(1)
    if dtype == "int4":
        vals = np.where(vals >= 8, vals - 16, vals)
        return vals.astype(np.int8)
    return vals.astype(np.uint8)


def decode(raw: bytes, dtype: str, shape: tuple) -> np.ndarray:
    """Raw little-endian bytes of a tensor -> an array of ``shape`` (sub-byte types unpacked)."""
    count = int(np.prod(shape, dtype=np.int64))
    if dtype in SUB_BYTE:
        return unpack_bits(raw, dtype, count).reshape(shape)
    if dtype not in BYTE_TYPES:
        raise BundleError(f"Core ML weights: unsupported storage dtype {dtype}",
                          "re-export with fp16/fp32/int8/int4/palettized weights")
    np_dtype = np.dtype(BYTE_TYPES[dtype])
    if len(raw) < count * np_dtype.itemsize:
        raise BundleError(f"Core ML weights: {len(raw)} bytes cannot hold {count} {dtype} values", _FIX)
    return np.frombuffer(raw, np_dtype, count).reshape(shape).copy()


class BlobFile:
    """One weight file, read whole; ``read(offset, dtype, shape)`` checks the record and decodes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.data = self.path.read_bytes()
        except OSError as e:
            raise BundleError(f"Core ML weights: cannot read {self.path.name} ({e.strerror})", _FIX) from None
        if len(self.data) < HEADER:
            raise BundleError(f"Core ML weights: {self.path.name} is {len(self.data)} bytes, shorter than its header",
                              _FIX)
        self.count, self.version = struct.unpack_from("<II", self.data, 0)
        if self.version != 2:
            raise BundleError(f"Core ML weights: {self.path.name} has storage version {self.version}, expected 2",
                              _FIX)

    def record(self, offset: int) -> tuple[str, int, int, int]:
        """(dtype, size in bytes, data offset, padding bits) of the metadata record at ``offset``."""
        if offset < HEADER or offset + 64 > len(self.data):
            raise BundleError(f"Core ML weights: offset {offset} is outside {self.path.name} "
                              f"({len(self.data)} bytes)", _FIX)
        sentinel, code, size, data_offset, padding = struct.unpack_from("<IIQQQ", self.data, offset)
        if sentinel != SENTINEL:
            raise BundleError(f"Core ML weights: no blob record at offset {offset} of {self.path.name}", _FIX)
        if code not in STORAGE_TYPES:
            raise BundleError(f"Core ML weights: unknown storage dtype code {code} at offset {offset}", _FIX)
        if data_offset + size > len(self.data) or data_offset < HEADER:
            raise BundleError(f"Core ML weights: blob at offset {offset} runs past the end of {self.path.name}",
                              _FIX)
        return STORAGE_TYPES[code], size, data_offset, padding

    def read(self, offset: int, dtype: str, shape: tuple) -> np.ndarray:
        stored, size, start, _ = self.record(offset)
        if stored != dtype:
            raise BundleError(f"Core ML weights: blob at offset {offset} stores {stored}, the program expects {dtype}",
                              _FIX)
        return decode(self.data[start:start + size], dtype, shape)
