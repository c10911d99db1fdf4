"""Run bundles without torch: ONNX Runtime (cpu, jetson, android), Core ML (ios, on Apple OSes).

>>> from edgevlm import runtime
>>> clf = runtime.load("bundles/fastvit_t8-cpu-int8")
>>> clf.classify("digit.png", top_k=3)
"""
from __future__ import annotations

from pathlib import Path

from .pipeline import Classifier, Prediction

__all__ = ["load", "Classifier", "Prediction"]


def load(bundle, backend: str | None = None, verify: bool = True, threads: int | None = None) -> Classifier:
    """Open a bundle: read and check its manifest, verify checksums, start a backend session."""
    from .. import bundle as _bundle
    from .backends import open_session

    path = Path(bundle)
    manifest = _bundle.read_manifest(path)
    if verify:
        _bundle.verify(path, manifest)
    if manifest.get("task") != "classification":
        from ..errors import BundleError

        raise BundleError(f"{path} is a {manifest.get('task')!r} bundle; this runtime runs classification bundles",
                          "upgrade edgevlm")
    art = manifest["artifacts"][0]
    session = open_session(path, manifest, art, backend=backend, threads=threads)
    return Classifier(path, manifest, session)
