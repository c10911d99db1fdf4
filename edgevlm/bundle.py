"""Bundles: a directory with manifest.json, the artifacts, and what the device needs to run them.

Written atomically: everything goes into a temporary sibling directory that is renamed into
place only when complete, so a failed export leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KIND = "edgevlm-bundle"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_table(root: Path) -> dict:
    """Every file of the bundle (package directories included) with its sha256 and size."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in _files(root)}


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to replace an existing bundle unless asked to."""
    if Path(out).exists() and not overwrite:
        raise BundleError(f"{out} already exists", "pass --overwrite or choose another --out")


@contextmanager
def staging(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it becomes ``out``, on failure it disappears."""
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError(f"bundle for {out} was not finished (no manifest)", "report this as a bug")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(root: Path, manifest: dict) -> dict:
    """Add schema facts and the file table, then write manifest.json (last, after every artifact)."""
    manifest = {"kind": KIND, "schema_version": SCHEMA_VERSION, **manifest, "files": file_table(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(bundle: Path) -> dict:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"no bundle at {bundle}", "pass a directory made by `edgevlm export`")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST}", "pass a directory made by `edgevlm export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BundleError(f"{path} is not valid JSON", "export the bundle again") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleError(f"{path} is not an edgevlm manifest", "export the bundle again")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{path} has no schema_version", "export the bundle again")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{bundle} uses manifest schema {version}; this edgevlm reads up to {SCHEMA_VERSION}",
            "upgrade edgevlm (pip install -U edgevlm) or export the bundle with this version",
        )
    for key in ("model", "target", "artifacts", "files"):
        if key not in manifest:
            raise BundleError(f"{path} lacks {key!r}", "export the bundle again")
    return manifest


def verify(bundle: Path, manifest: dict) -> None:
    """Check every file's size and sha256 against the manifest; extra or missing files fail."""
    bundle = Path(bundle)
    listed = manifest["files"]
    present = {p.relative_to(bundle).as_posix() for p in _files(bundle)}
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"{bundle} is missing {', '.join(missing[:5])}", "copy the whole bundle directory again")
    for rel, rec in listed.items():
        p = bundle / rel
        if p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
            raise BundleError(f"{bundle / rel} does not match its checksum in {MANIFEST} (modified or corrupt)",
                              "copy the bundle again or re-export it; never edit bundle files by hand")
    # Files the device itself adds next to the artifacts (a TensorRT engine, its cache).
    device = tuple(manifest.get("device_files", ()))
    extra = sorted(f for f in present - set(listed) if not f.startswith(device) or not device)
    if extra:
        raise BundleError(f"{bundle} holds files the manifest does not list: {', '.join(extra[:5])}",
                          "remove them, or re-export the bundle")
