"""``edgevlm doctor``: what this machine can run and why, one fact a line, with what to do about anything missing.

>>> from edgevlm.runtime.doctor import report, format_report
>>> rep = report("bundles/edgevlm_scenes-cpu-int8")      # or report() for the machine alone
>>> print(format_report(rep))
>>> rep["exit_code"]        # 0; 1 when the bundle cannot run here (no backend for a part, or too little memory);
...                         # 2 when it is no readable bundle

Every probe is cheap and side-effect free: files under /proc, /sys and /etc, the versions of what is installed,
and at most one ``nvidia-smi`` query (a 5 s timeout) where that program exists. Nothing is built, compiled or
downloaded: edgevlm's kernels are only looked for (``edgevlm kernels build`` builds them). ONNX Runtime and
llama-cpp-python are imported inside the probes, and a missing one is a fact, not an error; coremltools is never
imported (it imports torch): on macOS its presence is looked up. Like the rest of :mod:`edgevlm.runtime`, this
module imports no torch and nothing from edgevlm's exporters, modeling, compress or train (the import-linter
contract in pyproject.toml).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from .._version import __version__
from ..errors import EdgeVLMError, first_line
from .memory import read_text

OK, MISSING, OFF, WARN = "ok", "missing", "off", "warn"
SCHEMA_VERSION = 1                       # of report()'s dict; keys are only ever added
ACTIVATION_FRACTION = 0.25               # allowance for activations and a backend's working copies, of the weights
KV_BYTES_ONNX = 4                        # the ONNX decoders keep their KV cache in FP32

CPUINFO = Path("/proc/cpuinfo")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
CUDA_VERSION_FILES = (Path("/usr/local/cuda/version.json"), Path("/usr/local/cuda/version.txt"))
JETPACK_TRTEXEC = Path("/usr/src/tensorrt/bin/trtexec")

# CPU features the kernels edgevlm runs care about (edgevlm's MatMulQ4, ONNX Runtime's MLAS, llama.cpp's ggml)
X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16")
ARM_FLAGS = ("asimd", "asimddp", "i8mm")
KERNELS_ENV = "EDGEVLM_KERNELS"

ORT_FORMATS = ("onnx", "ort")
GGUF_FORMATS = ("gguf",)
COREML_FORMATS = ("coreml", "mlpackage", "mlmodel")
ENGINE_FORMATS = ("engine", "plan", "tensorrt")
DECODERS = (("onnxruntime", "decoder"), ("llama.cpp", "decoder_gguf"), ("coreml", "decoder_coreml"))   # as the runtime's
ACCELERATOR_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")

FIX_ORT = "pip install onnxruntime (onnxruntime-gpu for NVIDIA GPUs; NVIDIA's wheel for JetPack on a Jetson)"
FIX_LLAMA = "pip install 'edgevlm[gguf]' (llama-cpp-python)"
FIX_COREML = "run ios bundles on a Mac, iPhone or iPad, or export the model with --target cpu to try it here"
# Off Apple OSes an ios bundle's packages run through edgevlm's reference ML-program interpreter (runtime/mil)
REFERENCE_COREML = "edgevlm reference ML-program interpreter (numpy; not Core ML's kernels, slow)"
RAW_FORMATS = ("raw",)


# -- small helpers ---------------------------------------------------------------------------------------------
def _line(lines: list, topic: str, status: str, fact: str, fix: str | None = None, section: str = "machine") -> None:
    lines.append({"section": section, "topic": topic, "status": status, "fact": fact, "fix": fix})


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except Exception:                    # PackageNotFoundError, or a broken installation's metadata
        return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _sysctl(name: str) -> str | None:
    """One macOS sysctl value (a 2 s limit), or None."""
    exe = shutil.which("sysctl") or "/usr/sbin/sysctl"
    try:
        r = subprocess.run([exe, "-n", name], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


# -- the machine -----------------------------------------------------------------------------------------------
def parse_cpuinfo(text: str) -> dict:
    """``{"model": str | None, "flags": set[str] | None}`` from /proc/cpuinfo's text (the first CPU's fields: x86
    ``model name`` and ``flags``; Arm ``Features`` and ``CPU implementer``/``CPU part`` or ``Hardware``)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    words = fields.get("flags") or fields.get("features")
    model = fields.get("model name") or fields.get("hardware") or fields.get("processor name")
    if not model and fields.get("cpu part"):
        model = f"Arm CPU (implementer {fields.get('cpu implementer', '?')}, part {fields['cpu part']})"
    return {"model": model or None, "flags": set(words.split()) if words is not None else None}


def _arch_kind(machine: str) -> str:
    m = machine.lower()
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86"
    if m in ("aarch64", "arm64") or m.startswith("arm"):
        return "arm"
    return "other"


def _darwin_cpu(kind: str) -> tuple[str | None, set[str] | None]:
    model = _sysctl("machdep.cpu.brand_string")
    if kind == "arm":
        flags = {"asimd"}                # Advanced SIMD is part of every Apple silicon core
        for feat, flag in (("FEAT_DotProd", "asimddp"), ("FEAT_I8MM", "i8mm")):
            if _sysctl(f"hw.optional.arm.{feat}") == "1":
                flags.add(flag)
        return model, flags
    words = " ".join(filter(None, (_sysctl("machdep.cpu.features"), _sysctl("machdep.cpu.leaf7_features"))))
    if not words:
        return model, None
    aliases = {"avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni"}      # Intel Macs spell them without "_"
    return model, {aliases.get(w.lower(), w.lower()) for w in words.split()}


