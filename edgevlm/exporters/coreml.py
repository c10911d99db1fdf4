"""Core ML export (ML Program) for the ios target, checked as far as Linux allows.

Core ML predictions need macOS, so on Linux the package is proven in three other ways:

1. the TorchScript trace that coremltools converts is run and compared with eager PyTorch (FP32);
2. the saved package is re-read (spec and MIL program): type, deployment target, input/output
   names, shapes and dtypes, and how many weight tensors are stored as fp32 / fp16 / int8 / int4;
3. weight round trip: every weight the package stores (dequantized for int8/int4) is written back
   into a copy of the torch model and that copy is run and compared with eager. Weights the
   converter fused (BatchNorm folded into a conv, a layer scale folded into the conv before it)
   are mapped through an FP32 conversion of the same model: by name where the converter kept the
   torch module path, otherwise by shape and graph order, accepted only when the stored tensor is
   a per-output-channel multiple of the torch parameter.

Activations still run in FP32 in step 3, so it measures the stored weights, not Core ML's FP16
arithmetic. Step 4 does: the saved package itself is run by edgevlm's reference ML-program
interpreter (:mod:`edgevlm.runtime.mil`, numpy, in the program's own dtypes) and compared with
eager (``parity["reference_interpreter"]``; an op it does not cover is recorded as
"not covered: OP" and no parity is claimed). On macOS the package is also run with ``MLModel.predict``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Precision
from ..errors import BackendUnavailableError, BundleError, ConfigError, ExportError, ValidationError
from . import EXPORTERS
from .base import INPUT_NAME, OUTPUT_NAME, Artifact, ExportContext, io_spec
from .validate import compare

PACKAGE = "model.mlpackage"
WEIGHT_THRESHOLD = 2048            # tensors with fewer elements stay FP16 when quantizing
MIN_COMPRESSED_SHARE = 0.5         # an int8/int4 package must store at least this share of weights compressed
MAX_OTHER_FLOAT_SHARE = 0.01       # weights stored in the "wrong" float type (fp32 in an fp16 package, ...)
FIT_RTOL = 1e-3                    # per-channel fit of a fused tensor against a torch parameter
WEIGHT_DTYPE = {Precision.FP32: "fp32", Precision.FP16: "fp16", Precision.INT8: "int8", Precision.INT4: "int4"}
_NO_PREDICT = "skipped: Core ML predictions need macOS"


@contextlib.contextmanager
def _quiet():
    """Silence coremltools' progress bars, warnings and info logging (errors still raise)."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"), \
                contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        log.setLevel(level)


def _coremltools():
    """Import coremltools quietly, or say how to install it."""
    try:
        with _quiet():
            import coremltools
    except ImportError:
        raise BackendUnavailableError("coremltools is not installed", "pip install 'edgevlm[coreml]'") from None
    return coremltools


# ----------------------------------------------------------------------------- reading a program

@dataclass
class _Weight:
    """One weight tensor of a MIL program: a float ``const`` or a ``constexpr_*`` (compressed) op."""

    name: str               # op name without the converter's ``_to_fp16`` / ``_quantized`` suffixes
    op_name: str
    shape: tuple
    dtype: str              # storage dtype: fp32, fp16, int8, uint8, int4, ...
    compression: str | None  # constexpr op type, None for a plain const
    op: object

    def value(self) -> np.ndarray:
        """The float values the device computes with (dequantized for compressed tensors)."""
        if self.compression is None:
            return np.asarray(self.op.val.val, dtype=np.float32)
        return np.asarray(self.op.materialized_val_inference(), dtype=np.float32)


def _base_name(name: str) -> str:
    for suffix in ("_quantized", "_to_fp16", "_to_fp32"):
        while name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _walk(block):
    for op in block.operations:
        for b in op.blocks:
            yield from _walk(b)
        yield op


