"""Scratch and staging directories that a killed process does not leave behind for good.

Every temporary directory edgevlm makes carries the id of the process that made it in its name: scratch
directories live under one folder of the system's temp directory (``edgevlm-<uid>``), staging directories beside
the bundle they will become (``.NAME.edgevlm-staging.<pid>.<random>``). Whoever makes the next one removes those
whose process is gone, so a killed export is cleaned up by the next run.
Standard library only: the torch-free runtime uses it too.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

_PID = re.compile(r"\.(\d+)\.[^.]*$")          # NAME.<pid>.<random>


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:             # someone else's process: alive
        return True
    except OverflowError:
        return False
    return True


def sweep(folder: Path, prefix: str) -> list[Path]:
    """Remove entries of ``folder`` named ``prefix.<pid>.<random>`` whose process has ended; returns them."""
    gone = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return gone
    for p in entries:
        if not p.name.startswith(prefix + "."):
            continue
        m = _PID.search(p.name[len(prefix):])
        if m is None or pid_alive(int(m.group(1))):
            continue
        if p.is_symlink() or not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


def root() -> Path:
    """This user's scratch folder under the system temp directory (made 0700; refused if another user owns it)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"edgevlm-{uid}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(folder)
    except OSError as e:
        raise ConfigError(f"cannot make edgevlm's scratch folder {folder}: {e.strerror}",
                          "set TMPDIR to a writable directory") from None
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != uid):
        raise ConfigError(f"{folder} is not a directory of this user's (a link, a file or someone else's)",
                          "remove it, or set TMPDIR to a directory of your own")
    return folder


def make_scratch(name: str) -> Path:
    """A new scratch directory ``<root>/<name>.<pid>.<random>``, after removing those of ended processes."""
    folder = root()
    sweep(folder, name)
    return Path(tempfile.mkdtemp(prefix=f"{name}.{os.getpid()}.", dir=folder))


@contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A scratch directory for the duration of a ``with`` block (see :func:`make_scratch`)."""
    d = make_scratch(name)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def umask() -> int:
    """The process's umask (read without changing it where Linux tells it, else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
