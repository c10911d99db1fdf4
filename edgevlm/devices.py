"""Jetson device profiles (``export/devices/*.yaml``), what a VLM needs there, and whether it fits.

    memory   = weights + KV cache at the context + activations + the runtime's overhead      (an estimate)
    decode   = memory bandwidth / bytes read per new token                                     (an UPPER bound)
    vision   = image-side FLOPs / peak tensor throughput at the precision                      (a LOWER bound)

Everything here is arithmetic on facts (:class:`ModelFacts`): from a bundle's manifest alone
(:func:`facts_from_manifest`, no torch), or from a zoo recipe without loading weights (:func:`facts_from_recipe`,
which counts parameters and FLOPs under PyTorch's FakeTensorMode through :mod:`edgevlm.modeling.info`, imported
only when called). docs/devices.md gives the formulas, the figures against published ones, and the limits.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import yaml

from .errors import ConfigError, UnknownNameError
from .registry import Registry
from .resources import targets_dir

GIB = 2**30
MIB = 2**20
TEXT_TOKENS = 64           # prompt tokens besides the image in every estimate (as `edgevlm info`)
PLAN_CONTEXTS = (512, 2048)  # contexts `edgevlm plan` shows besides the model's own maximum


# -- device profiles ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """One Jetson module, read from ``export/devices/NAME.yaml`` (NVIDIA's published figures; sources in the file)."""

    name: str
    description: str
    total_memory_gib: float
    usable_memory_gib: float        # what a model may take, after L4T/JetPack (the file states the assumption)
    memory_bandwidth_gbs: float     # GB/s (1e9 bytes)
    gpu_fp16_tflops: float          # dense tensor-core FP16
    gpu_int8_tops: float            # dense tensor-core INT8
    jetpack: str
    tensorrt: str
    cuda: str
    dla_count: int = 0
    dla_int8_tops: float = 0.0      # dense, all DLAs together
    extra: dict = field(default_factory=dict)   # further published figures (sparse TOPS, FP8/FP4)

    @property
    def usable_bytes(self) -> float:
        return self.usable_memory_gib * GIB

    def peak_ops(self, precision: str) -> float:
        """Peak GPU tensor throughput (ops/s) the vision encoder can reach at ``precision``: FP32 runs as TF32 (half
        the FP16 rate; TensorRT's default), INT8/INT4 vision encoders run INT8 (a pixel part is never INT4)."""
        tflops = {"fp32": self.gpu_fp16_tflops / 2, "fp16": self.gpu_fp16_tflops}.get(precision, self.gpu_int8_tops)
        return tflops * 1e12

    def to_dict(self) -> dict:
        return asdict(self)


_KEYS = {"name", "description", "total_memory_gib", "usable_memory_gib", "memory_bandwidth_gbs", "gpu", "dla",
         "software"}
DEVICES: Registry[DeviceProfile] = Registry("device")


def _profile(d: dict, where: str) -> DeviceProfile:
    missing, unknown = _KEYS - set(d), set(d) - _KEYS
    if missing or unknown:
        raise ConfigError(f"{where}: {'missing' if missing else 'unknown'} key(s) {sorted(missing or unknown)}",
                          f"fix {where} (see export/devices/orin-nano-8gb.yaml)")
    gpu, dla, sw = dict(d["gpu"]), dict(d["dla"] or {}), d["software"]
    p = DeviceProfile(name=d["name"], description=d["description"], total_memory_gib=float(d["total_memory_gib"]),
                      usable_memory_gib=float(d["usable_memory_gib"]),
                      memory_bandwidth_gbs=float(d["memory_bandwidth_gbs"]),
                      gpu_fp16_tflops=float(gpu.pop("fp16_tflops")), gpu_int8_tops=float(gpu.pop("int8_tops")),
                      jetpack=str(sw["jetpack"]), tensorrt=str(sw["tensorrt"]), cuda=str(sw["cuda"]),
                      dla_count=int(dla.pop("count", 0)), dla_int8_tops=float(dla.pop("int8_tops", 0.0)),
                      extra={**{f"gpu_{k}": v for k, v in gpu.items()}, **{f"dla_{k}": v for k, v in dla.items()}})
    if not 0 < p.usable_memory_gib < p.total_memory_gib or min(p.memory_bandwidth_gbs, p.gpu_fp16_tflops,
                                                               p.gpu_int8_tops) <= 0:
        raise ConfigError(f"{where}: usable memory must be below total and every rate positive",
                          f"fix {where}")
    return p


@lru_cache(maxsize=None)
def _load() -> Registry[DeviceProfile]:
    for path in sorted((targets_dir() / "devices").glob("*.yaml")):
        where = f"export/devices/{path.name}"
        p = _profile(yaml.safe_load(path.read_text()), where)
        if p.name != path.stem:
            raise ConfigError(f"{where} is named {p.name!r}", f"name it {path.stem!r} or rename the file")
        DEVICES.add(p.name, p)
    return DEVICES


def get_device(name: str) -> DeviceProfile:
    """The profile of a Jetson module; an unknown name is a one-line :class:`ConfigError` naming close ones."""
    try:
        return _load().get(name)
    except UnknownNameError as e:
        raise ConfigError(e.problem, e.fix) from None


def list_devices() -> list[DeviceProfile]:
    reg = _load()
    return sorted((reg.get(n) for n in reg.names()), key=lambda p: (p.total_memory_gib, p.memory_bandwidth_gbs))


# -- runtimes --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuntimeCost:
    """What a runtime adds to a model's own bytes: a fixed overhead (process, libraries, contexts), resident bytes
    per byte of weights file, and the element sizes of its KV cache and activations."""

    name: str
    overhead_mib: float
    weight_factor: float
    kv_bytes: int
    act_bytes: int
    basis: str


RUNTIMES = {
    # Not measured here (no Jetson reaches this machine): a CUDA context with lazy module loading, TensorRT's runtime
    # libraries and an execution context's scratch. TensorRT preallocates the KV cache in FP16 at the engine's
    # maximum context.
    "tensorrt": RuntimeCost("tensorrt", 600.0, 1.0, 2, 2,
                            "assumed: CUDA context (lazy loading) + TensorRT runtime + execution-context scratch"),
    # Not measured here: llama.cpp's CUDA backend (context, cuBLAS handle, compute buffers); FP16 KV cache.
    "llama.cpp": RuntimeCost("llama.cpp", 500.0, 1.0, 2, 2,
                             "assumed: CUDA context + cuBLAS + llama.cpp compute buffers"),
    # Measured on this project's machine (AMD EPYC, 2 vCPUs, onnxruntime 1.32, glibc huge pages on), peak RSS of
    # `edgevlm bench` on the default model's bundles: INT8 (5.74 MiB of graphs) 100.4 MiB and FP32 (18.76 MiB)
    # 119.3 MiB. The slope between them (1.45 resident bytes per byte of graph: ONNX Runtime pre-packs MatMul/Conv
    # weights for MLAS beside the initializers) and the intercept left after KV cache and activations are the two
    # figures here; the INT4 bundle (not used to fit them) is the check (docs/devices.md). The process itself
    # (Python, numpy, onnxruntime, tokenizers, edgevlm) is 55 MiB of that overhead before any model loads.
    "onnxruntime-cpu": RuntimeCost("onnxruntime-cpu", 88.0, 1.45, 4, 4,
                                   "measured: `edgevlm bench` peak RSS of the default model's INT8 and FP32 bundles"),
}
# A MatMulNBits decoder on the CPU runs its decode steps with edgevlm's 4-bit kernel where it can
# (edgevlm.runtime.vlm._kernel_graphs): that path imports the onnx package (measured: +14.2 MiB RSS after the
# runtime's own imports) and parses the decoder once more while it builds the two graphs (+1 x decoder bytes).
Q4_KERNEL_MIB = 14.2
TARGET_RUNTIMES = {"tensorrt": "tensorrt", "onnxruntime": "onnxruntime-cpu"}   # a target profile's runtime -> cost


def get_runtime(name: str) -> RuntimeCost:
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}", f"choose one of: {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


# -- what a model is, in numbers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionPath:
    """One way the image reaches the language model: how many tokens it reads, the image side's FLOPs per image
    (vision tower + connector + any pre-fusion) and the tokens the largest prefill pass holds at once."""

    label: str
    tokens: int
    flops: float | None
    prefill_extra: int = 0          # tokens a pre-fusion pass holds besides the LM's own (LLaVA-Mini: the M features)


@dataclass(frozen=True)
class ModelFacts:
    """The numbers every formula here reads. ``params`` splits the model into the parts a bundle carries:
    ``decoder`` (transformer body + LM head, read once per new token), ``embed`` (the token table, one row per
    token), ``pixels`` (parts that read pixels) and ``features`` (parts after them: projector, pre-fusion, heads).
    ``file_bytes`` (from a bundle) replaces the per-parameter sizes by the files' real sizes."""

    name: str
    family: str
    params: dict
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int
    image_size: int
    views: int
    paths: tuple[VisionPath, ...]
    intermediate_size: int | None = None
    file_bytes: dict | None = None
    precision: str | None = None        # a bundle's precision (None: a zoo model, any precision)
    source: str = "recipe"
    matmulnbits_decoder: bool = False   # a bundle whose decoder is MatMulNBits (edgevlm's CPU kernel may run it)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())


def _text_config(cfg: dict) -> dict:
    return dict(cfg.get("text") or cfg.get("text_config") or {})


def facts_from_recipe(name: str) -> ModelFacts:
    """A zoo VLM's facts without its weights: parameters and per-image FLOPs counted under FakeTensorMode
    (``edgevlm info``'s counts), the decoder's shape from the recipe's text config."""
    return _facts_from_recipe(name)


@lru_cache(maxsize=None)
def _facts_from_recipe(name: str) -> ModelFacts:
    from .modeling.info import describe        # torch: only here, and only for a zoo model
    from .zoo import get_vlm_recipe

    recipe = get_vlm_recipe(name)
    d = describe(recipe)
    t = _text_config(recipe.config)
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    vocab = int(t.get("vocab_size", 32000))
    embed = vocab * hidden
    lm = d["params"].get("language_model", 0)
    tied = bool(t.get("tie_word_embeddings", False))
    # the decoder graph carries the LM head; a tied head is a second copy of the table (the embedding graph keeps one)
    decoder = lm if tied else lm - embed
    pixels = d["params"].get("vision", 0)
    features = sum(v for k, v in d["params"].items() if k not in ("vision", "language_model"))
    paths = _recipe_paths(recipe, d)
    return ModelFacts(name=recipe.name, family=recipe.family,
                      params={"decoder": decoder, "embed": embed, "pixels": pixels, "features": features},
                      num_layers=int(t["num_hidden_layers"]), num_kv_heads=int(t.get("num_key_value_heads", heads)),
                      head_dim=int(t.get("head_dim") or hidden // heads), hidden_size=hidden, vocab_size=vocab,
                      max_context=int(t.get("max_position_embeddings", 2048)), image_size=int(d["image_size"]),
                      views=int(d["views"]), paths=paths,
                      intermediate_size=int(t["intermediate_size"]) if t.get("intermediate_size") else None)


# compressed token counts `edgevlm plan` tries for families with a query compressor (n x n queries)
COMPRESSED_TOKENS = (1, 4, 16, 64)


def _recipe_paths(recipe, d: dict) -> tuple[VisionPath, ...]:
    """The model's own path first; a family with token compression (LLaVA-Mini: a path labelled uncompressed)
    also gets the other compressed counts, the pre-fusion FLOPs scaled by the tokens it runs over."""
    built = d["paths"][0]
    f = built["flops"]
    own = VisionPath(built["label"], int(built["vision_tokens"]),
                     float(f["vision"] + f["connector"] + f["fusion"]))
    if len(d["paths"]) < 2:
        return (own,)
    un = d["paths"][1]
    m = int(un["vision_tokens"])                  # the M features the compressor reads
    n0, text = own.tokens, d["text_tokens"]
    own = VisionPath(f"compressed to {n0}", n0, own.flops, prefill_extra=m)
    paths = [own]
    for n in COMPRESSED_TOKENS:
        if n != n0 and n < m:
            fusion = f["fusion"] * (m + n + text) / (m + n0 + text)
            paths.append(VisionPath(f"compressed to {n}", n, float(f["vision"] + f["connector"] + fusion),
                                    prefill_extra=m))
    uf = un["flops"]
    paths.append(VisionPath("uncompressed", m, float(uf["vision"] + uf["connector"] + uf["fusion"])))
    return tuple(paths)


# bundle parts by what they hold (``features`` is every other image-side part)
_DECODER_PARTS, _EMBED_PARTS = ("decoder", "decoder_gguf"), ("embed_tokens",)
_PIXEL_PARTS = ("vision_encoder", "vision_tower")


def facts_from_manifest(m: dict) -> ModelFacts:
    """A bundle's facts from its manifest alone (no torch, no file opened): the parts' file sizes, the decoder's
    shape from the ``generation`` block. Per-image FLOPs come from a ``device`` block when the export recorded one."""
    g, files = m["generation"], m["files"]

    def part_bytes(names) -> int:
        total = 0
        for name in names:
            part = m["parts"].get(name)
            if part:
                total += sum(f["size"] for p, f in files.items() if p == part["path"] or p.startswith(part["path"] + "."))
        return total

    decoders = [n for n in _DECODER_PARTS if n in m["parts"]]
    pixels = [n for n in m["parts"] if n in _PIXEL_PARTS]
    features = [n for n in m["parts"] if n not in (*_DECODER_PARTS, *_EMBED_PARTS, *_PIXEL_PARTS)]
    fb = {"decoder": part_bytes(decoders[:1]), "embed": part_bytes(_EMBED_PARTS), "pixels": part_bytes(pixels),
          "features": part_bytes(features)}
    image = g["image"]
    opts = image.get("options") or {}
    views = 1 + int(opts.get("max_crops", 0)) if image.get("mode") == "overlap_crops" else 1
    flops = (m.get("device") or {}).get("vision_flops")
    tokens = int(m["model"]["vision_tokens"])
    extra = int((g.get("prefusion") or {}).get("image_tokens", 0))
    return ModelFacts(name=m["model"]["name"], family=m["model"].get("family", ""),
                      params={"total": int(m["model"].get("params", 0))},
                      num_layers=int(g["num_layers"]), num_kv_heads=int(g["num_kv_heads"]), head_dim=int(g["head_dim"]),
                      hidden_size=int(g["hidden_size"]), vocab_size=int(g.get("vocab_size") or 0),
                      max_context=int(g["context_length"]), image_size=int(image["size"]), views=views,
                      paths=(VisionPath("bundle", tokens, float(flops) if flops else None, extra),),
                      file_bytes=fb, precision=m["precision"], source="manifest",
                      matmulnbits_decoder="MatMulNBits" in str(((m["parts"].get("decoder") or {}).get("details") or {})
                                                               .get("quantization", {}).get("ops", {})))


# -- the formulas ------------------------------------------------------------------------------------------------
PRECISIONS = ("fp16", "int8", "int4")          # what `edgevlm plan` tabulates (jetson's VLM precisions besides fp32)


def weight_bytes_per_param(precision: str, block_size: int = 32) -> dict:
    """Bytes per parameter of each part of an edgevlm bundle at ``precision`` (the pipeline's rules,
    docs/pipeline.md): the decoder at the precision (INT4: 4-bit weights + an FP32 scale per block; INT8: + per
    channel scales, rounded into 1.0), the token embedding FP32, parts reading pixels FP16 or INT8 (INT4 bundles
    keep INT8 vision), parts reading features FP32."""
    decoder = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 4.0 / block_size}[precision]
    pixels = {"fp32": 4.0, "fp16": 2.0}.get(precision, 1.0)
    return {"decoder": decoder, "embed": 4.0, "pixels": pixels, "features": 4.0}


# the fewest bytes a new token must read per decoder weight: the upper bound on decode speed ignores scales
MIN_DECODE_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}


