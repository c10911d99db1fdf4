"""Stage-by-stage progress for long jobs, printed to stderr with elapsed time and (on Linux) the process's memory."""
from __future__ import annotations

import sys
import time


def memory_line() -> str:
    """'memory 6.7 GiB, peak 16.1 GiB': this process now and at its peak (runtime.bench's readers)."""
    from .runtime.bench import peak_rss_mib, rss_mib

    try:
        return f"memory {rss_mib() / 1024:.1f} GiB, peak {peak_rss_mib() / 1024:.1f} GiB"
    except OSError:                     # no /proc (not Linux)
        return ""


class Stages:
    """``with stages("export ONNX"): ...`` prints '[3/6] export ONNX ...' and how long it took."""

    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total, self.n, self.t0 = total, 0, time.time()
        self.stream = stream or sys.stderr
        self.quiet = quiet

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=self.stream, flush=True)

    def __call__(self, title: str) -> "Stages":
        self.n += 1
        self._title, self._t = title, time.time()
        self.log(f"[{self.n}/{self.total}] {title}")
        return self

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            mem = memory_line()
            self.log(f"      done in {time.time() - self._t:.1f}s" + (f"; {mem}" if mem else ""))
