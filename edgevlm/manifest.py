"""manifest.json, parsed and checked in one place: after :func:`validate_manifest` a reader may index every
key the schema requires and convert it (``int()``, ``tuple()``) without a TypeError, KeyError or IndexError.

Standard library only: the torch-free runtime imports this module.

>>> m = parse_manifest(path.read_bytes(), str(path))     # size, nesting depth, JSON, a top-level object
>>> validate_manifest(m, str(path))                      # kind, schema version, then the schema below

The schema is data (:data:`MANIFEST_SCHEMA`), nodes of a small declarative language:

``type``       int | number | str | bool | list | dict | path | sha256 | any
``null``       None is allowed too
``min`` / ``max`` / ``gt``   inclusive bounds (ints, numbers), an exclusive lower bound
``choices``    the allowed values
``nonempty``   a string with at least one character
``count``      {substring: [lo, hi]}: how often a string holds each substring
``items``      the node of every element (lists); ``min_len`` / ``max_len``
``keys``       {name: node} of a dict, each node ``required`` or not; keys not named are allowed (a newer
               edgevlm may add some) and not checked
``values``     the node of every value of a dict whose keys are names of things (``files``, ``parts``);
               ``key``: the node every such key must satisfy
``variant``    {"on": key, "default": value, "cases": {value: {"keys": {...}, "requires_parts": [...]}}}:
               the dict's ``key`` picks which further keys it must hold (``default`` when the key is absent;
               no ``default``: the key is required)
``version``    {"key": name, "current": n}: a block with ``name`` > n comes from a newer edgevlm and is not
               judged by these rules; a missing ``name`` means 1
``requires_parts``   part names (``parts``) that must exist where this node (or variant case) is present
``one_of_keys``      lists of keys a dict must hold at least one of
``default``    the value an absent optional key stands for, checked as if present (``vision``: ``{}``)
``desc``       the words an error uses for what was expected (default: made from the node)

Paths (``type: path``) are relative POSIX paths inside the bundle: not empty, no leading ``/``, no drive
letter, no ``..`` or ``.`` component, no backslash, no NUL or other control character; ``dir_ok`` allows one
trailing ``/`` (a directory prefix such as ``trt_cache/``). Only the places the runtime opens are paths: the
``path`` keys inside ``details`` blocks record where the exporter worked (absolute, in a temporary directory)
and are not checked.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from .errors import BundleError

SCHEMA_VERSION = 1                     # the manifest's ``schema_version`` this edgevlm reads (as bundle.py)
KIND = "edgevlm-bundle"
GENERATION_VERSION = 1                 # the ``generation`` block's ``version`` (missing: 1)
MAX_MANIFEST_BYTES = 16 << 20          # real manifests are a few kB; 16 MiB leaves room for big file tables
MAX_DEPTH = 32                         # real manifests nest 6 or 7 levels
INT_LIMIT = 2**63 - 1                  # every integer fits numpy's int64
PRECISIONS = ("fp32", "fp16", "int8", "int4")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

FIX = "export the bundle again with `edgevlm export` (never edit manifest.json by hand)"
FIX_UPGRADE = "upgrade edgevlm (pip install -U edgevlm) or export the bundle with this version"


# -- node shorthands (each returns a plain dict: the schema stays data) --------------------------------------
def _node(type_: str, required: bool = False, **kw) -> dict:
    return {"type": type_, "required": required, **kw}


def Int(min=None, max=None, required=False, **kw) -> dict:
    return _node("int", required, min=min, max=max, **kw)


def Num(min=None, max=None, required=False, **kw) -> dict:
    return _node("number", required, min=min, max=max, **kw)


def Str(required=False, **kw) -> dict:
    return _node("str", required, **kw)


def Bool(required=False, **kw) -> dict:
    return _node("bool", required, **kw)


def List(items=None, required=False, **kw) -> dict:
    return _node("list", required, items=items, **kw)


def Dict(keys=None, required=False, **kw) -> dict:
    return _node("dict", required, keys=keys or {}, **kw)


def RelPath(required=False, **kw) -> dict:
    return _node("path", required, **kw)


def Any(required=False, **kw) -> dict:
    return _node("any", required, **kw)


ID = Int(min=0)                                    # a token id
IDS = List(ID)
MEAN_STD = List(Num(), min_len=3, max_len=3)       # per RGB channel
STD = List(Num(gt=0), min_len=3, max_len=3)        # divides: never 0

# -- blocks both kinds share ------------------------------------------------------------------------------
FILE_RECORD = Dict({"sha256": _node("sha256", True), "size": Int(min=0, required=True)})
FILES = Dict(required=True, key=RelPath(), values=FILE_RECORD)
TARGET = Dict({
    "name": Str(required=True, nonempty=True),
    "format": Str(required=True, nonempty=True),   # the runtime names the formats it cannot run itself
    "description": Str(), "runtime": Str(),
    "providers": List(Str(nonempty=True)),
    "batch": Any(), "tensorrt": Dict(), "minimum_deployment_target": Dict(),
    "vlm": Dict({"decoders": List(Str()), "default_decoder": Str(), "rewrites": List(Str())}),  # a VLM's rules
    "decoder_note": Dict({"default": Str(), "written": Str(), "why": Str()}),  # the default decoder gave way
}, required=True)
WEIGHTS = Dict({"source": Any(), "kind": Str(null=True), "dataset": Str(null=True), "revision": Str(null=True),
                "trained_with": Any()}, required=True)
ACCURACY = Dict({"status": Str(required=True), "reason": Str(), "metric": Str(), "dataset": Str(), "split": Str(),
                 "images": Int(min=0), "eager_fp32": Num(min=0, max=1), "bundle": Num(min=0, max=1),
                 "delta_points": Num(), "top1_agreement_with_eager": Num(min=0, max=1), "runtime": Str()},
                required=True)
# -- golden cases (golden/golden.json, edgevlm/runtime/golden.py, docs/golden.md) -------------------------------
GOLDEN_VERSION = 1
FINITE = Num(min=-1e30, max=1e30)                  # a logit: bounded, so never NaN or infinite
GOLDEN = Dict({"path": RelPath(required=True), "version": Int(min=1), "cases": Int(min=1), "bytes": Int(min=0),
               "new_tokens": Int(min=0)})
TOP_K_ROWS = Dict({"ids": List(List(ID, min_len=1, max_len=64), required=True, min_len=1, max_len=4096),
                   "logits": List(List(FINITE, min_len=1, max_len=64), required=True, min_len=1, max_len=4096),
                   "logsumexp": List(FINITE, required=True, min_len=1, max_len=4096)}, required=True)
GOLDEN_CRITERIA = Dict(required=True, values=Any(), key=Str(choices=[
    "same_greedy_tokens", "teacher_forced_top1_agreement_min", "prefix_tokens_min", "kl_mean_max",
    "same_top1", "top1_in_eager_top5", "logit_max_abs_diff_max", "kl_max", "basis"]))
GOLDEN_CASE = Dict({
    "id": Str(required=True, nonempty=True),
    "image": RelPath(required=True),               # under golden/
    "prompt": Str(),
    "eager": Dict({"tokens": List(ID, max_len=4096), "top5": TOP_K_ROWS}, required=True),
    "criteria": GOLDEN_CRITERIA,
})
GOLDEN_FILE_SCHEMA = Dict({
    "version": Int(min=1, required=True),
    "kind": Str(required=True, choices=["vlm", "classification"]),
    "cases": List(GOLDEN_CASE, required=True, min_len=1, max_len=16),
    "margins": Dict(), "measured": Any(),
}, required=True, version={"key": "version", "current": GOLDEN_VERSION})

COMMON = {
    "kind": Str(required=True, choices=[KIND]),
    "schema_version": Int(min=1, required=True),
    "edgevlm_version": Str(), "created": Str(),
    "task": Str(required=True),
    "weights": WEIGHTS,
    "target": TARGET,
    "precision": Str(required=True, choices=list(PRECISIONS)),
    "reparameterization": Dict(),
    "accuracy": ACCURACY,
    "versions": Dict(values=Str(null=True)),
    "device_files": List(RelPath(dir_ok=True)),
    "golden": GOLDEN,
    "files": FILES,
}
MODEL_COMMON = {"name": Str(required=True, nonempty=True), "family": Str(), "params": Int(min=0)}

# -- classification bundles (edgevlm/build.py) ------------------------------------------------------------
CLASSIFIER_ARTIFACT = Dict({
    "path": RelPath(required=True, dir_ok=True),   # a Core ML package is a directory
    "format": Str(required=True, nonempty=True),
    "precision": Str(required=True, choices=list(PRECISIONS)),
    "role": Str(), "inputs": List(Dict()), "outputs": List(Dict()), "parity": Dict(required=True),
    "warnings": List(Str()),
})
CLASSIFICATION = {
    "model": Dict({**MODEL_COMMON, "num_classes": Int(min=1), "input_size": Int(min=1, required=True),
                   "params_before_reparameterization": Int(min=0)}, required=True),
    "preprocessing": Dict({
        "input_size": Int(min=1, required=True), "resize": Int(min=1),
        "interpolation": Str(choices=list(INTERPOLATIONS)),
        "crop_pct": Num(min=0.5, max=1.0),         # zoo.PreprocessSpec's range
        "mean": MEAN_STD, "std": STD, "channel_order": Str(), "layout": Str(), "scale": Num(gt=0),
    }, required=True),
    "labels": List(Str(), required=True, min_len=1),
    "artifacts": List(CLASSIFIER_ARTIFACT, required=True, min_len=1),
    "calibration": Dict({"source": Str(), "images": Int(min=0), "method": Str()}),
}

# -- VLM bundles (edgevlm/build_vlm.py) -------------------------------------------------------------------
PART = Dict({
    "path": RelPath(required=True),
    "format": Str(required=True, nonempty=True),
    "precision": Str(required=True, choices=list(PRECISIONS)),
    "gguf_type": Str(), "details": Dict(), "parity": Dict(), "parity_fp32": Dict(),
})
IMAGE = Dict({
    "size": Int(min=1, required=True),
    "mode": Str(choices=["crop", "squash", "pad", "overlap_crops", "idefics3_tiles"]),   # processor.ImageSpec: + data/crops.py's layouts
    "interpolation": Str(choices=list(INTERPOLATIONS)),
    "mean": MEAN_STD, "std": STD,
    "options": Dict({"patch_size": Int(min=1), "overlap_margin": Int(min=0), "max_crops": Int(min=1),
                     "resample": Str(choices=["lanczos", "bicubic", "bilinear"])}),
}, required=True)
# The ``generation`` block, version 1. Its variants: how the prompt is assembled (``prompt.kind``), how image
# features are made (``vision.kind``; no ``vision`` block: one encoder graph), and LLaVA-Mini's pre-fusion.
PROMPT = Dict({"kind": Str(required=True), "bos_id": Int(min=0, null=True)}, required=True, variant={
    "on": "kind",
    "cases": {
        # a text template around the image marker (LLaVA, TinyGPT-V, edgevlm's own model, ...)
        "template": {"keys": {"template": Str(required=True, count={"{prompt}": [1, 1], "<image>": [0, 1]},
                                              desc="a template with one {prompt} and at most one <image>"),
                              "bos": Bool()}},
        # Moondream: token ids around the question, BOS then the image
        "moondream": {"keys": {"bos_id": Int(min=0, required=True), "prefix": List(ID, required=True),
                               "suffix": List(ID, required=True), "space_before_text": Bool(),
                               "template": Str()}},
    },
})
VISION = Dict({"kind": Str()}, default={}, variant={
    "on": "kind", "default": "encoder",
    "cases": {
        "encoder": {"requires_parts": ["vision_encoder"]},
        # Moondream's overlapping crops: a tower per crop, features stitched by the crop grid, a projector
        "moondream_crops": {"keys": {"side": Int(min=1, required=True), "margin": Int(min=0, required=True)},
                            "requires_parts": ["vision_tower", "vision_projector"]},
    },
})
# Moondream2's skills (``edgevlm.runtime.skills``; optional, added in version 1 without a bump: a reader that does not
# know the block ignores it): caption templates by length, detect/point templates around the object, the EOS id that
# ends an object list, whether size bins are log2-scaled, the default answer length. detect/point also need the
# ``region`` part, checked when they are asked for (caption and query run without it).
TEMPLATE = Dict({"prefix": List(ID, required=True), "suffix": List(ID, required=True)})
SKILLS = Dict({
    "caption": Dict(key=Str(nonempty=True), values=List(ID, min_len=1)),
    "detect": TEMPLATE, "point": TEMPLATE,
    "eos_id": Int(min=0, required=True),
    "log_sizes": Bool(),
    "max_tokens": Int(min=1),
})
GENERATION = Dict({
    "version": Int(min=1),
    "family": Str(),
    "image": IMAGE,
    "prompt": PROMPT,
    "stop_ids": List(ID, required=True),
    "eos_ids": List(ID),
    "context_length": Int(min=1, required=True),
    "bidirectional_image_prefix": Bool(),
    "hidden_size": Int(min=1, required=True),
    "vocab_size": Int(min=1),
    "tokenizer": RelPath(),
    "num_layers": Int(min=1, required=True),
    "num_kv_heads": Int(min=1, required=True),
    "head_dim": Int(min=1, required=True),
    # without a vision block the bundle has one encoder graph (the variant's default)
    "vision": VISION,
    # LLaVA-Mini: pre-fusion over [image tokens ; text], keeping ``n_tokens`` image tokens
    "prefusion": Dict({"n_tokens": Int(min=1, required=True), "skip_ids": IDS}, requires_parts=["prefusion"]),
    "skills": SKILLS,
}, required=True, version={"key": "version", "current": GENERATION_VERSION})
PARITY_RESULT = Dict({
    "backend": Str(required=True, nonempty=True), "precision": Str(),
    "same_greedy_tokens": Bool(required=True), "first_divergence": Int(min=0, null=True),
    "teacher_forced_top1_agreement": Num(min=0, max=1, required=True), "kl_mean": Num(required=True),
    "kl_max": Num(), "logits_max_abs_diff": Num(min=0), "new_tokens": Int(min=0), "prompt_tokens": Int(min=0),
    "passed": Bool(null=True), "criterion": Str(),
})
# The ``engines`` block of a bundle for a TensorRT target (edgevlm/exporters/tensorrt.py ``engine_plan``): one engine
# per ONNX graph, built on the device by build_engines.sh (trtexec) or `edgevlm build-engines` (edgevlm/runtime/
# tensorrt.py) from the same profiles, flags, workspace and timing cache.
SHAPE = List(Int(min=0), min_len=0, max_len=8)
ENGINE_FLAGS = List(Str(choices=["fp16", "int8", "strongly_typed"]))
ENGINE_GRAPH = Dict({
    "part": Str(required=True, nonempty=True),
    "onnx": RelPath(required=True), "onnx_sha256": _node("sha256", True),
    "engine": RelPath(required=True), "sidecar": RelPath(required=True),
    "precision": Str(required=True, choices=list(PRECISIONS)),
    "flags": ENGINE_FLAGS, "fallback_flags": ENGINE_FLAGS,
    "shapes": Dict(required=True, key=Str(nonempty=True),
                   values=Dict({"min": SHAPE | {"required": True}, "opt": SHAPE | {"required": True},
                                "max": SHAPE | {"required": True}})),
    "trtexec_args": List(Str()),
})
ENGINES = Dict({
    "version": Int(min=1),
    "tensorrt": Str(required=True, nonempty=True), "jetpack": Str(), "cuda": Str(),
    "workspace_mib": Int(min=1, required=True),
    "timing_cache": RelPath(required=True),
    "limits": Dict(), "script": RelPath(),
    "graphs": List(ENGINE_GRAPH, required=True),
}, version={"key": "version", "current": 1})
# ``edgevlm export --device D`` (edgevlm/devices.py, docs/devices.md): the Jetson module the bundle was checked against,
# the memory estimate that fit it and the speed bounds (decode an upper bound, the vision encoder a lower bound).
BYTES = Int(min=0, required=True)
DEVICE = Dict({
    "name": Str(required=True, nonempty=True), "description": Str(),
    "usable_memory_gib": Num(gt=0, required=True), "memory_bandwidth_gbs": Num(gt=0),
    "jetpack": Str(), "tensorrt": Str(), "cuda": Str(), "fits": Bool(required=True),
    "estimate": Dict({"runtime": Str(required=True), "context": Int(min=1, required=True),
                      "vision_tokens": Int(min=0), "weights_bytes": BYTES, "kv_cache_bytes": BYTES,
                      "activation_bytes": BYTES, "overhead_bytes": BYTES, "total_bytes": BYTES}, required=True),
    "predicted": Dict({"decode_tokens_per_s_max": Num(min=0, null=True),
                       "decode_tokens_per_s_max_at_context": Num(min=0, null=True),
                       "vision_encoder_ms_min": Num(min=0, null=True)}, required=True),
    "vision_flops": Int(min=0, null=True), "basis": Str(),
})
# Targets whose format is ort (edgevlm/exporters/ort_mobile.py, tokenizer_graph.py): tokenization as ONNX graphs of
# onnxruntime-extensions' ops (null where the family's tokenizer cannot be expressed: ``not_expressed`` says why), and
# the one reduced-operator config covering every graph of the bundle.
GRAPH_IO = {"path": RelPath(required=True), "input": Str(required=True, nonempty=True),
            "output": Str(required=True, nonempty=True)}
PROCESSING = Dict({
    "tokenizer": Dict({**GRAPH_IO, "extensions": Str(required=True, nonempty=True)}, required=True, null=True),
    "detokenizer": Dict(GRAPH_IO, required=True, null=True),
    "checked_prompts": Int(min=0, required=True), "not_expressed": Str(),
})
OPS_CONFIG = Dict({"path": RelPath(required=True), "graphs": Int(min=1), "operators": Int(min=0),
                   "contrib_ops": List(Str()), "build": Str()})
VLM = {
    "model": Dict({**MODEL_COMMON, "vision_tokens": Int(min=0, required=True)}, required=True),
    "generation": GENERATION,
    "parts": Dict(required=True, values=PART, one_of_keys=[["decoder", "decoder_gguf", "decoder_coreml"]],
                  keys={"embed_tokens": PART.copy() | {"required": True}}),
    "artifacts": List(Dict({"path": RelPath(required=True), "format": Str(required=True, nonempty=True),
                            "precision": Str(required=True, choices=list(PRECISIONS)), "part": Str()}),
                      required=True, min_len=1),
    "parity": Dict({"image": Str(), "prompt": Str(), "eager_tokens": List(ID, required=True),
                    "results": List(PARITY_RESULT, required=True)}, required=True),
    "engines": ENGINES,                            # TensorRT targets: the engines built on the device
    "device": DEVICE,                              # --device: the Jetson module it was checked to fit
    "processing": PROCESSING,                      # ort targets: tokenizer.onnx / detokenizer.onnx
    "ops_config": OPS_CONFIG,                      # ort targets: required_operators.config for every graph
}

MANIFEST_SCHEMA = Dict(COMMON, required=True, version={"key": "schema_version", "current": SCHEMA_VERSION},
                       variant={"on": "task", "cases": {"classification": {"keys": CLASSIFICATION},
                                                        "vlm": {"keys": VLM}}})


# -- parsing ----------------------------------------------------------------------------------------------
def parse_manifest(text: bytes | str, where: str) -> dict:
    """``text`` (the file's bytes, or its text) as a dict, or a one-line :class:`BundleError` naming ``where``:
    too large, not UTF-8, nested deeper than :data:`MAX_DEPTH`, not JSON, or not a JSON object."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        if len(data) > MAX_MANIFEST_BYTES:
            raise BundleError(f"{where} is over {MAX_MANIFEST_BYTES >> 20} MiB, larger than any manifest", FIX)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BundleError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                              FIX) from None
    elif not isinstance(text, str):
        raise BundleError(f"{where} was read as {type(text).__name__}, not text", "report this as a bug")
    elif len(text) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where} is over {MAX_MANIFEST_BYTES >> 20} MiB, larger than any manifest", FIX)
    text = text.removeprefix("\ufeff")              # a byte-order mark an editor may add
    try:
        obj = json.loads(text)
    except RecursionError:                          # json's C scanner stops near the interpreter's limit
        raise BundleError(f"{where} nests more than {MAX_DEPTH} levels deep", FIX) from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", FIX) from None
    except ValueError as e:                         # e.g. an integer of more than 4300 digits
        raise BundleError(f"{where} is not valid JSON ({_clip(str(e).split(';')[0], 100)})", FIX) from None
    depth = _depth(obj)
    if depth > MAX_DEPTH:
        raise BundleError(f"{where} nests more than {MAX_DEPTH} levels deep", FIX)
    if not isinstance(obj, dict):
        raise BundleError(f"{where} holds a JSON {_json_type(obj)}, not an object: it is not an edgevlm manifest",
                          "pass a directory made by `edgevlm export`")
    return obj


