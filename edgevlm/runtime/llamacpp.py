"""A GGUF language model run by llama.cpp (llama-cpp-python's C API), fed embeddings instead of tokens.

The VLM runtime splices image embeddings and text-token embeddings into ``inputs_embeds`` (S, D) and
hands them to :meth:`LlamaCppDecoder.prefill` (one llama.cpp embedding batch, ``batch.embd``); then
every new token goes through :meth:`LlamaCppDecoder.step`. No torch here.

Moondream's bidirectional image prefix: the first ``prefix`` positions are decoded as one batch with
``llama_set_causal_attn(ctx, False)`` (they see each other both ways), the rest with causal attention,
which is the eager model's 4D prefill mask.

llama.cpp logs through one process-wide callback; :data:`LOG` collects its lines (nothing is printed
unless ``EDGEVLM_LLAMA_LOG=1``), so tests and ``edgevlm`` can show or assert on its warnings.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, BundleError, ConfigError
from .gguf_header import read_gguf_header
from .memory import usable_bytes

# ggml_log_level (ggml/include/ggml.h)
LEVELS = {0: "NONE", 1: "DEBUG", 2: "INFO", 3: "WARN", 4: "ERROR"}
_CONT = 5
_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}          # ggml_type numbers for the KV cache
_FIX_REBUILD = "rebuild the bundle (edgevlm export ...) or download it again"


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise BackendUnavailableError("llama-cpp-python is not installed (the llama.cpp decoder of this bundle)",
                                      "pip install 'edgevlm[gguf]', or use the bundle's ONNX decoder") from None
    return llama_cpp


class LlamaLog:
    """Collects llama.cpp's (and ggml's) log lines: ``(level, text)`` with level DEBUG/INFO/WARN/ERROR."""

    def __init__(self, keep: int = 4000):
        self.lines: deque[tuple[str, str]] = deque(maxlen=keep)
        self._captures: list[list] = []
        self._buf, self._level = "", "INFO"
        self._cb = None
        self._lock = threading.Lock()
        self.echo = os.environ.get("EDGEVLM_LLAMA_LOG", "") not in ("", "0")

    def install(self) -> None:
        """Route llama.cpp's logging here (replacing llama-cpp-python's printer); idempotent."""
        if self._cb is not None:
            return
        llama_cpp = _llama_cpp()

        def on_log(level, text, _user):
            try:
                self._on(int(level), text.decode("utf-8", "replace") if text else "")
            except Exception:        # never let an exception cross the C boundary
                pass

        self._cb = llama_cpp.llama_log_callback(on_log)   # keep a reference: ctypes frees unreferenced callbacks
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))

    def _on(self, level: int, text: str) -> None:
        with self._lock:
            if level != _CONT:
                if self._buf:
                    self._emit()
                self._level = LEVELS.get(level, "INFO")
            self._buf += text
            if self._buf.endswith("\n"):
                self._emit()

    def _emit(self) -> None:
        line, self._buf = self._buf.rstrip("\n"), ""
        item = (self._level, line)
        self.lines.append(item)
        for c in self._captures:
            c.append(item)
        if self.echo:
            print(f"[llama.cpp {item[0]}] {line}", file=sys.stderr)

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                self._emit()

    @contextmanager
    def capture(self):
        """``with LOG.capture() as lines:`` — the lines logged inside the block."""
        self.install()
        got: list[tuple[str, str]] = []
        self._captures.append(got)
        try:
            yield got
        finally:
            self.flush()
            self._captures.remove(got)

    @staticmethod
    def warnings(lines) -> list[str]:
        return [t for lv, t in lines if lv in ("WARN", "ERROR")]

    @staticmethod
    def last_error(lines) -> str | None:
        errs = [t.strip() for lv, t in lines if lv == "ERROR" and t.strip()]
        return errs[-1] if errs else None


LOG = LlamaLog()
_backend_ready = False


def _backend(llama_cpp) -> None:
    global _backend_ready
    if not _backend_ready:
        LOG.install()
        llama_cpp.llama_backend_init()
        _backend_ready = True


# llama.cpp's AMX weight buffers crash here: SIGSEGV at ``ldtilecfg`` in ``ggml_backend_amx_mul_mat`` on the
# first matmul (llama-cpp-python 0.3.36 built natively on a Sapphire-Rapids-class VM; AMX itself works there,
# a plain C ``_tile_loadconfig`` runs). Upstream: ggml-org/llama.cpp issue 20824, PR 26954 (the tile config is
# built on the stack and optimised away). The other extra buffer type, CPU_REPACK (weights interleaved for the
# SIMD kernels), is safe and fast, but llama.cpp offers extra buffers only all together.
_BROKEN_BUFTS = ("AMX",)
REPACK_ENV = "EDGEVLM_LLAMA_REPACK"


def cpu_extra_buffer_types() -> list[str] | None:
    """Names of the extra weight-buffer types llama.cpp's CPU backend offers on this machine, in the order it
    tries them (e.g. ``['AMX', 'CPU_REPACK']``); None when the ggml libraries cannot be asked."""
    llama_cpp = _llama_cpp()
    _backend(llama_cpp)
    libdir = Path(llama_cpp.__file__).parent / "lib"
    suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
    try:
        ggml = ctypes.CDLL(str(libdir / f"libggml{suffix}"))
        base = ctypes.CDLL(str(libdir / f"libggml-base{suffix}"))
        ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
        ggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
        base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        base.ggml_backend_buft_name.restype = ctypes.c_char_p
        base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    dev = ggml.ggml_backend_dev_by_type(0)              # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = ggml.ggml_backend_dev_backend_reg(dev) if dev else None
    fn = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not fn:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
    names, i = [], 0
    while bufts and bufts[i]:
        names.append(base.ggml_backend_buft_name(bufts[i]).decode("utf-8", "replace"))
        i += 1
    return names


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def extra_buffers_choice() -> tuple[bool, str]:
    """Whether llama.cpp may put weights into its extra (repacked) CPU buffers here, and why.

    On unless the CPU backend would use a buffer type known to crash (AMX, see :data:`_BROKEN_BUFTS`); when the
    buffer types cannot be listed, off on CPUs with AMX. ``EDGEVLM_LLAMA_REPACK=1`` / ``=0`` decides instead.
    """
    env = os.environ.get(REPACK_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1", f"{REPACK_ENV}={env}"
    if env:
        raise ConfigError(f"{REPACK_ENV}={env!r} is not 0 or 1", f"unset {REPACK_ENV}, or set it to 0 or 1")
    names = cpu_extra_buffer_types()
    if names is None:
        if _cpu_has_amx():
            return False, "extra buffer types unknown and the CPU has AMX (llama.cpp's AMX buffers crash)"
        return True, "extra buffer types unknown; no AMX"
    broken = [n for n in names if n in _BROKEN_BUFTS]
    if broken:
        return False, (f"llama.cpp offers {', '.join(names)}; its {', '.join(broken)} weight buffers crash "
                       "(llama.cpp issue 20824), so plain CPU buffers are used; a llama-cpp-python built without "
                       "AMX keeps the repacked kernels (docs/vlm-bundles.md)")
    return True, f"llama.cpp offers {', '.join(names) or 'no extra buffer types'}"


_KV_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}     # bytes per cached element (Q8_0: 32 int8 + 1 f16 scale)


def _meta_int(meta: dict, key: str, default: int) -> int:
    """An integer hyper-parameter; a per-layer array (``{"values": [...]}``) gives its largest value."""
    v = meta.get(key, default)
    if isinstance(v, dict):
        return max(v.get("values") or [default])
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else default


def kv_cache_bytes(header: dict, n_ctx: int, kv_cache: str = "f16") -> int:
    """Bytes llama.cpp's KV cache takes for ``n_ctx`` positions of the model whose checked GGUF header this is
    (keys and values of every layer), before it allocates them."""
    meta = header["metadata"]
    arch = meta.get("general.architecture", "")
    layers = _meta_int(meta, f"{arch}.block_count", 1)
    heads = _meta_int(meta, f"{arch}.attention.head_count", 1)
    kv_heads = _meta_int(meta, f"{arch}.attention.head_count_kv", heads)
    width = _meta_int(meta, f"{arch}.embedding_length", 1)
    k = _meta_int(meta, f"{arch}.attention.key_length", max(1, width // max(1, heads)))
    v = _meta_int(meta, f"{arch}.attention.value_length", k)
    return int(n_ctx * layers * kv_heads * (k + v) * _KV_BYTES[kv_cache])


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def check_context(header: dict, n_ctx: int, kv_cache: str, name: str, available: int | None = None) -> None:
    """Refuse, before llama.cpp allocates anything, a context longer than the GGUF was exported for or a KV
    cache larger than the memory this process can still take (:func:`edgevlm.runtime.memory.usable_bytes`). A
    bundle's manifest is untrusted input: a context of 2**31 positions made llama.cpp reserve 8 GB before it
    failed (found by fuzz/fuzz_bundle.py)."""
    meta = header["metadata"]
    trained = meta.get(f"{meta.get('general.architecture', '')}.context_length")
    if isinstance(trained, int) and not isinstance(trained, bool) and n_ctx > trained:
        raise ConfigError(f"a context of {n_ctx:,} positions is longer than the {trained:,} that {name} was "
                          "exported for", f"use at most {trained:,} positions (a bundle's generation.context_length "
                          "must match its GGUF decoder; export it again if they differ)")
    need = kv_cache_bytes(header, n_ctx, kv_cache)
    free = usable_bytes() if available is None else available
    if free is not None and need > free:
        raise ConfigError(f"a KV cache of {n_ctx:,} positions for {name} needs {_size(need)}, more than the "
                          f"{_size(free)} of memory free", "use a smaller context (n_ctx), a smaller "
                          "KV cache type (f16 or q8_0), or free memory")


GPU_LAYERS_ENV = "EDGEVLM_GPU_LAYERS"
# How to get a llama-cpp-python that offloads to an NVIDIA GPU (llama-cpp-python's README: CMAKE_ARGS selects
# the ggml backend at build time; on JetPack, nvcc is /usr/local/cuda/bin/nvcc).
CUDA_BUILD = ('CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir --no-binary '
              'llama-cpp-python llama-cpp-python')


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python was built with a GPU backend (CUDA, Metal, Vulkan, ...)."""
    return bool(_llama_cpp().llama_supports_gpu_offload())


