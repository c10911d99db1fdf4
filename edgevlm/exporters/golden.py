"""Writing a bundle's golden cases at export (the check itself: :mod:`edgevlm.runtime.golden`; format:
docs/golden.md).

Each model kind gives its cases (the input image, for VLMs the prompt, and what eager PyTorch answered) and the
figures its bundle-to-be measured here through the torch-free runtime; this module stores the images as PNG
(the files the runtime reads: eager saw the same decoded pixels), derives nothing itself and checks the size rule:
the golden part stays under 1% of the bundle or 200 KB, whichever is larger.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExportError
from ..runtime import golden as g


def png_bytes(img) -> bytes:
    """``img`` (a PIL image) encoded as a golden case stores it (RGB PNG): eager decodes these bytes, as the
    runtime decodes the file, so both see the same pixels."""
    import io

    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_image(img, work: Path, name: str) -> Path:
    """``img`` (a PIL image, or its :func:`png_bytes`) as ``golden/<name>.png`` in the bundle being staged;
    returns its path. Eager and the runtime both read this file back, so they see the same pixels."""
    d = work / g.GOLDEN_DIR
    d.mkdir(exist_ok=True)
    path = d / f"{name}.png"
    path.write_bytes(img if isinstance(img, bytes) else png_bytes(img))
    return path


def _bundle_bytes(work: Path) -> int:
    return sum(p.stat().st_size for p in work.rglob("*") if p.is_file())


def write(work: Path, kind: str, cases: list[dict], measured: dict) -> dict:
    """Write ``golden/golden.json`` (the images are already there); returns the manifest's ``golden`` block."""
    doc = {"version": g.VERSION, "kind": kind, "margins": g.MARGINS, "measured": measured, "cases": cases}
    path = work / g.GOLDEN_JSON
    path.write_text(json.dumps(doc, indent=1) + "\n")
    size = sum(p.stat().st_size for p in (work / g.GOLDEN_DIR).iterdir() if p.is_file())
    limit = max(g.MAX_GOLDEN_BYTES, _bundle_bytes(work) // 100)
    if size > limit:
        raise ExportError(f"the golden cases take {size:,} bytes, over the {limit:,} allowed (1% of the bundle or "
                          "200 KB)", "report this as a bug (the cases' images should be small)")
    rec = {"path": g.GOLDEN_JSON, "version": g.VERSION, "cases": len(cases), "bytes": size}
    if kind == "vlm":
        rec["new_tokens"] = max(len(c["eager"]["tokens"]) for c in cases)
    return rec
