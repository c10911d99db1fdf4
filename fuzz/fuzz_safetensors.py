"""Fuzz the checkpoint loader: ``edgevlm.modeling.checkpoint.read_safetensors_header``, ``load_safetensors``,
``load_state_dict``, ``read_metadata``, and the default VLM's weights loader (``scenes_vlm.load``: tokenizer and
config overrides from the metadata, then the weights into the model).

Inputs:
- raw: the bytes are the .safetensors file (seed: a small file of several dtypes, committed);
- structured (first byte 0x01): edits of a real file (that small one, or an ``edgevlm_scenes_tiny`` checkpoint
  written by ``scenes_vlm.save`` at start-up): the header JSON (``_common.mutate_json``), the header length, the
  data bytes, the metadata's ``edgevlm`` facts and ``tokenizer`` JSON.
Expected: the tensors / the model, or a CheckpointError (any EdgeVLMError). One more rule: when
``read_safetensors_header`` accepts a file, the safetensors library must load it too (a refusal there is a check
the header reader misses, reported as a finding).

    python fuzz/fuzz_safetensors.py --seconds 600
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


class HeaderCheckMissed(AssertionError):
    """read_safetensors_header accepted a file the safetensors library then refused."""


def _scenes_seed() -> bytes:
    path = _common.cache_dir() / "edgevlm_scenes_tiny-random-v1.safetensors"
    if not path.is_file():
        from edgevlm.modeling import scenes_vlm
        from edgevlm.modeling.families import load_vlm

        model = load_vlm("edgevlm_scenes_tiny", "random")
        tmp = path.with_suffix(".part")
        scenes_vlm.save(model, tmp, {"config_overrides": {}, "trained_with": "fuzz seed"})
        tmp.rename(path)
    return path.read_bytes()


def _small_seed() -> bytes:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    return save({"a.weight": rng.normal(size=(2, 3)).astype(np.float32), "b": np.arange(4, dtype=np.int64),
                 "c": rng.normal(size=(1, 2, 2)).astype(np.float16), "d": np.array([True, False]),
                 "e": np.zeros((0, 3), np.float32)},
                metadata={"edgevlm": json.dumps({"config_overrides": {"text_layers": 1}}), "x": "y"})


def load():
    from edgevlm.errors import EdgeVLMError
    from edgevlm.modeling import checkpoint, scenes_vlm
    from edgevlm.modeling.families import get_vlm_recipe

    return {"ck": checkpoint, "scenes": scenes_vlm, "recipe": get_vlm_recipe("edgevlm_scenes_tiny"),
            "Edge": EdgeVLMError, "seeds": {"small": _small_seed(), "scenes": _scenes_seed()},
            "path": _common.work_dir() / "model.safetensors"}


def split(b: bytes):
    (n,) = struct.unpack_from("<Q", b)
    return json.loads(b[8:8 + n]), b[8 + n:]


def join(header, data: bytes, src: _common.Source | None = None) -> bytes:
    h = json.dumps(header, allow_nan=True).encode()
    if src is not None and src.int(0, 7) == 0:
        h = h + b" " * src.int(0, 16)                      # padding, as safetensors writes it
    n = len(h)
    if src is not None and src.int(0, 7) == 0:
        n = src.pick([0, 1, n - 1, n + 1, n + 8, 2**31, 2**63, 2**64 - 1, 100_000_001]) % (1 << 64)
    return struct.pack("<Q", n) + h + data


def mutate(ctx, src: _common.Source) -> bytes:
    name = src.pick(sorted(ctx["seeds"]))
    header, data = split(ctx["seeds"][name])
    for _ in range(src.int(1, 3)):
        op = src.int(0, 5)
        if op in (0, 1):                                     # the header (tensor entries mostly)
            key = src.pick(list(header)) if isinstance(header, dict) else None
            if key is not None and src.bool():
                header[key] = _common.mutate_json(header[key], src, max_ops=3)
            else:
                header = _common.mutate_json(header, src, max_ops=3)
        elif op == 2 and data:                               # the data bytes
            data = _common.mutate_bytes(data, src, max_ops=3)
        elif op == 3 and isinstance(header, dict):           # the edgevlm facts
            meta = header.get("__metadata__")
            if isinstance(meta, dict):
                try:
                    facts = json.loads(meta.get("edgevlm", "{}"))
                except (ValueError, TypeError):
                    facts = {}
                meta["edgevlm"] = json.dumps(_common.mutate_json(facts, src, max_ops=3), allow_nan=True)
        elif op == 4 and isinstance(header, dict):           # the tokenizer
            meta = header.get("__metadata__")
            if isinstance(meta, dict) and isinstance(meta.get("tokenizer"), str):
                try:
                    meta["tokenizer"] = json.dumps(_common.mutate_json(json.loads(meta["tokenizer"]), src, 4))
                except (ValueError, TypeError, RecursionError):
                    meta["tokenizer"] = src.text(32)
        elif op == 5:                                        # bytes after the data, or fewer bytes
            data = data + src.bytes(src.int(1, 32)) if src.bool() else data[: src.int(0, len(data))]
    return join(header, data, src)


def one_input(ctx, data: bytes, rec) -> None:
    ck, Edge = ctx["ck"], ctx["Edge"]
    b = mutate(ctx, _common.Source(data[1:])) if data[:1] == b"\x01" else data
    path = ctx["path"]
    path.write_bytes(b)
    try:
        hdr = ck.read_safetensors_header(path)
    except Edge:
        rec.count("header refused")
        hdr = None
    if hdr is not None:
        rec.count("header accepted")
    try:
        ck.load_safetensors(path)
        rec.count("loaded")
    except Edge as e:
        if hdr is not None:
            raise HeaderCheckMissed(f"read_safetensors_header accepted {path.name} but it does not load: {e}") from None
    for fn in (ck.load_state_dict, ck.read_metadata):
        try:
            fn(path)
        except Edge:
            pass
    if hdr is not None and "tokenizer" in hdr["metadata"]:
        try:
            ctx["scenes"].load(ctx["recipe"], path)
            rec.count("scenes_vlm loaded")
        except Edge:
            rec.count("scenes_vlm refused (EdgeVLMError)")


def seeds(ctx, folder: Path) -> None:
    (folder / "scenes.structured").write_bytes(b"\x01\x01" + bytes(range(256)))
    (folder / "small.structured").write_bytes(b"\x01\x00" + bytes(range(256)))


TARGET = _common.Target("safetensors", load, one_input, seeds, max_len=1 << 14, rss_limit_mb=6144)

if __name__ == "__main__":
    sys.exit(_common.main(TARGET))