def _depth(obj) -> int:
    """Nesting depth of lists and dicts (a flat object: 1), without recursion; stops past MAX_DEPTH."""
    peak, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        kids = o.values() if isinstance(o, dict) else o if isinstance(o, list) else None
        if kids is None:
            continue
        peak = max(peak, d)
        if peak > MAX_DEPTH:
            break
        stack.extend((k, d + 1) for k in kids if isinstance(k, (dict, list)))
    return peak


def load_manifest(path, where: str | None = None) -> dict:
    """Read ``path`` (a regular file, not a link; never more than MAX_MANIFEST_BYTES + 1 bytes), parse and
    validate it."""
    path = Path(path)
    where = where or str(path)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise BundleError(f"{where} is not a regular file (a link or a special file)", FIX)
        with path.open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"cannot read {where} ({e.strerror or e})", "check the path and its permissions") from None
    m = parse_manifest(data, where)
    validate_manifest(m, where)
    return m


# -- validation -------------------------------------------------------------------------------------------
def validate_manifest(m: dict, where: str) -> None:
    """Check ``m`` against :data:`MANIFEST_SCHEMA`; a :class:`BundleError` names the first bad key by its path
    (``generation.stop_ids[2]``) and what it must be. Keys the schema does not know are allowed."""
    if not isinstance(m, dict):
        raise BundleError(f"{where} holds a JSON {_json_type(m)}, not an object: it is not an edgevlm manifest",
                          "pass a directory made by `edgevlm export`")
    kind = m.get("kind")
    if kind != KIND:
        raise BundleError(f"{where} is not an edgevlm manifest (kind is {_show(kind)}, not {KIND!r})",
                          "pass a directory made by `edgevlm export`")
    ctx = _Context(where)
    _check(MANIFEST_SCHEMA, m, "", ctx)
    _cross_checks(m, ctx)


