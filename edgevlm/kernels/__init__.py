"""edgevlm's own CPU kernels, loaded into ONNX Runtime as custom ops.

``MatMulQ4`` (q4_matmul.c) runs a 4-bit decoder's matrix products: one row at a time for decode steps, and a
register-tiled int8 path over unpacked weight panels for prompts (many rows). It reads the
weights of ONNX Runtime's ``MatMulNBits`` (bits 4, blocks of 32, 64, 128, ..., symmetric) as they are and streams them with
AVX-512 VNNI (AVX2 on CPUs without it), where ONNX Runtime's kernel is compute-bound on small CPUs (see
docs/vlm-bundles.md, "Decode kernels").

The library is built once per machine with ``edgevlm kernels build``: a C compiler, and ONNX Runtime's C API
header, which the ``onnxruntime`` wheel does not ship: it is taken from ``$EDGEVLM_ORT_INCLUDE``, a system
install (/usr/include/onnxruntime), or Debian's ``libonnxruntime-dev`` package (downloaded once, checked
against its SHA-256). A session built against that header runs in any newer ONNX Runtime (the C API only
grows). Nothing is built or downloaded at run time: without the library, bundles run ONNX Runtime's kernels.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from pathlib import Path

SOURCE = Path(__file__).with_name("q4_matmul.c")
DOMAIN, OP = "ai.edgevlm", "MatMulQ4"
ATTN_OP = "DecodeAttention"          # one decode step's GroupQueryAttention (q4_matmul.c)
LIBRARY = "libedgevlm_kernels.so"
# AVX2 + FMA as the baseline; the AVX-512 VNNI path is compiled for its own target inside q4_matmul.c
FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-Wall", "-mavx2", "-mfma", "-mf16c"]
# Debian trixie's ONNX Runtime 1.21 headers (C API version 21); only the headers are used.
ORT_HEADERS_DEB = ("https://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
                   "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
SYSTEM_HEADERS = (Path("/usr/include/onnxruntime"), Path("/usr/local/include/onnxruntime"))


def cache_dir() -> Path:
    root = os.environ.get("EDGEVLM_CACHE") or Path.home() / ".cache" / "edgevlm"
    return Path(root) / "kernels"


def _build_key(compiler: str) -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join([compiler, *FLAGS]).encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    """Where ``edgevlm kernels build`` puts the library for this source (a new source builds anew)."""
    return cache_dir() / _build_key(_compiler() or "cc") / LIBRARY


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _unpack_deb(blob: bytes, member_prefix: str, dst: Path) -> None:
    """Extract ``member_prefix`` from a .deb (an ar archive holding data.tar.*) with the standard library."""
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos:pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                members = [m for m in tar.getmembers() if m.name.lstrip("./").startswith(member_prefix)
                           and (m.isfile() or m.isdir())]
                tar.extractall(dst, members=members, filter="data")
            return
    raise ValueError("the package holds no data.tar")


def header_dir(download: bool = True, log=print) -> Path:
    """A directory holding onnxruntime_c_api.h (see the module's docstring for where it comes from)."""
    env = os.environ.get("EDGEVLM_ORT_INCLUDE")
    if env:
        if not (Path(env) / "onnxruntime_c_api.h").is_file():
            from ..errors import ConfigError

            raise ConfigError(f"EDGEVLM_ORT_INCLUDE={env} holds no onnxruntime_c_api.h",
                              "point it at ONNX Runtime's include directory, or unset it")
        return Path(env)
    for d in SYSTEM_HEADERS:
        if (d / "onnxruntime_c_api.h").is_file():
            return d
    cached = cache_dir() / "ort-headers-1.21" / "usr" / "include" / "onnxruntime"
    if (cached / "onnxruntime_c_api.h").is_file():
        return cached
    from ..errors import ConfigError

    url, sha = ORT_HEADERS_DEB
    if not download:
        raise ConfigError("ONNX Runtime's C API header is not on this machine",
                          "run `edgevlm kernels build` (it downloads Debian's libonnxruntime-dev once) or set "
                          "EDGEVLM_ORT_INCLUDE")
    log(f"downloading ONNX Runtime's C headers (Debian libonnxruntime-dev, 85 kB): {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            blob = r.read()
    except OSError as e:
        raise ConfigError(f"could not download {url}: {e}",
                          "set EDGEVLM_ORT_INCLUDE to a directory holding onnxruntime_c_api.h (ONNX Runtime's "
                          "include/ directory, version 1.16 or newer)") from e
    if hashlib.sha256(blob).hexdigest() != sha:
        raise ConfigError(f"{url} does not have the expected SHA-256 {sha}",
                          "set EDGEVLM_ORT_INCLUDE to ONNX Runtime's include directory instead")
    tmp = cache_dir() / f".ort-headers-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _unpack_deb(blob, "usr/include/onnxruntime", tmp)
    try:
        tmp.rename(cached.parents[2])
    except OSError:                      # another process unpacked them first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cached / "onnxruntime_c_api.h").is_file():
            raise
    return cached


def build(force: bool = False, log=print) -> Path:
    """Compile q4_matmul.c into the cache (once per source and compiler) and return the library's path."""
    from ..errors import ConfigError

    cc = _compiler()
    if cc is None:
        raise ConfigError("no C compiler found (cc, gcc or clang)", "install one (Debian: apt install gcc), or set CC")
    out = library_path()
    if out.is_file() and out.with_suffix(".api").is_file() and not force:
        log(f"already built: {out}")
        return out
    inc = header_dir(log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{LIBRARY}.{os.getpid()}")
    cmd = [cc, *FLAGS, "-I", str(inc), str(SOURCE), "-o", str(tmp), "-lm"]
    log("+ " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"compiling {SOURCE.name} failed:\n{r.stderr.strip()[-2000:]}",
                          "a compiler that knows AVX-512 VNNI is needed (gcc >= 8 or clang >= 7)")
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", (inc / "onnxruntime_c_api.h").read_text(errors="replace"))
    out.with_suffix(".api").write_text(m.group(1) if m else "0")
    tmp.replace(out)
    log(f"built {out}")
    return out


def _api_version(lib: Path) -> int:
    """The C API version of the header ``lib`` was built with (ONNX Runtime 1.N has API N)."""
    try:
        return int(lib.with_suffix(".api").read_text().strip())
    except (OSError, ValueError):
        return 10**6


def status() -> tuple[Path | None, str | None]:
    """(library to register, None) when the kernels can run here, else (None, why not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    path = library_path()
    if not path.is_file():
        return None, "not built on this machine (run `edgevlm kernels build`)"
    api = _api_version(path)
    have = tuple(int(x) for x in ort.__version__.split(".")[:2] if x.isdigit())
    if have < (1, api):
        return None, f"built against ONNX Runtime's C API {api}: needs onnxruntime >= 1.{api}, this is {ort.__version__}"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"{path} does not load: {e}"
    if not lib.edgevlm_q4_isa():
        return None, "this CPU lacks AVX2 and FMA (the kernel's instructions)"
    return path, None


def isa() -> str | None:
    """Which of the kernel's code paths this CPU runs ("avx512-vnni" or "avx2"), None when it cannot run."""
    path, _ = status()
    if path is None:
        return None
    return {2: "avx512-vnni", 1: "avx2"}.get(ctypes.CDLL(str(path)).edgevlm_q4_isa())


def _call(many: bool, a, b, scales, k: int, n: int, block: int, bias=None):
    """Run the library's test entry (``edgevlm_q4_gemm`` when ``many`` else ``edgevlm_q4_gemv``) on numpy arrays."""
    import numpy as np

    path, why = status()
    if path is None:
        raise RuntimeError(why)
    lib = ctypes.CDLL(str(path))
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.uint8)
    scales = np.ascontiguousarray(scales, np.float32)
    bias = None if bias is None else np.ascontiguousarray(bias, np.float32).reshape(n)
    y = np.empty((a.shape[0], n) if many else n, np.float32)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    ptrs = (a.ctypes.data, b.ctypes.data, scales.ctypes.data, None if bias is None else bias.ctypes.data,
            y.ctypes.data)
    if not many:
        lib.edgevlm_q4_gemv.argtypes = [p, p, p, p, p, i64, i64, i64]
        lib.edgevlm_q4_gemv(*ptrs, k, n, block)
        return y
    lib.edgevlm_q4_gemm.argtypes = [p, p, p, p, p, i64, i64, i64, i64]
    lib.edgevlm_q4_gemm.restype = ctypes.c_int
    if lib.edgevlm_q4_gemm(*ptrs, a.shape[0], k, n, block):
        raise MemoryError("edgevlm_q4_gemm: out of memory")
    return y


def gemv(a, b, scales, k: int, n: int, block: int = 32, bias=None):
    """The kernel on one activation row (for tests): a (K,) float32, b/scales as MatMulNBits holds them, an
    optional bias (N,) -> (N,)."""
    return _call(False, a, b, scales, k, n, block, bias)


def gemm(a, b, scales, k: int, n: int, block: int = 32, bias=None):
    """The kernel's many-row path (prompts) on one thread, for tests: a (M, K) float32 -> (M, N)."""
    return _call(True, a, b, scales, k, n, block, bias)


def eligible(node) -> str | None:
    """None when a MatMulNBits node can run as MatMulQ4, else why not."""
    attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return "not a MatMulNBits node"
    bits, block, k = attrs.get("bits", 4), attrs.get("block_size", 0), attrs.get("K", 0)
    if bits != 4 or block < 32 or block & (block - 1):
        return f"bits {bits}, block {block} (the kernel does 4 bits in blocks of 32, 64, 128, ...)"
    if len([i for i in node.input[3:] if i]):
        return "zero points, g_idx or bias inputs (the kernel does symmetric weights without them)"
    if k % 64 or k % block:
        return f"K={k} is not a multiple of 64 and of the block"
    return None


def _bias_add(node, n: int, consumers: dict, outputs: set, vectors: dict):
    """The Add node that adds a constant vector of length ``n`` to ``node``'s output, when that output feeds
    nothing else and is not a graph output (so the Add can go into the product), and the vector's name."""
    out = node.output[0]
    users = consumers.get(out, [])
    if out in outputs or len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
        return None
    add = users[0]
    other = add.input[1] if add.input[0] == out else add.input[0]
    if other == out or vectors.get(other) != n:
        return None
    return add, other


def rewrite(model) -> int:
    """Turn eligible MatMulNBits nodes of ``model`` (an onnx.ModelProto, changed in place) into MatMulQ4 nodes
    reading the same initializers; an Add of a constant [N] vector right after one (a linear layer's bias) goes
    into the node as its bias input. Returns how many nodes became MatMulQ4."""
    from onnx import TensorProto, helper

    g = model.graph
    consumers: dict = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    outputs = {o.name for o in g.output}
    vectors = {t.name: t.dims[0] for t in g.initializer if len(t.dims) == 1 and t.data_type == TensorProto.FLOAT}
    n, folded = 0, set()        # the outputs of the Adds that went into a product
    for node in g.node:
        if node.op_type == "MatMulNBits" and eligible(node) is None:
            attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
            inputs, output = list(node.input[:3]), list(node.output)
            fold = _bias_add(node, attrs["N"], consumers, outputs, vectors)
            if fold is not None:
                add, bias = fold
                inputs.append(bias)
                output = list(add.output)
                folded.add(add.output[0])
            new = helper.make_node(OP, inputs, output, name=node.name, domain=DOMAIN,
                                   K=attrs["K"], N=attrs["N"], block_size=attrs["block_size"])
            node.CopyFrom(new)
            n += 1
    if folded:
        keep = [node for node in g.node if not (node.op_type == "Add" and node.output[0] in folded)]
        del g.node[:]
        g.node.extend(keep)
    if n and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return n


def attention_misfit(node) -> str | None:
    """None when a GroupQueryAttention node can run a decode step as DecodeAttention, else why not."""
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
        return "not a GroupQueryAttention node"
    attrs = {a.name: a for a in node.attribute}
    ints = {k: a.i for k, a in attrs.items() if a.type == a.INT}
    extra = set(attrs) - {"num_heads", "kv_num_heads", "scale", "do_rotary", "rotary_interleaved", "causal",
                          "local_window_size", "softcap", "smooth_softmax"}
    if extra:
        return f"attributes {sorted(extra)}"
    if ints.get("rotary_interleaved", 0) or ints.get("local_window_size", -1) != -1 or ints.get("smooth_softmax", 0):
        return "interleaved RoPE, a local window or smooth softmax"
    if "softcap" in attrs and attrs["softcap"].f != 0.0:
        return "softcap"
    if len(node.input) > 11 or len(node.output) != 3:
        return "inputs past attention_bias, or outputs besides out and present key/value"
    return None


def rewrite_decode_attention(model) -> int:
    """Turn every GroupQueryAttention node of ``model`` (changed in place) into DecodeAttention, which runs one
    position per call (the graph serves decode steps only); returns how many, 0 (and nothing changed) when any
    node does not fit."""
    from onnx import helper

    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    if not nodes or any(attention_misfit(n) for n in nodes):
        return 0
    for node in nodes:
        a = {x.name: x for x in node.attribute}
        new = helper.make_node(ATTN_OP, list(node.input) + [""] * (11 - len(node.input)), list(node.output),
                               name=node.name, domain=DOMAIN, num_heads=a["num_heads"].i,
                               kv_num_heads=a["kv_num_heads"].i, scale=a["scale"].f if "scale" in a else 0.0,
                               do_rotary=a["do_rotary"].i if "do_rotary" in a else 0, rotary_interleaved=0)
        node.CopyFrom(new)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return len(nodes)
