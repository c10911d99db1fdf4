"""Reading checkpoints without unpickling untrusted code.

safetensors files are read directly. PyTorch files (.pth/.pt/.bin/.ckpt) go through
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".pth.tar")  # .pth.tar: ml-fastvit
SAFETENSORS_NAMES = ("model.safetensors", "pytorch_model.safetensors")


def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def read_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file (edgevlm stores its facts under 'edgevlm')."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "edgevlm" in meta:
        try:
            return json.loads(meta["edgevlm"])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path} has unreadable edgevlm metadata", "re-save the checkpoint") from None
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


def load_state_dict(path: Path) -> dict:
    """Load tensors from a safetensors or weights-only PyTorch file, unwrapping common containers."""
    import torch

    path = resolve_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty", "download or copy the checkpoint again")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})",
                "the file is corrupt or truncated: download it again",
            ) from None
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
    """Load strictly; on a mismatch, list the missing, unexpected and mis-shaped keys."""
    target = model.state_dict()
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sd if k in target and sd[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        def _some(xs):
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")

        parts = [f"{len(missing)} missing: {_some(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_some(unexpected)}" if unexpected else "",
                 f"{len(shapes)} mis-shaped: {_some(shapes)}" if shapes else ""]
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
        from safetensors.torch import load_file

        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e})", "download the index again") from None
        sd = {}
        for name in shards:
            shard = path / name
            if not shard.is_file():
                raise CheckpointError(f"shard {name} listed in {index.name} is missing from {path}",
                                      "download every shard of the checkpoint")
            sd.update(load_file(str(shard)))
        return sd
    return load_state_dict(path)


def read_model_config(folder: Path, model_type: str, what: str, note: str = "") -> dict:
    """``folder/config.json``, checked to be valid JSON of ``model_type``; ``what`` names the files to pass."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"no config.json in {folder}", f"pass {what}")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON ({e})", "download config.json again") from None
    if cfg.get("model_type") != model_type:
        raise CheckpointError(f"{f} has model_type {cfg.get('model_type')!r}, not {model_type!r}",
                              "pick the zoo model of that family (see `edgevlm list`)" + note)
    return cfg