def gpu_layers_choice(requested: int | None, supported: bool) -> tuple[int, str]:
    """(``n_gpu_layers`` for llama.cpp, why). ``requested``: None = every layer where this llama-cpp-python
    can offload (else none), 0 = none, N = the first N layers, -1 = all; ``EDGEVLM_GPU_LAYERS`` sets it when
    the caller does not. Asking for layers on a build without a GPU backend is an error, not a silent CPU run."""
    how = "requested"
    if requested is None:
        env = os.environ.get(GPU_LAYERS_ENV, "").strip()
        if env:
            try:
                requested = int(env)
            except ValueError:
                raise ConfigError(f"{GPU_LAYERS_ENV}={env!r} is not an integer",
                                  f"unset {GPU_LAYERS_ENV}, or set it to -1 (all layers), 0 (CPU) or a count") from None
            how = GPU_LAYERS_ENV
    if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < -1):
        raise ConfigError(f"GPU layers must be -1 (all), 0 (CPU) or a positive count, got {requested!r}",
                          "pass --gpu-layers -1, 0 or N")
    if requested == 0:
        return 0, f"CPU ({how}: 0 GPU layers)"
    if not supported:
        if requested is not None:
            raise ConfigError(f"{requested if requested > 0 else 'all'} GPU layers {how}, but this llama-cpp-python "
                              "was built without a GPU backend", f"rebuild it with CUDA: {CUDA_BUILD}; or use 0 "
                              "GPU layers")
        return 0, "CPU: this llama-cpp-python was built without a GPU backend"
    if requested is None or requested == -1:
        return -1, "every layer on the GPU" + ("" if requested is None else f" ({how})")
    return requested, f"{requested} layers on the GPU ({how})"


