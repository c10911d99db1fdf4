"""Reading checkpoints without unpickling untrusted code.

safetensors files are read directly. PyTorch files (.pth/.pt/.bin/.ckpt) go through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".pth.tar")  # .pth.tar: ml-fastvit
SAFETENSORS_NAMES = ("model.safetensors", "pytorch_model.safetensors")


MAX_HEADER_BYTES = 100_000_000      # safetensors' own limit: a longer "header" is a corrupt file or not one at all
REDOWNLOAD = "the file is truncated or corrupt: download or copy it again (or export / train it again)"
# bits per element of every safetensors dtype edgevlm reads (torch has no 4- and 6-bit floats)
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "I16": 16, "U16": 16, "F16": 16,
                          "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64}


def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < MAX_HEADER_BYTES and head[8:9] == b"{"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _not_json(name: str):
    """Python's json reads NaN and Infinity; JSON (and the safetensors library) does not."""
    raise ValueError(f"{name} is not a JSON value")


def read_safetensors_header(path: Path, fix: str = REDOWNLOAD) -> dict:
    """The parsed, checked header of a safetensors file: ``{"metadata": {...}, "tensors": {name: info}}``.

    Reads only the header (no tensor data, nothing unpickled) and checks what safetensors itself would,
    so that every way a file can be broken is a :class:`CheckpointError` naming the file: too short, a header
    length past the end of the file or over 100 MB, a header that is not a JSON object, metadata that is not
    strings, an unknown dtype, a bad shape, offsets past the end of the file or not matching dtype x shape,
    tensors that overlap or leave gaps, bytes after the last tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is {size} bytes long, too short for a safetensors file", fix)
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a valid safetensors file: its header length ({n:,} bytes) is "
                                  f"absurd (over {MAX_HEADER_BYTES:,})", fix)
        if n > size - 8:
            raise CheckpointError(f"{path} is not a valid safetensors file: its header length ({n:,} bytes) is "
                                  f"larger than the file ({size:,} bytes; truncated?)", fix)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_not_json)
        json.dumps(header, ensure_ascii=False).encode("utf-8")    # a lone surrogate (\ud800) is not UTF-8
    except RecursionError:              # nesting deeper than the interpreter's limit
        raise CheckpointError(f"{path} is not a valid safetensors file: its header nests too deeply", fix) from None
    except ValueError as e:             # UnicodeDecodeError, JSONDecodeError, an integer of over 4300 digits
        raise CheckpointError(f"{path} is not a valid safetensors file: its header is not JSON "
                              f"({str(e).splitlines()[0][:120]})", fix) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a valid safetensors file: its header is a JSON "
                              f"{type(header).__name__}, not an object", fix)
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path} is not a valid safetensors file: its __metadata__ is not a map of strings", fix)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name[:100]!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where} has no dtype, shape and data_offsets in the header", fix)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BITS:
            raise CheckpointError(f"{where} has dtype {str(dtype)[:40]!r}, which edgevlm cannot read "
                                  f"(it reads {', '.join(SAFETENSORS_DTYPE_BITS)})", fix)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has shape {str(shape)[:80]}, not a list of non-negative sizes", fix)
        count = 1
        for d in shape:                 # as safetensors counts: left to right in 64 bits, even past a 0
            count *= d
            if d >= 1 << 64 or count >= 1 << 64:
                raise CheckpointError(f"{where} has shape {str(shape)[:80]}, over 2^64 elements", fix)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has data offsets {str(offsets)[:80]}, not [begin, end]", fix)
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(f"{where} ends at byte {end:,} of the data, past the end of the file (which holds "
                                  f"{data_size:,} bytes of data; truncated?)", fix)
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype] // 8
        if end - begin != nbytes:
            raise CheckpointError(f"{where} ({dtype} {tuple(shape)}) needs {nbytes:,} bytes but its offsets span "
                                  f"{end - begin:,}", fix)
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise CheckpointError(f"{path}: tensor {name[:100]!r} starts at byte {begin:,} of the data, not {pos:,} "
                                  "(tensors overlap or leave gaps)", fix)
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path} has {data_size - pos:,} bytes after its last tensor (not a file safetensors "
                              "wrote, or damaged)", fix)
    return {"metadata": meta, "tensors": header}


def read_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file (edgevlm stores its facts under 'edgevlm'); {} for other files."""
    path = resolve_file(path)
    if path.suffix != ".safetensors" and not _looks_like_safetensors(path):
        return {}
    meta = read_safetensors_header(path)["metadata"]
    if "edgevlm" in meta:
        try:
            facts = json.loads(meta["edgevlm"])
        except (ValueError, RecursionError):        # not JSON, an integer of over 4300 digits, too deep
            facts = None
        if not isinstance(facts, dict):
            raise CheckpointError(f"{path} has unreadable edgevlm metadata", "re-save the checkpoint") from None
        return facts
    return {}