def program_weights(prog) -> list[_Weight]:
    """The weight tensors of a pymil Program, in graph order."""
    from coremltools.converters.mil.mil import types

    out = []
    for func in prog.functions.values():
        for op in _walk(func):
            outputs = op.outputs
            if not outputs:
                continue
            children = outputs[0].child_ops
            feeds_constexpr = bool(children) and all((c.op_type or "").startswith("constexpr_") for c in children)
            if op.op_type == "const":
                var = outputs[0]
                if var.rank < 1 or not types.is_float(var.dtype) or feeds_constexpr:
                    continue  # scalars, shapes, and scale/offset parameters of a compressed tensor
                out.append(_Weight(_base_name(op.name), op.name, tuple(var.shape),
                                   types.builtin_to_string(var.dtype), None, op))
            elif (op.op_type or "").startswith("constexpr_") and not feeds_constexpr:
                data = next((op.inputs[k] for k in ("quantized_data", "data", "indices", "nonzero_data", "source_val")
                             if k in op.inputs), None)
                dtype = types.builtin_to_string(data.dtype) if data is not None else "unknown"
                out.append(_Weight(_base_name(op.name), op.name, tuple(outputs[0].shape), dtype, op.op_type, op))
    return out


def load_package(path: Path):
    """(MLModel without loading it into Core ML, spec, pymil Program) of a saved package."""
    ct = _coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    with _quiet():
        ml = ct.models.MLModel(str(path), skip_model_load=True)
        spec = ml.get_spec()
        prog = milproto_load(spec, spec.specificationVersion, ml.weights_dir) \
            if spec.WhichOneof("Type") == "mlProgram" else None
    return ml, spec, prog


def package_size(path: Path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


# ----------------------------------------------------------------------------- spec check

def _array_feature(feature) -> tuple[list[int], str] | None:
    from coremltools.proto import FeatureTypes_pb2

    if feature.type.WhichOneof("Type") != "multiArrayType":
        return None
    arr = feature.type.multiArrayType
    return list(arr.shape), FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType)


def check_package(path: Path, *, deployment_target: str, input_size: int, weight_dtype: str,
                  num_classes: int | None = None) -> dict:
    """Re-read a saved package and prove what it is; raises ValidationError on any mismatch.

    ``weight_dtype`` is the storage type the weights must have: fp32 or fp16 (no compressed
    tensors), or int8 / int4 (at least MIN_COMPRESSED_SHARE of weight elements in that type).
    """
    ct = _coremltools()
    ml, spec, prog = load_package(path)
    fix = "report the model and target as an exporter bug"

    def fail(problem: str, how: str = fix):
        raise ValidationError(f"Core ML package {Path(path).name}: {problem}", how)

    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        fail(f"is a {kind}, not an ML Program")
    try:
        want_version = int(ct.target[deployment_target])
    except KeyError:
        raise ConfigError(f"unknown Core ML deployment target {deployment_target!r}",
                          "use a coremltools target name such as iOS16 or iOS18 in export/ios.yaml") from None
    if spec.specificationVersion != want_version:
        fail(f"has specification version {spec.specificationVersion}, {deployment_target} means {want_version}",
             f"convert with minimum_deployment_target={deployment_target}; an op newer than that raises the version")

    inputs, outputs = list(spec.description.input), list(spec.description.output)
    if [i.name for i in inputs] != [INPUT_NAME]:
        fail(f"has inputs {[i.name for i in inputs]}, expected [{INPUT_NAME!r}]")
    want_shape = [1, 3, input_size, input_size]
    arr = _array_feature(inputs[0])
    if arr is None or arr != (want_shape, "FLOAT32"):
        fail(f"input {INPUT_NAME!r} is {arr}, expected a FLOAT32 tensor of shape {want_shape}",
             "convert with a TensorType input (not an ImageType) of the bundle's input size")
    if [o.name for o in outputs] != [OUTPUT_NAME]:
        fail(f"has outputs {[o.name for o in outputs]}, expected [{OUTPUT_NAME!r}]")
    arr = _array_feature(outputs[0])
    if arr is None or arr[1] != "FLOAT32":
        fail(f"output {OUTPUT_NAME!r} is {arr}, expected FLOAT32", "convert with an output TensorType of dtype float32")
    if num_classes is not None and arr[0] and arr[0] != [1, num_classes]:
        fail(f"output {OUTPUT_NAME!r} has shape {arr[0]}, expected [1, {num_classes}]")

    weights = program_weights(prog)
    counts: dict[str, int] = {}
    elements: dict[str, int] = {}
    ops: dict[str, int] = {}
    for w in weights:
        counts[w.dtype] = counts.get(w.dtype, 0) + 1
        elements[w.dtype] = elements.get(w.dtype, 0) + int(np.prod(w.shape))
        if w.compression:
            ops[w.compression] = ops.get(w.compression, 0) + 1
    total = sum(elements.values()) or 1
    compressed = {w.dtype for w in weights if w.compression}
    if weight_dtype in ("fp32", "fp16"):
        if compressed:
            fail(f"stores compressed weights ({', '.join(sorted(compressed))}) but {weight_dtype} was asked for")
        other = sum(n for d, n in elements.items() if d != weight_dtype)
        if elements.get(weight_dtype, 0) == 0 or other / total > MAX_OTHER_FLOAT_SHARE:
            fail(f"stores weights as {elements}, expected {weight_dtype}",
                 f"convert with compute_precision={'FLOAT32' if weight_dtype == 'fp32' else 'FLOAT16'}")
    else:
        wrong = compressed - {weight_dtype}
        if wrong:
            fail(f"stores compressed weights as {sorted(wrong)}, expected {weight_dtype}")
        share = elements.get(weight_dtype, 0) / total
        if share < MIN_COMPRESSED_SHARE:
            fail(f"stores only {share:.0%} of weight elements as {weight_dtype} ({elements})",
                 "use a smaller INT4 --block-size that divides the layer widths (e.g. 16), or --quant int8"
                 if weight_dtype == "int4" else "use --quant fp16; this model's weights are too small to quantize")
        if sum(n for d, n in elements.items() if d == "fp32") / total > MAX_OTHER_FLOAT_SHARE:
            fail(f"keeps FP32 weights next to {weight_dtype} ({elements})", "convert with compute_precision=FLOAT16")
    return {
        "type": kind,
        "spec_version": int(spec.specificationVersion),
        "inputs": [{"name": INPUT_NAME, "shape": want_shape, "dtype": "float32"}],
        "outputs": [{"name": OUTPUT_NAME, "shape": _array_feature(outputs[0])[0], "dtype": "float32"}],
        "weights_by_dtype": dict(sorted(counts.items())),
        "weight_elements_by_dtype": dict(sorted(elements.items())),
        "compression_ops": dict(sorted(ops.items())),
        "weight_dtype_share": round(elements.get(weight_dtype, 0) / total, 4),
    }