def kv_cache_bytes(facts: ModelFacts, context: int, elem_bytes: int) -> float:
    """layers x 2 (K and V) x KV heads x head dim x context x bytes."""
    return facts.num_layers * 2 * facts.num_kv_heads * facts.head_dim * context * elem_bytes


def activation_bytes(facts: ModelFacts, path: VisionPath, context: int, elem_bytes: int) -> float:
    """The larger of the vision encoder's and the prefill's live tensors (coarse; small next to the weights of
    every zoo model). Prefill over T tokens: the residual stream and a layer's temporaries (12 hidden-wide rows
    per token, or 4 + 3 x intermediate/hidden where the intermediate size is known), one layer's attention scores
    (heads x T^2) and the logits (T x vocab, FP32). Vision: 8 image-sized tensors per view."""
    t = min(context, path.tokens + TEXT_TOKENS + path.prefill_extra)
    heads = max(1, facts.hidden_size // facts.head_dim)
    rows = 4 + 3 * facts.intermediate_size / facts.hidden_size if facts.intermediate_size else 12
    prefill = t * facts.hidden_size * rows * elem_bytes + heads * t * t * elem_bytes + t * facts.vocab_size * 4
    vision = facts.views * 3 * facts.image_size**2 * elem_bytes * 8
    return max(prefill, vision)


def transformer_flops(layers: int, hidden: int, intermediate: int, tokens: int, kv_dim: int | None = None,
                      glu: bool = False) -> float:
    """FLOPs of a transformer stack over ``tokens`` (multiply-add = 2): the four attention projections, the MLP
    (two matrices, three with a gated MLP) and the attention products (QK^T and AV)."""
    kv = hidden if kv_dim is None else kv_dim
    proj = 2 * hidden * hidden + 2 * hidden * kv
    mlp = (3 if glu else 2) * hidden * intermediate
    return float(layers * (2 * tokens * (proj + mlp) + 4 * tokens * tokens * hidden))


@dataclass(frozen=True)
class Estimate:
    """One configuration's memory estimate and speed bounds on one device (``None`` where a figure needs a device
    or FLOPs that are not known)."""

    model: str
    precision: str
    vision_tokens: int
    context: int
    runtime: str
    weights_bytes: float
    kv_bytes: float
    activation_bytes: float
    overhead_bytes: float
    device: str | None = None
    usable_bytes: float | None = None
    decode_tok_s: float | None = None              # upper bound at the first new token after image + prompt
    decode_tok_s_at_context: float | None = None   # upper bound at the last token of the context
    vision_ms: float | None = None                 # lower bound for one image
    vision_flops: float | None = None

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.total_bytes <= self.usable_bytes

    def gib(self, v: float | None = None) -> float:
        return round((self.total_bytes if v is None else v) / GIB, 3)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, memory_gib=self.gib())
        return d


