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


# A VLM's parts per target format: the module that exports, checks and quantizes them (export_part, part_parity,
# export_embed_tokens, export_decoder, quantize_decoder, and the rewrites the profiles name). A new format for VLMs
# registers its module here; the pipeline (edgevlm.build_vlm) looks it up by the target profile's ``format``.
# ort: ONNX parts, then finish_parts; coreml: build_parts converts every part from PyTorch
VLM_PART_FORMATS = {"onnx": "vlm_onnx", "ort": "ort_mobile", "coreml": "coreml_vlm"}


def get_vlm_parts(fmt: str):
    """The part exporter module for VLM parts in a target format."""
    from ..errors import ConfigError

    if fmt not in VLM_PART_FORMATS:
        raise ConfigError(f"no exporter writes VLM parts in the {fmt} format yet",
                          f"export for a target whose format is one of: {', '.join(VLM_PART_FORMATS)}")
    return importlib.import_module(f"{__name__}.{VLM_PART_FORMATS[fmt]}")
