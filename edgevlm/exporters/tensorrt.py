"""TensorRT readiness for the jetson target: operator check and the on-device engine recipe.

TensorRT engines are specific to the GPU, TensorRT version and JetPack they are built with,
so the bundle ships the checked ONNX graph plus ``build_engine.sh``, which runs ``trtexec`` on
the Jetson. What can be checked here is checked here: every node against the TensorRT ONNX
parser's operator list for the targeted version (data: export/ops/tensorrt.yaml), and the
Q/DQ rules of explicit quantization (symmetric, constant positive scales, INT4 weights only).
"""
from __future__ import annotations

import os
import shlex
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import Precision
from ..errors import ExportError
from .base import INPUT_NAME, ExportContext

OPS_FILE = ("ops", "tensorrt.yaml")      # under resources.targets_dir()
DEFAULT_DOMAINS = ("", "ai.onnx")
SCRIPT = "build_engine.sh"
ENGINE = "model.plan"
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@lru_cache(maxsize=None)
def _tables() -> dict:
    import yaml

    from ..resources import targets_dir

    path = targets_dir().joinpath(*OPS_FILE)
    if not path.is_file():
        raise ExportError(f"TensorRT operator table {path} is missing", "reinstall edgevlm")
    return yaml.safe_load(path.read_text())


def _major_minor(version: str) -> str:
    parts = str(version).strip().split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else f"{parts[0]}.0"


def ops_table(version: str) -> tuple[str, dict, list[str]]:
    """(table key, table, warnings) for a TensorRT version such as "10.3" or "10.3.0"."""
    versions = _tables()["versions"]
    want = _major_minor(version)
    for key, table in versions.items():
        if want in table["covers"]:
            return key, table, []
    same_major = sorted((k for k in versions if k.split(".")[0] == want.split(".")[0]),
                        key=lambda k: tuple(int(p) for p in k.split(".")))
    if same_major:
        key = same_major[-1]
        return key, versions[key], [f"no operator table for TensorRT {want}; checked against {key}, "
                                    "which may refuse operators added since"]
    raise ExportError(f"no TensorRT operator table for version {version}",
                      f"set tensorrt.version in the target profile to one of "
                      f"{', '.join(c for t in versions.values() for c in t['covers'])}")