def _pick_path(facts: ModelFacts, vision_tokens: int | None) -> VisionPath:
    if vision_tokens is None:
        return facts.paths[0]
    for p in facts.paths:
        if p.tokens == vision_tokens:
            return p
    raise ConfigError(f"{facts.name} has no path with {vision_tokens} vision tokens",
                      f"choose one of: {', '.join(str(p.tokens) for p in facts.paths)}")


def estimate(facts: ModelFacts, precision: str | None = None, device: DeviceProfile | None = None,
             runtime: str = "tensorrt", context: int | None = None, vision_tokens: int | None = None,
             block_size: int = 32) -> Estimate:
    """Memory, decode-speed upper bound and vision-latency lower bound of ``facts`` at ``precision`` with
    ``vision_tokens`` (a path of the model) and ``context`` (default: the model's maximum) on ``device``."""
    precision = precision or facts.precision or "fp16"
    if facts.file_bytes is not None and precision != facts.precision:
        raise ConfigError(f"a {facts.precision} bundle has no {precision} estimate",
                          "estimate the zoo model instead (`edgevlm plan --model NAME`)")
    rt = get_runtime(runtime)
    ctx = int(context or facts.max_context)
    path = _pick_path(facts, vision_tokens)
    if facts.file_bytes is not None:
        sizes = dict(facts.file_bytes)
    else:
        per = weight_bytes_per_param(precision, block_size)
        sizes = {k: facts.params.get(k, 0) * per[k] for k in per}
    weights = sum(sizes.values()) * rt.weight_factor
    overhead = rt.overhead_mib * MIB
    if rt.name == "onnxruntime-cpu" and facts.matmulnbits_decoder:
        overhead += Q4_KERNEL_MIB * MIB + sizes["decoder"]
    kv = kv_cache_bytes(facts, ctx, rt.kv_bytes)
    act = activation_bytes(facts, path, ctx, rt.act_bytes)
    est = dict(model=facts.name, precision=precision, vision_tokens=path.tokens, context=ctx, runtime=rt.name,
               weights_bytes=weights, kv_bytes=kv, activation_bytes=act, overhead_bytes=overhead,
               vision_flops=path.flops)
    if device is not None:
        if facts.file_bytes is not None:
            per_token = facts.file_bytes["decoder"]          # every decoder weight is read once per new token
        else:
            per_token = facts.params["decoder"] * MIN_DECODE_BYTES[precision]
        first = min(ctx, path.tokens + TEXT_TOKENS)
        bw = device.memory_bandwidth_gbs * 1e9
        est.update(device=device.name, usable_bytes=device.usable_bytes,
                   decode_tok_s=bw / (per_token + kv_cache_bytes(facts, first, rt.kv_bytes)),
                   decode_tok_s_at_context=bw / (per_token + kv_cache_bytes(facts, ctx, rt.kv_bytes)))
        if path.flops:
            est["vision_ms"] = 1000 * path.flops / device.peak_ops(precision)
    return Estimate(**est)


