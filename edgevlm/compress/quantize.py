"""Quantization of ONNX graphs with ONNX Runtime's tools.

- FP16: weights and activations in half precision, inputs/outputs kept FP32.
- INT8: static post-training quantization, QDQ format, per-channel weights, calibrated on
  images with MinMax, Entropy or Percentile.
- INT4: block-wise weight-only quantization of MatMul weights, as MatMulNBits (ONNX Runtime)
  or as blocked DequantizeLinear (QDQ, for TensorRT).
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np

from ..config import CalibMethod
from ..errors import ExportError
from ..scratch import scratch as scratch_dir
from .onnx_io import EXTERNAL_DATA_BYTES, quiet, save_model


# INT8 weights are kept to 7 bits: x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) multiply u8 x s8 with
# vpmaddubsw, whose 16-bit pair sums saturate with full-range weights, so the same bundle answered differently there
# (measured on an AVX2-only AMD EPYC: fastvit_t8 INT8 top-1 0.906 against 0.986 eager; the default VLM's INT8
# decoder KL 0.43). ONNX Runtime's quantizer calls this reduce_range; OpenVINO documents the same workaround.
REDUCE_RANGE = True


def to_fp16(src: Path, dst: Path) -> dict:
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # one warning per tiny weight clipped to FP16's range
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    save_model(model, dst)
    return {"method": "float16 weights and activations, FP32 inputs/outputs"}


@contextlib.contextmanager
def _bounded_calibration_memory():
    """ONNX Runtime's calibrator runs its augmented graph (every tensor also feeding a ReduceMin/ReduceMax output)
    with the default CPU memory arena and memory patterns, which keep each run's activations and grow with every
    batch: Moondream2's 413M vision tower took 3.4 GB before the first view, 11.0 after it, 18.6 after the second.
    Without the arena and the patterns the same runs peak at 10.7 and 12.3 GB (ONNX Runtime 1.32, peak RSS of the
    process). The calibrator has no option for its session, so its session factory is replaced for the duration
    and restored after (tests/test_pipeline.py checks that it is restored)."""
    import onnxruntime
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self):
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                          providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def _calibrate_minmax(model_path: Path, input_name: str, data: np.ndarray, batch: int, op_types, progress):
    """MinMax ranges of every float tensor ONNX Runtime's quantizer would ask for (inputs and outputs of the nodes
    of ``op_types``, by default every op type it can quantize; initializers excepted), streamed: one batch at a time, each tensor's
    running minimum and maximum merged as it goes, so memory does not grow with the number of views.

    The weights are read once, by the session: the graph is loaded without them, a ReduceMin and a ReduceMax are
    added per tensor, and the augmented graph is saved next to ``model_path`` so that its external-data references
    resolve to the same ``<file>.data`` (removed after). ONNX Runtime's own calibrator held a 4.1 GB tower about four
    times (its load, an opset-update copy, the calibrator's model, the session): TinyGPT-V's EVA tower ran out of
    24 GB on its first view. Returns ``{tensor: (min, max)}`` as ``np.float32`` arrays of shape (1,), the values
    ORT's MinMaxCalibrater gives (its ranges for the same views match: tests/test_pipeline.py)."""
    import uuid

    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    if not op_types:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        op_types = set(QLinearOpsRegistry) | set(QDQRegistry)       # quantize_static's default
    model_path = Path(model_path)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path), load_external_data=False))
    vis = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    inits = {i.name for i in model.graph.initializer}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    wanted: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for name in list(node.input) + list(node.output):
            vi = vis.get(name)
            if (vi is not None and name not in inits and vi.type.HasField("tensor_type")
                    and vi.type.tensor_type.elem_type in floats):
                wanted.add(name)
    if not wanted:
        raise ExportError(f"{model_path.name}: no float tensor to calibrate", "check the graph's ops (shape "
                          "inference found no float tensors)")
    # Each ReduceMin/ReduceMax pair goes right after the node that makes its tensor (graph inputs: first), and the
    # session runs them there (priority-based order, below): each activation is freed once reduced. Run at the end,
    # as ONNX Runtime's default order ran them, every activation stayed alive (TinyGPT-V's tower: 19.4 GB at the
    # first view).
    outputs, nodes, order = [], [], []          # order: the tensors in the order their reductions run

    def reduce(name: str) -> list:
        order.append(name)
        made = []
        for op in ("ReduceMin", "ReduceMax"):
            out = f"calib_{len(order) - 1}_{op}"
            # keepdims=1: ONNX Runtime cannot reduce a zero-length axis away
            made.append(helper.make_node(op, [name], [out], keepdims=1, name=out))
            outputs.append(helper.make_tensor_value_info(out, vis[name].type.tensor_type.elem_type, None))
        return made

    for inp in model.graph.input:
        if inp.name in wanted:
            nodes += reduce(inp.name)
    for node in model.graph.node:
        nodes.append(node)
        for out in node.output:
            if out in wanted:
                nodes += reduce(out)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    names = [o.name for o in outputs]
    augmented = model_path.with_name(f".calib-{uuid.uuid4().hex}.onnx")
    try:
        onnx.save_model(model, str(augmented))        # the weights stay where they are: external data is referenced
        del model
        opts = onnxruntime.SessionOptions()
        # no arena, no memory patterns: each run's activations are freed as it goes (the arena kept them and grew
        # with every batch), and no graph optimization (pre-packing copies weights). Priority-based order runs
        # each reduction where it was placed: ONNX Runtime's default order ran them after everything else, every
        # calibrated activation alive at once (40 MLP layers over 8192x512 activations: 1.8 GiB against none)
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        opts.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
        sess = onnxruntime.InferenceSession(str(augmented), sess_options=opts, providers=["CPUExecutionProvider"])
    finally:
        augmented.unlink(missing_ok=True)
    lo = np.full(len(order), np.inf, np.float32)
    hi = np.full(len(order), -np.inf, np.float32)
    starts = range(0, len(data), batch)
    for k, start in enumerate(starts):
        if progress is not None:
            progress(k, len(starts))
        res = [np.asarray(r, np.float32).reshape(-1)[0] for r in sess.run(names, {input_name: data[start:start + batch]})]
        lo = np.fmin(lo, np.asarray(res[0::2], np.float32))       # fmin/fmax: a NaN range does not win
        hi = np.fmax(hi, np.asarray(res[1::2], np.float32))
    del sess
    return {name: (lo[i:i + 1], hi[i:i + 1]) for i, name in enumerate(order)}


