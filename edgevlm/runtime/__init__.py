"""Run bundles without torch: ONNX Runtime (cpu, jetson, android), Core ML (ios, on Apple OSes).

>>> from edgevlm import runtime
>>> clf = runtime.load("bundles/fastvit_t8-cpu-int8")
>>> clf.classify("digit.png", top_k=3)
>>> vlm = runtime.load("bundles/edgevlm_scenes-cpu-int8")      # a VLM bundle
>>> print(vlm.generate("scene.png", "How many circles?"))
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["load", "Classifier", "Prediction"]


def __getattr__(name: str):
    """Classifier and Prediction load with their module (numpy) on first use: the `edgevlm` command imports
    runtime.memory before anything else (to decide on its huge-page restart), and that stays standard-library only."""
    if name in ("Classifier", "Prediction"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load(bundle, backend: str | None = None, verify: bool = True, threads: int | None = None,
         decoder: str | None = None, providers: list[str] | None = None, gpu_layers: int | None = None):
    """Open a bundle: read and check its manifest, verify checksums, start a backend session.

    Classification bundles give a :class:`Classifier`; VLM bundles a :class:`~edgevlm.runtime.vlm.VLMPipeline`
    (``decoder``: "onnxruntime" or "llama.cpp" when the bundle carries both; default: the first listed).
    ``providers``: ONNX Runtime execution providers to try in order (default: the target profile's); the CPU
    provider is always the last resort. ``gpu_layers``: a llama.cpp decoder's layers on the GPU (default: all,
    where llama-cpp-python was built with a GPU backend; 0: CPU). Either kind's ``.verify()`` runs the bundle's
    golden cases.
    """
    from .. import bundle as _bundle
    from .backends import open_session

    path = Path(bundle)
    manifest = _bundle.read_manifest(path)
    if verify:
        _bundle.verify(path, manifest)
    if manifest.get("task") == "vlm":
        from .vlm import VLMPipeline

        return VLMPipeline(path, manifest, decoder=decoder, threads=threads, providers=providers,
                           gpu_layers=gpu_layers)
    if manifest.get("task") != "classification":
        from ..errors import BundleError

        raise BundleError(f"{path} is a {manifest.get('task')!r} bundle; this runtime runs classification bundles",
                          "upgrade edgevlm")
    from .pipeline import Classifier

    art = manifest["artifacts"][0]
    session = open_session(path, manifest, art, backend=backend, threads=threads, providers=providers)
    return Classifier(path, manifest, session)
