"""Bundles: a directory with manifest.json, the artifacts, and what the device needs to run them.

Written atomically: everything goes into a staging directory beside the output that is renamed into place only
when complete, so a failed export leaves nothing half-written (and a killed one is cleaned up by the next export
to the same place, see :mod:`edgevlm.scratch`).

Read as untrusted input: every path the manifest names is resolved by :func:`resolve`, which refuses anything that
leaves the bundle, passes through a symbolic link or is not in the manifest's checksummed ``files`` table (ONNX
external data included), before anything opens it.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from .errors import BundleError, ConfigError
from .manifest import KIND, MAX_MANIFEST_BYTES, SCHEMA_VERSION, parse_manifest, validate_manifest
from .scratch import sweep, umask

MANIFEST = "manifest.json"
STAGING = "edgevlm-staging"       # .NAME.edgevlm-staging.<pid>.<random> beside the output
OLD = "edgevlm-old"               # .NAME.edgevlm-old.<pid>.<random>: the bundle being replaced, for an instant
_REEXPORT = "re-export the bundle with `edgevlm export`, or copy the whole bundle directory again"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    """The bundle's regular files (the manifest aside); a link or a special file anywhere in it is refused."""
    root = Path(root)
    found = []
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(top) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{p} is a symbolic link; bundles hold only plain files and directories",
                                  "copy the bundle without links (cp -rL), or re-export it")
            if name in files and not stat.S_ISREG(mode):
                raise BundleError(f"{p} is not a regular file", "remove it, or re-export the bundle")
            if name in files and not (top == str(root) and name == MANIFEST):
                found.append(p)
    return sorted(found)


def file_table(root: Path) -> dict:
    """Every file of the bundle (package directories included) with its sha256 and size."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in _files(root)}


# -- writing ---------------------------------------------------------------------------------------------------
def listed_size(files: dict, rel: str) -> int:
    """Bytes of one artifact from a manifest's ``files`` table: a file (an ONNX graph with its ``<file>.data``), or a
    directory (a Core ML package) as the sum of the files listed under it."""
    if rel in files:
        return int(files[rel]["size"]) + int(files.get(rel + ".data", {}).get("size", 0))
    prefix = rel.rstrip("/") + "/"
    return sum(int(v["size"]) for k, v in files.items() if k.startswith(prefix))


def is_bundle(path: Path) -> bool:
    """``path`` is a directory holding an edgevlm manifest (the only directories --overwrite replaces)."""
    m = Path(path) / MANIFEST
    try:
        st = os.lstat(m)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
            return False
        return json.loads(m.read_bytes()).get("kind") == KIND
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_out(out: Path, overwrite: bool) -> Path:
    """Refuse an output path before any work is done: edgevlm writes only a new path, an empty directory, or
    (with ``overwrite``) a bundle of its own; the place must be a writable directory that is not ``.``, ``/`` or
    the home folder."""
    out = Path(out)
    fix = "pass a new directory, e.g. --out bundles/NAME"
    if not str(out) or out.name in ("", ".", ".."):
        raise ConfigError(f"--out {str(out) or repr('')} names no new directory", fix)
    where = Path(os.path.abspath(out))
    for special, what in ((Path("/"), "the root directory"), (Path.home(), "your home folder"),
                          (Path.cwd(), "the current directory")):
        if where == Path(os.path.abspath(special)):
            raise ConfigError(f"--out {out} is {what}", fix)
    parent = where.parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a directory", fix)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable", "choose a directory you can write to")
    if os.path.islink(out):
        raise ConfigError(f"--out {out} is a symbolic link; edgevlm does not replace links", fix)
    if not os.path.lexists(out):
        return out
    if not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a bundle; edgevlm replaces only its own bundles",
                          fix)
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be read: {e.strerror}", fix) from None
    if entries and not is_bundle(out):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise ConfigError(f"--out {out} holds files that are not an edgevlm bundle ({shown}); --overwrite replaces "
                          "only bundles and empty directories", "choose another --out, or empty it yourself")
    if not overwrite:
        raise BundleError(f"{out} already exists", "pass --overwrite or choose another --out")
    return out


def _chmod_tree_to_umask(root: Path) -> None:
    """mkdtemp makes 0700 directories: give the bundle's directories the mode any other output gets."""
    mode = 0o777 & ~umask()
    for top, dirs, _ in os.walk(root):
        for d in [top] + [os.path.join(top, x) for x in dirs]:
            if stat.S_IMODE(os.lstat(d).st_mode) == 0o700:
                os.chmod(d, mode)


