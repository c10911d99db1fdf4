"""A model's export parts, declared as data by its family (as optimum's per-architecture ONNX configs and
ExecuTorch's named methods declare theirs).

A :class:`PartSpec` says what one graph of a bundle is: the module to trace, its input and output names, which
axes are dynamic, example inputs for the trace and the parity check, and the facts the runtime needs. The
export pipeline (:mod:`edgevlm.build_vlm`) exports, validates and quantizes every part the same way; the target
profile (``export/*.yaml``) decides format and quantization per part *role*. A family adds a graph by returning
one more spec, never by a branch in the pipeline or an exporter.

This module is plain data (no torch import): the modeling side fills it, the exporters read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class PartRole(str, Enum):
    """What a part does, which decides the quantization rules a target applies to it."""

    PIXELS = "pixels"        # reads pixel values: INT8 calibrated on images (the target's int8 rules)
    FEATURES = "features"    # reads another part's features (projector, pre-fusion): kept FP32 below FP16
    HEADS = "heads"          # small task heads read on the decoder's hidden state (region heads): kept FP32

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PartSpec:
    """One ONNX graph of a VLM bundle, besides the token embedding and the decoder (generic to every LM)."""

    name: str                                   # the manifest's part key, e.g. "vision_tower"
    module: Any                                 # the torch module traced; its outputs are float32
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    example: tuple                              # example inputs (tensors), in ``inputs`` order
    role: PartRole = PartRole.PIXELS
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)   # input -> {axis: dim name}
    bounds: dict[str, int] = field(default_factory=dict)   # dim name -> largest size fed (formats with bounded
    #                                           flexible shapes, as Core ML, need one for every dynamic axis)
    facts: dict = field(default_factory=dict)   # recorded in the part's manifest record (merge rule, tokens, ...)
    what: str = ""                              # named in export errors

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def __post_init__(self) -> None:
        if len(self.example) != len(self.inputs):
            raise ValueError(f"part {self.name}: {len(self.inputs)} inputs but {len(self.example)} example tensors")
        unknown = set(self.dynamic) - set(self.inputs)
        if unknown:
            raise ValueError(f"part {self.name}: dynamic axes for unknown inputs {sorted(unknown)}")
