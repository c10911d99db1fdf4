"""ORT-format export for ONNX Runtime Mobile (the android target).

The validated ONNX graph from exporters.onnx is converted with ONNX Runtime's own tool
(onnxruntime.tools.convert_onnx_models_to_ort) into ``model.ort``, together with
``required_operators.config``, the operator list a custom minimal ONNX Runtime build takes
(``--include_ops_by_config``). The .ort file itself is then run in ONNX Runtime and compared
with eager PyTorch, because graph optimizations are baked into it at conversion time.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

from ..errors import ExportError
from ..scratch import scratch as scratch_dir
from . import EXPORTERS
from .base import Artifact, ExportContext, io_spec
from .onnx import build_onnx
from .validate import validate_onnx

MODEL = "model.ort"
OPS_CONFIG = "required_operators.config"
DEFAULT_DOMAIN = "ai.onnx"
# ORT format targets ARM phones: keeps QDQ as INT8 QLinear kernels and leaves out the x86 NCHWc layout.
TARGET_PLATFORM = "arm"


def _converter():
    """ONNX Runtime's converter, imported without keeping the root log handler its tools install."""
    root = logging.getLogger()
    before = list(root.handlers)
    from onnxruntime.tools import convert_onnx_models_to_ort as conv

    for h in root.handlers[:]:
        if h not in before:
            root.removeHandler(h)
    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
    return conv


def convert_to_ort(onnx_path: Path, out_dir: Path, style: str = "Fixed") -> tuple[Path, Path]:
    """Convert one ONNX file with ONNX Runtime's converter; returns (model.ort, ops config) in ``out_dir``."""
    conv = _converter()
    src = Path(out_dir) / "model.onnx"       # the converter names its outputs after the input file
    if Path(onnx_path).resolve() != src.resolve():
        shutil.copyfile(onnx_path, src)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        conv.convert_onnx_models_to_ort(src, output_dir=Path(out_dir),
                                        optimization_styles=[conv.OptimizationStyle[style]],
                                        target_platform=TARGET_PLATFORM)
    suffix = ".with_runtime_opt" if style == "Runtime" else ""
    ort_file = Path(out_dir) / f"model{suffix}.ort"
    config = Path(out_dir) / f"model.required_operators{suffix}.config"
    if not ort_file.is_file() or not config.is_file():
        raise ExportError(f"ONNX Runtime's converter wrote no {ort_file.name} / {config.name}",
                          "report the model and the onnxruntime version")
    return ort_file, config


def read_ops_config(path: Path) -> dict[str, list[str]]:
    """Domain -> sorted operator names listed in a required-operators config."""
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    required, _ = parse_config(str(path))
    return {domain: sorted({op for ops in by_opset.values() for op in ops})
            for domain, by_opset in sorted((required or {}).items())}


@EXPORTERS.register("ort")
def export(ctx: ExportContext) -> list[Artifact]:
    import onnxruntime as ort

    p = ctx.quant.precision
    with scratch_dir("ort") as tmp:
        scratch = Path(tmp)
        onnx_path, onnx_parity, details = build_onnx(ctx, scratch)
        errors = []
        # Runtime style keeps the graph as exported and lets the device's execution provider (NNAPI,
        # XNNPACK) fuse at load time; Fixed bakes in CPU-only fusions and FP32 casts of FP16 weights.
        for style in ("Runtime", "Fixed"):
            out = scratch / f"ort-{style.lower()}"
            out.mkdir()
            ctx.log(f"  converting to ORT format (optimization style {style}, {TARGET_PLATFORM})")
            try:
                ort_file, config = convert_to_ort(onnx_path, out, style)
                break
            except Exception as e:  # the converter raises whatever the session raised
                errors.append(f"{style}: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}")
                ctx.log(f"    {style} conversion failed: {errors[-1]}")
        else:
            raise ExportError("ONNX Runtime could not convert the graph to ORT format (" + "; ".join(errors) + ")",
                              "export --target cpu (plain ONNX), or report the model and onnxruntime version")
        shutil.copyfile(ort_file, ctx.workdir / MODEL)
        # The converter's header names its temporary paths; the bundle gets a stable one.
        lines = [ln for ln in config.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        (ctx.workdir / OPS_CONFIG).write_text(
            f"# Operators of {MODEL} (ONNX Runtime {ort.__version__}, {style} optimizations, {TARGET_PLATFORM}),\n"
            f"# for a custom build: --minimal_build --include_ops_by_config {OPS_CONFIG}\n" + "\n".join(lines) + "\n")

    ops = read_ops_config(ctx.workdir / OPS_CONFIG)
    contrib = {d: o for d, o in ops.items() if d != DEFAULT_DOMAIN}
    parity = validate_onnx(ctx, ctx.workdir / MODEL, p.value)
    parity["runtime"] += f" (ORT format, {style} optimizations)"
    inputs, outputs = io_spec(ctx.input_size, int(parity["shape"][1]))
    minimal = {
        "include_ops_by_config": OPS_CONFIG,
        "contrib_ops_required": bool(contrib),
        "note": ("build ONNX Runtime with --minimal_build --include_ops_by_config " + OPS_CONFIG
                 + ("; keep contrib ops (do not pass --disable_contrib_ops): the graph uses "
                    + ", ".join(f"{d}:{op}" for d, names in contrib.items() for op in names) if contrib else "")),
    }
    if "MatMulNBits" in contrib.get("com.microsoft", []):
        minimal["int4"] = "MatMulNBits is an ONNX Runtime contrib op (com.microsoft); it needs a build with contrib ops"
    if style == "Runtime":
        minimal["runtime_optimizations"] = ("saved runtime optimizations are replayed only with the session "
                                            "option session.enable_saved_runtime_optimizations=1")
    art_details = {
        "ops_config": OPS_CONFIG, "optimization_style": style, "optimization_target": TARGET_PLATFORM,
        "onnxruntime_version": ort.__version__, "required_operators": ops, "minimal_build": minimal,
        "onnx": details, "onnx_parity": onnx_parity,
    }
    if errors:
        art_details["conversion_fallback"] = errors
    return [Artifact(MODEL, "ort", p.value, inputs=inputs, outputs=outputs, parity=parity, details=art_details)]
