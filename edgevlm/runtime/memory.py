"""Weights in 2 MiB pages: glibc's malloc asked for transparent huge pages (Linux).

Decoding one token streams every weight matrix through the cores once. With 4 KiB pages a 1 GB decoder
spans 250 000 pages, far more than the TLB holds, so each matrix row costs page walks the hardware
prefetcher cannot hide; ONNX Runtime's and llama.cpp's weights live in plain ``malloc`` memory, which the
kernel backs with 4 KiB pages unless the process asks (THP mode ``madvise``, the common default).

glibc 2.35+ asks when the process starts with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (it then
``madvise(MADV_HUGEPAGE)``s what it maps), so the ``edgevlm`` command restarts itself once with that
setting (:func:`reexec_with_huge_pages`); library users set it before starting Python. Measured on the
project's 2-vCPU machine: 1.3B INT4 decoder 52 -> 47 ms per token, llama.cpp Q4_K_M 17.6 -> 19.1 tok/s, same
resident memory (docs/vlm-bundles.md, "Huge pages"). ``EDGEVLM_HUGE_PAGES=0`` turns it off.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
MEMINFO = Path("/proc/meminfo")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
OPT_OUT = "EDGEVLM_HUGE_PAGES"
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(sysfs: Path = THP_SYSFS) -> str | None:
    """The kernel's THP mode ("always", "madvise", "never"), or None where there is no such setting."""
    try:
        text = sysfs.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def _glibc_version() -> tuple[int, int] | None:
    name, version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def why_not(environ=None, mode: str | None = "auto", glibc="auto") -> str | None:
    """None when glibc can be asked for huge pages in a new process, else the reason it cannot or should not."""
    env = os.environ if environ is None else environ
    if env.get(OPT_OUT, "").strip() == "0":
        return f"turned off ({OPT_OUT}=0)"
    if not sys.platform.startswith("linux"):
        return f"transparent huge pages are a Linux feature (this is {sys.platform})"
    glibc = _glibc_version() if glibc == "auto" else glibc
    if glibc is None or glibc < (2, 35):
        return "needs glibc 2.35 or newer (glibc.malloc.hugetlb)" + ("" if glibc is None else f"; this is {glibc}")
    mode = thp_mode() if mode == "auto" else mode
    if mode not in ("always", "madvise"):
        return f"the kernel's transparent huge pages are {mode or 'unavailable'}"
    return None


def active(environ=None) -> bool:
    """Whether this process was started with glibc asked for huge pages."""
    env = os.environ if environ is None else environ
    return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def huge_page_env(environ=None, **probe) -> dict | None:
    """``environ`` plus the glibc setting, or None when it is already there or cannot apply (see :func:`why_not`)."""
    env = dict(os.environ if environ is None else environ)
    if active(env) or why_not(env, **probe):
        return None
    have = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{have}:{TUNABLE}" if have else TUNABLE
    return env


def reexec_with_huge_pages(argv: list[str]) -> None:
    """Restart ``python -m edgevlm ARGV`` with huge pages asked for; returns only when nothing is to be done.

    Called by the ``edgevlm`` command before it imports anything heavy (a restart then costs one Python start,
    ~50 ms). The new environment holds the setting, so the restarted process does not restart again.
    """
    env = huge_page_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", "edgevlm", *argv], env)
    except OSError:          # no exec (a frozen or sandboxed interpreter): run as we are
        return


def huge_pages_mib() -> float | None:
    """Anonymous memory of this process now in huge pages (MiB), from /proc/self/smaps_rollup; None off Linux."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def status() -> dict:
    """What a benchmark or ``edgevlm bench`` records: asked for, why not, and how much memory got huge pages."""
    on = active()
    mib = huge_pages_mib()
    return {"huge_pages": on, "huge_pages_why_not": None if on else (why_not() or "not asked for (started "
            f"without GLIBC_TUNABLES={TUNABLE})"), "huge_pages_mib": None if mib is None else round(mib, 1)}


# -- how much memory there is (edgevlm doctor, and llama.cpp's context check before it allocates) ------------------
def read_text(path: Path, limit: int = 1 << 20) -> str | None:
    """The first ``limit`` bytes of a system file as text (None when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def meminfo(path: Path | None = None) -> dict:
    """``MemTotal`` and ``MemAvailable`` of /proc/meminfo in bytes (keys absent where unknown)."""
    out = {}
    for line in (read_text(path or MEMINFO) or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            out[key] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def cgroup_room() -> tuple[int | None, int | None]:
    """(this process's cgroup memory limit, what it has left under it) in bytes, or (None, None) without one."""
    for limit_file, used_file in ((CGROUP_V2 / "memory.max", CGROUP_V2 / "memory.current"),
                                  (CGROUP_V1 / "memory.limit_in_bytes", CGROUP_V1 / "memory.usage_in_bytes")):
        limit = (read_text(limit_file, 64) or "").strip()
        if not limit.isdigit() or int(limit) >= 1 << 60:          # "max", absent, or v1's "no limit" (2**63 - 4096)
            continue
        used = (read_text(used_file, 64) or "").strip()
        return int(limit), max(0, int(limit) - int(used)) if used.isdigit() else None
    return None, None


def usable_bytes(available: int | None = None) -> int | None:
    """What this process can still take: ``MemAvailable`` (or ``available``), bounded by its cgroup's room; None
    where neither is known."""
    usable = meminfo().get("MemAvailable") if available is None else available
    room = cgroup_room()[1]
    if room is not None:
        usable = room if usable is None else min(usable, room)
    return usable