def cpu_facts() -> dict:
    from .backends import usable_cpus

    machine = platform.machine() or "unknown"
    kind = _arch_kind(machine)
    text = read_text(CPUINFO)
    if text is not None:
        info = parse_cpuinfo(text)
        model, flags, source = info["model"], info["flags"], str(CPUINFO)
    elif sys.platform == "darwin":
        model, flags = _darwin_cpu(kind)
        source = "sysctl"
    else:
        model, flags, source = None, None, None
    names = X86_FLAGS if kind == "x86" else ARM_FLAGS if kind == "arm" else ()
    return {"model": model or platform.processor() or None, "arch": machine, "arch_kind": kind,
            "flags": None if flags is None else {n: n in flags for n in names}, "flags_source": source,
            "usable_cpus": usable_cpus(), "logical_cpus": os.cpu_count()}


def _cpu_lines(cpu: dict, lines: list) -> None:
    n = cpu["usable_cpus"]
    of = f" (of {cpu['logical_cpus']})" if cpu["logical_cpus"] and cpu["logical_cpus"] != n else ""
    _line(lines, "CPU", OK, f"{cpu['model'] or 'unknown model'}, {cpu['arch']}, {n} usable CPU{'s' * (n != 1)}{of}")
    flags = cpu["flags"]
    if flags is None:
        _line(lines, "CPU features", WARN, "unknown (no /proc/cpuinfo to read them from)",
              "nothing to do; the backends find the features themselves")
        return
    have = [k for k, v in flags.items() if v]
    if cpu["arch_kind"] == "x86":
        if flags["avx2"] and flags["fma"]:
            _line(lines, "AVX2", OK, "avx2, fma" + (", f16c" if flags["f16c"] else "")
                  + ": edgevlm's MatMulQ4 kernel can run (its AVX2 path), as can ONNX Runtime's and llama.cpp's "
                  "AVX2 kernels")
        else:
            _line(lines, "AVX2", WARN, "no avx2/fma: edgevlm's MatMulQ4 kernel cannot run; ONNX Runtime and llama.cpp "
                  "fall back to SSE code, slowly", "use a CPU with AVX2 and FMA (x86-64-v3: Intel Haswell, AMD Zen "
                  "or newer) for 4-bit decoders")
        avx512 = [k for k in ("avx512f", "avx512bw", "avx512vl") if flags[k]]
        if len(avx512) == 3:
            _line(lines, "AVX-512", OK, "avx512f, avx512bw, avx512vl: ONNX Runtime's AVX-512 kernels")
        else:
            _line(lines, "AVX-512", MISSING, f"{', '.join(avx512) or 'none'} of avx512f/bw/vl (optional: the AVX2 "
                  "paths run)")
        vnni = [k for k in ("avx512_vnni", "avx_vnni") if flags[k]]
        if flags["avx512_vnni"]:
            _line(lines, "VNNI", OK, f"{', '.join(vnni)}: edgevlm's MatMulQ4 takes its AVX-512 VNNI path; INT8 "
                  "matmuls use VNNI dot products")
        elif vnni:
            _line(lines, "VNNI", OK, "avx_vnni: ONNX Runtime's and llama.cpp's INT8 dot products (edgevlm's MatMulQ4 "
                  "uses AVX-512 VNNI only, so it takes its AVX2 path)")
        else:
            _line(lines, "VNNI", MISSING, "no avx512_vnni / avx_vnni (optional: INT8 dot products take more "
                  "instructions)")
        amx = [k for k in ("amx_tile", "amx_int8", "amx_bf16") if flags[k]]
        if amx:
            _line(lines, "AMX", OK, f"{', '.join(amx)}: ONNX Runtime's INT8 matmuls can use it; llama.cpp's AMX "
                  "weight buffers are a known crash and edgevlm avoids them (see the llama.cpp buffers line)")
        else:
            _line(lines, "AMX", MISSING, "no amx_tile / amx_int8 / amx_bf16 (optional)")
    elif cpu["arch_kind"] == "arm":
        if flags["asimd"]:
            _line(lines, "NEON", OK, "asimd: ONNX Runtime's and llama.cpp's NEON kernels")
        else:
            _line(lines, "NEON", WARN, "no asimd (Advanced SIMD) reported: the backends run scalar code, slowly",
                  "use an Armv8-A CPU with Advanced SIMD (every Cortex-A53 or newer, every Jetson Orin)")
        if flags["asimddp"]:
            _line(lines, "dotprod", OK, "asimddp: INT8 dot products (ONNX Runtime, llama.cpp)"
                  + ("; i8mm too" if flags.get("i8mm") else ""))
        else:
            _line(lines, "dotprod", MISSING, "no asimddp (optional: INT8 dot products take more instructions)")
    else:
        _line(lines, "CPU features", WARN, f"{', '.join(have) or 'none'} ({cpu['arch']}: edgevlm checks no features "
              "here)")


def memory_facts() -> dict:
    from . import memory

    info = memory.meminfo()
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            total = None
    limit = memory.cgroup_room()[0]
    usable = memory.usable_bytes(available)
    hp = memory.status()
    return {"total_bytes": total, "available_bytes": available, "cgroup_limit_bytes": limit,
            "usable_bytes": usable, "thp_mode": memory.thp_mode(), **hp}