def resolve_file(path: Path) -> Path:
    """A checkpoint path: a file, or a directory holding model.safetensors (Hugging Face layout)."""
    path = Path(path)
    if path.is_dir():
        for name in SAFETENSORS_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CheckpointError(
            f"no model.safetensors in {path}" + (f" (found {len(found)} .safetensors files)" if found else ""),
            "point --weights at the checkpoint file itself",
        )
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}", "check the path, or pass --weights random")
    return path


def load_safetensors(path: Path, fix: str = REDOWNLOAD) -> dict:
    """All tensors of a safetensors file, its header checked first (:func:`read_safetensors_header`)."""
    from safetensors.torch import load_file

    read_safetensors_header(path, fix)
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})",
                              fix) from None


def load_state_dict(path: Path, fix: str = REDOWNLOAD) -> dict:
    """Load tensors from a safetensors or weights-only PyTorch file, unwrapping common containers.

    ``fix``: what to tell the user when a safetensors file is broken (where it comes from, how to remake it)."""
    import torch

    path = resolve_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty", "download or copy the checkpoint again")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        sd = load_safetensors(path, fix)
    elif path.name.endswith(PICKLE_SUFFIXES):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e).splitlines()[0][:160]
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in str(e).lower():
                raise CheckpointError(
                    f"{path} is a pickle that holds more than tensors and will not be unpickled ({msg})",
                    "convert it to safetensors where you trust it: "
                    "safetensors.torch.save_file(state_dict, 'model.safetensors')",
                ) from None
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({msg})",
                                  "download it again or convert it to safetensors") from None
    else:
        raise CheckpointError(
            f"{path} is neither safetensors nor a PyTorch checkpoint (suffix {path.suffix or 'none'})",
            "pass a .safetensors file (preferred) or a .pth/.pt/.bin state dict",
        )
    for key in ("state_dict", "model", "model_ema", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors", "save model.state_dict() to safetensors")
    return sd


def fit_state_dict(model, sd: dict, source: str,
                   fix: str = "check that --model names the checkpoint's architecture (and --num-classes its head)",
                   ) -> None:
    """Load strictly; on a mismatch, list the missing, unexpected, mis-shaped and mis-typed keys."""
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sd if k in target and sd[k].shape != target[k].shape]
    # a float weight stored as integers, booleans or complex numbers would be cast silently into garbage
    dtypes = [f"{k}: checkpoint {str(sd[k].dtype).replace('torch.', '')} vs model "
              f"{str(target[k].dtype).replace('torch.', '')}"
              for k in sd if k in target and target[k].is_floating_point() and not sd[k].is_floating_point()]
    if missing or unexpected or shapes or dtypes:
        def _some(xs):
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")

        parts = [f"{len(missing)} missing: {_some(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_some(unexpected)}" if unexpected else "",
                 f"{len(shapes)} mis-shaped: {_some(shapes)}" if shapes else "",
                 f"{len(dtypes)} of a non-float dtype: {_some(dtypes)}" if dtypes else ""]
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(p for p in parts if p),
            fix,
        )
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in sd.items()}, strict=True)


def load_checkpoint_dir(path: Path) -> dict:
    """All tensors of a Hugging Face style directory: one safetensors file or a sharded index."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if path.is_dir() and index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:   # ValueError: bad JSON
            raise CheckpointError(f"{index} is not a safetensors index ({e})", "download the index again") from None
        sd = {}
        for name in shards:
            shard = path / name
            if not shard.is_file():
                raise CheckpointError(f"shard {name} listed in {index.name} is missing from {path}",
                                      "download every shard of the checkpoint")
            sd.update(load_safetensors(shard))
        return sd
    return load_state_dict(path)


def read_model_config(folder: Path, model_type: str, what: str, note: str = "") -> dict:
    """``folder/config.json``, checked to be valid JSON of ``model_type``; ``what`` names the files to pass."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"no config.json in {folder}", f"pass {what}")
    try:
        cfg = json.loads(f.read_text())
    except (ValueError, RecursionError) as e:     # ValueError: not JSON or not UTF-8
        raise CheckpointError(f"{f} is not valid JSON ({str(e).splitlines()[0][:120] if str(e) else 'too deep'})",
                              "download config.json again") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f} holds a JSON {type(cfg).__name__}, not an object", "download config.json again")
    if cfg.get("model_type") != model_type:
        raise CheckpointError(f"{f} has model_type {cfg.get('model_type')!r}, not {model_type!r}",
                              "pick the zoo model of that family (see `edgevlm list`)" + note)
    return cfg