def check_block(schema: dict, value, where: str) -> None:
    """Check a JSON document other than the manifest (e.g. golden/golden.json) against a node of this language;
    a :class:`BundleError` names ``where`` and the first bad key."""
    _check(schema, value, "", _Context(where))


class _Context:
    def __init__(self, where: str):
        self.where = where
        self.parts_needed: list[tuple[str, str]] = []      # (part, the key path that needs it)

    def fail(self, path: str, problem: str, fix: str = FIX):
        raise BundleError(f"{self.where}: {path or 'the manifest'} {problem}", fix)


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isascii() and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


_PYTHON_TYPES = {"int": int, "number": (int, float), "str": str, "path": str, "sha256": str, "bool": bool,
                 "list": list, "dict": dict}


def _check(node: dict, value, path: str, ctx: _Context) -> None:
    t = node["type"]
    if value is None and node.get("null"):
        return
    if t == "any":
        return
    if not isinstance(value, _PYTHON_TYPES[t]) or (t in ("int", "number") and isinstance(value, bool)):
        ctx.fail(path, f"must be {_describe(node)}, got {_show(value)}")
    if "choices" in node and node["choices"] is not None and value not in node["choices"]:
        ctx.fail(path, f"must be {_describe(node)}, got {_show(value)}")
    if t in ("int", "number"):
        lo, hi, gt = node.get("min"), node.get("max"), node.get("gt")
        bounded = lo is not None or hi is not None or gt is not None
        if t == "int" and not -INT_LIMIT <= value <= INT_LIMIT:     # numpy's int64 takes ids, sizes, lengths
            ctx.fail(path, f"must be {_describe(node)} that fits in 64 bits, got {_show(value)}")
        if (bounded and isinstance(value, float) and not math.isfinite(value)) or (lo is not None and value < lo) \
                or (hi is not None and value > hi) or (gt is not None and value <= gt):
            ctx.fail(path, f"must be {_describe(node)}, got {_show(value)}")
    elif t == "str":
        if node.get("nonempty") and not value:
            ctx.fail(path, f"must be {_describe(node)}, got ''")
        for sub, (lo, hi) in (node.get("count") or {}).items():
            if not lo <= value.count(sub) <= hi:
                ctx.fail(path, f"must be {_describe(node)}, got {_show(value)}")
    elif t == "path":
        why = _path_problem(value, node.get("dir_ok", False))
        if why:
            ctx.fail(path, why)
    elif t == "sha256":
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            ctx.fail(path, f"must be {_describe(node)}, got {_show(value)}")
    elif t == "list":
        n = len(value)
        if n < (node.get("min_len") or 0) or (node.get("max_len") is not None and n > node["max_len"]):
            ctx.fail(path, f"must be {_describe(node)}, got a list of {n}")
        if node.get("items") is not None:
            for i, item in enumerate(value):
                _check(node["items"], item, _join(path, i), ctx)
    elif t == "dict":
        _check_dict(node, value, path, ctx)
    for part in node.get("requires_parts") or ():
        ctx.parts_needed.append((part, path))