class _Reader:
    """Feeds calibration images to ONNX Runtime's calibrator one small batch at a time; ``progress(done, total)``
    is called before each batch is handed over."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 8, progress=None):
        self._batches = [{input_name: data[i:i + batch]} for i in range(0, len(data), batch)]
        self._next, self._progress = 0, progress

    def get_next(self):
        if self._next >= len(self._batches):
            return None
        if self._progress is not None:
            self._progress(self._next, len(self._batches))
        self._next += 1
        return self._batches[self._next - 1]


def _depthwise_convs(model) -> list[str]:
    """Names of grouped convolutions (one group per channel or several channels)."""
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and next((a.i for a in n.attribute if a.name == "group"), 1) > 1:
            out.append(n.name)
    return out


def _activation_matmuls(model) -> list[str]:
    """Names of MatMuls whose operands are both computed (no constant weight)."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


_METHODS = {CalibMethod.MINMAX: "MinMax", CalibMethod.ENTROPY: "Entropy", CalibMethod.PERCENTILE: "Percentile"}


def to_int8(src: Path, dst: Path, calibration: np.ndarray, method: CalibMethod = CalibMethod.MINMAX,
            symmetric_activations: bool = False, activations: str = "uint8",
            op_types: list[str] | None = None, quantize_bias: bool = True,
            exclude_depthwise: bool = False, exclude_activation_matmuls: bool = False, batch: int = 8,
            progress=None) -> dict:
    """Static INT8 (QDQ, per-channel weights). Returns what was done, for the manifest.

    ``batch``: calibration rows fed per run (1 for graphs with a fixed leading dimension).
    ``progress(done, total)``: called per calibration batch.
    (ONNX Runtime 1.32's ``CalibMaxIntermediateOutputs`` does not stream MinMax: it drops the collected ranges
    instead of merging them and then fails with "No data is collected"; MinMax keeps only per-batch ranges anyway.)
    ``quantize_bias=False`` keeps biases FP32: TensorRT refuses INT32 DequantizeLinear inputs.
    ``exclude_depthwise=True`` keeps depthwise convolutions FP32: ONNX Runtime's CPU kernels
    run them no faster in INT8, and the Q/DQ pairs around them cost time.
    ``exclude_activation_matmuls=True`` keeps MatMuls of two activations (attention's Q·Kᵀ and
    A·V) FP32: both sides would need run-time quantization for little gain.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration is None or len(calibration) == 0:
        raise ExportError("INT8 needs calibration images and none were given", "pass --calib DIR")
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    big = sum(f.stat().st_size for f in (Path(src), Path(src).with_name(Path(src).name + ".data"))
              if f.exists()) > EXTERNAL_DATA_BYTES
    with scratch_dir("quantize") as tmp, quiet(stdout=False):      # prints pass: ``progress`` may log
        # Pre-processing is an optimization; quantization works without it. Over 2 GB it is skipped: its sessions
        # held TinyGPT-V's 4.1 GB tower about three times over (13 GB more), then it could not save the result.
        pre = Path(src) if big else Path(tmp) / "pre.onnx"
        if not big:
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
            except Exception:
                pre = Path(src)
        extra = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True,
                 "QuantizeBias": quantize_bias}
        if method == CalibMethod.PERCENTILE:
            extra["CalibPercentile"] = 99.99
        kwargs = {}
        if op_types:
            kwargs["op_types_to_quantize"] = op_types
        graph = onnx.load(str(pre), load_external_data=False)       # names only: the weights stay on disk
        depthwise = _depthwise_convs(graph) if exclude_depthwise else []
        act_mm = _activation_matmuls(graph) if exclude_activation_matmuls else []
        del graph
        if depthwise or act_mm:
            kwargs["nodes_to_exclude"] = depthwise + act_mm
        if method == CalibMethod.MINMAX:     # streamed, weights read once; ranges handed over as ORT's cache
            from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

            ranges = _calibrate_minmax(pre, input_name, calibration, batch, kwargs.get("op_types_to_quantize"),
                                       progress)
            cache = Path(tmp) / "ranges.json"
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
            reader, calibrated = None, {"calibration_cache_path": str(cache)}
        else:
            reader, calibrated = _Reader(input_name, calibration, batch, progress), {}
        with _bounded_calibration_memory():
            quantize_static(
                str(pre), str(dst), reader, **calibrated,
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
                reduce_range=REDUCE_RANGE, extra_options=extra, **kwargs,
                # over protobuf's 2 GB (a 1B tower): the augmented graph and the result keep weights in <file>.data
                use_external_data_format=big,
            )
    model = onnx.load(str(dst), load_external_data=False)
    counts = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"method": "static post-training, QDQ, per-channel weights", "weight_bits": 7 if REDUCE_RANGE else 8,
            "calibration": method.value,
            "calibration_images": int(len(calibration)), "activations": activations,
            "symmetric_activations": symmetric_activations, "bias": "int32" if quantize_bias else "fp32",
            "depthwise_convs_kept_fp32": len(depthwise), "activation_matmuls_kept_fp32": len(act_mm),
            "qdq_nodes": counts}


def weight_elements(model) -> int:
    """Float weight elements (initializers of rank >= 2) in a graph."""
    import onnx

    return sum(int(np.prod(i.dims)) for i in model.graph.initializer
               if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(i.dims) >= 2)


def _reduction_axis(node) -> int | None:
    """The axis a weight is summed over (blocks run along it): MatMul K, Gemm K, Conv in-channels."""
    if node.op_type == "MatMul":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    if node.op_type == "Conv":
        return 1
    return None


def blockwise_int4(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 with one positive FP32 scale per block of ``block`` values along ``axis``.

    Returns (q int8 values in [-7, 7], scales) with scales shaped like ``w`` but ``ceil(n / block)``
    along ``axis``: the layout of ONNX's blocked DequantizeLinear (opset 21).
    """
    w = np.moveaxis(w.astype(np.float32), axis, 0)
    n = w.shape[0]
    nb = -(-n // block)
    pad = nb * block - n
    wp = np.concatenate([w, np.zeros((pad,) + w.shape[1:], np.float32)]) if pad else w
    blocks = wp.reshape((nb, block) + w.shape[1:])
    scale = np.abs(blocks).max(axis=1) / 7.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)        # all-zero blocks: any positive scale
    q = np.clip(np.round(blocks / scale[:, None]), -7, 7).astype(np.int8).reshape(wp.shape)[:n]
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis)


