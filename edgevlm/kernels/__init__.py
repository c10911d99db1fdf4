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


def _call(many: bool, a, b, scales, k: int, n: int, block: int):
    """Run the library's test entry (``edgevlm_q4_gemm`` when ``many`` else ``edgevlm_q4_gemv``) on numpy arrays."""
    import numpy as np

    path, why = status()
    if path is None:
        raise RuntimeError(why)
    lib = ctypes.CDLL(str(path))
    a = np.ascontiguousarray(a, np.float32)
    b = np.ascontiguousarray(b, np.uint8)
    scales = np.ascontiguousarray(scales, np.float32)
    y = np.empty((a.shape[0], n) if many else n, np.float32)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    ptrs = (a.ctypes.data, b.ctypes.data, scales.ctypes.data, y.ctypes.data)
    if not many:
        lib.edgevlm_q4_gemv.argtypes = [p, p, p, p, i64, i64, i64]
        lib.edgevlm_q4_gemv(*ptrs, k, n, block)
        return y
    lib.edgevlm_q4_gemm.argtypes = [p, p, p, p, i64, i64, i64, i64]
    lib.edgevlm_q4_gemm.restype = ctypes.c_int
    if lib.edgevlm_q4_gemm(*ptrs, a.shape[0], k, n, block):
        raise MemoryError("edgevlm_q4_gemm: out of memory")
    return y


def gemv(a, b, scales, k: int, n: int, block: int = 32):
    """The kernel on one activation row (for tests): a (K,) float32, b/scales as MatMulNBits holds them -> (N,)."""
    return _call(False, a, b, scales, k, n, block)


def gemm(a, b, scales, k: int, n: int, block: int = 32):
    """The kernel's many-row path (prompts) on one thread, for tests: a (M, K) float32 -> (M, N)."""
    return _call(True, a, b, scales, k, n, block)


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


def rewrite(model) -> int:
    """Turn eligible MatMulNBits nodes of ``model`` (an onnx.ModelProto, changed in place) into MatMulQ4 nodes
    reading the same initializers; returns how many."""
    from onnx import helper

    n = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and eligible(node) is None:
            attrs = {a.name: a.i for a in node.attribute if a.type == a.INT}
            new = helper.make_node(OP, list(node.input[:3]), list(node.output), name=node.name, domain=DOMAIN,
                                   K=attrs["K"], N=attrs["N"], block_size=attrs["block_size"])
            node.CopyFrom(new)
            n += 1
    if n and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return n