def _check_dict(node: dict, value: dict, path: str, ctx: _Context) -> None:
    ver = node.get("version")
    if ver is not None:
        v = value.get(ver["key"], 1)
        _check(Int(min=1), v, _join(path, ver["key"]), ctx)
        if v > ver["current"]:
            what = f"{path} block" if path else "manifest"
            ctx.fail(_join(path, ver["key"]), f"is {v}: this {what} comes from a newer edgevlm (this one reads up "
                     f"to {ver['current']})", FIX_UPGRADE)
    keys = dict(node.get("keys") or {})
    var = node.get("variant")
    if var is not None:
        on = var["on"]
        choice = value.get(on, var.get("default"))
        if on not in value and "default" not in var:
            ctx.fail(_join(path, on), f"is missing (one of {_choices(var['cases'])})")
        if not isinstance(choice, str) or choice not in var["cases"]:
            ctx.fail(_join(path, on), f"must be one of {_choices(var['cases'])}, got {_show(choice)}",
                     FIX_UPGRADE)
        case = var["cases"][choice]
        keys.update(case.get("keys") or {})
        for part in case.get("requires_parts") or ():
            ctx.parts_needed.append((part, f"{_join(path, on)} {choice!r}"))
    for name, sub in keys.items():
        if name not in value:
            if sub.get("required"):
                ctx.fail(_join(path, name), f"is missing ({_describe(sub)})")
            if "default" in sub:                    # an absent block means its default (e.g. vision: encoder)
                _check(sub, sub["default"], _join(path, name), ctx)
            continue
        _check(sub, value[name], _join(path, name), ctx)
    if node.get("key") is not None or node.get("values") is not None:
        for k, v in value.items():
            if node.get("key") is not None:
                _check(node["key"], k, f"{path} key" if path else "key", ctx)
            if node.get("values") is not None and k not in keys:
                _check(node["values"], v, _join(path, k), ctx)
    for group in node.get("one_of_keys") or ():
        if not any(k in value for k in group):
            ctx.fail(path, f"must hold {' or '.join(group)}")


