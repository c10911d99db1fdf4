"""TensorRT engines of a bundle, on the device: build them from the manifest's engine plan, refuse ones built for
another TensorRT, GPU or ONNX, and run them natively (TensorRT 10's named-tensor API, CUDA memory through
cuda-python; never torch).

The plan (the manifest's ``engines`` block, written at export by ``edgevlm.exporters.tensorrt.engine_plan``) gives
per ONNX graph the engine file (``engines/<part>.plan``), one optimization profile (min/opt/max of every input),
the precision flags, the workspace and the timing cache. ``build_engines.sh`` (trtexec) and
:func:`build_engines` (the ``tensorrt`` Python API) build from it alike, and each writes a sidecar
``engines/<part>.json``: TensorRT version, GPU, compute capability, precision, sha256 of the ONNX it was built from.
:func:`check_engine` compares a sidecar with this machine before an engine is deserialized.

Nothing here was run against a GPU in edgevlm's CI (there is none): the API calls follow NVIDIA's TensorRT 10 Python
API and cuda-python's runtime bindings (see docs/jetson.md), and the tests that need them skip.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import sha256_file
from ..errors import BackendUnavailableError, BundleError, first_line

FIX_TRT = ("on the Jetson install JetPack's TensorRT Python package (sudo apt install python3-libnvinfer) and "
           "cuda-python (pip install cuda-python); elsewhere pip install tensorrt cuda-python")
# What the builder's flag names in the plan mean to the Python API (trtexec's are in exporters.tensorrt.FLAG_TRTEXEC).
BUILDER_FLAGS = {"fp16": "FP16", "int8": "INT8"}
STRONGLY_TYPED = "strongly_typed"


def _major_minor(version: str) -> str:
    parts = str(version).strip().split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else f"{parts[0]}.0"


# -- what this machine has ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    """TensorRT version (major.minor), GPU name and compute capability ("8.7" for Orin) of this machine."""

    tensorrt: str
    gpu: str
    compute_capability: str


def import_tensorrt():
    """The ``tensorrt`` module, or a one-line :class:`BackendUnavailableError` naming how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError("the tensorrt Python package is not installed", FIX_TRT) from None
    return trt


def import_cudart():
    """cuda-python's runtime API (``cuda.bindings.runtime``; ``cuda.cudart`` before cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendUnavailableError("cuda-python is not installed", FIX_TRT) from None
    return cudart


def _check(result, what: str):
    """cuda-python returns (cudaError_t, values...): the values, or a BundleError naming the call."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BundleError(f"CUDA failed in {what}: {err}", "check the GPU driver and that no other process holds "
                          "the GPU's memory (tegrastats / nvidia-smi)")
    return rest[0] if len(rest) == 1 else tuple(rest)


def probe() -> Machine:
    """This machine's TensorRT and GPU (needs tensorrt and cuda-python)."""
    trt, cudart = import_tensorrt(), import_cudart()
    prop = _check(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return Machine(_major_minor(trt.__version__), name, f"{prop.major}.{prop.minor}")


def native_available() -> str | None:
    """None when tensorrt and cuda-python import (a native engine session can run), else why not."""
    try:
        import_tensorrt()
        import_cudart()
    except BackendUnavailableError as e:
        return e.problem
    return None


# -- the plan and the sidecars --------------------------------------------------------------------------------
def engine_plan(manifest: dict) -> dict | None:
    """The manifest's ``engines`` block (None: the bundle is not for a TensorRT target)."""
    return manifest.get("engines")


def plan_graph(manifest: dict, part: str) -> dict | None:
    plan = engine_plan(manifest) or {}
    return next((g for g in plan.get("graphs", ()) if g.get("part") == part), None)


def read_sidecar(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} (the engine's sidecar) cannot be read: {first_line(e)}",
                          f"run `edgevlm build-engines {Path(path).parent.parent}` here") from None
    if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("tensorrt", "compute_capability")):
        raise BundleError(f"{path} is not an engine sidecar (it lacks tensorrt / compute_capability)",
                          f"run `edgevlm build-engines {Path(path).parent.parent}` here")
    return d


def check_engine(bundle: Path, graph: dict, machine: Machine | Callable[[], Machine] | None = None) -> Path:
    """The engine file of a planned ``graph`` after its sidecar was checked against this machine (TensorRT version,
    compute capability) and the bundle's ONNX (sha256); a one-line :class:`BundleError` otherwise. ``machine``: a
    :class:`Machine`, or the probe that gives it (default :func:`probe`; called only once the sidecar was read)."""
    bundle = Path(bundle)
    engine, sidecar = bundle / graph["engine"], bundle / graph["sidecar"]
    fix = f"run `edgevlm build-engines {bundle}` here"
    if not engine.is_file():
        raise BundleError(f"{engine} is missing", fix)
    if not sidecar.is_file():
        raise BundleError(f"{engine} has no sidecar {sidecar.name} saying what it was built for", fix)
    side = read_sidecar(sidecar)
    here = machine if isinstance(machine, Machine) else (machine or probe)()
    built_trt, built_sm = _major_minor(side["tensorrt"]), side["compute_capability"]
    if built_trt != here.tensorrt or built_sm != here.compute_capability:
        raise BundleError(f"{engine.name} was built for TensorRT {built_trt} on sm {built_sm}, this machine has "
                          f"TensorRT {here.tensorrt} on sm {here.compute_capability} ({here.gpu})", fix)
    want = graph["onnx_sha256"]
    if side.get("onnx_sha256") != want:
        raise BundleError(f"{engine.name} was built from another {graph['onnx']} (sha256 "
                          f"{str(side.get('onnx_sha256'))[:12]}..., the bundle's is {want[:12]}...)", fix)
    onnx = bundle / graph["onnx"]
    if onnx.is_file() and sha256_file(onnx) != want:
        raise BundleError(f"{graph['onnx']} changed since export (its sha256 is not the plan's), so "
                          f"{engine.name} no longer matches it", "export the bundle again, then " + fix)
    return engine