def _default_threads() -> int:
    from .backends import usable_cpus

    return usable_cpus()


class LlamaCppDecoder:
    """A GGUF decoder with a KV cache: ``prefill(embeds) -> logits``, then ``step(token) -> logits``.

    ``n_ctx``: positions the KV cache holds (prompt + image + generated). ``kv_cache``: ``f16`` (llama.cpp's
    default, half the memory) or ``f32`` (bit-closer to eager). ``flash_attn``: None = llama.cpp's choice
    (``auto``: on for CPU), except with an F32 KV cache, where it is off: llama.cpp's CPU flash attention
    works in F16 internally (logits ~1e-3 off eager; without it ~1e-5). ``n_batch``: the most positions one
    llama.cpp batch takes (default ``min(n_ctx, 2048)``); a bidirectional prefix must fit in one.
    ``gpu_layers``: layers offloaded to the GPU (:func:`gpu_layers_choice`; default: all of them where this
    llama-cpp-python has a GPU backend, as on a Jetson built with CUDA); ``offloaded`` is llama.cpp's own count.

    Weights go into llama.cpp's repacked CPU buffers where that is safe (:func:`extra_buffers_choice`);
    ``weight_buffers`` maps each buffer type llama.cpp used to its MiB (e.g. ``{'CPU_REPACK': 236.2, 'CPU': 51.0}``).
    """

    name = "llama.cpp"

    def __init__(self, path, n_ctx: int, n_threads: int | None = None, *, kv_cache: str = "f16",
                 n_batch: int | None = None, flash_attn: bool | None = None, gpu_layers: int | None = None):
        self._ctx = self._model = None
        self._tok_batch = None
        llama_cpp = self._ll = _llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"GGUF decoder {path} is missing", _FIX_REBUILD)
        # the whole header, checked in Python before llama.cpp's native parser reads the file (untrusted input)
        self.header = read_gguf_header(path)
        if kv_cache not in _KV_TYPES:
            raise ConfigError(f"unknown KV cache type {kv_cache!r}", f"use one of: {', '.join(_KV_TYPES)}")
        if int(n_ctx) < 1:
            raise ConfigError(f"n_ctx must be positive, got {n_ctx}", "pass the bundle's context_length")
        check_context(self.header, int(n_ctx), kv_cache, path.name)
        _backend(llama_cpp)
        self.path, self.n_ctx = path, int(n_ctx)
        self.n_threads = int(n_threads or _default_threads())
        self.n_batch = int(n_batch or min(self.n_ctx, 2048))

        self.extra_buffers, self.extra_buffers_why = extra_buffers_choice()
        self.gpu_layers, self.gpu_layers_why = gpu_layers_choice(gpu_layers,
                                                                 bool(llama_cpp.llama_supports_gpu_offload()))
        with LOG.capture() as lines:
            mp = llama_cpp.llama_model_default_params()
            mp.n_gpu_layers = self.gpu_layers
            mp.use_extra_bufts = self.extra_buffers
            self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
            if self._model:
                cp = llama_cpp.llama_context_default_params()
                cp.n_ctx = self.n_ctx
                cp.n_batch = cp.n_ubatch = self.n_batch
                cp.n_seq_max = 1
                cp.n_threads = cp.n_threads_batch = self.n_threads
                cp.type_k = cp.type_v = _KV_TYPES[kv_cache]
                if flash_attn is None:
                    flash_attn = None if kv_cache != "f32" else False
                if flash_attn is not None:      # llama_flash_attn_type: -1 auto, 0 disabled, 1 enabled
                    cp.flash_attn_type = 1 if flash_attn else 0
                cp.embeddings = False
                cp.no_perf = True
                self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        self.load_log = lines
        # "load_tensors:   CPU_REPACK model buffer size =   123.45 MiB": where llama.cpp put the weights
        self.weight_buffers = {m.group(1): float(m.group(2)) for _, t in lines
                               for m in [re.search(r"(\S+) model buffer size\s*=\s*([0-9.]+) MiB", t)] if m}
        # "load_tensors: offloaded 25/25 layers to GPU": what llama.cpp actually put on the GPU
        found = [m for _, t in lines for m in [re.search(r"offloaded (\d+)/(\d+) layers to GPU", t)] if m]
        self.offloaded = (int(found[-1].group(1)), int(found[-1].group(2))) if found else None
        if not self._model:
            why = LOG.last_error(lines) or "unknown reason"
            raise BundleError(f"llama.cpp could not load {path.name}: {why}", _FIX_REBUILD)
        if not self._ctx:
            why = LOG.last_error(lines) or "unknown reason"
            self.close()
            raise ConfigError(f"llama.cpp could not create a context of {self.n_ctx} positions for {path.name}: "
                              f"{why}", "use a smaller context (n_ctx) or free memory")
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._tok_batch = llama_cpp.llama_batch_init(1, 0, 1)
        self.n_past = 0

    # -- properties -------------------------------------------------------------------------------
    @property
    def warnings(self) -> list[str]:
        """llama.cpp's WARN/ERROR lines from loading this model and creating its context."""
        return LOG.warnings(self.load_log)

    def _require_open(self):
        if self._ctx is None:
            raise ConfigError("this llama.cpp decoder is closed", "open the bundle again")

    # -- decoding ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the KV cache (a new prompt starts at position 0)."""
        self._require_open()
        self._ll.llama_memory_clear(self._mem, True)
        self._ll.llama_set_causal_attn(self._ctx, True)
        self.n_past = 0

    def _room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise ConfigError(f"the sequence needs {self.n_past + n} positions, the llama.cpp context holds "
                              f"{self.n_ctx}", "shorten the prompt or lower max_new_tokens, or build the bundle "
                              "with a larger context")

    def _decode(self, batch, n: int, what: str) -> None:
        with LOG.capture() as lines:
            rc = self._ll.llama_decode(self._ctx, batch)
        if rc == 1:
            raise ConfigError(f"llama.cpp found no room in its KV cache for {what} ({n} positions after "
                              f"{self.n_past})", "shorten the prompt or lower max_new_tokens")
        if rc != 0:
            why = LOG.last_error(lines) or f"llama_decode returned {rc}"
            raise BundleError(f"llama.cpp failed on {what}: {why}", _FIX_REBUILD)

    def _logits(self) -> np.ndarray:
        ptr = self._ll.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise BundleError("llama.cpp returned no logits", _FIX_REBUILD)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _embd_chunk(self, embeds: np.ndarray, want_logits: bool, what: str) -> None:
        ll, n = self._ll, int(embeds.shape[0])
        batch = ll.llama_batch_init(n, self.n_embd, 1)
        try:
            batch.n_tokens = n
            ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
            pos = np.arange(self.n_past, self.n_past + n, dtype=np.int32)
            ctypes.memmove(batch.pos, pos.ctypes.data, pos.nbytes)
            ones = np.ones(n, np.int32)         # a named array: a temporary could be freed before memmove reads it
            ctypes.memmove(batch.n_seq_id, ones.ctypes.data, ones.nbytes)
            out = np.zeros(n, np.int8)
            out[-1] = 1 if want_logits else 0
            ctypes.memmove(batch.logits, out.ctypes.data, n)
            for i in range(n):
                batch.seq_id[i][0] = 0
            self._decode(batch, n, what)
        finally:
            ll.llama_batch_free(batch)
        self.n_past += n

    def prefill(self, embeds: np.ndarray, prefix: int = 0) -> np.ndarray:
        """Decode ``embeds`` (S, D) after what the cache holds; the logits (V,) of the last position.

        ``prefix`` > 1: the first ``prefix`` rows attend to each other both ways (one non-causal batch).
        """
        self._require_open()
        e = np.asarray(embeds)
        if e.ndim == 3 and e.shape[0] == 1:
            e = e[0]
        if e.ndim != 2 or e.shape[1] != self.n_embd or e.shape[0] == 0:
            raise ConfigError(f"prefill takes embeddings of shape (S, {self.n_embd}), got {tuple(np.shape(embeds))}",
                              "pass the spliced inputs_embeds of this model")
        e = np.ascontiguousarray(e, dtype=np.float32)
        n, prefix = int(e.shape[0]), int(prefix)
        if not np.isfinite(e).all():
            raise ConfigError("the embeddings hold NaN or Inf", "check the vision encoder's output")
        self._room(n)
        start = 0
        if prefix > 1:
            prefix = min(prefix, n)
            if prefix > self.n_batch:
                raise ConfigError(f"the bidirectional prefix has {prefix} positions but one llama.cpp batch takes "
                                  f"{self.n_batch}", f"open the decoder with n_batch >= {prefix}")
            self._ll.llama_set_causal_attn(self._ctx, False)
            try:
                self._embd_chunk(e[:prefix], prefix == n, "the bidirectional image prefix")
            finally:
                self._ll.llama_set_causal_attn(self._ctx, True)
            start = prefix
        while start < n:
            stop = min(n, start + self.n_batch)
            self._embd_chunk(e[start:stop], stop == n, "the prompt")
            start = stop
        return self._logits()

    def step(self, token_id: int) -> np.ndarray:
        """Append one token; its next-token logits (V,)."""
        self._require_open()
        t = int(token_id)
        if not 0 <= t < self.n_vocab:
            raise ConfigError(f"token id {t} is outside the vocabulary (0..{self.n_vocab - 1})",
                              "use the bundle's own tokenizer")
        self._room(1)
        b = self._tok_batch
        b.n_tokens = 1
        b.token[0] = t
        b.pos[0] = self.n_past
        b.n_seq_id[0] = 1
        b.seq_id[0][0] = 0
        b.logits[0] = 1
        self._decode(b, 1, f"token {t}")
        self.n_past += 1
        return self._logits()

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization of ``text`` with the GGUF's tokenizer (to check it against the source)."""
        self._require_open()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._ll.llama_token * cap)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self._ll.llama_token * cap)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        ll = getattr(self, "_ll", None)
        if ll is None:
            return
        if self._tok_batch is not None:
            ll.llama_batch_free(self._tok_batch)
            self._tok_batch = None
        if self._ctx:
            ll.llama_free(self._ctx)
        if self._model:
            ll.llama_model_free(self._model)
        self._ctx = self._model = None

    def __enter__(self) -> "LlamaCppDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
