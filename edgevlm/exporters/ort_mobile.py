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

import numpy as np

from ..errors import ExportError
from ..scratch import scratch as scratch_dir
from . import EXPORTERS
from .base import Artifact, ExportContext, io_spec
from .onnx import build_onnx
from .validate import validate_onnx
from .vlm_onnx import (  # noqa: F401
    export_decoder,
    export_embed_tokens,
    export_part,
    part_parity,
    part_reference,
    quantize_decoder,
)

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


# -- VLM parts (a target profile whose format is ort) --------------------------------------------------------------
# The parts are exported, quantized and checked as ONNX by the ONNX part exporter; once every part is final the
# pipeline hands them to :func:`finish_parts`, which converts them all to ORT format in one call of ONNX Runtime's
# converter (one reduced-operator config, with types, covering every graph of the bundle) and writes the tokenizer
# graphs. The parity and golden stages then run the .ort files through the runtime.

VLM_STYLE = "Fixed"             # the runtime (and an app) opens .ort files without replaying saved optimizations
TYPED_CONFIG = "required_operators_and_types.config"    # the converter's name for the typed config of a directory
# ONNX tensor types the ORT format (onnxruntime/core/flatbuffers/schema/ort.fbs, TensorDataType) has no type for,
# and the type their values are held in instead (the same integers, twice the bytes)
WIDEN = {21: ("uint4", 2, "uint8"), 22: ("int4", 3, "int8")}     # onnx TensorProto.UINT4/INT4 -> UINT8/INT8
# the checker function of onnxruntime.tools.mobile_helpers.usability_checker per execution provider
USABILITY_CHECKS = {"NnapiExecutionProvider": "check_nnapi_partitions"}


def hold_in_ort_format(path: Path) -> dict | None:
    """Rewrite tensors the ORT format cannot hold (INT4/UINT4 initializers) as INT8/UINT8 with the same values;
    returns what was used instead, or None when the graph needed nothing."""
    import onnx
    from onnx import numpy_helper

    from ..compress.onnx_io import save_model

    model = onnx.load(str(path))
    widened: dict[str, int] = {}
    for i, t in enumerate(model.graph.initializer):
        if t.data_type in WIDEN:
            name, _, wide = WIDEN[t.data_type]
            arr = numpy_helper.to_array(t).astype(np.int8 if wide == "int8" else np.uint8)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
            widened[f"{name}->{wide}"] = widened.get(f"{name}->{wide}", 0) + 1
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type in WIDEN:
            vi.type.tensor_type.elem_type = {21: 2, 22: 3}[vi.type.tensor_type.elem_type]
    if not widened:
        return None
    save_model(model, path)
    return {"tensors": widened, "why": "the ORT format has no INT4 tensor type; the same 4-bit values are held in "
                                       "8-bit tensors (DequantizeLinear reads them alike), twice the bytes"}


def mobile_usability(onnx_path: Path, providers) -> dict:
    """Which of the profile's execution providers can take the graph, by ONNX Runtime's mobile usability checker
    (``onnxruntime.tools.check_onnx_model_mobile_usability``'s functions, no logging set up); providers it does not
    assess say so."""
    import tempfile

    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    with tempfile.TemporaryDirectory() as tmp:     # as analyze_model: checked after ONNX Runtime's BASIC optimizations
        try:
            basic = Path(tmp) / Path(onnx_path).name
            with contextlib.redirect_stdout(io.StringIO()):
                uc.optimize_model(Path(onnx_path), basic, use_external_initializers=True)
            model = uc.ModelProtoWithShapeInfo(basic).model_with_shape_info
        except Exception as e:  # noqa: BLE001 -- the checker's own limits: recorded, the export goes on
            model, failed = None, f"the usability checker failed: {str(e).splitlines()[0][:160]}"
    out: dict = {}
    for ep in providers:
        fn = USABILITY_CHECKS.get(ep)
        if ep == "CPUExecutionProvider":
            out[ep] = {"suitability": "YES", "basis": f"every op of the graph is in {OPS_CONFIG}"}
        elif model is None:
            out[ep] = {"suitability": "not assessed", "basis": failed}
        elif fn is None:
            out[ep] = {"suitability": "not assessed",
                       "basis": "ONNX Runtime's mobile usability checker reports NNAPI and CoreML only"}
        else:
            info = getattr(uc, fn)(model, True)
            rec = {"suitability": info.suitability().name, "nodes": info.num_nodes,
                   "supported_nodes": info.num_supported_nodes, "partitions": info.num_partitions,
                   "unsupported_ops": sorted(info.unsupported_ops),
                   "basis": "onnxruntime.tools.check_onnx_model_mobile_usability (" + fn + ")"}
            if info.nodes_unsupported_due_to_dynamic_input:
                rec["with_fixed_shapes"] = getattr(uc, fn)(model, False).suitability().name
            out[ep] = rec
    return out


