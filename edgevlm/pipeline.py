"""The one export pipeline every model kind goes through.

    check the output -> load (and every check that needs no file written) -> stage in a temporary directory ->
    export, quantize and validate the parts -> golden cases (eager's answers on a few inputs and the criteria a
    device run must meet, :mod:`edgevlm.runtime.golden`) -> manifest header + the kind's blocks -> atomic rename

A model kind (:mod:`edgevlm.build` for classifiers, :mod:`edgevlm.build_vlm` for VLMs) is an
:class:`ExportJob`: what it loads, the parts it writes, and the manifest blocks it adds. The target profile
(``export/*.yaml``) decides format, precisions and quantization rules; nothing here branches on a target or a
family. :func:`edgevlm.api.export` picks the kind from the model's name.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .bundle import check_out, staging, write_manifest
from .progress import Stages
from .scratch import scratch as scratch_dir


@dataclass
class ExportJob:
    """One model kind's contribution to the pipeline.

    ``load(stages)`` loads the model and makes every check that needs no file (it runs before anything is staged);
    ``build(work, scratch, stages)`` writes the parts into ``work`` (the staging directory; ``scratch`` is a private
    temporary directory for intermediates) and returns the manifest's blocks besides the header;
    ``golden(work, blocks, stages)`` writes ``golden/`` after the parts are validated and returns the manifest's
    ``golden`` block.
    """

    task: str                                      # the manifest's "task": classification | vlm
    out: Path
    overwrite: bool
    stages: int                                    # how many progress stages load + build announce, besides "write"
    load: Callable[[Stages], None]
    build: Callable[[Path, Path, Stages], dict]
    packages: tuple[str, ...] = ()                 # versions recorded in the manifest
    golden: Callable[[Path, dict, Stages], dict] | None = None


def versions(packages: tuple[str, ...]) -> dict:
    """edgevlm's, Python's and the installed versions of ``packages`` (absent ones left out)."""
    out = {"edgevlm": __version__, "python": platform.python_version()}
    for n in packages:
        try:
            out[n] = _md.version(n)
        except _md.PackageNotFoundError:
            pass
    return out


def header(task: str) -> dict:
    """The manifest keys every bundle starts with."""
    return {"edgevlm_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "task": task}


def run(job: ExportJob, quiet: bool = False) -> tuple[Path, dict]:
    """Run one export job to a written, validated bundle; returns (bundle path, manifest)."""
    check_out(job.out, job.overwrite)
    stages = Stages(job.stages + 1 + (job.golden is not None), quiet=quiet)
    job.load(stages)
    with staging(job.out, overwrite=job.overwrite) as work, scratch_dir(job.task) as tmp:
        blocks = job.build(work, Path(tmp), stages)
        if job.golden is not None:
            with stages("golden cases (eager's answers and the criteria for a device run)"):
                blocks["golden"] = job.golden(work, blocks, stages)
        with stages(f"write bundle {job.out}"):
            manifest = write_manifest(work, {**header(job.task), **blocks, "versions": versions(job.packages)})
    return job.out, manifest
