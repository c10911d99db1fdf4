"""edgevlm: take small vision and vision-language models onto edge devices, with proof.

Heavy modules (torch, onnx, coremltools) load only when used; ``import edgevlm`` is cheap.
"""
from ._version import __version__

__all__ = ["__version__", "export", "load_vlm", "runtime"]


def __getattr__(name):
    if name == "runtime":
        import importlib

        return importlib.import_module(".runtime", __name__)
    if name == "load_vlm":
        from .modeling.families import load_vlm

        return load_vlm
    if name == "export":
        from .api import export

        return export
    raise AttributeError(name)