def sidecar_record(graph: dict, machine: Machine, builder: str, flags: list[str], seconds: float) -> dict:
    return {"part": graph["part"], "tensorrt": machine.tensorrt, "gpu": machine.gpu,
            "compute_capability": machine.compute_capability, "precision": graph["precision"],
            "onnx": graph["onnx"], "onnx_sha256": graph["onnx_sha256"], "builder": builder, "flags": flags,
            "build_s": round(seconds, 1)}


# -- building (the tensorrt Python API; the same plan build_engines.sh runs through trtexec) -------------------
def check_plan_version(plan: dict, machine: Machine, bundle: Path) -> None:
    if _major_minor(plan["tensorrt"]) != machine.tensorrt:
        raise BundleError(f"{bundle}'s engine plan is for TensorRT {plan['tensorrt']}, this machine has TensorRT "
                          f"{machine.tensorrt}", f"use JetPack {plan.get('jetpack') or '?'} (TensorRT "
                          f"{plan['tensorrt']}), or export again with tensorrt.version: \"{machine.tensorrt}\"")


def build_engines(bundle, parts: list[str] | None = None, log: Callable[[str], None] = print,
                  machine: Machine | None = None) -> list[dict]:
    """Build ``engines/<part>.plan`` and its sidecar for every planned graph (or ``parts``) of ``bundle`` with the
    tensorrt Python API; returns the sidecars. Refuses, before building anything, a bundle without a plan, a
    TensorRT other than the plan's, and an ONNX that changed since export."""
    from .. import bundle as _bundle

    bundle = Path(bundle)
    manifest = _bundle.read_manifest(bundle)
    plan = engine_plan(manifest)
    if not plan:
        raise BundleError(f"{bundle} has no engine plan in its manifest (target "
                          f"{manifest.get('target', {}).get('name')!r})",
                          "export it again with this edgevlm for a TensorRT target: --target jetson --decoder onnx")
    graphs = [g for g in plan["graphs"] if parts is None or g["part"] in parts]
    unknown = sorted(set(parts or ()) - {g["part"] for g in plan["graphs"]})
    if unknown:
        raise BundleError(f"{bundle}'s engine plan has no part {', '.join(unknown)}",
                          f"pick from {', '.join(g['part'] for g in plan['graphs'])}")
    trt = import_tensorrt()
    import_cudart()
    machine = machine or probe()
    check_plan_version(plan, machine, bundle)
    for g in graphs:
        if sha256_file(bundle / g["onnx"]) != g["onnx_sha256"]:
            raise BundleError(f"{g['onnx']} changed since export (its sha256 is not the plan's)",
                              "export the bundle again")
    (bundle / "engines").mkdir(exist_ok=True)
    cache_path = bundle / plan["timing_cache"]
    logger = trt.Logger(trt.Logger.WARNING)
    out = []
    for g in graphs:
        t0 = time.perf_counter()
        flags = list(g["flags"])
        log(f"building {g['engine']} from {g['onnx']} ({g['precision']}, {' '.join(flags) or 'fp32'})")
        try:
            blob = _build_one(trt, logger, bundle, g, flags, plan["workspace_mib"], cache_path)
        except BundleError:
            if not g.get("fallback_flags"):
                raise
            flags = list(g["fallback_flags"])
            log(f"  retrying {g['part']} with {' '.join(flags)}")
            blob = _build_one(trt, logger, bundle, g, flags, plan["workspace_mib"], cache_path)
        (bundle / g["engine"]).write_bytes(blob)
        rec = sidecar_record(g, machine, f"tensorrt {trt.__version__} Python API", flags, time.perf_counter() - t0)
        (bundle / g["sidecar"]).write_text(json.dumps(rec, indent=1) + "\n")
        log(f"  wrote {g['engine']} ({len(blob):,} bytes) for TensorRT {machine.tensorrt} on sm "
            f"{machine.compute_capability}")
        out.append(rec)
    return out