def ort_node_count(path: Path) -> int:
    """Nodes in an ORT-format file's main graph (read from its flatbuffer)."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import (
        InferenceSession,
    )

    buf = Path(path).read_bytes()
    return int(InferenceSession.GetRootAs(buf, 0).Model().Graph().NodesLength())


def graph_ops(ort_path: Path, scratch: Path) -> dict[str, dict[int, set[str]]]:
    """domain -> opset -> op types one ORT-format graph needs (ONNX Runtime's own config reader)."""
    from onnxruntime.tools.ort_format_model import create_config_from_models
    from onnxruntime.tools.reduced_build_config_parser import parse_config

    cfg = Path(scratch) / (Path(ort_path).stem + ".ops.config")
    with contextlib.redirect_stdout(io.StringIO()):
        create_config_from_models([Path(ort_path)], cfg, False)
    required, _ = parse_config(str(cfg))
    return required or {}


def typed_ops(ort_path: Path, scratch: Path) -> dict[str, set[str]]:
    """op type -> the tensor types ONNX Runtime's typed config lists for it, for one ORT-format graph."""
    import json

    from onnxruntime.tools.ort_format_model import create_config_from_models

    cfg = Path(scratch) / (Path(ort_path).stem + ".typed.config")
    with contextlib.redirect_stdout(io.StringIO()):
        create_config_from_models([Path(ort_path)], cfg, True)
    out: dict[str, set[str]] = {}
    for line in cfg.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rest, depth, cur = line.split(";", 2)[2], 0, ""
        for ch in rest + ",":           # Op{json},Op,...: split on the commas outside the JSON
            if ch == "," and depth == 0:
                name, _, types = cur.partition("{")
                spec = json.loads("{" + types) if types else {}
                out.setdefault(name, set()).update(t for io_ in spec.values() for ts in io_.values() for t in ts)
                cur = ""
                continue
            depth += (ch == "{") - (ch == "}")
            cur += ch
    return out


# ops that move or reshape tensors: an FP16 graph whose other ops take no MLFloat16 computes in FP32
DATA_MOVEMENT = {"Cast", "Concat", "Gather", "Slice", "Expand", "Split", "Reshape", "Transpose", "Squeeze",
                 "Unsqueeze", "Shape", "Identity"}


def check_ops_config(bundle: Path, parts: dict, config: Path | None = None) -> int:
    """Every op of every ``.ort`` part is in the bundle's reduced-operator config; the first that is not raises a
    one-line :class:`ExportError` naming the op and the graph. Returns the number of graphs checked."""
    import tempfile

    from onnxruntime.tools.reduced_build_config_parser import parse_config

    config = Path(config or Path(bundle) / OPS_CONFIG)
    have, _ = parse_config(str(config))
    have = have or {}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, rec in parts.items():
            if rec.get("format") != "ort":
                continue
            for domain, by_opset in graph_ops(Path(bundle) / rec["path"], Path(tmp)).items():
                for opset, ops in by_opset.items():
                    missing = sorted(ops - have.get(domain, {}).get(opset, set()))
                    if missing:
                        raise ExportError(f"{rec['path']} (part {name}) needs {domain}:{missing[0]} (opset {opset}), "
                                          f"which {config.name} does not list",
                                          "export the bundle again; a reduced ONNX Runtime build from this config "
                                          "would not run it")
            n += 1
    return n


def finish_parts(model, work: Path, scratch: Path, parts: dict, target, log) -> dict:
    """Every final ONNX part of ``parts`` (in ``work``) becomes ``<part>.ort`` (ONNX Runtime's converter, one call
    over the directory of parts, Fixed optimizations for ARM); ``required_operators.config`` (operators and types)
    covers every graph; the ONNX files leave the bundle. Each part's record points at its .ort file and its
    ``details.ort`` holds the size, the op counts, the providers that can take it and any precision held otherwise.
    Then the tokenizer graphs (:mod:`edgevlm.exporters.tokenizer_graph`). Returns the manifest's extra blocks."""
    import onnxruntime as ort

    from ..compress.onnx_io import move_model, op_counts
    from .tokenizer_graph import CORPUS, family_prompts, write_tokenizer_graphs

    try:
        import onnxruntime_extensions  # noqa: F401 -- the tokenizer graphs' ops
    except ImportError:
        raise ExportError("android bundles carry tokenizer graphs, which need the onnxruntime-extensions package",
                          "pip install 'edgevlm[android]'") from None
    src, out = Path(scratch) / "ort-src", Path(scratch) / "ort-out"
    src.mkdir()
    onnx_parts = {name: rec for name, rec in parts.items() if rec["format"] == "onnx"}
    facts: dict = {}
    for name, rec in onnx_parts.items():
        f = src / f"{Path(rec['path']).stem}.onnx"
        move_model(Path(work) / rec["path"], f)
        held = hold_in_ort_format(f)
        if held:
            log(f"  {name}: {', '.join(held['tensors'])} tensors held as 8-bit in the ORT format ({held['why']})")
        facts[name] = {"onnx_ops": op_counts(f), "providers": mobile_usability(f, target.providers), "held": held,
                       "onnx_bytes": f.stat().st_size + (f.with_name(f.name + ".data").stat().st_size
                                                         if f.with_name(f.name + ".data").exists() else 0)}
    conv = _converter()
    log(f"  converting {len(onnx_parts)} graphs to ORT format ({VLM_STYLE} optimizations, {TARGET_PLATFORM}; "
        f"onnxruntime {ort.__version__})")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            conv.convert_onnx_models_to_ort(src, output_dir=out, optimization_styles=[conv.OptimizationStyle[VLM_STYLE]],
                                            target_platform=TARGET_PLATFORM, enable_type_reduction=True)
    except Exception as e:  # noqa: BLE001 -- the converter raises whatever the session raised
        raise ExportError(f"ONNX Runtime could not convert the VLM parts to ORT format: {str(e).splitlines()[0][:200]}",
                          "export --target cpu (plain ONNX), or report the model and onnxruntime version") from None
    lines = [ln for ln in (out / TYPED_CONFIG).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    (Path(work) / OPS_CONFIG).write_text(
        f"# Operators and types of every graph of this bundle ({', '.join(Path(r['path']).stem + '.ort' for r in onnx_parts.values())}; "
        f"ONNX Runtime {ort.__version__}, {VLM_STYLE} optimizations, {TARGET_PLATFORM}),\n"
        f"# for a custom build: --minimal_build extended --include_ops_by_config {OPS_CONFIG} "
        "--enable_reduced_operator_type_support\n" + "\n".join(lines) + "\n")
    for name, rec in onnx_parts.items():
        stem = Path(rec["path"]).stem
        dst = Path(work) / f"{stem}.ort"
        shutil.move(str(out / f"{stem}.ort"), dst)
        ops = graph_ops(dst, scratch)
        f = facts[name]
        rec["details"]["ort"] = {
            "from": rec["path"], "size_bytes": dst.stat().st_size, "nodes": ort_node_count(dst),
            "ops": {d: sorted({o for v in by.values() for o in v}) for d, by in sorted(ops.items())},
            "onnx_op_counts": f["onnx_ops"], "providers": f["providers"],
            "optimization_style": VLM_STYLE, "optimization_target": TARGET_PLATFORM,
            **({"precision_held_as": f["held"]} if f["held"] else {})}
        rec["details"]["ort"]["onnx_size_bytes"] = f["onnx_bytes"]
        half = sorted(op for op, types in typed_ops(dst, scratch).items() if "MLFloat16" in types)
        if rec["precision"] == "fp16":
            computing = [op for op in half if op not in DATA_MOVEMENT]
            rec["details"]["ort"]["float16_ops"] = half
            if not computing:           # the ORT format holds FP16 tensors, but no kernel here computes in FP16
                rec["details"]["ort"]["precision_held_as"] = {
                    "computes_in": "fp32", "why": "the Fixed conversion for the CPU provider put Casts around every "
                    "op without an FP16 kernel: only " + (", ".join(half) or "no op") + " take FP16 tensors"}
                log(f"    {dst.name}: FP16 tensors, computed in FP32 (Casts around every op without an FP16 kernel)")
        rec.update(path=dst.name, format="ort")
        log(f"    {dst.name}: {dst.stat().st_size / 1e6:.2f} MB, {rec['details']['ort']['nodes']} nodes, NNAPI "
            + str(f["providers"].get("NnapiExecutionProvider", {}).get("suitability", "-")))
    n = check_ops_config(work, parts)
    required = read_ops_config(Path(work) / OPS_CONFIG)
    contrib = sorted(f"{d}:{o}" for d, names in required.items() if d != DEFAULT_DOMAIN for o in names)
    ops_block = {"path": OPS_CONFIG, "graphs": n, "operators": sum(len(v) for v in required.values()),
                 "type_reduction": True, "onnxruntime_version": ort.__version__, "contrib_ops": contrib,
                 "build": f"--minimal_build extended --include_ops_by_config {OPS_CONFIG} "
                          "--enable_reduced_operator_type_support" + ("" if contrib else " --disable_contrib_ops")}
    log(f"  {OPS_CONFIG}: {ops_block['operators']} operators over {n} graphs"
        + (f" (contrib: {', '.join(contrib)})" if contrib else ""))
    prompts = list(CORPUS) + family_prompts(model)
    processing = write_tokenizer_graphs(Path(work) / "tokenizer.json", work, scratch, prompts, log)
    return {"processing": processing, "ops_config": ops_block}
