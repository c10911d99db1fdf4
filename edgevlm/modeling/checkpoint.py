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
