"""Backend sessions. Each takes (N, 3, H, W) float32 and returns (N, C) logits; none imports torch."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..bundle import resolve
from ..errors import BackendUnavailableError, BundleError, first_line


TRT_CACHE = "trt_cache"      # where ONNX Runtime's TensorRT provider keeps the engines it builds, inside the bundle


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailableError("onnxruntime is not installed",
                                      "pip install onnxruntime (or onnxruntime-gpu on a Jetson)") from None
    return ort


class OrtSession:
    """ONNX Runtime, with providers chosen from the target profile by what this machine has."""

    def __init__(self, path: Path, wanted: list[str], precision: str, threads: int | None = None,
                 cache_dir: Path | None = None, *, custom_ops: tuple = (), initializers: dict | None = None):
        """``custom_ops``: libraries to register; ``initializers``: name -> OrtValue used in place of the graph's
        initializers of that name, without a copy (kept alive here: sessions given the same ones share that
        memory)."""
        ort = _ort()
        available = ort.get_available_providers()
        chosen = [p for p in wanted if p in available] or []
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        providers: list = []
        for p in chosen:
            if p == "TensorrtExecutionProvider":
                opts = {"trt_fp16_enable": precision in ("fp16", "int8", "int4"),
                        "trt_int8_enable": precision == "int8", "trt_engine_cache_enable": True}
                if cache_dir is not None:
                    opts["trt_engine_cache_path"] = str(cache_dir)
                providers.append((p, opts))
            else:
                providers.append(p)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's default counts physical cores and on some VMs settles on one thread;
        # use every CPU this process may run on (measured: 1.9x faster at batch 1 on 2 vCPUs).
        so.intra_op_num_threads = threads or usable_cpus()
        for lib in custom_ops:
            so.register_custom_ops_library(str(lib))
        self._initializers = dict(initializers or {})
        for name, value in self._initializers.items():
            so.add_initializer(name, value)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:
            raise BundleError(f"ONNX Runtime cannot load {path.name}: {first_line(e)}",
                              "upgrade onnxruntime to the version in the manifest, or re-export") from None
        self.providers = self.session.get_providers()
        self.name = f"onnxruntime ({self.providers[0]})"
        self.input_name = self.session.get_inputs()[0].name
        batch = self.session.get_inputs()[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


class ReferenceCoreMLSession:
    """A Core ML package off Apple OSes: edgevlm's reference ML-program interpreter (numpy, the program's own
    dtypes), not Core ML's kernels; the name says so. One image per call, as Core ML runs these packages."""

    def __init__(self, path: Path):
        from .coreml import INTERPRETER, CoreMLGraph

        self.graph = CoreMLGraph(path, expect=("pixel_values",))
        self.name = f"coreml-reference ({INTERPRETER})"
        self.providers = ["edgevlm-mil-reference"]
        self.fixed_batch = 1

    def run(self, x: np.ndarray) -> np.ndarray:
        i = self.graph.outputs.index("logits") if "logits" in self.graph.outputs else 0
        return np.concatenate([self.graph(pixel_values=np.ascontiguousarray(x[j:j + 1], np.float32))[i]
                               for j in range(len(x))]).astype(np.float32)


class CoreMLSession:
    """Core ML packages predict only on macOS/iOS (elsewhere :class:`ReferenceCoreMLSession` runs them)."""

    def __init__(self, path: Path):
        if sys.platform != "darwin":
            raise BackendUnavailableError("Core ML predicts on macOS and iOS only",
                                          "off Apple OSes, edgevlm runs the package with its reference interpreter")
        try:
            import coremltools as ct
        except ImportError:
            raise BackendUnavailableError("coremltools is not installed", "pip install coremltools") from None
        self.model = ct.models.MLModel(str(path))
        self.name = "coreml"
        self.providers = ["CoreML"]
        self.fixed_batch = 1

    def run(self, x: np.ndarray) -> np.ndarray:
        outs = [self.model.predict({"pixel_values": x[i:i + 1]})["logits"] for i in range(len(x))]
        return np.concatenate(outs).astype(np.float32)


def open_session(bundle: Path, manifest: dict, artifact: dict, backend: str | None = None,
                 threads: int | None = None, providers: list[str] | None = None):
    """Pick a backend for the artifact's format: 'onnxruntime' or 'coreml' (None: by format)."""
    fmt = artifact["format"]
    path = resolve(bundle, manifest, artifact["path"], "artifact")
    backend = backend or ("coreml" if fmt == "coreml" else "onnxruntime")
    if backend == "coreml":
        if fmt != "coreml":
            raise BundleError(f"{bundle} holds a {fmt} model, not Core ML", "use --backend onnxruntime")
        return CoreMLSession(path) if sys.platform == "darwin" else ReferenceCoreMLSession(path)
    if backend == "onnxruntime":
        if fmt not in ("onnx", "ort"):
            raise BundleError(f"{bundle} is a {fmt} bundle (target {manifest['target']['name']})",
                              "use --backend coreml on macOS, or export --target cpu")
        wanted = list(providers or manifest["target"].get("providers", ["CPUExecutionProvider"]))
        threads = threads or int(os.environ.get("EDGEVLM_THREADS", "0")) or None
        return OrtSession(path, wanted, artifact["precision"], threads, cache_dir=Path(bundle) / TRT_CACHE)
    raise BundleError(f"unknown backend {backend!r}", "use onnxruntime or coreml")


# -- a VLM bundle's parts: native TensorRT engine, else ONNX Runtime (TensorRT / CUDA providers), else CPU --------
ENGINES_ENV = "EDGEVLM_ENGINES"          # 0: never use a bundle's TensorRT engines (run its ONNX graphs instead)


def part_backend(bundle: Path, manifest: dict, part: str) -> dict:
    """Which session :func:`open_part` picks for ``part`` here, without opening it: ``{"backend": "tensorrt
    engine" | "onnxruntime", "engine": path or None, "why": ...}`` (``why``: why not the engine)."""
    from . import tensorrt as _trt

    g = _trt.plan_graph(manifest, part)
    if g is None:
        return {"backend": "onnxruntime", "engine": None, "why": "the bundle plans no TensorRT engine for it"}
    engine = Path(bundle) / g["engine"]
    if os.environ.get(ENGINES_ENV, "").strip() == "0":
        why = f"{ENGINES_ENV}=0"
    elif not engine.is_file():
        why = f"{g['engine']} is not built (run `edgevlm build-engines {bundle}` on the device)"
    else:
        why = _trt.native_available()
    if why is None:
        return {"backend": "tensorrt engine", "engine": g["engine"], "why": None}
    return {"backend": "onnxruntime", "engine": None, "why": why}


def open_part(bundle: Path, manifest: dict, part: str, fallback, expect: tuple[str, ...] = ()):
    """The session for a VLM bundle's ``part``: its TensorRT engine (``engines/<part>.plan``) run natively when it
    is built and tensorrt + cuda-python import, after its sidecar was checked against this machine (a mismatch is a
    one-line BundleError, never a silent fallback); else ``fallback()``, the ONNX Runtime session (whose providers
    are the target's TensorRT and CUDA ones where this onnxruntime has them, else the CPU's)."""
    choice = part_backend(bundle, manifest, part)
    if choice["engine"] is None:
        return fallback()
    from . import tensorrt as _trt

    g = _trt.plan_graph(manifest, part)
    return _trt.TrtSession(_trt.check_engine(Path(bundle), g), expect=expect)
