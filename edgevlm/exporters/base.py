"""What every exporter receives and returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import QuantConfig
from ..targets import TargetProfile

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


@dataclass
class ExportContext:
    """A reparameterized eval-mode model and everything needed to export and check it."""

    model: "torch.nn.Module"  # noqa: F821
    target: TargetProfile
    quant: QuantConfig
    workdir: Path                       # the bundle's temporary directory; artifacts go here
    example: np.ndarray                 # (B, 3, H, W) float32 preprocessed real images, for parity
    calibration: Callable[[], np.ndarray] | None = None   # -> (N, 3, H, W), called only for INT8
    opset: int = 20
    log: Callable[[str], None] = print

    @property
    def input_size(self) -> int:
        return int(self.example.shape[-1])

    def eager(self, x: np.ndarray) -> np.ndarray:
        """Eager PyTorch FP32 outputs, the reference every artifact is checked against."""
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


@dataclass
class Artifact:
    """One file (or package directory) of a bundle, with its checks."""

    path: str                           # relative to the bundle root
    format: str                         # onnx | ort | coreml
    precision: str
    role: str = "classifier"
    inputs: list = field(default_factory=list)    # [{name, shape, dtype}]
    outputs: list = field(default_factory=list)
    parity: dict = field(default_factory=dict)    # see exporters.validate
    details: dict = field(default_factory=dict)   # format-specific: quantization coverage, op checks, spec
    # A PyTorch stand-in that computes what the artifact computes, where the artifact itself cannot
    # run here (Core ML on Linux: the package's own weights in eager). Not written to the manifest.
    stand_in: object = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "precision": self.precision, "role": self.role,
                "inputs": self.inputs, "outputs": self.outputs, "parity": self.parity, **self.details}


def io_spec(input_size: int, num_classes: int | None, batch: str | int = "batch") -> tuple[list, list]:
    return ([{"name": INPUT_NAME, "shape": [batch, 3, input_size, input_size], "dtype": "float32"}],
            [{"name": OUTPUT_NAME, "shape": [batch, num_classes], "dtype": "float32"}])
