"""The one torch.onnx export wrapper of every exporter (classifier graphs, VLM parts, decoders): dynamo export, quiet,
external data for big weights, and one-line errors."""
from __future__ import annotations

from pathlib import Path

from ..compress.onnx_io import EXTERNAL_DATA_BYTES, quiet


def export_module(module, args: tuple, path: Path, opset: int, input_names, output_names, dynamic_shapes,
                  external_data: bool | None = None, what: str = "model") -> bool:
    """torch.onnx dynamo export of ``module(*args)`` to ``path`` (quiet; weights in ``<file>.data`` when
    ``external_data``, None: when over EXTERNAL_DATA_BYTES); returns whether weights are external. A failure is one
    ExportError naming ``what`` and the exporter's first line."""
    import torch

    from ..errors import ExportError

    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    try:
        with torch.no_grad(), quiet():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        input_names=list(input_names), output_names=list(output_names),
                                        dynamic_shapes=dynamic_shapes, verbose=False)
            path = Path(path)
            data = path.with_name(path.name + ".data")
            if data.exists():
                data.unlink()
            program.save(str(path), external_data=bool(external_data))
        del program
    except Exception as e:
        import re

        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise ExportError(f"torch.onnx could not export the {what}: {first}",
                          "report the model; try --opset 18") from None
    finally:
        _drop_rewriter_state()
    return bool(external_data)


def _drop_rewriter_state() -> None:
    """Forget the graph torch.onnx's last export left in onnxscript's rewrite rules.

    Those rules are module globals, and each one's pattern matcher keeps the last graph it looked at
    (``_graph``, ``_match``, ``_current_node``). That graph's initializers wrap the exported module's parameters,
    so without this the weights stay in memory as long as the process runs, even once the module lets them go
    (4 GiB for TinyGPT-V's vision tower). The matcher sets these again at its next match."""
    import gc

    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:                       # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if PatternMatcher in type(obj).__mro__:      # (not isinstance: some objects warn when asked their __class__)
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                obj.__dict__.pop(attr, None)
    gc.collect()