def _dtype_name(data_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(data_type).lower()


def _dtype(t) -> str:
    return _dtype_name(t.data_type)


def _constants(graph, outer: dict) -> dict:
    """Name -> TensorProto for initializers and Constant outputs visible in ``graph``."""
    from onnx import helper

    consts = dict(outer)
    consts.update({i.name: i for i in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = helper.get_attribute_value(a)
    return consts


def _check_qdq(node, consts: dict, qdq: dict, stats: dict) -> list[str]:
    """TensorRT's explicit-quantization rules for one Q/DQ node; returns violations."""
    from onnx import helper, numpy_helper

    name = node.name or node.output[0]
    out: list[str] = []
    is_dq = node.op_type == "DequantizeLinear"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x = consts.get(node.input[0])
    scale = consts.get(node.input[1]) if len(node.input) > 1 else None
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    has_zp = len(node.input) > 2 and bool(node.input[2])
    # The quantized type: DequantizeLinear reads it from its data, QuantizeLinear from its zero
    # point, else from output_dtype, else ONNX's default UINT8 (which TensorRT would read as INT8).
    if is_dq and x is not None:
        qtype = _dtype(x)
    elif zp is not None:
        qtype = _dtype(zp)
    elif not is_dq and not has_zp:
        qtype = _dtype_name(attrs["output_dtype"]) if attrs.get("output_dtype") else "uint8"
    else:
        qtype = None
    if qtype is not None and qtype not in qdq["types"]:
        what = "a Conv/Gemm bias quantized to INT32" if qtype == "int32" else f"{qtype.upper()} data"
        hint = " (INT4 needs TensorRT 10)" if qtype == "int4" else ""
        out.append(f"{node.op_type} {name!r} carries {what}; this TensorRT quantizes to "
                   f"{', '.join(t.upper() for t in qdq['types'])} only{hint}")
    if qtype:
        stats[qtype] = stats.get(qtype, 0) + 1
    if scale is None:
        out.append(f"{node.op_type} {name!r} has a computed scale; TensorRT needs constant scales")
        scale_arr = None
    else:
        scale_arr = numpy_helper.to_array(scale)
        if not (scale_arr > 0).all():
            out.append(f"{node.op_type} {name!r} has scales <= 0; TensorRT needs positive scales")
    if has_zp:
        if zp is None:
            out.append(f"{node.op_type} {name!r} has a computed zero point; TensorRT needs constant zeros")
        elif np.any(numpy_helper.to_array(zp).astype(np.int64) != 0):
            out.append(f"{node.op_type} {name!r} is asymmetric (zero point != 0); TensorRT quantization "
                       "is symmetric only")
    if x is None and scale_arr is not None and scale_arr.size > 1:
        out.append(f"{node.op_type} {name!r} quantizes an activation per channel; TensorRT allows "
                   "per-channel scales on constant weights only")
    blocked = int(attrs.get("block_size", 0) or 0) > 0
    if qtype == "int4" and "int4" in qdq["types"]:
        if not is_dq or x is None or len(x.dims) != 2:
            out.append(f"{node.op_type} {name!r}: TensorRT takes INT4 only as DequantizeLinear of "
                       "constant 2-D weights")
        elif x.dims[-1] % 2:
            out.append(f"{node.op_type} {name!r}: INT4 weights need an even last dimension, got {list(x.dims)}")
        else:
            stats["int4_blocked"] = stats.get("int4_blocked", 0) + int(blocked)
    elif blocked:
        rule = ("block-quantizes INT4 weights only" if qdq["block_quantization"] != "none"
                else "has no block quantization")
        out.append(f"{node.op_type} {name!r} is block-quantized as {qtype or 'an activation'}; TensorRT {rule}")
    return out


def check_ops(onnx_model, version: str = "10.3") -> dict:
    """Check every node against TensorRT's ONNX-parser support; raise ExportError on anything it refuses.

    Returns the record kept in the manifest: op counts, Q/DQ statistics and warnings.
    """
    from onnx import helper

    key, table, warnings = ops_table(version)
    supported, listed_no = set(table["supported"]), set(table["unsupported"])
    limits = table.get("attribute_limits", {})
    functions = {(f.domain, f.name): f for f in onnx_model.functions}
    opset = next((o.version for o in onnx_model.opset_import if o.domain in DEFAULT_DOMAINS), None)

    ops: dict[str, int] = {}
    bad: dict[tuple[str, str], dict] = {}
    violations: list[str] = []
    qstats: dict[str, int] = {}

    def visit(nodes, consts: dict, seen_fn: frozenset) -> None:
        for node in nodes:
            domain = node.domain if node.domain not in DEFAULT_DOMAINS else ""
            label = f"{domain}.{node.op_type}" if domain else node.op_type
            ops[label] = ops.get(label, 0) + 1
            fn = functions.get((node.domain, node.op_type))
            if fn is not None and fn.name not in seen_fn:       # a model-local function: check its body
                visit(fn.node, consts, seen_fn | {fn.name})
                continue
            if domain:
                reason = ("ONNX Runtime contrib op" if domain.startswith("com.microsoft")
                          else f"custom domain {domain}")
            elif node.op_type in listed_no:
                reason = f"listed as unsupported by TensorRT {key}"
            elif node.op_type not in supported:
                reason = f"not in TensorRT {key}'s operator list"
            else:
                reason = None
            if reason:
                rec = bad.setdefault((domain, node.op_type), {"op": label, "count": 0, "reason": reason})
                rec["count"] += 1
                continue
            for attr, allowed in limits.get(node.op_type, {}).items():
                a = next((a for a in node.attribute if a.name == attr), None)
                if a is not None:
                    value = helper.get_attribute_value(a)
                    value = value.decode() if isinstance(value, bytes) else value
                    if value not in allowed:
                        violations.append(f"{node.op_type} {node.name!r} has {attr}={value!r}; "
                                          f"TensorRT {key} supports {allowed}")
            if node.op_type in _QDQ:
                violations.extend(_check_qdq(node, consts, table["qdq"], qstats))
            for a in node.attribute:                            # If/Loop/Scan bodies
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    visit(g.node, _constants(g, consts), seen_fn)

    visit(onnx_model.graph.node, _constants(onnx_model.graph, {}), frozenset())

    if opset is not None and opset > table["opset"]["max"]:
        warnings.append(f"opset {opset} is above TensorRT {key}'s documented range "
                        f"({table['opset']['min']}-{table['opset']['max']}); the parser tries it op by op")
    if opset is not None and opset < table["opset"]["min"]:
        violations.append(f"opset {opset} is below TensorRT {key}'s minimum {table['opset']['min']}")

    unsupported = sorted(bad.values(), key=lambda r: (-r["count"], r["op"]))
    if unsupported or violations:
        parts = []
        if unsupported:
            parts.append("unsupported ops " + ", ".join(f"{r['op']} x{r['count']} ({r['reason']})"
                                                         for r in unsupported))
        if violations:
            more = f" (+{len(violations) - 5} more)" if len(violations) > 5 else ""
            parts.append("quantization TensorRT refuses: " + "; ".join(violations[:5]) + more)
        raise ExportError(f"TensorRT {version} cannot build this graph: " + "; ".join(parts),
                          _fix(unsupported, violations))
    n_q = sum(ops.get(op, 0) for op in _QDQ)
    return {"passed": True, "version": str(version), "table": key, "source": table["source"],
            "opset": opset, "ops": dict(sorted(ops.items())), "unsupported": [],
            "qdq": {"nodes": n_q, **dict(sorted(qstats.items()))} if n_q else {"nodes": 0},
            "warnings": warnings}


def _fix(unsupported: list[dict], violations: list[str]) -> str:
    ops = {r["op"] for r in unsupported}
    if "com.microsoft.MatMulNBits" in ops:
        return ("for INT4 on jetson export blocked DequantizeLinear (target int4.format: qdq), "
                "or use --quant int8 or fp16 for jetson")
    if any("INT32" in v for v in violations):
        return ("quantize for TensorRT without bias quantization (ONNX Runtime QuantizeBias=False), "
                "or use --quant fp16 for jetson")
    if any(k in v for v in violations for k in ("scales <= 0", "INT4 only", "INT4 weights", "INT4 needs")):
        return ("quantize INT4 weights for TensorRT: blocked DequantizeLinear of 2-D weights with positive "
                "scales, or use --quant int8 or fp16 for jetson")
    if violations:
        return ("quantize for TensorRT: symmetric INT8 (int8.symmetric_activations: true, INT8 "
                "activations) with constant scales, or use --quant fp16 for jetson")
    if any(r["reason"] != "ONNX Runtime contrib op" for r in unsupported):
        return "use --quant int8 or fp16 for jetson, a TensorRT version that supports these ops, or report the model"
    return "use --quant int8 or fp16 for jetson, or report the model"


def shape_profile(batch: dict, input_size: int, channels: int = 3) -> dict:
    """TensorRT optimization profile (min/opt/max NCHW shapes) from the target's batch range."""
    lo, opt, hi = (int(batch[k]) for k in ("min", "opt", "max"))
    if not 1 <= lo <= opt <= hi:
        raise ExportError(f"batch profile min={lo} opt={opt} max={hi} is not ordered",
                          "fix batch in the target profile: 1 <= min <= opt <= max")
    return {k: [b, channels, input_size, input_size] for k, b in (("min", lo), ("opt", opt), ("max", hi))}


def precision_flags(precision: Precision) -> tuple[list[str], list[str]]:
    """(trtexec precision flags, fallback flags tried if the first build fails).

    INT8 and INT4 graphs are explicitly quantized (Q/DQ), so TensorRT takes the quantized
    layers from the graph; ``--fp16`` lets every other layer run in half precision. INT4
    weight-only graphs build weakly typed with ``--fp16`` (``--int4`` only enables INT4
    plugin I/O); if that build fails the script retries strongly typed, which trtexec does
    not combine with precision flags and which then runs the FP32 graph in FP32.
    """
    p = Precision.parse(precision)
    return {Precision.FP32: ([], []), Precision.FP16: (["--fp16"], []),
            Precision.INT8: (["--int8", "--fp16"], []),
            Precision.INT4: (["--fp16"], ["--stronglyTyped"])}[p]


def _shape(name: str, dims: list[int]) -> str:
    return f"{name}:{'x'.join(str(d) for d in dims)}"


def trtexec_args(onnx_name: str, profile: dict, flags: list[str], workspace_mib: int,
                 input_name: str = INPUT_NAME) -> list[str]:
    return [f"--onnx={onnx_name}", f"--saveEngine={ENGINE}",
            *(f"--{k}Shapes={_shape(input_name, profile[k])}" for k in ("min", "opt", "max")),
            f"--memPoolSize=workspace:{int(workspace_mib)}M", *flags]


def _check_input(model, profile: dict) -> str:
    """The graph's image input must accept every shape of the profile."""
    if not model.graph.input:
        raise ExportError("the ONNX graph has no input", "report this model as an exporter bug")
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    want = profile["max"]
    if len(dims) != 4 or any(d is not None and d != w for d, w in zip(dims[1:], want[1:])):
        raise ExportError(f"ONNX input {inp.name!r} has shape {dims}, the TensorRT profile needs "
                          f"[batch, {want[1]}, {want[2]}, {want[3]}]", "report this model as an exporter bug")
    if dims[0] is not None and not profile["min"][0] == profile["max"][0] == dims[0]:
        raise ExportError(f"ONNX input {inp.name!r} has a fixed batch of {dims[0]} but the target wants "
                          f"{profile['min'][0]}..{profile['max'][0]}", "export with a dynamic batch axis")
    return inp.name


def _find_trtexec_sh() -> str:
    """Bash that sets $TRTEXEC (or dies naming how to install it) and $found, this device's TensorRT version
    (major.minor, empty when it cannot be told); expects ``die`` to be defined."""
    return f"""TRTEXEC="${{TRTEXEC:-}}"
if [ -z "$TRTEXEC" ]; then
  if command -v trtexec >/dev/null 2>&1; then
    TRTEXEC="$(command -v trtexec)"
  elif [ -x {JETPACK_TRTEXEC} ]; then
    TRTEXEC={JETPACK_TRTEXEC}
  fi
fi
if [ -z "$TRTEXEC" ] || [ ! -x "$TRTEXEC" ]; then
  die "trtexec not found (looked at \\$TRTEXEC, PATH and {JETPACK_TRTEXEC}). On JetPack install it" \\
      "with 'sudo apt install tensorrt' (package libnvinfer-bin), or set TRTEXEC=/path/to/trtexec"
fi

# TensorRT version on this device: trtexec's banner ("[TensorRT v100300]"), else the package.
found=""
code="$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p' | head -n 1 || true)"
if [ -n "$code" ]; then
  if [ "$code" -ge 10000 ]; then found="$((code / 10000)).$((code / 100 % 100))"
  else found="$((code / 1000)).$((code / 100 % 10))"; fi
elif command -v dpkg-query >/dev/null 2>&1; then
  found="$(dpkg-query -W -f='${{Version}}' libnvinfer-bin 2>/dev/null | cut -d. -f1,2 || true)"
fi
"""


def render_script(args: list[str], fallback_args: list[str], version: str, jetpack: str, cuda: str,
                  precision: str, onnx_name: str) -> str:
    """The bash script that builds the engine on the Jetson."""
    q = " ".join(shlex.quote(a) for a in args)
    fb = " ".join(shlex.quote(a) for a in fallback_args)
    return f"""#!/usr/bin/env bash
# Builds the TensorRT engine for this bundle. Run it ON the Jetson: an engine only runs with
# the GPU, TensorRT version and JetPack it was built with.
#   checked for: TensorRT {version} (JetPack {jetpack}, CUDA {cuda}), precision {precision}
#   input:  {onnx_name}   output: {ENGINE} (the only file this adds to the bundle; the trtexec
#   log goes to a temporary file, or to $BUILD_LOG)
#
# usage: bash {SCRIPT} [--benchmark] [extra trtexec options]
#   --benchmark   also time the engine after building (default: build only, --skipInference)
#   TRTEXEC=/path/to/trtexec bash {SCRIPT}   to use a specific trtexec
set -euo pipefail

EXPECTED_TRT="{version}"
ARGS=({q})
FALLBACK_ARGS=({fb})   # tried once if the build with ARGS fails

die() {{ echo "{SCRIPT}: error: $*" >&2; exit 1; }}
warn() {{ echo "{SCRIPT}: warning: $*" >&2; }}

cd "$(dirname "$0")"
[ -f {shlex.quote(onnx_name)} ] || die "{onnx_name} is missing next to this script"

{_find_trtexec_sh()}if [ -z "$found" ]; then
  warn "could not tell the TensorRT version; this graph was checked against TensorRT $EXPECTED_TRT"
elif [ "${{found%%.*}}" != "${{EXPECTED_TRT%%.*}}" ]; then
  warn "this device has TensorRT $found but the graph was checked against TensorRT $EXPECTED_TRT" \\
       "(JetPack {jetpack}); operators or quantization may be refused. Use JetPack {jetpack}, or expect to re-export."
elif [ "$found" != "$EXPECTED_TRT" ]; then
  echo "{SCRIPT}: TensorRT $found (graph checked against $EXPECTED_TRT)"
fi

EXTRA=()
SKIP=(--skipInference)
for a in "$@"; do
  case "$a" in
    --benchmark) SKIP=() ;;
    *) EXTRA+=("$a") ;;
  esac
done

build() {{
  rm -f {ENGINE}
  echo "{SCRIPT}: $TRTEXEC $* ${{SKIP[*]:-}} ${{EXTRA[*]:-}}" | tee -a "$LOG"
  "$TRTEXEC" "$@" ${{SKIP[@]+"${{SKIP[@]}}"}} ${{EXTRA[@]+"${{EXTRA[@]}}"}} 2>&1 | tee -a "$LOG" \\
    && [ -s {ENGINE} ]
}}

LOG="${{BUILD_LOG:-$(mktemp "${{TMPDIR:-/tmp}}/edgevlm-trtexec.XXXXXX")}}"
: >"$LOG"
if build "${{ARGS[@]}}"; then
  :
elif [ ${{#FALLBACK_ARGS[@]}} -gt 0 ]; then
  warn "trtexec failed with: ${{ARGS[*]}}; retrying with ${{FALLBACK_ARGS[*]}} (log: $LOG)"
  fb=()
  for a in "${{ARGS[@]}}"; do
    case "$a" in --fp16|--int8|--int4|--bf16|--best) ;; *) fb+=("$a") ;; esac
  done
  build "${{fb[@]}}" "${{FALLBACK_ARGS[@]}}" || die "trtexec could not build {ENGINE}; full log in $LOG"
else
  die "trtexec could not build {ENGINE}; full log in $LOG"
fi
echo "{SCRIPT}: built {ENGINE} ($(wc -c <{ENGINE}) bytes) with TensorRT ${{found:-unknown}}"
"""


def prepare(ctx: ExportContext, onnx_path) -> dict:
    """Check ``onnx_path`` for TensorRT and write the engine build script; returns the manifest record."""
    import onnx

    trt = ctx.target.tensorrt
    version = str(trt["version"])
    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path))
    ctx.log(f"  checking operators for TensorRT {version}")
    check = check_ops(model, version)
    p = ctx.quant.precision
    qdq = check["qdq"]
    if p == Precision.INT8 and not qdq.get("int8"):
        raise ExportError("the INT8 graph has no INT8 Q/DQ nodes, so trtexec would calibrate nothing and "
                          "use placeholder ranges", "report this model; use --quant fp16 for jetson")
    if p == Precision.INT4 and not qdq.get("int4"):
        check["warnings"].append("no weight was quantized to INT4 (no MatMul with constant weights); "
                                 "the engine is effectively FP16")
    for w in check["warnings"]:
        ctx.log(f"    warning: {w}")

    profile = shape_profile(ctx.target.batch, ctx.input_size)
    input_name = _check_input(model, profile)
    onnx_name = Path(os.path.relpath(onnx_path, ctx.workdir)).as_posix()
    flags, fallback = precision_flags(p)
    args = trtexec_args(onnx_name, profile, flags, trt.get("workspace_mib", 1024), input_name)
    script = Path(ctx.workdir) / SCRIPT
    script.write_text(render_script(args, fallback, version, str(trt.get("jetpack", "?")),
                                    str(trt.get("cuda", "?")), p.value, onnx_name))
    script.chmod(0o755)
    ctx.log(f"  wrote {SCRIPT} (trtexec {' '.join(flags) or 'fp32'}, batch "
            f"{profile['min'][0]}..{profile['max'][0]})")
    return {
        "version": version, "jetpack": str(trt.get("jetpack", "")), "cuda": str(trt.get("cuda", "")),
        "op_check": check, "build_script": SCRIPT, "engine": ENGINE, "trtexec_args": args,
        "fallback_args": fallback, "shape_profile": profile,
        "note": (f"engines are built on the device: run `bash {SCRIPT}` on the Jetson (JetPack "
                 f"{trt.get('jetpack', '?')}) to write {ENGINE}; an engine only runs with the GPU and "
                 "TensorRT version it was built with"),
    }


# -- engines for a VLM bundle: one per ONNX graph, planned at export, built on the device ---------------------
ENGINES_SCRIPT = "build_engines.sh"
ENGINES_DIR = "engines"
PLAN_VERSION = 1
# The engine plan's precision flags, by name: what trtexec and the Python API (edgevlm.runtime.tensorrt) each set.
FLAG_TRTEXEC = {"fp16": "--fp16", "int8": "--int8", "strongly_typed": "--stronglyTyped"}
_TRTEXEC_FLAG = {v: k for k, v in FLAG_TRTEXEC.items()}
# Defaults of the profile's optional ``tensorrt.engines`` block; both are clamped to the model's context.
ENGINE_DEFAULTS = {"max_prompt": 512, "context": 4096, "timing_cache": f"{ENGINES_DIR}/timing.cache"}


def _dims(value_info) -> list:
    """An ONNX input's dims: ints, or the symbolic name (str) of a dynamic axis."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _axis_kind(name: str, input_name: str, axis: int, rank: int) -> str:
    """Which range a dynamic axis takes: batch (images), seq (new positions), past (cached positions) or total
    (past + seq: the attention mask's last axis and the present KV)."""
    if name == "past":
        return "past"
    if name == "seq":
        return "seq"
    if input_name == "attention_mask" and axis == rank - 1:
        return "total"
    if axis == 0 and rank == 4:
        return "batch"
    return "seq"                         # any other dynamic axis counts positions (a part's tokens)


def engine_limits(target, context_length: int, vision_tokens: int) -> dict:
    """Batch, prompt length and context the engines cover, from the profile's ``batch`` and its optional
    ``tensorrt.engines`` block (max_prompt, context, timing_cache), clamped to the model's context."""
    eng = {**ENGINE_DEFAULTS, **(target.tensorrt.get("engines") or {})}
    lo, opt, hi = (int(target.batch[k]) for k in ("min", "opt", "max"))
    if not 1 <= lo <= opt <= hi:
        raise ExportError(f"batch profile min={lo} opt={opt} max={hi} is not ordered",
                          "fix batch in the target profile: 1 <= min <= opt <= max")
    context = min(int(eng["context"]), int(context_length))
    max_prompt = min(int(eng["max_prompt"]), context)
    if max_prompt < 1 or context < 2:
        raise ExportError(f"tensorrt.engines gives max_prompt={max_prompt} and context={context}",
                          "set tensorrt.engines.max_prompt >= 1 and context >= 2 in the target profile")
    opt_prompt = max(1, min(max_prompt, int(vision_tokens) + 32))        # an image and a short question
    return {"batch": {"min": lo, "opt": opt, "max": hi}, "max_prompt": max_prompt, "opt_prompt": opt_prompt,
            "context": context, "timing_cache": str(eng["timing_cache"])}


def graph_profile(model, limits: dict) -> dict:
    """One optimization profile {input: {min, opt, max}} for every input of ``model``.

    A decoder gets one profile that covers prefill (seq 1..max_prompt, past 0) and decode (seq 1, past up to the
    context), tuned (opt) at a decode step over a prompt: the shape the generation loop runs most; trtexec's
    --minShapes/--optShapes/--maxShapes describe one profile, so both builders use one."""
    ranges = {"batch": (limits["batch"]["min"], limits["batch"]["opt"], limits["batch"]["max"]),
              "seq": (1, 1 if _has_past(model) else limits["opt_prompt"], limits["max_prompt"]),
              "past": (0, limits["opt_prompt"], limits["context"] - 1),
              "total": (1, limits["opt_prompt"] + 1, limits["context"])}
    init = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = _dims(vi)
        out = {"min": [], "opt": [], "max": []}
        for axis, d in enumerate(dims):
            r = (d, d, d) if isinstance(d, int) else ranges[_axis_kind(d, vi.name, axis, len(dims))]
            for k, v in zip(("min", "opt", "max"), r):
                out[k].append(int(v))
        shapes[vi.name] = out
    return shapes


def _has_past(model) -> bool:
    return any(i.name.startswith("past_key_values.") for i in model.graph.input)


def graph_flags(precision: str) -> tuple[list[str], list[str]]:
    """(flags, fallback flags) by name (see :data:`FLAG_TRTEXEC`) for a graph exported at ``precision``: the same
    choice as :func:`precision_flags` for backbones (explicit Q/DQ graphs build weakly typed with FP16 enabled;
    INT4 retries strongly typed)."""
    flags, fallback = precision_flags(Precision.parse(precision))
    return [_TRTEXEC_FLAG[f] for f in flags], [_TRTEXEC_FLAG[f] for f in fallback]


def _shapes_arg(shapes: dict, which: str) -> str:
    return ",".join(_shape(name, s[which]) for name, s in shapes.items())


def engine_trtexec_args(g: dict, workspace_mib: int, timing_cache: str) -> list[str]:
    """trtexec's arguments for one planned graph (paths relative to the bundle)."""
    args = [f"--onnx={g['onnx']}", f"--saveEngine={g['engine']}"]
    if any(s["min"] != s["max"] for s in g["shapes"].values()):
        args += [f"--{k}Shapes={_shapes_arg(g['shapes'], k)}" for k in ("min", "opt", "max")]
    args += [f"--memPoolSize=workspace:{int(workspace_mib)}M", f"--timingCacheFile={timing_cache}"]
    return args + [FLAG_TRTEXEC[f] for f in g["flags"]]


def engine_plan(work: Path, parts: dict, target, context_length: int, vision_tokens: int) -> dict:
    """The manifest's ``engines`` block: per ONNX graph of the bundle its engine file, shape profile, precision
    flags and the sha256 of the ONNX it is built from, plus workspace and timing cache; ``build_engines.sh`` and
    ``edgevlm build-engines`` both build from it."""
    import onnx

    from ..bundle import sha256_file

    trt = target.tensorrt
    limits = engine_limits(target, context_length, vision_tokens)
    graphs = []
    for part, rec in parts.items():
        if rec.get("format") != "onnx":
            continue
        path = Path(work) / rec["path"]
        model = onnx.load(str(path), load_external_data=False)
        flags, fallback = graph_flags(rec.get("precision", "fp32"))
        g = {"part": part, "onnx": rec["path"], "onnx_sha256": sha256_file(path),
             "engine": f"{ENGINES_DIR}/{part}.plan", "sidecar": f"{ENGINES_DIR}/{part}.json",
             "precision": rec.get("precision", "fp32"), "flags": flags, "fallback_flags": fallback,
             "shapes": graph_profile(model, limits)}
        del model
        g["trtexec_args"] = engine_trtexec_args(g, trt.get("workspace_mib", 1024), limits["timing_cache"])
        graphs.append(g)
    return {"version": PLAN_VERSION, "tensorrt": str(trt["version"]), "jetpack": str(trt.get("jetpack", "")),
            "cuda": str(trt.get("cuda", "")), "workspace_mib": int(trt.get("workspace_mib", 1024)),
            "timing_cache": limits["timing_cache"], "limits": limits, "script": ENGINES_SCRIPT,
            "graphs": graphs}


def render_engines_script(plan: dict) -> str:
    """``build_engines.sh``: trtexec once per planned graph, refusing a TensorRT other than the plan's."""
    version, jetpack = plan["tensorrt"], plan["jetpack"] or "?"
    builds = []
    for g in plan["graphs"]:
        fb = [a for a in g["trtexec_args"] if a not in {FLAG_TRTEXEC[f] for f in g["flags"]}]
        fb += [FLAG_TRTEXEC[f] for f in g["fallback_flags"]]
        builds.append(f"build_one {shlex.quote(g['part'])} {shlex.quote(g['onnx'])} {shlex.quote(g['engine'])} "
                      f"{shlex.quote(g['sidecar'])} {shlex.quote(g['onnx_sha256'])} {shlex.quote(g['precision'])} "
                      f"\"{' '.join(g['fallback_flags'])}\" -- "
                      + " ".join(shlex.quote(a) for a in g["trtexec_args"])
                      + (" --FALLBACK-- " + " ".join(shlex.quote(a) for a in fb) if g["fallback_flags"] else ""))
    return f"""#!/usr/bin/env bash
# Builds one TensorRT engine per ONNX graph of this bundle, from the engine plan in manifest.json
# (`edgevlm build-engines BUNDLE` builds the same with TensorRT's Python API). Run it ON the Jetson: an engine
# only runs with the GPU and TensorRT version it was built with.
#   planned for: TensorRT {version} (JetPack {jetpack}, CUDA {plan['cuda'] or '?'}), workspace {plan['workspace_mib']} MiB,
#   timing cache {plan['timing_cache']}
#   writes: {', '.join(g['engine'] for g in plan['graphs'])} and a .json sidecar next to each
#   (TensorRT version, GPU, compute capability, precision, sha256 of the ONNX)
#
# usage: bash {ENGINES_SCRIPT} [extra trtexec options]
#   TRTEXEC=/path/to/trtexec bash {ENGINES_SCRIPT}   to use a specific trtexec
set -euo pipefail

EXPECTED_TRT="{version}"
SCRIPT={ENGINES_SCRIPT}

die() {{ echo "$SCRIPT: error: $*" >&2; exit 1; }}
warn() {{ echo "$SCRIPT: warning: $*" >&2; }}

cd "$(dirname "$0")"
{_find_trtexec_sh()}if [ -z "$found" ]; then
  die "could not tell this device's TensorRT version (trtexec --help shows no [TensorRT vNNNNNN] banner); the" \\
      "engines are planned for TensorRT $EXPECTED_TRT (JetPack {jetpack})"
elif [ "$found" != "$EXPECTED_TRT" ]; then
  die "this device has TensorRT $found but the bundle's engine plan is for TensorRT $EXPECTED_TRT. Use JetPack" \\
      "{jetpack} (TensorRT $EXPECTED_TRT), or export again with tensorrt.version: \\"$found\\" in the target profile"
fi

GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
SM="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)"
if [ -z "$SM" ] && [ -r /proc/device-tree/compatible ] && tr '\\0' ' ' </proc/device-tree/compatible | grep -q tegra234; then
  SM="8.7"; GPU="${{GPU:-Orin (nvgpu)}}"                 # Jetson Orin: nvidia-smi may not report it
fi
[ -n "$SM" ] || warn "could not tell the GPU's compute capability; the sidecars record it as unknown"

EXTRA=("$@")
LOG="${{BUILD_LOG:-$(mktemp "${{TMPDIR:-/tmp}}/edgevlm-trtexec.XXXXXX")}}"
: >"$LOG"
mkdir -p {ENGINES_DIR}

run_trtexec() {{
  echo "$SCRIPT: $TRTEXEC $* --skipInference ${{EXTRA[*]:-}}" | tee -a "$LOG"
  "$TRTEXEC" "$@" --skipInference ${{EXTRA[@]+"${{EXTRA[@]}}"}} 2>&1 | tee -a "$LOG" >/dev/null
}}

# build_one PART ONNX ENGINE SIDECAR SHA256 PRECISION FALLBACK_FLAGS -- ARGS... [--FALLBACK-- ARGS...]
build_one() {{
  local part="$1" onnx="$2" engine="$3" sidecar="$4" sha="$5" precision="$6" fbflags="$7"; shift 8
  local args=() fb=() into=args
  for a in "$@"; do
    if [ "$a" = "--FALLBACK--" ]; then into=fb; continue; fi
    if [ "$into" = args ]; then args+=("$a"); else fb+=("$a"); fi
  done
  [ -f "$onnx" ] || die "$onnx is missing next to this script"
  got="$(sha256sum "$onnx" | cut -d' ' -f1)"
  [ "$got" = "$sha" ] || die "$onnx changed since export (sha256 $got, the plan has $sha); export the bundle again"
  rm -f "$engine" "$sidecar"
  local flags="${{args[*]}}"
  if ! {{ run_trtexec "${{args[@]}}" && [ -s "$engine" ]; }}; then
    [ ${{#fb[@]}} -gt 0 ] || die "trtexec could not build $engine; full log in $LOG"
    warn "trtexec failed for $part; retrying with $fbflags (log: $LOG)"
    {{ run_trtexec "${{fb[@]}}" && [ -s "$engine" ]; }} || die "trtexec could not build $engine; full log in $LOG"
    flags="${{fb[*]}}"
  fi
  printf '{{"part": "%s", "tensorrt": "%s", "gpu": "%s", "compute_capability": "%s", "precision": "%s", "onnx": "%s", "onnx_sha256": "%s", "builder": "trtexec", "args": "%s"}}\\n' \\
    "$part" "$found" "${{GPU:-unknown}}" "${{SM:-unknown}}" "$precision" "$onnx" "$sha" "$flags" >"$sidecar"
  echo "$SCRIPT: built $engine ($(wc -c <"$engine") bytes) with TensorRT $found on sm ${{SM:-unknown}}"
}}

{chr(10).join(builds)}
echo "$SCRIPT: done; check it with: edgevlm verify ."
"""


def write_engine_plan(work: Path, parts: dict, target, context_length: int, vision_tokens: int, log=None) -> dict:
    """Plan the bundle's engines and write ``build_engines.sh``; returns the manifest's ``engines`` block."""
    plan = engine_plan(work, parts, target, context_length, vision_tokens)
    script = Path(work) / ENGINES_SCRIPT
    script.write_text(render_engines_script(plan))
    script.chmod(0o755)
    if log is not None:
        lim = plan["limits"]
        log(f"  engine plan for TensorRT {plan['tensorrt']}: {', '.join(g['part'] for g in plan['graphs'])} "
            f"(prompt <= {lim['max_prompt']}, context {lim['context']}); wrote {ENGINES_SCRIPT}")
    return plan
