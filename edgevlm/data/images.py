"""Safe image decoding and preprocessing in numpy and Pillow (the runtime path: no torch).

The same functions preprocess images for eager evaluation, calibration and bundles, so the
device sees exactly the tensors the model was validated on.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from ..errors import ImageError

# Pillow's decompression-bomb guard stays on; we make it an error rather than a warning.
MAX_PIXELS = 64_000_000
MAX_SIDE = 16_384
MIN_SIDE = 8
MAX_FILE_BYTES = 50 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _check_size(w: int, h: int, what: str) -> None:
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageError(f"{what} is {w}x{h} pixels, smaller than {MIN_SIDE}x{MIN_SIDE}", "use a larger image")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        raise ImageError(
            f"{what} is {w}x{h} pixels, over the limit of {MAX_PIXELS // 1_000_000} MP / {MAX_SIDE} px a side",
            "downscale the image before passing it",
        )


def _reason(e: Exception) -> str:
    msg = str(e).splitlines()[0][:100] if str(e) else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _high_depth_to_8bit(img: Image.Image, what: str) -> Image.Image:
    """A 16-bit, 32-bit integer or float single-channel image as 8-bit 'L', scaled by its value range.

    Pillow's ``convert("RGB")`` clips these modes at 255, so a 16-bit grayscale PNG (0..65535) would reach
    the model all white. Conventions: 'I;16*' is 0..65535; 'I' from a PNG is a 16-bit PNG, otherwise 0..255
    if it fits there, else 0..65535; 'F' is 0..1 if it fits there, else 0..255. Anything else is refused.
    """
    a = np.asarray(img)
    if a.ndim != 2:
        raise ImageError(f"{what} has mode {img.mode} with an array of shape {a.shape}", "save it as 8-bit RGB")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageError(f"{what} is a float image with NaN or infinite pixels", "save it as 8-bit RGB")
    lo, hi = (a.min().item(), a.max().item()) if a.size else (0, 0)
    if img.mode.startswith("I;16"):
        scale = 255 / 65535
    elif img.mode == "I":
        if lo < 0 or hi > 65535:
            raise ImageError(f"{what} is a 32-bit integer image with values {lo}..{hi}, outside 16-bit 0..65535",
                             "convert it to 8-bit (or 16-bit) with the display window you want, e.g. in Pillow "
                             "or numpy, before passing it")
        scale = 255 / 65535 if img.format == "PNG" or hi > 255 else 1.0
    else:  # "F"
        if lo < 0 or hi > 255:
            raise ImageError(f"{what} is a float image with values {lo:g}..{hi:g}, neither 0..1 nor 0..255",
                             "scale it to 0..1 or 0..255 (or save it as 8-bit RGB) before passing it")
        scale = 255.0 if hi <= 1 else 1.0
    x = np.rint(a.astype(np.float64) * scale)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "L")


def _to_rgb(img: Image.Image, what: str) -> Image.Image:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _high_depth_to_8bit(img, what)
    return img.convert("RGB")             # a copy, loaded here (a lazily opened file fails inside load_image)


def load_image(src: ImageLike) -> Image.Image:
    """Decode an image to RGB with the decompression-bomb guard on and clear errors.

    16-bit and 32-bit grayscale images are scaled to 8 bits by their range (not clipped, as Pillow's
    ``convert`` would); any failure to decode or convert is an :class:`ImageError` naming the input.
    """
    if isinstance(src, Image.Image):
        img, what = src, str(getattr(src, "filename", "") or "image")[:200]
    elif isinstance(src, np.ndarray):
        arr = src
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ImageError(f"array of shape {src.shape} is not an image", "pass an HxWx3 uint8 array")
        if arr.dtype != np.uint8:
            raise ImageError(f"array of dtype {arr.dtype} is not an 8-bit image", "pass uint8 values 0-255")
        img, what = Image.fromarray(arr[..., :3] if arr.shape[-1] != 1 else arr[..., 0]), "array"
    else:
        if not isinstance(src, (str, Path, bytes, bytearray)):
            raise ImageError(f"a {type(src).__name__} is not an image",
                             "pass a file path, image bytes, a PIL image or an HxWx3 uint8 array")
        what = str(src)[:200] if isinstance(src, (str, Path)) else "image bytes"
        if isinstance(src, (str, Path)):
            path = Path(src)
            if not path.is_file():
                raise ImageError(f"no image file at {path}", "check the path")
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ImageError(f"{path} is over {MAX_FILE_BYTES >> 20} MiB", "use a smaller image file")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ImageError(f"{path} cannot be read ({_reason(e)})", "check the file's permissions") from None
        else:
            data = bytes(src)
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                _check_size(*img.size, what)
                img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{what} is a decompression bomb (too many pixels)", "use a smaller image") from None
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), SyntaxError, ...
            raise ImageError(f"{what} is not a decodable image ({_reason(e)})",
                             "pass a complete PNG, JPEG, BMP or WebP file (re-save or re-download it)") from None
    _check_size(*img.size, what)
    try:
        return _to_rgb(img, what)
    except ImageError:
        raise
    except Exception as e:  # a lazily opened PIL image that is truncated, a mode Pillow cannot convert (LAB, ...)
        raise ImageError(f"{what} (mode {img.mode}) cannot be decoded or converted to RGB ({_reason(e)})",
                         "save it as an 8-bit RGB or grayscale PNG or JPEG") from None


def preprocess(img: ImageLike, pre) -> np.ndarray:
    """Resize the shorter side, centre-crop, scale and normalize: returns (3, H, W) float32.

    ``pre`` is a :class:`edgevlm.zoo.PreprocessSpec` or a manifest's preprocessing dict.
    """
    if isinstance(pre, dict):
        from ..zoo import PreprocessSpec

        pre = PreprocessSpec.from_dict(pre)
    img = load_image(img)
    # Same arithmetic as timm's eval transform (torchvision Resize + CenterCrop): shorter side to
    # `resize`, longer side truncated, crop offsets rounded.
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = pre.resize, int(pre.resize * long / short)
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[pre.interpolation])
    left, top = int(round((nw - pre.input_size) / 2.0)), int(round((nh - pre.input_size) / 2.0))
    img = img.crop((left, top, left + pre.input_size, top + pre.input_size))
    x = np.asarray(img, dtype=np.float32) / 255.0                     # (H, W, 3)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))                 # (3, H, W)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