def decode_upper_bound(bandwidth_gbs: float, bytes_per_token: float) -> float:
    """Tokens/s no decoder can beat at batch 1: every weight (and the KV cache so far) crosses the memory bus once
    per token."""
    return bandwidth_gbs * 1e9 / bytes_per_token


# -- fit ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fit:
    ok: bool
    estimate: Estimate
    message: str            # one line: why it fits, or the refusal with what would fit instead
    fix: str | None = None


def _fmt(e: Estimate) -> str:
    return f"{e.gib():.2f} GiB"


def _alternatives(facts: ModelFacts, precision: str, device: DeviceProfile, runtime: str, context: int,
                  vision_tokens: int, allowed: tuple[str, ...]) -> list[tuple[str, Estimate]]:
    """What would fit instead, most like the request first: a lower precision, fewer vision tokens (families with
    token compression), a shorter context; then their combinations with INT4."""
    out: list[tuple[str, Estimate]] = []
    lower = [p for p in PRECISIONS[PRECISIONS.index(precision) + 1 if precision in PRECISIONS else 0:] if p in allowed]
    for p in lower:
        out.append((f"--quant {p}", estimate(facts, p, device, runtime, context, vision_tokens)))
    fewer = sorted((p for p in facts.paths if p.tokens < vision_tokens), key=lambda p: -p.tokens)
    shorter = [c for c in sorted({*PLAN_CONTEXTS, 1024, 4096}, reverse=True) if c < context]
    for q in [precision] + lower[-1:]:
        flag = "" if q == precision else f" with --quant {q}"
        for p in fewer:
            out.append((f"{p.tokens} vision tokens (token compression){flag}",
                        estimate(facts, q, device, runtime, context, p.tokens)))
        for c in shorter:
            out.append((f"--context {c}{flag}", estimate(facts, q, device, runtime, c, vision_tokens)))
    return [(what, e) for what, e in out if e.fits]


