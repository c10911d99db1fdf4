"""Fuzz the image decoder path: ``edgevlm.data.images.load_image`` + ``preprocess`` (and the VLM processor's
``preprocess_image``) on mutated PNG, JPEG, WebP, GIF, TIFF, BMP and PPM bytes.

The input is the image file itself. Expected: an RGB image within the size limits (and float32 arrays of the
spec's shape), or an ImageError. Pillow's decompression-bomb guard must stay on: checked after every input.

    python fuzz/fuzz_images.py --seconds 600
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

SPECS = [{"input_size": 16, "interpolation": "bicubic", "crop_pct": 0.875},
         {"input_size": 8, "interpolation": "nearest", "crop_pct": 1.0, "mean": [0, 0, 0], "std": [1, 1, 1]}]


def load():
    import numpy as np
    from PIL import Image

    from edgevlm.data import images
    from edgevlm.processor import ImageSpec, preprocess_image

    return {"np": np, "Image": Image, "images": images, "preprocess_image": preprocess_image,
            "vlm_specs": [ImageSpec(size=12, mode="crop"), ImageSpec(size=10, mode="squash", interpolation="bilinear")]}


def one_input(ctx, data: bytes, rec) -> None:
    images, Image, np = ctx["images"], ctx["Image"], ctx["np"]
    try:
        img = images.load_image(data)
        assert img.mode == "RGB", img.mode
        w, h = img.size
        assert images.MIN_SIDE <= w <= images.MAX_SIDE and images.MIN_SIDE <= h <= images.MAX_SIDE, img.size
        assert w * h <= images.MAX_PIXELS, img.size
        spec = SPECS[len(data) % len(SPECS)]
        x = images.preprocess(data, spec)
        assert x.shape == (3, spec["input_size"], spec["input_size"]) and x.dtype == np.float32, x.shape
        v = ctx["preprocess_image"](img, ctx["vlm_specs"][len(data) % 2])
        assert v.ndim == 4 and v.dtype == np.float32, v.shape
    finally:
        # the guard stays on whatever happened (load_image sets it; nothing may switch it off)
        assert Image.MAX_IMAGE_PIXELS == images.MAX_PIXELS, Image.MAX_IMAGE_PIXELS


def seeds(ctx, folder: Path) -> None:
    """Small images of every format and mode the decoder meets, written at start-up."""
    from PIL import Image

    np = ctx["np"]
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), "RGB")
    out = {}

    def save(name, img, fmt, **kw):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        out[name] = b.getvalue()

    save("rgb.png", rgb, "PNG")
    save("pal.png", rgb.convert("P"), "PNG")
    save("la.png", rgb.convert("LA"), "PNG")
    save("rgba.png", rgb.convert("RGBA"), "PNG")
    save("gray16.png", Image.fromarray((rng.integers(0, 65535, (10, 9))).astype(np.uint16)), "PNG")
    save("q.jpg", rgb, "JPEG", quality=50)
    save("prog.jpg", rgb, "JPEG", progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("gray.jpg", rgb.convert("L"), "JPEG")
    save("lossy.webp", rgb, "WEBP", quality=30)
    save("lossless.webp", rgb.convert("RGBA"), "WEBP", lossless=True)
    frames = [rgb.convert("P"), rgb.rotate(90, expand=False).convert("P")]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["anim.gif"] = b.getvalue()
    save("raw.tif", rgb, "TIFF")
    save("lzw.tif", rgb, "TIFF", compression="tiff_lzw")
    save("deflate.tif", rgb, "TIFF", compression="tiff_adobe_deflate")
    save("packbits.tif", rgb.convert("L"), "TIFF", compression="packbits")
    save("float.tif", Image.fromarray(rng.random((9, 9)).astype(np.float32), "F"), "TIFF")
    save("i16.tif", Image.fromarray(rng.integers(0, 65535, (9, 9)).astype(np.uint16)), "TIFF")
    save("i32.tif", Image.fromarray(rng.integers(0, 300, (9, 9)).astype(np.int32), "I"), "TIFF")
    save("bit.tif", rgb.convert("1"), "TIFF", compression="group4")
    save("rgb.bmp", rgb, "BMP")
    save("pal.bmp", rgb.convert("P"), "BMP")
    save("rgb.ppm", rgb, "PPM")
    save("gray.pgm", rgb.convert("L"), "PPM")
    for name, b in out.items():
        (folder / name).write_bytes(b)


TARGET = _common.Target("images", load, one_input, seeds, max_len=1 << 16, rss_limit_mb=2048,
                         instrument=("edgevlm", "PIL"))

if __name__ == "__main__":
    sys.exit(_common.main(TARGET))
