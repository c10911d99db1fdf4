"""Stage-by-stage progress for long jobs, printed to stderr with elapsed time."""
from __future__ import annotations

import sys
import time


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
            self.log(f"      done in {time.time() - self._t:.1f}s")
