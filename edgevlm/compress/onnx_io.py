"""Saving and inspecting ONNX files: the helpers every ONNX-writing step shares (the VLM exporter, the graph
rewrites and the quantizers), kept here at the compress layer so that both the exporters and the compress steps
can use them (exporters import compress, never the other way round).

- :func:`save_model`: a ModelProto to disk, its weights in ``<file>.data`` when over protobuf's 2 GiB limit
- :func:`file_bytes`, :func:`op_counts`, :func:`check_model`: the facts a manifest records about a saved graph
- :func:`quiet`: silence the third-party tools' prints, warnings and logs while they run

onnx is imported inside the functions, so importing this module costs nothing.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

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
    """Move an ONNX file; one with external weights names its ``<file>.data``, so it is saved again under the new
    name (and the source pair removed)."""
    import shutil

    src, dst = Path(src), Path(dst)
    data = src.with_name(src.name + ".data")
    if data.exists():
        import onnx

        save_model(onnx.load(str(src)), dst, external_data=True)
        src.unlink()
        data.unlink()
    else:
        shutil.move(str(src), dst)


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


__all__ = ["EXTERNAL_DATA_BYTES", "check_model", "file_bytes", "op_counts", "quiet", "save_model"]