def _path_problem(p: str, dir_ok: bool) -> str | None:
    """What is wrong with ``p`` as a relative POSIX path inside the bundle (words after the path), or None."""
    shown = _clip(repr(p), 200)
    outside = f"{shown} points outside the bundle"
    odd = f"{shown} is not a relative path inside the bundle"
    if not p:
        return f"{odd} (it is empty)"
    if len(p) > 1024:
        return f"{odd} (it is longer than 1024 characters)"
    if "\x00" in p:
        return f"{odd} (it holds a NUL character)"
    if any(ord(c) < 32 or ord(c) == 127 for c in p):
        return f"{odd} (it holds a control character)"
    if "\\" in p:
        return f"{odd} (it holds a backslash; paths in a manifest use /)"
    if p.startswith("/"):
        return f"{outside} (an absolute path)"
    if re.match(r"[A-Za-z]:", p):
        return f"{outside} (it names a drive)"
    parts = p.split("/")
    if dir_ok and len(parts) > 1 and parts[-1] == "":
        parts = parts[:-1]
    if ".." in parts:
        return f"{outside} (it climbs out with ..)"
    if any(s in ("", ".") for s in parts):
        return f"{odd} (it has an empty or '.' component)"
    return None


def _cross_checks(m: dict, ctx: _Context) -> None:
    """What one node cannot say alone: the parts a generation block needs, labels for every class. (Whether each
    path the manifest names is in ``files`` and stays inside the bundle on disk is for ``bundle.resolve``, which
    checks it before anything is opened.)"""
    if m["task"] == "vlm":
        for part, needed_by in ctx.parts_needed:
            if part not in m["parts"]:
                ctx.fail(_join("parts", part), f"is missing ({needed_by} needs it)")
    else:
        n = m["model"].get("num_classes")
        if n is not None and len(m["labels"]) < n:
            ctx.fail("labels", f"must name all {n} classes (model.num_classes), got {len(m['labels'])}")
        if m["model"]["input_size"] != m["preprocessing"]["input_size"]:
            ctx.fail("model.input_size", f"is {m['model']['input_size']}, preprocessing.input_size "
                     f"{m['preprocessing']['input_size']}: they must agree")


