"""ONNX export (dynamo exporter, dynamic batch), quantization and parity for onnx targets.

The cpu target ships the graph as is; the jetson target adds TensorRT's operator check and
the engine build recipe (see exporters.tensorrt). The android target converts the same graph
to ORT format (exporters.ort_mobile).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import Precision
from ..scratch import scratch as scratch_dir
from . import EXPORTERS
from .base import INPUT_NAME, OUTPUT_NAME, Artifact, ExportContext, io_spec
from .torch_export import export_module
from .validate import validate_onnx

MAX_BATCH = 1024


def export_fp32(model, example: np.ndarray, path: Path, opset: int = 18) -> dict:
    """Export an eval-mode model to one self-contained ONNX file with a dynamic batch axis."""
    import onnx
    import torch

    x = torch.from_numpy(np.ascontiguousarray(example[:2] if len(example) >= 2 else np.concatenate([example] * 2)))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # weights inline: every edge classifier here is far below 2 GB
    export_module(model, (x,), path, opset, [INPUT_NAME], [OUTPUT_NAME], ({0: batch},), external_data=False,
                  what=type(model).__name__)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": opset, "dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            "checker": "onnx.checker full_check passed", "ops": dict(sorted(ops.items()))}


def build_onnx(ctx: ExportContext, scratch: Path) -> tuple[Path, dict, dict]:
    """FP32 export then the requested precision; returns (path, parity, details)."""
    from ..compress import quantize

    p = ctx.quant.precision
    fp32 = scratch / "model.fp32.onnx"
    ctx.log(f"  exporting ONNX (opset {ctx.opset}, dynamic batch)")
    details = {"export": export_fp32(ctx.model, ctx.example, fp32, ctx.opset)}
    reference = ctx.eager(ctx.example)
    fp32_parity = validate_onnx(ctx, fp32, "fp32", reference)
    if p == Precision.FP32:
        return fp32, fp32_parity, details
    out = scratch / f"model.{p.value}.onnx"
    if p == Precision.FP16:
        ctx.log("  converting to FP16")
        details["quantization"] = quantize.to_fp16(fp32, out)
    elif p == Precision.INT8:
        data = ctx.calibration()
        ctx.log(f"  calibrating INT8 on {len(data)} images ({ctx.quant.calib_method.value})")
        details["quantization"] = quantize.to_int8(fp32, out, data, ctx.quant.calib_method,
                                                   **ctx.target.int8_options())
    elif p == Precision.INT4:
        fmt = ctx.target.int4.get("format", "mixed")
        ctx.log(f"  quantizing weights to INT4 (block {ctx.quant.block_size}, {fmt})")
        details["quantization"] = quantize.to_int4(fp32, out, ctx.quant.block_size, fmt=fmt)
    details["fp32_parity"] = fp32_parity
    return out, validate_onnx(ctx, out, p.value, reference), details


@EXPORTERS.register("onnx")
def export(ctx: ExportContext) -> list[Artifact]:
    with scratch_dir("onnx") as tmp:
        path, parity, details = build_onnx(ctx, Path(tmp))
        dst = ctx.workdir / "model.onnx"
        Path(path).replace(dst)
    inputs, outputs = io_spec(ctx.input_size, int(parity["shape"][1]))
    art = Artifact("model.onnx", "onnx", ctx.quant.precision.value, inputs=inputs, outputs=outputs,
                   parity=parity, details=details)
    coverage = details.get("quantization", {}).get("weight_coverage")
    if coverage is not None and coverage < 0.5:
        why = ("TensorRT's weight-only INT4 covers MatMul/Gemm; convolutions stay FP16"
               if ctx.target.tensorrt else "the other weights stay FP32")
        msg = f"only {coverage:.0%} of the weights are INT4: {why}"
        ctx.log(f"    warning: {msg}")
        art.details.setdefault("warnings", []).append(msg)
    if ctx.target.tensorrt:
        from . import tensorrt

        art.details["tensorrt"] = tensorrt.prepare(ctx, dst)
    return [art]