def fit(facts: ModelFacts, precision: str, device: DeviceProfile, runtime: str = "tensorrt",
        context: int | None = None, vision_tokens: int | None = None,
        allowed: tuple[str, ...] = PRECISIONS, block_size: int = 32) -> Fit:
    """Whether ``facts`` at ``precision`` fits ``device``'s usable memory; a refusal names what would fit instead
    (``allowed``: the precisions the target takes), or the smallest device it fits."""
    ctx = int(context or facts.max_context)
    e = estimate(facts, precision, device, runtime, ctx, vision_tokens, block_size)
    parts = (f"weights {e.gib(e.weights_bytes):.2f} + KV cache {e.gib(e.kv_bytes):.2f} + activations "
             f"{e.gib(e.activation_bytes):.2f} + {e.runtime} {e.gib(e.overhead_bytes):.2f} GiB")
    what = f"{facts.name} at {precision}, {e.vision_tokens} vision tokens, context {ctx}"
    if e.fits:
        return Fit(True, e, f"{what} fits {device.name}: {_fmt(e)} of {device.usable_memory_gib} GiB usable ({parts})")
    problem = f"{what} needs {_fmt(e)} on {device.name}, which has {device.usable_memory_gib} GiB usable ({parts})"
    alts = _alternatives(facts, precision, device, runtime, ctx, e.vision_tokens, allowed)
    if alts:
        fix = "it fits with " + " or ".join(f"{w} ({_fmt(a)})" for w, a in alts[:3])
    else:
        bigger = [d for d in list_devices() if estimate(facts, precision, d, runtime, ctx, vision_tokens).fits]
        fix = (f"no lower precision, token count or context fits {device.name}; at {precision} it fits "
               f"--device {bigger[0].name}" if bigger else "no Jetson profile fits it; choose a smaller model")
    return Fit(False, e, problem, fix)