# -- words ------------------------------------------------------------------------------------------------
def _describe(node: dict) -> str:
    if node.get("desc"):
        d = node["desc"]
    elif node.get("choices") is not None:
        d = "one of " + ", ".join(repr(c) for c in node["choices"])
    else:
        t = node["type"]
        if t in ("int", "number"):
            d = "an integer" if t == "int" else "a number"
            bounds = []
            if node.get("gt") is not None:
                bounds.append(f"> {node['gt']}")
            if node.get("min") is not None:
                bounds.append(f">= {node['min']}")
            if node.get("max") is not None:
                bounds.append(f"<= {node['max']}")
            d += (" " + " and ".join(bounds)) if bounds else ""
        elif t == "str":
            d = "a non-empty string" if node.get("nonempty") else "a string"
        elif t == "bool":
            d = "true or false"
        elif t == "path":
            d = "a relative path inside the bundle"
        elif t == "sha256":
            d = "a sha256 (64 lowercase hex digits)"
        elif t == "list":
            lo, hi = node.get("min_len"), node.get("max_len")
            what = _plural(_describe(node["items"])) if node.get("items") is not None else "items"
            d = (f"a list of {lo} {what}" if lo is not None and lo == hi
                 else f"a non-empty list of {what}" if lo == 1 else f"a list of {what}")
        elif t == "dict":
            d = "an object"
        else:
            d = "anything"
    return d + (" or null" if node.get("null") else "")


def _plural(d: str) -> str:
    for a, b in (("an integer", "integers"), ("a number", "numbers"), ("a non-empty string", "non-empty strings"),
                 ("a string", "strings"), ("an object", "objects"), ("a relative path", "relative paths")):
        if d.startswith(a):
            return b + d[len(a):]
    return d


def _choices(cases: dict) -> str:
    return ", ".join(repr(c) for c in cases)


def _json_type(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


def _show(v) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return f"a list of {len(v)}"
    return _clip(repr(v), 60)
