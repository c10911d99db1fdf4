"""One module per artifact format. Each exporter validates what it writes against eager PyTorch.

Exporters register by the target profile's ``format`` (onnx, ort, coreml) and are imported
lazily, so importing edgevlm stays cheap.
"""
from __future__ import annotations

import importlib

from ..registry import Registry

EXPORTERS: Registry = Registry("export format")
_MODULES = {"onnx": "onnx", "ort": "ort_mobile", "coreml": "coreml"}


def get_exporter(fmt: str):
    """The ``export(ctx) -> list[Artifact]`` function for a target format."""
    if fmt not in EXPORTERS and fmt in _MODULES:
        importlib.import_module(f"{__name__}.{_MODULES[fmt]}")
    return EXPORTERS.get(fmt)