def _memory_lines(mem: dict, lines: list) -> None:
    from . import memory

    if mem["total_bytes"] is None:
        _line(lines, "memory", WARN, "unknown (no /proc/meminfo)", "nothing to do; bundle memory checks are skipped")
    else:
        fact = f"{_size(mem['total_bytes'])} total, {_size(mem['available_bytes'])} available"
        if mem["cgroup_limit_bytes"] is not None:
            fact += f"; this process's cgroup allows {_size(mem['cgroup_limit_bytes'])}"
        _line(lines, "memory", OK, fact)
    if mem["huge_pages"]:
        _line(lines, "huge pages", OK, f"weights in 2 MiB pages: glibc asked ({'GLIBC_TUNABLES=' + memory.TUNABLE}), "
              f"the kernel's transparent huge pages are {mem['thp_mode']}")
        return
    why = mem["huge_pages_why_not"] or "not asked for"
    if why.startswith("turned off"):
        fix = f"unset {memory.OPT_OUT}"
    elif why.startswith("not asked for"):
        fix = (f"run through the `edgevlm` command (it restarts itself with GLIBC_TUNABLES={memory.TUNABLE}); from "
               "Python, set that variable before Python starts")
    elif "glibc" in why:
        fix = "a distribution with glibc 2.35 or newer (Debian 12, Ubuntu 22.04)"
    elif "kernel" in why:
        fix = "as root: echo madvise > /sys/kernel/mm/transparent_hugepage/enabled"
    else:
        fix = None
    _line(lines, "huge pages", OFF, f"{why} (decoders stream their weights through 4 KiB pages)", fix)


def onnxruntime_facts() -> dict:
    out = {"installed": False, "version": None, "providers": [], "device": None, "cuda": False, "tensorrt": False,
           "error": None}
    try:
        import onnxruntime as ort
    except ImportError:
        return out
    except Exception as e:               # a broken install (missing shared library, ...)
        return {**out, "error": first_line(e)}
    providers = list(ort.get_available_providers())
    try:
        device = ort.get_device()
    except Exception:
        device = None
    return {**out, "installed": True, "version": ort.__version__, "providers": providers, "device": device,
            "cuda": "CUDAExecutionProvider" in providers, "tensorrt": "TensorrtExecutionProvider" in providers}


def _ort_lines(ort: dict, lines: list) -> None:
    if not ort["installed"]:
        why = f"does not import: {ort['error']}" if ort["error"] else "not installed"
        _line(lines, "ONNX Runtime", MISSING, f"{why}: no ONNX bundle can run here", FIX_ORT)
        return
    _line(lines, "ONNX Runtime", OK, f"{ort['version']}, providers: {', '.join(ort['providers'])}")
    gpu_fix = ("pip install onnxruntime-gpu (on a Jetson: NVIDIA's onnxruntime-gpu wheel for your JetPack); "
               "without it, jetson bundles run on the CPU")
    _line(lines, "CUDA provider", OK if ort["cuda"] else MISSING,
          "CUDAExecutionProvider available" if ort["cuda"] else "CUDAExecutionProvider not in this ONNX Runtime",
          None if ort["cuda"] else gpu_fix)
    _line(lines, "TensorRT provider", OK if ort["tensorrt"] else MISSING,
          "TensorrtExecutionProvider available (jetson bundles build their engines on first run)" if ort["tensorrt"]
          else "TensorrtExecutionProvider not in this ONNX Runtime", None if ort["tensorrt"] else gpu_fix)


