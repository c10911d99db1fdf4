"""A reference interpreter for Core ML ML programs (``.mlpackage``), in numpy.

Reads the package as shipped -- the ``CoreML.Specification.Model`` protobuf with its MIL program,
and the weight blob file -- without coremltools or torch, and executes the ``main`` function op by
op in the program's own dtypes. It is a reference for checking a package's numbers on Linux, not
Apple's kernels: results differ from a device by kernel rounding order (see ``ops`` for the FP16
arithmetic it models). An op it has no implementation for raises ``NotCovered``.
"""
from __future__ import annotations

from .ops import OPS
from .program import NotCovered, Program, TensorType, load_package, run_package

COVERED_OPS = sorted(set(OPS) | {"const"})

__all__ = ["COVERED_OPS", "NotCovered", "Program", "TensorType", "load_package", "run_package"]