def _to_opset(model, version: int):
    from onnx import version_converter

    current = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if current >= version:
        return model
    try:
        return version_converter.convert_version(model, version)
    except Exception:
        # The converter has no adapter for some op; the ops our exporters emit mean the same at 21.
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = version
        return model


def _weights_to_dequantize_linear(model, op_types: tuple[str, ...], rank_ok, quantize_one) -> dict[str, int]:
    """The rewrite both weight-only formats share: every constant FP32 weight (input 1) of an ``op_types`` node whose
    rank passes ``rank_ok`` is replaced by ``quantize_one(name, w, reduction axis) -> (initializers, DequantizeLinear
    attributes)`` feeding a DequantizeLinear; originals nobody else reads are dropped. Returns {node: elements}."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1
    done, new_nodes, quantized = {}, [], {}
    for node in model.graph.node:
        red = _reduction_axis(node) if node.op_type in op_types else None
        wname = node.input[1] if red is not None and len(node.input) > 1 else None
        if wname in inits and inits[wname].data_type == TensorProto.FLOAT and rank_ok(len(inits[wname].dims)):
            if wname not in done:
                w = numpy_helper.to_array(inits[wname])
                tensors, attrs = quantize_one(wname, w, red)
                model.graph.initializer.extend(tensors)
                out = f"{wname}_dq"
                new_nodes.append(helper.make_node("DequantizeLinear", [t.name for t in tensors], [out],
                                                  name=f"{wname}_DequantizeLinear", **attrs))
                done[wname] = out
                quantized[node.name or wname] = int(w.size)
            node.input[1] = done[wname]
    for wname in done:  # drop the FP32 originals nobody else reads
        if users.get(wname, 0) == sum(1 for n in model.graph.node for i in n.input if i == done[wname]):
            model.graph.initializer.remove(inits[wname])
    # DequantizeLinear nodes go first: they depend only on initializers, so the order stays topological.
    nodes = new_nodes + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return quantized


def int4_qdq(model, block_size: int, op_types: tuple[str, ...]) -> dict[str, int]:
    """Replace constant weights of ``op_types`` by blocked INT4 DequantizeLinear (positive scales).

    Returns {node name: weight elements quantized}. The graph moves to opset 21, where
    DequantizeLinear takes INT4 and ``block_size``.
    """
    from onnx import TensorProto, helper, numpy_helper

    def quantize_one(name: str, w: np.ndarray, axis: int):
        q, scale = blockwise_int4(w, axis, block_size)
        return ([helper.make_tensor(f"{name}_int4", TensorProto.INT4, q.shape, q.flatten().tolist()),
                 numpy_helper.from_array(scale, f"{name}_int4_scale")], {"axis": axis, "block_size": block_size})

    return _weights_to_dequantize_linear(model, op_types, lambda rank: rank >= 2, quantize_one)


def int8_weights_qdq(model, op_types: tuple[str, ...] = ("MatMul",)) -> dict[str, int]:
    """Replace constant weights of ``op_types`` by per-channel symmetric INT8 DequantizeLinear (weight-only: the
    product runs in float, as TensorRT's weight-only INT8 and any ONNX runtime take it). One positive scale per
    output channel (MatMul/Gemm N) of a 2-D weight, values in [-127, 127]. Returns {node: weight elements}."""
    from onnx import numpy_helper

    def quantize_one(name: str, w: np.ndarray, red: int):
        w = w.astype(np.float32)
        scale = np.abs(w).max(axis=red) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)          # all-zero channels: any positive scale
        q = np.clip(np.round(w / np.expand_dims(scale, red)), -127, 127).astype(np.int8)
        return ([numpy_helper.from_array(q, f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_int8_scale")],
                {"axis": 1 - red})                                         # the output-channel axis of a 2-D weight

    return _weights_to_dequantize_linear(model, op_types, lambda rank: rank == 2, quantize_one)


def matmulnbits_streamed(src: Path, dst: Path, block_size: int = 32, accuracy_level: int = 4) -> int:
    """Every MatMul with a constant 2-D FP32 weight of ``src`` becomes ONNX Runtime's ``MatMulNBits`` (4-bit,
    symmetric, blocks of ``block_size`` along K), one weight at a time: the graph is read without its weights, each
    weight read from disk, packed by ONNX Runtime's own kernel (``quantize_matmul_4bits``, as its
    ``MatMulNBitsQuantizer`` packs) and written out at once; the other weights are copied file to file. Memory holds
    the graph and one weight, where the quantizer holds the whole FP32 model and its result (a 10 GB Phi-2 decoder
    was OOM-killed there). Returns how many MatMuls were replaced."""
    from onnx import TensorProto, helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from .onnx_io import _DataFile, finish_streamed, load_graph, read_initializer, stream_tensors

    src, dst = Path(src), Path(dst)
    model = load_graph(src)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    data = _DataFile(dst.with_name(dst.name + ".data"))
    packed: dict[str, tuple[str, str, int, int]] = {}
    nodes, replaced = [], 0
    try:
        for node in g.node:
            w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
            if w is None or w.data_type != TensorProto.FLOAT or len(w.dims) != 2:
                nodes.append(node)
                continue
            if w.name not in packed:
                k, n = (int(d) for d in w.dims)
                blocks = -(-k // block_size)
                weight = read_initializer(w, src.parent)
                if blocks * block_size != k:
                    weight = np.pad(weight, ((0, blocks * block_size - k), (0, 0)))
                q = np.zeros((n, blocks, block_size // 2), np.uint8)
                scales = np.zeros((n, blocks), np.float32)
                zero = np.zeros((n, (blocks + 1) // 2), np.uint8)
                quantize_matmul_4bits(q, np.ascontiguousarray(weight), scales, zero, block_size, n, k, True)
                del weight
                qt = TensorProto(name=w.name + "_Q4", data_type=TensorProto.UINT8, dims=q.shape)
                st = TensorProto(name=w.name + "_scales", data_type=TensorProto.FLOAT, dims=scales.shape)
                data.put_bytes(qt, q.tobytes())
                data.put_bytes(st, scales.tobytes())
                g.initializer.extend([qt, st])
                packed[w.name] = (qt.name, st.name, k, n)
            qname, sname, k, n = packed[w.name]
            nodes.append(helper.make_node("MatMulNBits", [node.input[0], qname, sname], list(node.output),
                                          name=(node.name + "_Q4") if node.name else "", domain="com.microsoft",
                                          K=k, N=n, bits=4, block_size=block_size, accuracy_level=accuracy_level))
            replaced += 1
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in g.node for i in n.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        stream_tensors(model, data, src.parent)           # the other weights: copied file to file
    finally:
        data.close()
    finish_streamed(model, dst, data.end)
    return replaced


INT4_FORMATS = ("mixed", "qdq", "matmulnbits")


def to_int4(src: Path, dst: Path, block_size: int = 32, fmt: str = "mixed") -> dict:
    """Block-wise symmetric INT4 weight-only quantization.

    - ``mixed`` (ONNX Runtime): MatMul weights become MatMulNBits (ONNX Runtime's fused INT4
      kernel); Conv and Gemm weights become blocked INT4 DequantizeLinear, so convolutional
      models store their weights in 4 bits too (computed in FP32).
    - ``qdq`` (TensorRT): MatMul and Gemm weights become blocked INT4 DequantizeLinear with
      positive scales — TensorRT's weight-only INT4 applies to matrix multiplies only.
    - ``matmulnbits`` (ORT format, which has no INT4 tensor type): MatMulNBits only.
    """
    if fmt not in INT4_FORMATS:
        raise ValueError(f"unknown INT4 format {fmt!r}; use one of {INT4_FORMATS}")
    import onnx

    model = onnx.load(str(src))
    total = weight_elements(model)
    quantized: dict[str, int] = {}
    if fmt != "qdq":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        inits = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
        before = {n.name: inits[n.input[1]] for n in model.graph.node
                  if n.op_type == "MatMul" and n.input[1] in inits}
        with quiet():
            q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, accuracy_level=4)
            q.process()
        model = q.model.model
        left = {n.name for n in model.graph.node if n.op_type == "MatMul"}
        quantized.update({k: v for k, v in before.items() if k not in left})
    ops = {"mixed": ("Conv", "Gemm"), "qdq": ("MatMul", "Gemm"), "matmulnbits": ()}[fmt]
    dq = {}
    if ops:
        model = _to_opset(model, 21)
        dq = int4_qdq(model, block_size, ops)
    quantized.update(dq)
    save_model(model, dst)
    n_q = sum(quantized.values())
    return {"method": f"block-wise weight-only INT4 (block {block_size}, symmetric, positive scales)",
            "format": {"qdq": "DequantizeLinear (QDQ, opset 21) on MatMul/Gemm",
                       "mixed": "MatMulNBits on MatMul; DequantizeLinear (opset 21) on Conv/Gemm",
                       "matmulnbits": "MatMulNBits on MatMul"}[fmt],
            "layers_quantized": len(quantized), "matmulnbits_layers": len(quantized) - len(dq),
            "weights_quantized": n_q, "weights_total": total,
            "weight_coverage": round(n_q / total, 4) if total else 0.0}