def gpu_facts() -> dict:
    """NVIDIA GPUs by ``nvidia-smi`` (where it exists; 5 s at most), the CUDA toolkit's version file."""
    cuda = None
    for f in CUDA_VERSION_FILES:
        text = read_text(f, 1 << 16)
        m = re.search(r'"cuda"\s*:\s*\{[^}]*"version"\s*:\s*"([^"]+)"', text or "") or \
            re.search(r"CUDA Version\s+([\d.]+)", text or "")
        if m:
            cuda = m.group(1)
            break
    exe = shutil.which("nvidia-smi")
    out = {"nvidia_smi": exe, "gpus": [], "cuda_toolkit": cuda, "error": None}
    if not exe:
        return out
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return {**out, "error": first_line(e)}
    if r.returncode != 0:
        return {**out, "error": first_line(Exception(r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}"))}
    for row in r.stdout.strip().splitlines():
        cells = [c.strip() for c in row.split(",")]
        if len(cells) >= 3:
            mib = int(cells[2]) if cells[2].isdigit() else None
            out["gpus"].append({"name": cells[0], "driver": cells[1], "memory_bytes": mib * 2**20 if mib else None})
    return out


def tensorrt_facts() -> dict:
    trtexec = shutil.which("trtexec") or (str(JETPACK_TRTEXEC) if JETPACK_TRTEXEC.is_file() else None)
    out = {"installed": False, "version": None, "trtexec": trtexec, "error": None}
    if not _has_module("tensorrt"):
        return out
    try:
        import tensorrt
    except Exception as e:               # the module is there, its libraries (libnvinfer) are not
        return {**out, "error": first_line(e)}
    return {**out, "installed": True, "version": getattr(tensorrt, "__version__", None) or _dist_version("tensorrt")}


def jetson_facts() -> dict:
    text = read_text(TEGRA_RELEASE, 4096)
    if text is None:
        return {"l4t": None, "jetpack": None, "release_file": None}
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    l4t = f"{m.group(1)}.{m.group(2)}" if m else first_line(Exception(text.strip()), 80)
    major = int(m.group(1)) if m else None
    jetpack = {36: "6", 35: "5", 34: "5", 32: "4"}.get(major)
    return {"l4t": l4t, "jetpack": jetpack, "release_file": str(TEGRA_RELEASE)}


def _nvidia_lines(gpu: dict, trt: dict, jet: dict, lines: list) -> None:
    if gpu["gpus"]:
        shown = "; ".join(f"{g['name']} (driver {g['driver']}, {_size(g['memory_bytes'])})" for g in gpu["gpus"])
        _line(lines, "NVIDIA GPU", OK, shown + (f"; CUDA toolkit {gpu['cuda_toolkit']}" if gpu["cuda_toolkit"] else ""))
    elif gpu["nvidia_smi"]:
        _line(lines, "NVIDIA GPU", WARN, f"nvidia-smi found no GPU ({gpu['error'] or 'no rows'})",
              "check the NVIDIA driver (nvidia-smi should list the GPU)")
    else:
        cuda = f"; CUDA toolkit {gpu['cuda_toolkit']}" if gpu["cuda_toolkit"] else ""
        _line(lines, "NVIDIA GPU", MISSING, f"none found (no nvidia-smi){cuda}",
              "only jetson bundles use one (TensorRT on a Jetson Orin); every other bundle runs on the CPU")
    if trt["installed"]:
        _line(lines, "TensorRT", OK, f"{trt['version']} (Python module)"
              + (f"; trtexec at {trt['trtexec']}" if trt["trtexec"] else ""))
    elif trt["trtexec"]:
        _line(lines, "TensorRT", OK, f"trtexec at {trt['trtexec']} (no tensorrt Python module): jetson bundles' "
              "build_engine.sh can build their engines")
    else:
        why = f"the tensorrt module does not import ({trt['error']})" if trt["error"] else "not installed"
        _line(lines, "TensorRT", MISSING, f"{why} — jetson bundles' engines are built on the device with trtexec "
              "(the bundle's build_engine.sh) or `pip install tensorrt`",
              "on a Jetson, JetPack ships TensorRT and /usr/src/tensorrt/bin/trtexec; elsewhere pip install tensorrt")
    if jet["l4t"]:
        if jet["jetpack"] == "6":
            _line(lines, "Jetson", OK, f"L4T R{jet['l4t']} (JetPack 6): jetson bundles' TensorRT 10 recipe applies")
        else:
            _line(lines, "Jetson", WARN, f"L4T R{jet['l4t']} (JetPack {jet['jetpack'] or 'unknown'}): jetson bundles "
                  "are made for JetPack 6 (TensorRT 10)", "flash JetPack 6 (L4T R36) on the Jetson")
    else:
        _line(lines, "Jetson", MISSING, f"not a Jetson (no {TEGRA_RELEASE})",
              "jetson bundles are meant for a Jetson Orin with JetPack 6; here their ONNX graphs run through "
              "ONNX Runtime on the CPU")


def llama_cpp_facts() -> dict:
    out = {"installed": False, "version": None, "gpu_offload": None, "extra_buffer_types": None,
           "extra_buffers": None, "extra_buffers_why": None, "extra_buffers_fix": None, "error": None}
    try:
        import llama_cpp
    except ImportError:
        return out
    except Exception as e:               # the package is there, its shared library does not load
        return {**out, "error": first_line(e)}
    out.update(installed=True, version=getattr(llama_cpp, "__version__", None) or _dist_version("llama_cpp_python"))
    try:
        out["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        pass
    from . import llamacpp

    try:
        out["extra_buffer_types"] = llamacpp.cpu_extra_buffer_types()
        out["extra_buffers"], out["extra_buffers_why"] = llamacpp.extra_buffers_choice()
    except EdgeVLMError as e:            # a bad EDGEVLM_LLAMA_REPACK
        out.update(extra_buffers_why=e.problem, extra_buffers_fix=e.fix)
    except Exception as e:
        out["extra_buffers_why"] = f"could not be asked: {first_line(e)}"
    return out


def _llama_lines(ll: dict, lines: list, nvidia: bool = False) -> None:
    """``nvidia``: this machine has an NVIDIA GPU or is a Jetson (then a CPU-only llama.cpp is worth a fix)."""
    from .llamacpp import CUDA_BUILD, GPU_LAYERS_ENV, REPACK_ENV

    if not ll["installed"]:
        why = f"does not import ({ll['error']})" if ll["error"] else "not installed"
        _line(lines, "llama-cpp-python", MISSING, f"{why}: GGUF decoders (a bundle's decoder_gguf part) cannot run "
              "here", FIX_LLAMA + ", or run a bundle's ONNX decoder")
        return
    if ll["gpu_offload"]:
        _line(lines, "llama-cpp-python", OK, f"{ll['version']}; GPU offload: yes, GGUF decoders put every layer on "
              f"the GPU (--gpu-layers N or {GPU_LAYERS_ENV} to change)")
    elif nvidia:
        _line(lines, "llama-cpp-python", WARN, f"{ll['version']}; GPU offload: "
              f"{'no' if ll['gpu_offload'] is False else 'unknown'}, built without CUDA: GGUF decoders run on the "
              "CPU although this machine has an NVIDIA GPU", f"on JetPack (nvcc in /usr/local/cuda/bin): {CUDA_BUILD}")
    else:
        _line(lines, "llama-cpp-python", OK, f"{ll['version']}; GPU offload: "
              f"{'no' if ll['gpu_offload'] is False else 'unknown'} (GGUF decoders run on the CPU)")
    if ll["extra_buffers"] is None:
        _line(lines, "llama.cpp buffers", WARN, f"extra CPU weight buffers: {ll['extra_buffers_why']}",
              ll["extra_buffers_fix"] or f"set {REPACK_ENV}=0 or 1 to decide")
    elif ll["extra_buffers"]:
        _line(lines, "llama.cpp buffers", OK, f"extra (repacked) CPU weight buffers on: {ll['extra_buffers_why']}")
    else:
        env = os.environ.get(REPACK_ENV, "").strip() == "0"
        _line(lines, "llama.cpp buffers", OFF, f"extra (repacked) CPU weight buffers off: {ll['extra_buffers_why']}",
              f"unset {REPACK_ENV}" if env else f"{REPACK_ENV}=1 forces them on (llama.cpp's AMX buffers crash on "
              "first use: only with a llama-cpp-python built without AMX)")


def coreml_facts() -> dict:
    if sys.platform != "darwin":
        return {"available": False, "platform_ok": False, "installed": False, "version": None}
    have = _has_module("coremltools")           # looked up, not imported: coremltools imports torch
    return {"available": have, "platform_ok": True, "installed": have,
            "version": _dist_version("coremltools") if have else None}


def _coreml_lines(cm: dict, lines: list) -> None:
    if cm["available"]:
        _line(lines, "Core ML", OK, f"coremltools {cm['version'] or '(version unknown)'}: ios bundles run here")
    elif cm["platform_ok"]:
        _line(lines, "Core ML", MISSING, "coremltools is not installed: ios bundles run through edgevlm's "
              "reference ML-program interpreter (numpy, slow)", "pip install 'edgevlm[coreml]'")
    else:
        _line(lines, "Core ML", MISSING, "not available (macOS/iOS only); ios bundles run through edgevlm's reference "
              "ML-program interpreter (numpy, slow)", FIX_COREML)


def kernels_facts(arch_kind: str) -> dict:
    """edgevlm's CPU kernels: looked for, never built (``edgevlm kernels build`` builds them)."""
    off = os.environ.get(KERNELS_ENV, "").strip() == "0"
    from .. import kernels

    try:
        path, why = kernels.status()
        isa = kernels.isa() if path is not None else None
    except Exception as e:
        path, why, isa = None, f"could not be checked: {first_line(e)}", None
    state = "off" if off else "ready" if path is not None else "missing"
    return {"state": state, "isa": isa, "library": None if path is None else str(path),
            "why": f"turned off ({KERNELS_ENV}=0)" if off else why, "built_why_not": why,
            "env": f"{KERNELS_ENV}=0" if off else None, "x86": arch_kind == "x86"}


def _kernel_lines(k: dict, lines: list) -> None:
    name = "edgevlm kernels"
    if k["state"] == "off":
        built = f"; built here ({k['isa']})" if k["isa"] else ""
        _line(lines, name, OFF, f"MatMulQ4 turned off ({KERNELS_ENV}=0){built}: 4-bit ONNX decoders run ONNX "
              "Runtime's MatMulNBits", f"unset {KERNELS_ENV} to use them")
    elif k["state"] == "ready":
        from .vlm import KERNEL_PROMPT_ROWS

        _line(lines, name, OK, f"MatMulQ4 ready ({k['isa']}): 4-bit ONNX decoders' decode steps and prompts of "
                               f"{KERNEL_PROMPT_ROWS[k['isa']]}+ positions; {k['library']}")
    elif not k["x86"]:
        _line(lines, name, MISSING, "MatMulQ4 is x86-64 only (AVX2): ONNX Runtime's MatMulNBits runs 4-bit "
              "decoders here")
    else:
        why = k["why"] or "not available"
        fix = ("run `edgevlm kernels build` (needs a C compiler; once per machine)" if "not built" in why
               else FIX_ORT if "onnxruntime is not installed" in why
               else "upgrade onnxruntime, or rebuild: edgevlm kernels build --force" if "needs onnxruntime" in why
               else None if "lacks AVX2" in why else "rebuild them: edgevlm kernels build --force")
        _line(lines, name, MISSING, f"MatMulQ4 not used: {why} (4-bit ONNX decoders run ONNX Runtime's MatMulNBits)",
              fix)


def _python_facts() -> dict:
    return {"edgevlm": __version__, "python": platform.python_version(), "system": platform.system(),
            "release": platform.release(), "machine": platform.machine(),
            "tokenizers": _dist_version("tokenizers") if _has_module("tokenizers") else None}


# -- a bundle --------------------------------------------------------------------------------------------------
def _file_bytes(f: Path) -> int:
    """Bytes on disk of one part: the file (with an ONNX graph's external data), or every file of a package."""
    from ..bundle import onnx_external_locations

    st = os.lstat(f)
    if stat.S_ISDIR(st.st_mode):
        total = 0
        for top, _dirs, files in os.walk(f, followlinks=False):
            total += sum(os.lstat(os.path.join(top, n)).st_size for n in files)
        return total
    total = st.st_size
    if f.suffix == ".onnx":
        for loc in dict.fromkeys(onnx_external_locations(f)):
            try:
                total += os.lstat(f.parent / loc).st_size        # checked to be inside the bundle by resolve
            except OSError:
                pass
    return total


def _ort_backend(target: dict, ort: dict) -> dict:
    """Which ONNX Runtime provider runs an ONNX part here, as backends.OrtSession chooses it."""
    if not ort["installed"]:
        why = "ONNX Runtime is not installed" + (f" ({ort['error']})" if ort["error"] else "")
        return {"backend": None, "why": why, "fix": FIX_ORT}
    wanted = [p for p in (target.get("providers") or ["CPUExecutionProvider"]) if isinstance(p, str)]
    chosen = [p for p in wanted if p in ort["providers"]]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    lacking = [p for p in wanted if p not in ort["providers"]]
    out = {"backend": f"onnxruntime ({chosen[0]})", "providers": chosen, "why": None, "fix": None}
    if lacking:
        out["why"] = (f"the target asks for {', '.join(lacking)}, not in this ONNX Runtime, so {chosen[0]} runs it")
        if any(p in ACCELERATOR_PROVIDERS for p in lacking):
            out["fix"] = ("on the NVIDIA device: onnxruntime-gpu (NVIDIA's wheel for JetPack on a Jetson); here the "
                          "CPU runs it, slower")
        else:
            out["fix"] = "those providers are ONNX Runtime Mobile's on Android; here the CPU provider runs it"
    return out


def _part_backend(fmt: str, task: str, target: dict, facts: dict, bundle_has_onnx_decoder: bool) -> dict:
    tfmt = target.get("format")
    if task == "vlm" and tfmt not in ORT_FORMATS + COREML_FORMATS:
        return {"backend": None, "why": f"this runtime runs VLM bundles exported for ONNX targets; this one is for "
                f"{target.get('name')!r} ({tfmt})", "fix": "export the model again with --target cpu"}
    if fmt in ORT_FORMATS:
        return _ort_backend(target, facts["onnxruntime"])
    if fmt in GGUF_FORMATS:
        ll = facts["llama_cpp"]
        if ll["installed"]:
            where = "GPU, every layer" if ll["gpu_offload"] else "CPU"
            return {"backend": f"llama.cpp ({where})", "why": None, "fix": None}
        why = f"does not import ({ll['error']})" if ll["error"] else "is not installed"
        return {"backend": None, "why": f"llama.cpp: llama-cpp-python {why}",
                "fix": FIX_LLAMA + (", or run the bundle's ONNX decoder (--decoder-backend onnxruntime)"
                                    if bundle_has_onnx_decoder else "")}
    if fmt in COREML_FORMATS:
        cm = facts["coreml"]
        if cm["available"]:
            return {"backend": "Core ML", "why": None, "fix": None}
        return {"backend": REFERENCE_COREML, "why": None, "fix": None,
                "note": "Core ML is not available here (macOS/iOS only): " + FIX_COREML}
    if fmt in RAW_FORMATS:
        return {"backend": "numpy (a table read directly)", "why": None, "fix": None}
    if fmt in ENGINE_FORMATS:
        return {"backend": None, "why": "a TensorRT engine: edgevlm's runtime loads ONNX graphs (ONNX Runtime's "
                "TensorRT provider builds and caches its own engines)",
                "fix": "export the model with --target jetson and run its ONNX graphs on the Jetson"}
    return {"backend": None, "why": f"no backend in this edgevlm for the format {fmt!r}",
            "fix": "upgrade edgevlm (pip install -U edgevlm), or export the model again with --target cpu"}


def _decode_kernel(rec: dict, backend: dict, facts: dict) -> str | None:
    """What runs a 4-bit ONNX decoder's decode steps (vlm.open_ort_decoder's decision, without loading the graph)."""
    if rec.get("precision") != "int4" or backend.get("backend") is None:
        return None
    k = facts["kernels"]
    accel = [p for p in backend.get("providers", []) if p != "CPUExecutionProvider"]
    if k["state"] == "off":
        return f"ONNX Runtime's MatMulNBits (edgevlm's kernel turned off: {KERNELS_ENV}=0)"
    if accel:
        return f"{accel[0]} (edgevlm's kernel is for the CPU provider)"
    if k["state"] == "ready":
        return (f"edgevlm MatMulQ4 ({k['isa']}) and DecodeAttention, if the graph's MatMulNBits and "
                "GroupQueryAttention fit them (checked at load)")
    return f"ONNX Runtime's MatMulNBits (edgevlm's kernel: {k['why']})"


def bundle_facts(path, facts: dict) -> dict:
    """What a bundle needs and whether this machine has it: per part its file, format, size and backend (or why
    none), the KV cache at the bundle's context length, and the memory it all takes against what is available."""
    from ..bundle import read_manifest, resolve
    from .vlm_ops import DECODER_PARTS

    path = Path(path)
    out = {"path": str(path), "readable": False, "problem": None, "fix": None, "task": None, "model": None,
           "target": None, "target_format": None, "precision": None, "context_length": None, "parts": [],
           "decoder": None, "tokenizers": None, "memory": None, "runnable": False, "problems": [], "exit_code": 2}
    try:
        m = read_manifest(path)
    except EdgeVLMError as e:
        out.update(problem=e.problem, fix=e.fix, problems=[e.problem])
        return out
    task, target = m["task"], m["target"]
    out.update(readable=True, task=task, model=m["model"]["name"], target=target["name"],
               target_format=target["format"], precision=m["precision"])
    gen = m.get("generation") if task == "vlm" else None
    ctx = int(gen["context_length"]) if gen else None
    out["context_length"] = ctx

    if task == "vlm":
        entries = [(name, rec, name in DECODER_PARTS.values()) for name, rec in m["parts"].items()]
    else:                               # the runtime runs the first artifact (runtime.load)
        entries = [(art.get("role") if i == 0 and isinstance(art.get("role"), str) else f"artifact {i}", art, False)
                   for i, art in enumerate(m["artifacts"])]
    has_onnx_decoder = task == "vlm" and "decoder" in m["parts"]
    parts = []
    for i, (name, rec, is_decoder) in enumerate(entries):
        fmt = str(rec["format"])
        p = {"name": name, "file": rec["path"], "format": fmt, "precision": rec.get("precision"),
             "role": "decoder" if is_decoder else "part", "required": not is_decoder and (task == "vlm" or i == 0),
             "size_bytes": None, "backend": None, "providers": None, "runs": False, "why": None, "fix": None,
             "kv_cache_bytes": None, "kv_cache": None, "decode_kernel": None, "loaded": False, "engine": None}
        parts.append(p)
        try:
            f = resolve(path, m, rec["path"], f"part {name!r}" if task == "vlm" else "artifact")
            p["size_bytes"] = _file_bytes(f)
        except (EdgeVLMError, OSError) as e:
            p.update(why=e.problem if isinstance(e, EdgeVLMError) else first_line(e),
                     fix=e.fix if isinstance(e, EdgeVLMError) else "copy the whole bundle directory again")
            continue
        b = _part_backend(fmt, task, target, facts, has_onnx_decoder)
        if b.get("note"):
            p["note"] = b["note"]
        p.update(backend=b["backend"], providers=b.get("providers"), why=b["why"], fix=b["fix"],
                 runs=b["backend"] is not None)
        if task == "vlm" and fmt in ORT_FORMATS and m.get("engines"):
            # a TensorRT engine built on the device runs the part natively where it can (backends.open_part)
            from .backends import part_backend

            try:
                p["engine"] = part_backend(path, m, name)
            except (EdgeVLMError, OSError, KeyError, TypeError, ValueError) as e:
                p["engine"] = {"backend": "onnxruntime", "engine": None, "why": first_line(e)}
            if p["engine"]["engine"]:
                p["backend"] = f"tensorrt engine ({p['engine']['engine']})"
        if is_decoder and fmt in ORT_FORMATS:
            p["kv_cache"] = "fp32, 2 x layers x kv_heads x head_dim x context x 4 bytes"
            p["kv_cache_bytes"] = 2 * int(gen["num_layers"]) * int(gen["num_kv_heads"]) * int(gen["head_dim"]) * ctx \
                * KV_BYTES_ONNX
            p["decode_kernel"] = _decode_kernel(rec, b, facts)
        elif is_decoder and fmt in GGUF_FORMATS:
            _gguf_kv(p, f, rec, ctx)
        elif is_decoder and fmt in COREML_FORMATS:        # the stateful decoder's KV states (float16, the whole context)
            p["kv_cache"] = "fp16 Core ML states, 2 x layers x kv_heads x head_dim x context x 2 bytes"
            p["kv_cache_bytes"] = 2 * int(gen["num_layers"]) * int(gen["num_kv_heads"]) * int(gen["head_dim"]) * ctx * 2
    out["parts"] = parts

    # which decoder the runtime would run: the first the bundle lists (onnxruntime, then llama.cpp) that runs here
    by_name = {p["name"]: p for p in parts}
    problems = [f"part {p['name']}: {p['why']}" for p in parts if p["required"] and not p["runs"]]
    if task == "vlm":
        have = [(b, by_name[key]) for b, key in DECODERS if key in by_name]
        running = [(b, p) for b, p in have if p["runs"]]
        chosen = running[0] if running else (have[0] if have else None)
        out["decoder"] = {"backend": running[0][0] if running else None, "default": have[0][0] if have else None,
                          "part": running[0][1]["name"] if running else None}
        if not running:
            problems.append("no decoder can run here: " + "; ".join(f"{p['name']}: {p['why']}" for _, p in have))
        if chosen is not None:
            chosen[1]["loaded"] = True
        tok = _dist_version("tokenizers") if _has_module("tokenizers") else None
        out["tokenizers"] = tok
        if tok is None:
            problems.append("the tokenizers package is not installed (VLM bundles' prompts)")
    else:
        chosen = None
    for p in parts:
        if p["required"]:
            p["loaded"] = True
    out["memory"] = _bundle_memory(parts, chosen[1] if chosen else None, facts["memory"])
    if out["memory"]["fits"] is False:
        mem = out["memory"]
        problems.append(f"it needs {_size(mem['need_bytes'])} of memory, {_size(mem['available_bytes'])} is available")
    out["problems"] = problems
    out["runnable"] = not problems
    out["exit_code"] = 0 if out["runnable"] else 1
    return out


def _gguf_kv(p: dict, f: Path, rec: dict, ctx: int) -> None:
    """A GGUF decoder's KV cache at ``ctx`` positions (the type the runtime gives it: F32 for FP32 decoders, else
    F16), from its checked header; a header llama.cpp must not read, or a context longer than the GGUF's, stops it."""
    from .gguf_header import read_gguf_header
    from .llamacpp import kv_cache_bytes

    kv_type = "f32" if rec.get("precision") == "fp32" else "f16"
    try:
        header = read_gguf_header(f)
        p["kv_cache_bytes"] = kv_cache_bytes(header, ctx, kv_type)
    except EdgeVLMError as e:
        p.update(backend=None, runs=False, why=e.problem, fix=e.fix)
        return
    p["kv_cache"] = f"{kv_type} (llama.cpp), from the GGUF header"
    meta = header["metadata"]
    trained = meta.get(f"{meta.get('general.architecture', '')}.context_length")
    if isinstance(trained, int) and not isinstance(trained, bool) and ctx > trained:
        p.update(backend=None, runs=False, why=f"the bundle's context of {ctx:,} positions is longer than the "
                 f"{trained:,} its GGUF was exported for", fix="export the bundle again")


def _bundle_memory(parts: list, decoder: dict | None, mem: dict) -> dict:
    loaded = [p for p in parts if p["loaded"] and p["size_bytes"] is not None]
    weights = sum(p["size_bytes"] for p in loaded)
    kv = (decoder or {}).get("kv_cache_bytes") or 0
    allowance = int(weights * ACTIVATION_FRACTION)
    need = weights + kv + allowance
    available = mem["usable_bytes"]
    return {"weights_bytes": weights, "kv_cache_bytes": kv, "activation_allowance_bytes": allowance,
            "activation_allowance_fraction": ACTIVATION_FRACTION, "need_bytes": need, "available_bytes": available,
            "parts_counted": [p["name"] for p in loaded], "fits": None if available is None else need <= available}


def _bundle_lines(b: dict, lines: list) -> None:
    def add(topic, status, fact, fix=None):
        _line(lines, topic, status, fact, fix, section="bundle")

    if not b["readable"]:
        add("bundle", MISSING, f"{b['path']}: {b['problem']}", b["fix"])
        return
    add("bundle", OK, f"{b['path']}: {b['model']} ({b['task']}), target {b['target']} ({b['target_format']}), "
        f"{b['precision']}" + (f", context {b['context_length']:,} positions" if b["context_length"] else ""))
    for p in b["parts"]:
        what = f"{p['file']} ({p['format']}, {p['precision']}, {_size(p['size_bytes'])})"
        if p["runs"]:
            status = WARN if p["why"] else OK
            fact = f"{what} -> {p['backend']}" + (f"; {p['why']}" if p["why"] else "")
        else:
            status = MISSING if p["required"] or p["role"] == "decoder" else WARN
            fact = f"{what} -> {'no backend here' if p['size_bytes'] is not None else 'cannot be used'}: {p['why']}"
        if p["decode_kernel"]:
            fact += f"; decode steps: {p['decode_kernel']}"
        if p["engine"] and not p["engine"]["engine"]:
            fact += f"; TensorRT engine not used: {p['engine']['why']}"
        if p["role"] == "decoder" and p["runs"] and not p["loaded"]:
            fact += " (not the decoder the runtime picks by default)"
        add(f"part {p['name']}", status, fact, p["fix"])
    d = b["decoder"]
    if d is not None and d["backend"] is not None and d["backend"] != d["default"]:
        add("decoder", WARN, f"the bundle's default decoder ({d['default']}) cannot run here; {d['backend']} can",
            f"run it with --decoder-backend {d['backend']}")
    if b["task"] == "vlm" and b["tokenizers"] is None:
        add("tokenizers", MISSING, "not installed: VLM bundles' prompts need it", "pip install tokenizers")
    mem = b["memory"]
    dec = next((p for p in b["parts"] if p["loaded"] and p["role"] == "decoder"), None)
    if dec is not None and dec["kv_cache_bytes"] is not None:
        add("KV cache", OK, f"{_size(dec['kv_cache_bytes'])} for {b['context_length']:,} positions ({dec['name']}: "
            f"{dec['kv_cache']})")
    need = (f"needs {_size(mem['need_bytes'])}: weights {_size(mem['weights_bytes'])} (file sizes of "
            f"{', '.join(mem['parts_counted']) or 'no part'})" + (f" + KV cache {_size(mem['kv_cache_bytes'])}"
                                                                    if mem["kv_cache_bytes"] else "")
            + f" + {int(ACTIVATION_FRACTION * 100)}% of the weights for activations "
            f"{_size(mem['activation_allowance_bytes'])}")
    if mem["fits"] is None:
        add("fits in memory", WARN, f"unknown: {need}; available memory unknown here")
    elif mem["fits"]:
        add("fits in memory", OK, f"yes: {need}; {_size(mem['available_bytes'])} available")
    else:
        add("fits in memory", MISSING, f"no: {need}; only {_size(mem['available_bytes'])} available",
            "free memory, or export a smaller precision (--quant int4) or a smaller model")
    if b["runnable"]:
        dec_name = f" (decoder: {d['backend']})" if d and d["backend"] else ""
        add("verdict", OK, f"this bundle can run here{dec_name}")
    else:
        add("verdict", MISSING, "this bundle cannot run here: " + "; ".join(b["problems"]))


# -- the report ------------------------------------------------------------------------------------------------
def report(bundle=None) -> dict:
    """Everything doctor knows, as one JSON-ready dict with stable keys (``SCHEMA_VERSION``; keys are only ever
    added): the facts per topic, ``checks`` (one line each: section, topic, status ok/missing/off/warn, fact,
    fix), ``bundle`` (None without one) and ``exit_code`` (0; 1: the bundle cannot run here; 2: no readable
    bundle)."""
    py = _python_facts()
    cpu = cpu_facts()
    facts = {"schema_version": SCHEMA_VERSION, "edgevlm": py["edgevlm"], "python": py["python"],
             "platform": {"system": py["system"], "release": py["release"], "machine": py["machine"]},
             "cpu": cpu, "memory": memory_facts(), "onnxruntime": onnxruntime_facts(), "gpu": gpu_facts(),
             "tensorrt": tensorrt_facts(), "jetson": jetson_facts(), "llama_cpp": llama_cpp_facts(),
             "coreml": coreml_facts(), "kernels": kernels_facts(cpu["arch_kind"]), "tokenizers": py["tokenizers"]}
    lines: list = []
    _line(lines, "edgevlm", OK, f"{py['edgevlm']}, Python {py['python']}, {py['system']} {py['release']} "
          f"{py['machine']}")
    _cpu_lines(cpu, lines)
    _memory_lines(facts["memory"], lines)
    _ort_lines(facts["onnxruntime"], lines)
    _kernel_lines(facts["kernels"], lines)
    _llama_lines(facts["llama_cpp"], lines, nvidia=bool(facts["gpu"]["gpus"] or facts["jetson"]["l4t"]))
    _nvidia_lines(facts["gpu"], facts["tensorrt"], facts["jetson"], lines)
    _coreml_lines(facts["coreml"], lines)
    if py["tokenizers"]:
        _line(lines, "tokenizers", OK, f"{py['tokenizers']} (VLM bundles' prompts)")
    else:
        _line(lines, "tokenizers", MISSING, "not installed: VLM bundles cannot run here", "pip install tokenizers")
    b = None
    if bundle is not None:
        b = bundle_facts(bundle, facts)
        _bundle_lines(b, lines)
    return {**facts, "bundle": b, "checks": lines, "exit_code": 0 if b is None else b["exit_code"]}


def format_report(rep: dict) -> str:
    """The report as text: one line per fact (status, topic, fact), the fix on the line below it."""
    out = ["edgevlm doctor: what this machine can run, and why"]
    section = None
    width = max((len(c["topic"]) for c in rep["checks"]), default=10)
    for c in rep["checks"]:
        if c["section"] != section:
            section = c["section"]
            if section == "bundle":
                out += ["", f"bundle {rep['bundle']['path']}"]
        out.append(f"{c['status']:<7}  {c['topic']:<{width}}  {c['fact']}")
        if c["fix"]:
            out.append(f"{'':<7}  {'':<{width}}  fix: {c['fix']}")
    b = rep.get("bundle")
    if b is not None:
        out.append("")
        out.append(f"exit {rep['exit_code']}: " + ("the bundle can run here" if rep["exit_code"] == 0 else
                                                   "the bundle cannot run here" if rep["exit_code"] == 1 else
                                                   "not a readable bundle"))
    return "\n".join(out)