# ----------------------------------------------------------------------------- weight round trip

def _channel_fit(ref: np.ndarray, param: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-output-channel factors c with ref ≈ c * param, and the relative residual of that fit."""
    a = param.reshape(param.shape[0], -1).astype(np.float64)
    b = ref.reshape(ref.shape[0], -1).astype(np.float64)
    den = (a * a).sum(1)
    c = np.divide((a * b).sum(1), den, out=np.zeros_like(den), where=den > 0)
    scale = np.linalg.norm(b)
    return c, float(np.linalg.norm(b - c[:, None] * a) / scale) if scale > 0 else float("inf")


def map_weights(model, reference: list[_Weight]) -> tuple[dict, dict]:
    """Map FP32-program weights to torch state_dict entries: {weight name: (torch name, factors or None)}.

    By name when the converter kept the module path and the values agree; otherwise the nearest
    unclaimed same-shape tensor (graph order) whose per-output-channel multiple reproduces it.
    """
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()
             if v.is_floating_point() and v.dim() >= 1}
    names = list(state)
    by_key: dict[str, str | None] = {}
    for k in names:
        key = k.replace(".", "_")
        by_key[key] = None if key in by_key else k   # None marks an ambiguous key
    mapping: dict[str, tuple[str, np.ndarray | None]] = {}
    claimed: set[str] = set()
    stats = {"by_name": 0, "by_shape_order_fit": 0, "unmapped": []}
    last = -1
    for w in reference:
        ref = w.value()
        k = by_key.get(w.name)
        if k and state[k].shape == ref.shape and np.allclose(ref, state[k], rtol=1e-5, atol=1e-7):
            mapping[w.name] = (k, None)
            claimed.add(k)
            stats["by_name"] += 1
            last = names.index(k)
            continue
        if ref.ndim < 2 or ref[0].size < 2 or not np.any(ref):
            stats["unmapped"].append(w.name)   # biases and zero tensors: a channel fit would prove nothing
            continue
        order = names[last + 1:] + names[: last + 1]
        for k in order:
            if k in claimed or state[k].shape != ref.shape:
                continue
            c, residual = _channel_fit(ref, state[k])
            if residual <= FIT_RTOL:
                mapping[w.name] = (k, c)
                claimed.add(k)
                stats["by_shape_order_fit"] += 1
                last = names.index(k)
                break
        else:
            stats["unmapped"].append(w.name)
    return mapping, stats


def weight_roundtrip(model, package: Path, reference_weights: list[_Weight], example: np.ndarray,
                     reference: np.ndarray, precision: str) -> tuple[dict, object]:
    """Load the package's stored (dequantized) weights into a copy of ``model`` and compare with eager.

    Returns the parity record and the copy (None when the mapping is incomplete)."""
    import torch

    _, _, prog = load_package(package)
    stored = program_weights(prog)
    clone = copy.deepcopy(model).eval()
    mapping, stats = map_weights(clone, reference_weights)
    state = clone.state_dict()
    original = {k: v.clone() for k, v in state.items()}
    loaded, compressed_loaded, unmapped_compressed, unmapped_float = 0, 0, [], []
    written: dict[str, str] = {}
    with _quiet():
        for w in stored:
            if w.name not in mapping:
                (unmapped_compressed if w.compression else unmapped_float).append(w.name)
                continue
            name, c = mapping[w.name]
            value = w.value()
            if not np.isfinite(value).all():
                raise ValidationError(f"Core ML weight {w.op_name} holds NaN or Inf after dequantization",
                                      "export at fp16, or report the model as an exporter bug")
            if c is not None:   # the package stores c * param: write back value / c, keep dead channels
                keep = c == 0
                safe = np.where(keep, 1.0, c).reshape(-1, *([1] * (value.ndim - 1)))
                value = np.where(keep.reshape(safe.shape), original[name].numpy(), value / safe)
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
            written[name] = w.name
            loaded += 1
            compressed_loaded += bool(w.compression)
    # tensors the converter deduplicated: an unclaimed exact twin of a name-mapped tensor gets the same
    # values (constant tensors such as zero biases or unit norms are skipped: their copy would change nothing)
    twins = 0
    for name, t in original.items():
        if name in written or not t.is_floating_point() or t.dim() < 1 or bool((t == t.flatten()[0]).all()):
            continue
        for src in written:
            if mapping[written[src]][1] is None and original[src].shape == t.shape and torch.equal(original[src], t):
                state[name].copy_(state[src])
                twins += 1
                break
    n_compressed = sum(1 for w in stored if w.compression)
    mapping_rec = {"by_name": stats["by_name"], "by_shape_order_fit": stats["by_shape_order_fit"],
                   "deduplicated_twins": twins, "tensors_loaded": loaded,
                   "compressed_loaded": f"{compressed_loaded}/{n_compressed}",
                   "float_tensors_kept_fp32": len(unmapped_float)}
    if unmapped_compressed:
        return {"status": "skipped", "mapping": mapping_rec,
                "reason": f"{len(unmapped_compressed)} compressed tensors could not be mapped to torch parameters "
                          f"(e.g. {unmapped_compressed[:3]})"}, None
    with torch.no_grad():
        out = clone(torch.from_numpy(np.ascontiguousarray(example))).numpy()
    rec = compare(reference, out, precision)
    rec.update(status="ok", runtime="eager PyTorch FP32 with the package's stored weights", mapping=mapping_rec,
               method="names from the torch module path, else shape + graph order with a per-output-channel "
                      f"scale fit (relative residual <= {FIT_RTOL}) against an FP32 conversion")
    if unmapped_float:
        rec["note"] = (f"{len(unmapped_float)} uncompressed tensors (fused biases) could not be mapped and "
                       "keep their FP32 values")
    return rec, clone


# ----------------------------------------------------------------------------- conversion

def trace_checked(ctx: ExportContext, reference: np.ndarray):
    """TorchScript-trace the model on one image; prove the trace reproduces eager on every example."""
    import torch

    x1 = torch.from_numpy(np.ascontiguousarray(ctx.example[:1]))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(ctx.model, x1, check_trace=False)
            out = np.concatenate([traced(torch.from_numpy(np.ascontiguousarray(ctx.example[i:i + 1]))).numpy()
                                  for i in range(len(ctx.example))])
    except Exception as e:
        raise ExportError(f"torch.jit.trace failed on {type(ctx.model).__name__}: {str(e).splitlines()[0][:200]}",
                          "report the model; Core ML conversion needs a traceable model") from None
    rec = compare(reference, out, "fp32")
    rec.update(runtime="torch.jit.trace (batch 1)", inputs=int(len(ctx.example)))
    ctx.log(f"    parity traced fp32: max abs {rec['max_abs_diff']:.2e} [ok]")
    return traced, rec


def convert(traced, input_size: int, deployment_target: str, fp16: bool, compute_units: str = "ALL"):
    """coremltools conversion of a traced module to an ML Program with a float32 tensor in and out."""
    ct = _coremltools()
    try:
        with _quiet():
            return ct.convert(
                traced,
                inputs=[ct.TensorType(name=INPUT_NAME, shape=(1, 3, input_size, input_size), dtype=np.float32)],
                outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
                convert_to="mlprogram",
                minimum_deployment_target=ct.target[deployment_target],
                compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32,
                compute_units=ct.ComputeUnit[compute_units],
            )
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        fix = "report the model; try --quant fp32 or another model"
        if isinstance(e, TypeError) and "0-dimensional" in msg:
            fix = (f"coremltools {ct.__version__} cannot cast shape values with numpy {np.__version__} "
                   "(attention blocks); install numpy<2.4 or a coremltools release with the fix")
        raise ExportError(f"coremltools could not convert the model: {msg}", fix) from None


def quantize(mlmodel, precision: Precision, block_size: int):
    """Weight-only linear quantization: per-channel symmetric INT8, or per-block symmetric INT4."""
    import coremltools.optimize as cto

    if precision == Precision.INT8:
        op = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                weight_threshold=WEIGHT_THRESHOLD)
    else:
        op = cto.coreml.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                block_size=block_size, weight_threshold=WEIGHT_THRESHOLD)
    try:
        with _quiet():
            return cto.coreml.linear_quantize_weights(mlmodel, cto.coreml.OptimizationConfig(global_config=op))
    except Exception as e:
        raise ExportError(f"coremltools could not quantize the weights to {precision}: {str(e).splitlines()[0][:200]}",
                          "use --quant fp16, or report the model") from None


def predict_parity(path: Path, example: np.ndarray, reference: np.ndarray, precision: str,
                   compute_units: str = "ALL") -> dict:
    """Run the package with Core ML (macOS only) one image at a time and compare with eager."""
    ct = _coremltools()
    units = "CPU_ONLY" if precision == "fp32" else compute_units  # GPU / Neural Engine compute in FP16
    with _quiet():
        ml = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[units])
        out = np.concatenate([np.asarray(ml.predict({INPUT_NAME: np.ascontiguousarray(example[i:i + 1])})[OUTPUT_NAME],
                                         dtype=np.float32) for i in range(len(example))])
    rec = compare(reference, out.reshape(reference.shape), precision)
    rec.update(runtime=f"Core ML MLModel.predict ({units})", inputs=int(len(example)))
    return rec


def interpreted(path: Path) -> tuple[object, dict]:
    """(the saved package loaded by edgevlm's reference ML-program interpreter, the fields every parity record
    through it carries: the runtime, the op types covered and used, the uncovered ones)."""
    from ..runtime.mil import load_package

    prog = load_package(path)
    return prog, {"runtime": "edgevlm reference ML-program interpreter (numpy)",
                  "ops_covered": f"{len(prog.ops_used) - len(prog.uncovered)}/{len(prog.ops_used)} op types",
                  "ops_used": dict(sorted(prog.ops_used.items())), "uncovered": prog.uncovered}


def interpreter_parity(path: Path, example: np.ndarray, reference: np.ndarray, precision: str) -> dict:
    """Run the saved package through edgevlm's reference ML-program interpreter (numpy, the program's own
    dtypes) one image at a time and compare with eager. An op it does not cover is recorded, never passed."""
    prog, base = interpreted(path)
    if prog.uncovered:
        return {"status": f"not covered: {', '.join(prog.uncovered)}", "passed": None, **base}
    try:
        out = np.concatenate([np.asarray(prog.predict({INPUT_NAME: np.ascontiguousarray(example[i:i + 1])})[OUTPUT_NAME],
                                         dtype=np.float32) for i in range(len(example))])
    except BundleError as e:   # an op the interpreter cannot run on this program: recorded, parity not claimed
        return {"status": f"interpreter error: {e.problem}", "passed": None, **base}
    rec = compare(reference, out.reshape(reference.shape), precision)
    rec.update(status="ok", inputs=len(example), **base)
    return rec


@EXPORTERS.register("coreml")
def export(ctx: ExportContext) -> list[Artifact]:
    """Convert, compress, save and check ``model.mlpackage``."""
    ct = _coremltools()
    p = ctx.quant.precision
    ctx.target.check_precision(p)
    target = ctx.target.minimum_deployment_target.get(p.value)
    if not target:
        raise ConfigError(f"target {ctx.target.name} names no Core ML deployment target for {p}",
                          "add it under minimum_deployment_target in the target's yaml")
    units = ctx.target.compute_units or "ALL"
    size = ctx.input_size
    reference = ctx.eager(ctx.example)
    num_classes = int(reference.shape[1])

    ctx.log("  tracing the model (TorchScript, batch 1)")
    traced, traced_parity = trace_checked(ctx, reference)
    fp16 = p != Precision.FP32
    ctx.log(f"  converting to a Core ML ML Program ({target}, {'FLOAT16' if fp16 else 'FLOAT32'})")
    mlmodel = convert(traced, size, target, fp16, units)
    if p in (Precision.INT8, Precision.INT4):
        ctx.log(f"  quantizing weights to {p.value.upper()} "
                + ("(per-channel symmetric)" if p == Precision.INT8 else f"(blocks of {ctx.quant.block_size})"))
        mlmodel = quantize(mlmodel, p, ctx.quant.block_size)
    path = Path(ctx.workdir) / PACKAGE
    if path.exists():
        shutil.rmtree(path)
    with _quiet():
        mlmodel.save(str(path))

    ctx.log("  checking the saved package (spec and MIL program)")
    spec = check_package(path, deployment_target=target, input_size=size, weight_dtype=WEIGHT_DTYPE[p],
                         num_classes=num_classes)
    ctx.log(f"    spec v{spec['spec_version']}, weights {spec['weights_by_dtype']}")

    ctx.log("  weight round trip: stored weights back into PyTorch")
    if fp16:
        ref_weights = program_weights(convert(traced, size, target, False, units)._mil_program)
    else:
        ref_weights = program_weights(load_package(path)[2])
    roundtrip, stand_in = weight_roundtrip(ctx.model, path, ref_weights, ctx.example, reference, p.value)
    if roundtrip["status"] == "ok":
        ctx.log(f"    parity weights {p.value}: max abs {roundtrip['max_abs_diff']:.2e}, "
                f"top-1 agreement {roundtrip.get('top1_agreement', float('nan')):.3f}")
    else:
        ctx.log(f"    weight round trip skipped: {roundtrip['reason']}")

    ctx.log("  reference interpreter: the package itself run with numpy")
    interpreted = interpreter_parity(path, ctx.example, reference, p.value)
    if interpreted["status"] == "ok":
        ctx.log(f"    parity interpreter {p.value}: max abs {interpreted['max_abs_diff']:.2e}, "
                f"top-1 agreement {interpreted.get('top1_agreement', float('nan')):.3f}")
    else:
        ctx.log(f"    reference interpreter: {interpreted['status']} (parity not claimed)")

    parity = {"traced": traced_parity, "weight_roundtrip": roundtrip, "reference_interpreter": interpreted,
              "coreml_predict": _NO_PREDICT}
    if sys.platform == "darwin":
        parity["coreml_predict"] = predict_parity(path, ctx.example, reference, p.value, units)

    inputs, outputs = io_spec(size, num_classes, batch=1)
    details = {"coreml": {
        "minimum_deployment_target": target,
        "compute_precision": "FLOAT16" if fp16 else "FLOAT32",
        "compute_units": units,
        "spec_version": spec["spec_version"],
        "weights_by_dtype": spec["weights_by_dtype"],
        "weight_elements_by_dtype": spec["weight_elements_by_dtype"],
        "compression_ops": spec["compression_ops"],
        "quantization": None if p not in (Precision.INT8, Precision.INT4) else {
            "mode": "linear_symmetric", "dtype": p.value, "weight_threshold": WEIGHT_THRESHOLD,
            "granularity": "per_channel" if p == Precision.INT8 else "per_block",
            **({"block_size": ctx.quant.block_size} if p == Precision.INT4 else {}),
            "compressed_share": spec["weight_dtype_share"]},
        "coremltools_version": ct.__version__,
        "size_bytes": package_size(path),
    }}
    return [Artifact(PACKAGE, "coreml", p.value, inputs=inputs, outputs=outputs, parity=parity, details=details,
                     stand_in=stand_in)]
