"""edgevlm.runtime.memory: glibc asked for transparent huge pages, and whether memory really gets them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgevlm.runtime import memory

# A child that mallocs 256 MiB through libc (as ONNX Runtime and llama.cpp get their weight memory), writes
# every page, and reports how much of its anonymous memory sits in huge pages.
CHILD = """
import ctypes, json
from edgevlm.runtime.memory import huge_pages_mib
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
n = 256 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
print(json.dumps({"huge_mib": huge_pages_mib()}))
"""


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert memory.thp_mode(f) == "madvise"
    f.write_text("[always] madvise never\n")
    assert memory.thp_mode(f) == "always"
    assert memory.thp_mode(tmp_path / "missing") is None


def test_why_not_names_each_reason():
    ok = dict(mode="madvise", glibc=(2, 36))
    assert memory.why_not({}, **ok) is None
    assert memory.why_not({}, mode="always", glibc=(2, 39)) is None
    assert "EDGEVLM_HUGE_PAGES=0" in memory.why_not({"EDGEVLM_HUGE_PAGES": "0"}, **ok)
    assert "2.35" in memory.why_not({}, mode="madvise", glibc=(2, 31))
    assert "2.35" in memory.why_not({}, mode="madvise", glibc=None)          # musl, or no libc found
    assert "never" in memory.why_not({}, mode="never", glibc=(2, 36))
    assert "unavailable" in memory.why_not({}, mode=None, glibc=(2, 36))


def test_huge_page_env_adds_the_tunable_once_and_keeps_the_others():
    ok = dict(mode="madvise", glibc=(2, 36))
    env = memory.huge_page_env({"PATH": "/bin"}, **ok)
    assert env["GLIBC_TUNABLES"] == memory.TUNABLE and env["PATH"] == "/bin"
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    env = memory.huge_page_env(mine, **ok)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{memory.TUNABLE}"
    assert mine == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}            # the caller's mapping is not changed
    assert memory.active(env) and memory.huge_page_env(env, **ok) is None     # already there: no restart loop
    assert memory.huge_page_env({"EDGEVLM_HUGE_PAGES": "0"}, **ok) is None
    assert memory.huge_page_env({}, mode="never", glibc=(2, 36)) is None


@pytest.mark.skipif(memory.why_not({}) is not None, reason=f"huge pages cannot apply here: {memory.why_not({})}")
def test_the_tunable_puts_malloc_memory_in_huge_pages():
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "EDGEVLM_HUGE_PAGES")}

    def child(env):
        r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])["huge_mib"]

    on = child(memory.huge_page_env(base))
    assert on >= 200, f"only {on} MiB of 256 in huge pages with {memory.TUNABLE}"
    if memory.thp_mode() == "madvise":          # with "always" the kernel gives them to everyone anyway
        assert child(base) < 64


def test_bench_peak_rss_is_this_process_not_the_one_that_started_it():
    """Linux carries ru_maxrss across fork and exec; bench's peak is the address space's own (VmHWM), so a bench
    started from a large process (a test runner, a notebook) does not report its parent's peak."""
    import subprocess
    import sys

    import numpy as np

    held = np.ones(400 * 2**20 // 8)          # 400 MiB resident in this process
    held[::512] += 1
    code = ("import resource; from edgevlm.runtime.bench import peak_rss_mib; "
            "print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    peak, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                check=True).stdout.split())
    assert inherited > 400 or sys.platform != "linux"        # what ru_maxrss says in the child
    assert peak < 200, peak                                   # a Python with numpy imported, not the parent
    del held
