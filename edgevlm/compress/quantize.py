"""Quantization of ONNX graphs with ONNX Runtime's tools.

- FP16: weights and activations in half precision, inputs/outputs kept FP32.
- INT8: static post-training quantization, QDQ format, per-channel weights, calibrated on
  images with MinMax, Entropy or Percentile.
- INT4: block-wise weight-only quantization of MatMul weights, as MatMulNBits (ONNX Runtime)
  or as blocked DequantizeLinear (QDQ, for TensorRT).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from ..config import CalibMethod
from ..errors import ExportError


def _quiet():
    for name in ("onnxruntime.quantization", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _save(model, path: Path) -> None:
    import onnx

    onnx.save_model(model, str(path))


def to_fp16(src: Path, dst: Path) -> dict:
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _save(model, dst)
    return {"method": "float16 weights and activations, FP32 inputs/outputs"}


class _Reader:
    """Feeds calibration images to ONNX Runtime's calibrator one small batch at a time."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 8):
        self._batches = iter([{input_name: data[i:i + batch]} for i in range(0, len(data), batch)])

    def get_next(self):
        return next(self._batches, None)


_METHODS = {CalibMethod.MINMAX: "MinMax", CalibMethod.ENTROPY: "Entropy", CalibMethod.PERCENTILE: "Percentile"}


def to_int8(src: Path, dst: Path, calibration: np.ndarray, method: CalibMethod = CalibMethod.MINMAX,
            symmetric_activations: bool = False, activations: str = "uint8",
            op_types: list[str] | None = None) -> dict:
    """Static INT8 (QDQ, per-channel weights). Returns what was done, for the manifest."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _quiet()
    if calibration is None or len(calibration) == 0:
        raise ExportError("INT8 needs calibration images and none were given", "pass --calib DIR")
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:
            pre = Path(src)  # pre-processing is an optimization; quantization works without it
        extra = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True}
        if method == CalibMethod.PERCENTILE:
            extra["CalibPercentile"] = 99.99
        kwargs = {}
        if op_types:
            kwargs["op_types_to_quantize"] = op_types
        quantize_static(
            str(pre), str(dst), _Reader(input_name, calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
            extra_options=extra, **kwargs,
        )
    model = onnx.load(str(dst))
    counts = {}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"method": "static post-training, QDQ, per-channel weights", "calibration": method.value,
            "calibration_images": int(len(calibration)), "activations": activations,
            "symmetric_activations": symmetric_activations, "qdq_nodes": counts}


def _matmul_weights(model) -> dict[str, int]:
    """MatMul nodes whose right operand is a constant initializer: name -> weight elements."""
    inits = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def weight_elements(model) -> int:
    import onnx

    return sum(int(np.prod(i.dims)) for i in model.graph.initializer
               if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(i.dims) >= 2)


def to_int4(src: Path, dst: Path, block_size: int = 32, qdq: bool = False) -> dict:
    """Block-wise symmetric INT4 weight-only quantization of MatMul weights."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _quiet()
    model = onnx.load(str(src))
    total = weight_elements(model)
    before = _matmul_weights(model)
    kwargs = {"quant_format": QuantFormat.QDQ} if qdq else {"accuracy_level": 4}
    q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, **kwargs)
    q.process()
    out = q.model.model
    remaining = _matmul_weights(out)
    # A MatMul still fed by a constant initializer stayed FP32; the others now read packed INT4.
    quantized = {k: v for k, v in before.items() if k not in remaining}
    _save(out, dst)
    n_q = sum(quantized.values())
    return {"method": f"block-wise weight-only INT4 (block {block_size}, symmetric)",
            "format": "DequantizeLinear (QDQ, opset 21)" if qdq else "MatMulNBits",
            "matmul_layers_quantized": len(quantized), "weights_quantized": n_q, "weights_total": total,
            "weight_coverage": round(n_q / total, 4) if total else 0.0,
            "note": "convolution and Gemm weights stay FP32" if n_q < total else ""}