@contextmanager
def staging(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory beside ``out``; on success it becomes ``out``, on failure it disappears. Staging
    directories of killed exports to the same place are removed first."""
    out = Path(out)
    check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in (STAGING, OLD):
        sweep(out.parent, f".{out.name}.{kind}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{STAGING}.{os.getpid()}.", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise BundleError(f"bundle for {out} was not finished (no manifest)", "report this as a bug")
        _chmod_tree_to_umask(tmp)
        check_out(out, overwrite)          # again: the place may have changed while the export ran
        if os.path.lexists(out):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.{OLD}.{os.getpid()}.", dir=out.parent))
            os.replace(out, old)           # onto the empty directory just made
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


# -- reading ---------------------------------------------------------------------------------------------------
def read_manifest(bundle: Path) -> dict:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"no bundle at {bundle}", "pass a directory made by `edgevlm export`")
    try:
        st = os.lstat(path)
    except OSError:
        raise BundleError(f"{bundle} has no {MANIFEST}", "pass a directory made by `edgevlm export`") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file (a link or a special file)", _REEXPORT)
    with path.open("rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    manifest = parse_manifest(data, str(path))
    validate_manifest(manifest, str(path))           # types, required keys, ranges: the runtime relies on them
    return manifest


def verify(bundle: Path, manifest: dict) -> None:
    """Check every file's size and sha256 against the manifest; extra or missing files, links and special files
    fail."""
    bundle = Path(bundle)
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    where = bundle / MANIFEST
    if not isinstance(listed, dict):
        raise BundleError(f"{where} has no files table (an object of path -> sha256 and size)", _REEXPORT)
    for rel, rec in listed.items():
        if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and isinstance(rec.get("size"), int)
                and not isinstance(rec.get("size"), bool)):
            raise BundleError(f"{where} lists {str(rel)[:100]!r} without a sha256 string and a size", _REEXPORT)
    device = manifest.get("device_files", [])
    if not isinstance(device, list) or not all(isinstance(d, str) and d for d in device):
        raise BundleError(f"{where} has device_files that are not a list of path prefixes", _REEXPORT)
    present = {p.relative_to(bundle).as_posix() for p in _files(bundle)}
    missing = sorted(set(listed) - present)
    if missing:
        raise BundleError(f"{bundle} is missing {', '.join(missing[:5])}", "copy the whole bundle directory again")
    for rel, rec in listed.items():
        p = bundle / rel                   # one of the walked files (listed and present): inside the bundle
        if p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
            raise BundleError(f"{bundle / rel} does not match its checksum in {MANIFEST} (modified or corrupt)",
                              "copy the bundle again or re-export it; never edit bundle files by hand")
    # Files the device itself adds next to the artifacts (a TensorRT engine, its cache).
    device = tuple(device)
    extra = sorted(f for f in present - set(listed) if not f.startswith(device) or not device)
    if extra:
        raise BundleError(f"{bundle} holds files the manifest does not list: {', '.join(extra[:5])}",
                          "remove them, or re-export the bundle")


# -- containment -----------------------------------------------------------------------------------------------
def resolve(bundle: Path, manifest: dict, rel, what: str) -> Path:
    """The bundle's file (or package directory) ``rel`` that the manifest names as ``what``, refused unless it is
    a relative path that stays inside the bundle, passes through no symbolic link and is listed with its checksum
    in the manifest's ``files`` (a directory: every file under it listed). ONNX graphs' external data is held to
    the same rules. Nothing is opened before these checks pass."""
    bundle = Path(bundle)
    shown = f"{what} path {rel!r} in {bundle / MANIFEST}"
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise BundleError(f"{shown} is not a relative path inside the bundle", _REEXPORT)
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise BundleError(f"{shown} points outside the bundle", _REEXPORT)
    key = pure.as_posix()
    here = bundle
    for part in pure.parts:
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except OSError:
            raise BundleError(f"{shown}: {here} does not exist", "copy the whole bundle directory again") from None
        if stat.S_ISLNK(mode):
            raise BundleError(f"{shown} passes through a symbolic link ({here})", _REEXPORT)
    files = manifest.get("files")
    files = files if isinstance(files, dict) else {}
    if stat.S_ISDIR(mode):
        inside = [f for f in files if f.startswith(key + "/")]
        present = {p.relative_to(bundle).as_posix() for p in _files(here)}      # refuses links inside
        if not inside or present - set(inside):
            raise BundleError(f"{shown} is a directory whose files are not all listed in the manifest's files",
                              _REEXPORT)
        return here
    if not stat.S_ISREG(mode):
        raise BundleError(f"{shown} is not a regular file", _REEXPORT)
    if key not in files:
        raise BundleError(f"{shown} is not listed in the manifest's files (it has no checksum)", _REEXPORT)
    if here.suffix == ".onnx":
        for loc in onnx_external_locations(here):
            base = pure.parent
            ext = PurePosixPath(loc)
            if ext.is_absolute() or ".." in ext.parts or "\\" in loc or "\x00" in loc:
                raise BundleError(f"{bundle / key} keeps weights in {loc!r}, outside the bundle", _REEXPORT)
            resolve(bundle, manifest, (base / ext).as_posix(), f"external data of {key}")
    return here


# ONNX protobuf fields that lead to tensors (onnx/onnx.proto3): message -> {field number: message it holds}.
_ONNX_FIELDS = {
    "model": {7: "graph", 20: "training", 25: "function"},          # ModelProto.graph, training_info, functions
    "training": {1: "graph", 2: "graph"},                            # TrainingInfoProto.initialization, algorithm
    "function": {7: "node"},                                         # FunctionProto.node
    "graph": {1: "node", 5: "tensor", 15: "sparse"},                 # GraphProto.node, initializer, sparse_initializer
    "node": {5: "attribute"},                                        # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},                            # SparseTensorProto.values, indices
    "tensor": {13: "entry"},                                         # TensorProto.external_data
}


def read_varint(buf, i: int, end: int) -> tuple[int, int]:
    """(value, next index) of the protobuf base-128 varint at ``buf[i]``; ValueError when it runs past ``end``."""
    value = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _scan(buf, start: int, end: int):
    """(field number, start, end) of each length-delimited field of the message in ``buf[start:end]``."""
    i = start
    while i < end:
        key, i = read_varint(buf, i, end)
        wire = key & 7
        if wire == 0:
            _, i = read_varint(buf, i, end)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = read_varint(buf, i, end)
            if i + n > end:
                raise ValueError("field past the end")
            yield key >> 3, i, i + n
            i += n
        else:
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("field past the end")


def onnx_external_locations(path: Path) -> list[str]:
    """Every ``location`` an ONNX file's tensors give for external data (initializers, sparse ones, attribute
    tensors, subgraphs, functions), read from the protobuf wire format without loading any weights."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise BundleError(f"{path} is empty, not an ONNX graph", _REEXPORT)
    found: list[str] = []
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        stack = [("model", 0, size)]
        try:
            while stack:
                kind, start, end = stack.pop()
                if kind == "entry":
                    kv = {n: bytes(buf[a:b]) for n, a, b in _scan(buf, start, end) if n in (1, 2)}
                    if kv.get(1) == b"location":
                        found.append(kv.get(2, b"").decode("utf-8", "replace"))
                    continue
                fields = _ONNX_FIELDS[kind]
                stack.extend((fields[n], a, b) for n, a, b in _scan(buf, start, end) if n in fields)
        except ValueError as e:
            raise BundleError(f"{path} is not a valid ONNX graph ({e})", _REEXPORT) from None
    return found