def _build_one(trt, logger, bundle: Path, g: dict, flags: list[str], workspace_mib: int, cache_path: Path) -> bytes:
    """One engine: parse the ONNX, one optimization profile from the plan, the flags, workspace and timing cache
    (read before, written back after)."""
    builder = trt.Builder(logger)
    net_flags = 0
    if STRONGLY_TYPED in flags:
        net_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle / g["onnx"])):
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise BundleError(f"TensorRT's ONNX parser refused {g['onnx']}: {errors[:200]}",
                          "export the bundle again with this edgevlm; if it persists, report it")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    for f in flags:
        if f in BUILDER_FLAGS:
            config.set_flag(getattr(trt.BuilderFlag, BUILDER_FLAGS[f]))
    profile = builder.create_optimization_profile()
    for name, s in g["shapes"].items():
        profile.set_shape(name, tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BundleError(f"TensorRT could not build {g['engine']} from {g['onnx']} with {' '.join(flags) or 'fp32'}",
                          "see TensorRT's log above; try `bash build_engines.sh` for trtexec's full log")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(memoryview(cache.serialize())))    # augmented by this build
    return bytes(memoryview(blob))


# -- running an engine ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """What ``session.get_inputs()`` gives in ONNX Runtime: name, shape (-1 for dynamic axes), element type."""

    name: str
    shape: list
    type: str


class TrtSession:
    """A TensorRT engine with the call interface of a VLM part's ONNX Runtime graph (``runtime.vlm._Graph``):
    ``graph(**feeds) -> [outputs in engine order]``, ``.outputs``, ``.path``, ``.providers``, ``.session`` (itself,
    with ``get_inputs()`` / ``get_outputs()``).

    Inputs are copied host -> device, the engine runs on its own CUDA stream (``execute_async_v3``), outputs come
    back device -> host; device buffers are kept and grown as shapes grow."""

    name = "tensorrt (engine)"

    def __init__(self, engine_path: Path, expect: tuple[str, ...] = ()):
        trt, self._cudart = import_tensorrt(), import_cudart()
        self._trt = trt
        self.path = Path(engine_path)
        self.providers = ["TensorRT engine (native)"]
        self.ort = self                   # what OrtDecoder reads providers from
        self.session = self
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {self.path.name}",
                              f"run `edgevlm build-engines {self.path.parent.parent}` here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [n for n in names if is_in[n]]
        self.outputs = [n for n in names if not is_in[n]]
        self._dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        missing = [n for n in expect if n not in self._inputs]
        if missing:
            raise BundleError(f"{self.path.name} is not the engine this part needs: it lacks the input(s) "
                              f"{', '.join(missing[:4])}", f"run `edgevlm build-engines {self.path.parent.parent}`")
        self._stream = _check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}          # name -> (device pointer, bytes)

    def _info(self, n: str) -> TensorInfo:
        return TensorInfo(n, [int(d) for d in self.engine.get_tensor_shape(n)], self._dtype[n].name)

    def get_inputs(self) -> list[TensorInfo]:
        return [self._info(n) for n in self._inputs]

    def get_outputs(self) -> list[TensorInfo]:
        return [self._info(n) for n in self.outputs]

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if nbytes > size:
            if ptr:
                _check(self._cudart.cudaFree(ptr), "cudaFree")
            size = max(nbytes, 2 * size, 256)
            ptr = _check(self._cudart.cudaMalloc(size), "cudaMalloc")
            self._buffers[name] = (int(ptr), size)
        return self._buffers[name][0]

    def __call__(self, **feeds) -> list[np.ndarray]:
        cu = self._cudart
        h2d, d2h = cu.cudaMemcpyKind.cudaMemcpyHostToDevice, cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise BundleError(f"{self.path.name} needs the input(s) {', '.join(missing[:4])}", "report this as a bug")
        held = []
        for n in self._inputs:
            x = np.ascontiguousarray(feeds[n], dtype=self._dtype[n])
            held.append(x)
            if not self.context.set_input_shape(n, tuple(x.shape)):
                raise BundleError(f"{self.path.name}: input {n} of shape {list(x.shape)} is outside the engine's "
                                  "optimization profile", "export and build the engines with a longer "
                                  "tensorrt.engines.max_prompt / context")
            ptr = self._buffer(n, x.nbytes)
            if x.nbytes:
                _check(cu.cudaMemcpyAsync(ptr, x.ctypes.data, x.nbytes, h2d, self._stream), "cudaMemcpyAsync")
            self.context.set_tensor_address(n, ptr)
        outs = []
        for n in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            y = np.empty(shape, self._dtype[n])
            self.context.set_tensor_address(n, self._buffer(n, y.nbytes))
            outs.append(y)
        if not self.context.execute_async_v3(self._stream):
            raise BundleError(f"TensorRT failed running {self.path.name}",
                              f"rebuild the engines (`edgevlm build-engines {self.path.parent.parent}`)")
        for n, y in zip(self.outputs, outs):
            if y.nbytes:
                _check(cu.cudaMemcpyAsync(y.ctypes.data, self._buffers[n][0], y.nbytes, d2h, self._stream),
                       "cudaMemcpyAsync")
        _check(cu.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        del held
        return [y.astype(np.float32) if y.dtype == np.float16 else y for y in outs]

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:                # interpreter shutdown: cuda-python may be gone already
            pass
