"""Saving and inspecting ONNX files: the helpers every ONNX-writing step shares (the VLM exporter, the graph
rewrites and the quantizers), kept here at the compress layer so that both the exporters and the compress steps
can use them (exporters import compress, never the other way round).

- :func:`save_model`: a ModelProto to disk, its weights in ``<file>.data`` when over protobuf's 2 GiB limit
- :func:`file_bytes`, :func:`op_counts`, :func:`check_model`: the facts a manifest records about a saved graph
- :func:`quiet`: silence the third-party tools' prints, warnings and logs while they run
- graphs larger than memory: :func:`load_graph` (the graph without its weights), :func:`read_initializer` (one
  weight, read from disk), :func:`save_streamed` (weights copied file to file, or written as each is made) and
  :func:`move_model` (a rename): a rewrite of a 10 GB decoder holds one weight at a time, not the model

onnx is imported inside the functions, so importing this module costs nothing.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

# Protobuf cannot serialize a model of 2 GiB or more; above this many bytes of weights (headroom left for
# the graph itself) a graph is saved with its weights in ``<file>.data`` next to it.
EXTERNAL_DATA_BYTES = 1_900_000_000

_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "onnxruntime.quantization", "root")


@contextlib.contextmanager
def quiet(stdout: bool = True):
    """Silence the exporters' and quantizers' progress prints, warnings and logs (the CLI prints its own log);
    levels and filters are restored on exit. ``stdout=False`` lets prints through (for a block that calls back
    into code that logs progress)."""
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), (contextlib.redirect_stdout(io.StringIO()) if stdout
                                         else contextlib.nullcontext()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def file_bytes(path: Path) -> int:
    """Size of an ONNX file on disk, its external ``<file>.data`` included."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the saved graph has (top-level graph; weights not loaded), sorted by op."""
    import onnx

    ops: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return dict(sorted(ops.items()))


def move_model(src: Path, dst: Path) -> None:
    """Move an ONNX file and its ``<file>.data``: the data file is renamed and the graph's references rewritten to
    its new name (the weights are never read)."""
    import os
    import shutil

    src, dst = Path(src), Path(dst)
    data = src.with_name(src.name + ".data")
    if not data.exists():
        shutil.move(str(src), dst)
        return
    model = load_graph(src)
    new = dst.with_name(dst.name + ".data")
    for t in _external_tensors(model):
        _set_location(t, new.name, *_span(t))
    os.replace(data, new) if data.parent == new.parent else shutil.move(str(data), new)
    _write_graph(model, dst)
    shutil.copymode(dst, new)          # a quantizer's temporary file is owner-only; a bundle's files are not
    if src != dst:
        src.unlink()


def load_graph(path: Path):
    """The ModelProto of ``path`` without its external weights (they stay on disk: :func:`read_initializer`)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _span(t) -> tuple[int, int]:
    info = {e.key: e.value for e in t.external_data}
    return int(info.get("offset", 0)), int(info["length"])


def _data_path(t, base_dir: Path) -> Path:
    """The file an external initializer's bytes are in; one that points outside ``base_dir`` is refused."""
    where = dict((e.key, e.value) for e in t.external_data)["location"]
    if Path(where).is_absolute() or ".." in Path(where).parts:
        raise ValueError(f"initializer {t.name} points outside its folder ({where}); re-export the graph")
    return Path(base_dir) / where


def _set_location(t, location: str, offset: int, length: int) -> None:
    from onnx import TensorProto

    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    t.data_location = TensorProto.EXTERNAL