def check_fit(facts: ModelFacts, precision: str, device: DeviceProfile, runtime: str = "tensorrt",
              allowed: tuple[str, ...] = PRECISIONS, block_size: int = 32, context: int | None = None) -> Fit:
    """:func:`fit`, raising a one-line :class:`ConfigError` (the problem and what would fit) when it does not."""
    f = fit(facts, precision, device, runtime, context=context, allowed=allowed, block_size=block_size)
    if not f.ok:
        raise ConfigError(f.message, f.fix)
    return f


def device_block(f: Fit, device: DeviceProfile) -> dict:
    """The bundle manifest's ``device`` block: the device, the estimate and the predictions, with their basis."""
    e = f.estimate
    return {"name": device.name, "description": device.description, "usable_memory_gib": device.usable_memory_gib,
            "memory_bandwidth_gbs": device.memory_bandwidth_gbs, "jetpack": device.jetpack,
            "tensorrt": device.tensorrt, "cuda": device.cuda, "fits": bool(f.ok),
            "estimate": {"runtime": e.runtime, "context": e.context, "vision_tokens": e.vision_tokens,
                         "weights_bytes": int(e.weights_bytes), "kv_cache_bytes": int(e.kv_bytes),
                         "activation_bytes": int(e.activation_bytes), "overhead_bytes": int(e.overhead_bytes),
                         "total_bytes": int(e.total_bytes)},
            "predicted": {"decode_tokens_per_s_max": _round(e.decode_tok_s),
                          "decode_tokens_per_s_max_at_context": _round(e.decode_tok_s_at_context),
                          "vision_encoder_ms_min": _round(e.vision_ms)},
            "vision_flops": int(e.vision_flops) if e.vision_flops else None,
            "basis": "docs/devices.md: decode <= bandwidth / bytes per token; vision >= FLOPs / peak tensor ops"}


def _round(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(f"{float(v):.4g}")    # 4 significant digits


# -- the plan table ------------------------------------------------------------------------------------------------
def plan(facts: ModelFacts, device: DeviceProfile, runtime: str = "tensorrt",
         precisions: tuple[str, ...] = PRECISIONS) -> list[dict]:
    """Every precision x vision-token path x context (512, 2048, the model's maximum) with fit, memory and bounds."""
    contexts = sorted({c for c in PLAN_CONTEXTS if c < facts.max_context} | {facts.max_context})
    rows = []
    for p in precisions:
        for path in facts.paths:
            for c in contexts:
                e = estimate(facts, p, device, runtime, c, path.tokens)
                rows.append({"precision": p, "vision tokens": path.tokens, "path": path.label, "context": c,
                             "fits": "yes" if e.fits else "no", "memory (GiB)": round(e.total_bytes / GIB, 2),
                             "decode tok/s <=": _round(e.decode_tok_s), "vision ms >=": _round(e.vision_ms),
                             "estimate": e.to_dict()})
    return rows
