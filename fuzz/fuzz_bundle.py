"""Fuzz the bundle loader: ``edgevlm.runtime.load(bundle_dir, verify=...)`` on mutated bundles, then one
prediction (classify, or a two-token generate) when it loads, and sometimes its golden cases (``.verify()``).

Every input (its bytes drive all choices) takes a copy of a real bundle (the cached VLM bundle with ONNX and GGUF
decoders, or the classification bundle) and applies one to four edits:
- the manifest: structural edits (``_common.mutate_json``);
- an artifact (ONNX graph, GGUF decoder, tokenizer.json): bit flips, interesting integers, truncation,
  insertions; JSON edits of tokenizer.json; one artifact's bytes swapped with another's or copied over it;
- the file set: a file deleted, an extra file, a file replaced by a directory;
then, most of the time, refreshes the manifest's ``files`` table (sizes and sha256, ``bundle.file_table``) so that
the loaders behind ``verify`` are reached. Expected: a loaded bundle, or an EdgeVLMError.

    python fuzz/fuzz_bundle.py --seconds 600
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bundles  # noqa: E402
import _common  # noqa: E402


def load():
    import numpy as np

    from edgevlm import bundle, runtime
    from edgevlm.errors import EdgeVLMError

    src = _bundles.bundles()
    files = {k: sorted(p.relative_to(v).as_posix() for p in v.rglob("*") if p.is_file() and p.name != bundle.MANIFEST)
             for k, v in src.items()}
    rng = np.random.default_rng(0)
    return {"bundle": bundle, "runtime": runtime, "Edge": EdgeVLMError, "src": src, "files": files,
            "image": rng.integers(0, 255, (24, 24, 3), dtype=np.uint8), "work": _common.work_dir() / "b",
            "bases": {k: json.loads((v / bundle.MANIFEST).read_text()) for k, v in src.items()}}


def mutate_bundle(ctx, d: Path, kind: str, src: _common.Source, rec=None) -> dict:
    """Apply the edits; returns the manifest to write (its files table refreshed or not)."""
    m = ctx["bases"][kind]
    names = ctx["files"][kind]
    for _ in range(src.int(1, 4)):
        op = src.int(0, 9)
        name = src.pick(names)
        p = d / name
        if op in (0, 1):                                        # the manifest
            m = _common.mutate_json(m, src, max_ops=4)
            rec and rec.count("edit: manifest")
        elif op in (2, 3, 4) and p.is_file():                   # an artifact's bytes
            data = p.read_bytes()
            if name.endswith(".json") and src.bool():
                try:
                    data = json.dumps(_common.mutate_json(json.loads(data), src, max_ops=4)).encode()
                except (ValueError, RecursionError):
                    pass
            else:
                data = _common.mutate_bytes(data, src, max_ops=4)
            _bundles.replace_file(p, data)
            rec and rec.count(f"edit: bytes of {Path(name).suffix}")
        elif op == 5 and p.is_file():                           # another artifact's bytes
            other = d / src.pick(names)
            if other.is_file():
                _bundles.replace_file(p, other.read_bytes())
                rec and rec.count("edit: swapped artifact")
        elif op == 6 and p.is_file():                           # truncated
            data = p.read_bytes()
            _bundles.replace_file(p, data[: src.int(0, len(data))])
            rec and rec.count("edit: truncated artifact")
        elif op == 7 and p.exists():                            # deleted, or a directory in its place
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            if src.bool():
                p.mkdir()
            rec and rec.count("edit: file removed")
        elif op == 8:                                           # an extra file
            (d / src.pick(["extra.bin", "trt_cache/engine", "decoder.onnx.data", name + ".bak"])).parent.mkdir(
                exist_ok=True)
            (d / src.pick(["extra.bin", "decoder.onnx.data"])).write_bytes(src.bytes(src.int(0, 64)))
            rec and rec.count("edit: extra file")
        elif op == 9 and p.is_file():                           # a header-sized prefix of another format
            _bundles.replace_file(p, src.pick([b"GGUF", b"\x08\x07\x12", b"{}", b"", b"\x00" * 64])
                                  + p.read_bytes()[src.int(0, 64):])
            rec and rec.count("edit: foreign header")
    if src.int(0, 7) != 0:
        try:
            m = json.loads(json.dumps(m))
            if isinstance(m, dict):
                m["files"] = ctx["bundle"].file_table(d)
                rec and rec.count("files table refreshed")
        except ctx["Edge"]:
            pass
    return m


def one_input(ctx, data: bytes, rec) -> None:
    src = _common.Source(data)
    kind = src.pick(sorted(ctx["src"]))
    d = _bundles.link_copy(ctx["src"][kind], ctx["work"])
    m = mutate_bundle(ctx, d, kind, src, rec)
    text = json.dumps(m, allow_nan=True).encode()
    if src.int(0, 15) == 0:
        text = _common.mutate_bytes(text, src)
    _bundles.replace_file(d / ctx["bundle"].MANIFEST, text)
    verify = src.int(0, 3) != 0
    decoder = src.pick([None, "onnxruntime", "llama.cpp"]) if kind == "vlm" else None
    try:
        model = ctx["runtime"].load(d, verify=verify, threads=1, decoder=decoder)
    except ctx["Edge"]:
        rec.count("load refused (EdgeVLMError)")
        return
    rec.count(f"loaded {kind}")
    try:
        if kind == "vlm":
            model.generate(ctx["image"], "how many circles?", max_new_tokens=2)
        else:
            model.classify(ctx["image"], top_k=2)
        rec.count(f"ran {kind}")
        if src.int(0, 3) == 0:          # the golden cases (golden/golden.json, its PNGs) are bundle input too
            rep = model.verify()
            rec.count(f"verified {kind}: {'pass' if rep.passed else 'fail'}" if rep.golden else
                      f"verified {kind}: no golden cases")
    except ctx["Edge"]:
        rec.count(f"run refused {kind} (EdgeVLMError)")
    finally:
        close = getattr(model, "close", None)
        if close:
            close()


def seeds(ctx, folder: Path) -> None:
    for i in range(8):
        (folder / f"seed{i}").write_bytes(bytes([i]) + bytes(range(i, 256)))


TARGET = _common.Target("bundle", load, one_input, seeds, max_len=4096, timeout_s=120)

if __name__ == "__main__":
    sys.exit(_common.main(TARGET))