def read_initializer(t, base_dir: Path):
    """One initializer as a numpy array, read from ``base_dir``'s data file when it is external (the TensorProto is
    left as it is: onnx's own loader would keep the bytes in it)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(t):
        return numpy_helper.to_array(t)
    loc = _data_path(t, base_dir)
    offset, length = _span(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):      # packed: no numpy dtype of that width
        light = onnx.TensorProto()
        light.CopyFrom(t)
        del light.external_data[:]
        light.data_location = onnx.TensorProto.DEFAULT
        with open(loc, "rb") as f:
            f.seek(offset)
            light.raw_data = f.read(length)
        return numpy_helper.to_array(light)
    a = np.fromfile(loc, dtype=dtype, count=length // np.dtype(dtype).itemsize, offset=offset)
    return a.reshape(tuple(t.dims))


class _DataFile:
    """Appends tensors' bytes to one ``<file>.data`` (aligned offsets) and points the TensorProtos at them."""

    ALIGN = 4096

    def __init__(self, path: Path):
        self.path = Path(path)
        self.f = open(self.path, "wb")
        self.end = 0
        self.written: set[str] = set()        # initializers already placed in this file

    def _start(self) -> int:
        pad = -self.end % self.ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.end += pad
        return self.end

    def put_bytes(self, t, data: bytes) -> None:
        off = self._start()
        self.f.write(data)
        self.end += len(data)
        t.ClearField("raw_data")
        _set_location(t, self.path.name, off, len(data))
        self.written.add(t.name)

    def copy_from(self, t, src: Path) -> None:
        offset, length = _span(t)
        off = self._start()
        with open(src, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(left, 64 << 20))
                if not chunk:
                    raise ValueError(f"{src.name} ends before initializer {t.name}'s {length} bytes")
                self.f.write(chunk)
                left -= len(chunk)
        self.end += length
        _set_location(t, self.path.name, off, length)
        self.written.add(t.name)

    def close(self) -> None:
        self.f.close()


def stream_tensors(model, data: _DataFile, base_dir: Path, min_bytes: int = 1024) -> None:
    """Place every weight of ``model`` not yet in ``data``: on-disk ones (external data relative to ``base_dir``)
    copied file to file in chunks, in-memory ones of ``min_bytes`` or more written out."""
    from onnx.external_data_helper import _get_all_tensors, _get_initializer_tensors, uses_external_data

    inits = {t.name for t in _get_initializer_tensors(model)}    # Constant nodes' tensors stay inline, as onnx saves
    for t in _get_all_tensors(model):
        if t.name in data.written:
            continue
        if uses_external_data(t):
            src = _data_path(t, base_dir)
            if src.resolve() == data.path.resolve():
                raise ValueError(f"{data.path.name} would be overwritten while it is read; save elsewhere")
            data.copy_from(t, src)
        elif t.name in inits and t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
            data.put_bytes(t, t.raw_data)


def save_streamed(model, dst: Path, base_dir: Path) -> None:
    """Save a graph whose initializers are partly on disk (:func:`load_graph`, external data relative to ``base_dir``)
    and partly in memory (new ones a rewrite made) to ``dst`` + ``<dst>.data`` (:func:`stream_tensors`): memory holds
    one chunk, never the model. ``dst`` must not be the source graph (its data file is read while the new one is
    written). A result under EXTERNAL_DATA_BYTES is saved as one file, as :func:`save_model` saves it."""
    dst = Path(dst)
    data = _DataFile(dst.with_name(dst.name + ".data"))
    try:
        stream_tensors(model, data, base_dir)
    finally:
        data.close()
    finish_streamed(model, dst, data.end)


def finish_streamed(model, dst: Path, data_bytes: int) -> None:
    """Write the graph of a streamed save; when its data file holds under EXTERNAL_DATA_BYTES, fold the weights back
    into one file (a graph that small fits in memory)."""
    import onnx

    _write_graph(model, dst)
    if data_bytes < EXTERNAL_DATA_BYTES:
        small = onnx.load(str(dst))
        dst.with_name(dst.name + ".data").unlink()
        save_model(small, dst, external_data=False)


def _write_graph(model, dst: Path) -> None:
    """The graph's protobuf alone (every large weight already points at its data file)."""
    with open(dst, "wb") as f:
        f.write(model.SerializeToString())


def check_model(path: Path) -> str:
    """``onnx.checker`` with ``full_check`` (shape inference too) on a saved graph; raises when it fails, else
    returns the line a manifest records."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)      # a path: works with external data too
    return "onnx.checker full_check passed"


def save_model(model, path: Path, external_data: bool | None = None) -> bool:
    """Save an ONNX ModelProto; weights go to ``<file>.data`` when ``external_data`` (None: when the
    initializers exceed EXTERNAL_DATA_BYTES). Returns whether external data was written."""
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = sum(i.ByteSize() for i in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()                     # save_model appends to an existing data file
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return bool(external_data)


__all__ = ["EXTERNAL_DATA_BYTES", "check_model", "file_bytes", "load_graph", "move_model", "op_counts", "quiet",
           "read_initializer", "save_model", "save_streamed", "stream_tensors"]
