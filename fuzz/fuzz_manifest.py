"""Fuzz the manifest reader and verifier: ``edgevlm.bundle.read_manifest`` + ``verify`` and
``edgevlm.manifest.parse_manifest`` + ``validate_manifest`` (+ ``load_manifest``).

Inputs:
- raw: the bytes are manifest.json (seeds: real manifests, committed and of the cached bundles);
- structured (first byte 0x01): the rest of the bytes drive edits of a real manifest (keys deleted, values of
  other types or interesting values, paths, nesting ...; see ``_common.mutate_json``) and sometimes byte edits of
  its text.
The manifest is written into a copy of the real bundle it names (classification or VLM), so ``verify`` checks it
against real files. Expected: each call returns or raises EdgeVLMError.

    python fuzz/fuzz_manifest.py --seconds 600
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bundles  # noqa: E402
import _common  # noqa: E402


def load():
    from edgevlm import bundle, manifest
    from edgevlm.errors import EdgeVLMError

    src = _bundles.bundles()
    work = _common.work_dir()
    dirs = {k: _bundles.link_copy(v, work / k) for k, v in src.items()}
    bases = {k: json.loads((v / bundle.MANIFEST).read_text()) for k, v in src.items()}
    return {"bundle": bundle, "manifest": manifest, "Edge": EdgeVLMError, "dirs": dirs, "bases": bases}


def _attempt(ctx, rec, what: str, fn, *a):
    """Run one reader; EdgeVLMError is a fine answer (None), anything else propagates."""
    try:
        out = fn(*a)
    except ctx["Edge"]:
        rec.count(f"{what} refused")
        return None
    rec.count(f"{what} accepted")
    return True if out is None else out


def text_of(ctx, data: bytes) -> bytes:
    if data[:1] != b"\x01":
        return data
    src = _common.Source(data[1:])
    base = ctx["bases"][src.pick(sorted(ctx["bases"]))]
    m = _common.mutate_json(base, src, max_ops=8)
    text = json.dumps(m, indent=src.pick([None, 1]), ensure_ascii=src.bool()).encode("utf-8", "surrogatepass")
    if src.int(0, 3) == 0:
        text = _common.mutate_bytes(text, src, max_ops=3)
    return text


def one_input(ctx, data: bytes, rec) -> None:
    bundle, manifest = ctx["bundle"], ctx["manifest"]
    text = text_of(ctx, data)
    d = ctx["dirs"]["classification" if b'"classification"' in text else "vlm"]
    where = str(d / bundle.MANIFEST)
    m = _attempt(ctx, rec, "parse_manifest", manifest.parse_manifest, text, where)
    if m is not None:
        _attempt(ctx, rec, "validate_manifest", manifest.validate_manifest, m, where)
    _bundles.replace_file(d / bundle.MANIFEST, text)
    _attempt(ctx, rec, "load_manifest", manifest.load_manifest, d / bundle.MANIFEST)
    m2 = _attempt(ctx, rec, "read_manifest", bundle.read_manifest, d)
    if m2 is not None:
        _attempt(ctx, rec, "verify", bundle.verify, d, m2)


def seeds(ctx, folder: Path) -> None:
    for k, m in ctx["bases"].items():
        (folder / f"{k}.json").write_text(json.dumps(m, indent=2))
        (folder / f"{k}.structured").write_bytes(b"\x01" + bytes(range(256)))


TARGET = _common.Target("manifest", load, one_input, seeds, max_len=1 << 16)

if __name__ == "__main__":
    sys.exit(_common.main(TARGET))
