"""Numpy helpers a VLM bundle shares with its exporter (``edgevlm.exporters.vlm_onnx``): decoder I/O names, the
decoder's additive attention mask, Moondream's crop merge and LLaVA-Mini's splice.

They live on the runtime side because the runtime is torch-free and imports nothing from the exporters
(``[tool.importlinter]`` in pyproject.toml); the exporters import them from here.
"""
from __future__ import annotations

import numpy as np

DECODERS = ("onnxruntime", "llama.cpp", "coreml")
# backend -> the part it runs (coreml: a stateful Core ML program, run here by the reference interpreter)
DECODER_PARTS = {"onnxruntime": "decoder", "llama.cpp": "decoder_gguf", "coreml": "decoder_coreml"}


def decoder_backends(parts: dict) -> list[str]:
    """The decoder backends a VLM bundle's ``parts`` carry, in the order the runtime prefers them."""
    return [b for b in DECODERS if DECODER_PARTS[b] in parts]

MASK_MIN = float(np.finfo(np.float32).min)      # "masked" in the additive attention masks


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of decoder.onnx, in graph order."""
    kv = [f"{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    return (["inputs_embeds", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["logits"] + [f"present.{n}" for n in kv])


def attention_mask(n_new: int, n_past: int = 0, bidirectional_prefix: int = 0) -> np.ndarray:
    """The decoder's additive mask (1, 1, n_new, n_past + n_new): causal, 0 = attend, MASK_MIN = masked.

    ``bidirectional_prefix`` > 1: the first that many positions (counted from 0, prefill only) also see
    each other ahead, as Moondream's BOS + image prefix.
    """
    q = np.arange(n_past, n_past + n_new)[:, None]
    k = np.arange(n_past + n_new)[None, :]
    allowed = k <= q
    if bidirectional_prefix > 1:
        allowed |= (q < bidirectional_prefix) & (k < bidirectional_prefix)
    return np.where(allowed, 0.0, MASK_MIN).astype(np.float32)[None, None]


def merge_crops_numpy(feats: np.ndarray, grid: tuple[int, int], side: int, margin: int) -> np.ndarray:
    """Moondream's ``MoondreamConnector.merge`` in numpy: (V, N, C) tower features, global view first,
    then rows*cols local crops -> (N, 2C) = [global | local crops stitched (inner margins dropped) and
    average-pooled (adaptive, as torch) back to side x side]."""
    feats = np.asarray(feats, dtype=np.float32)
    rows, cols = int(grid[0]), int(grid[1])
    v, n, c = feats.shape
    if rows * cols != v - 1 or n != side * side:
        raise ValueError(f"{v} views of {n} features do not make a global view plus a {rows}x{cols} grid "
                         f"of {side}x{side} crops")
    s, m = side, margin
    tiles = feats[1:].reshape(rows, cols, s, s, c)
    step = s - 2 * m
    out = np.zeros((rows * step + 2 * m, cols * step + 2 * m, c), np.float32)             # (H', W', C)
    for r in range(rows):
        y0, y1 = (0 if r == 0 else m), (s if r == rows - 1 else s - m)
        for q in range(cols):
            x0, x1 = (0 if q == 0 else m), (s if q == cols - 1 else s - m)
            out[r * step + y0:r * step + y1, q * step + x0:q * step + x1] = tiles[r, q, y0:y1, x0:x1]

    def pool_matrix(length: int) -> np.ndarray:            # torch adaptive_avg_pool bins: [floor, ceil)
        a = np.zeros((s, length), np.float32)
        for i in range(s):
            lo, hi = (i * length) // s, -(-((i + 1) * length) // s)
            a[i, lo:hi] = 1.0 / (hi - lo)
        return a

    pooled = np.einsum("ih,hwc,jw->ijc", pool_matrix(out.shape[0]), out, pool_matrix(out.shape[1]))
    return np.concatenate([feats[0], pooled.reshape(s * s, c).astype(np.float32)], axis=-1)   # (N, 2C)


def splice_llava_mini(fused: np.ndarray, n_img: int, n_tokens: int, n_before: int) -> np.ndarray:
    """LlavaMiniModel.splice from prefusion.onnx's output (1, n_img + L, D): [fused text before <image> ;
    the N compressed vision tokens ; fused text after] -> (1, L + N, D)."""
    text = fused[:, n_img:]
    vis = fused[:, n_img - n_tokens:n_img]
    return np.concatenate([text[:, :n_before], vis, text[:, n_before:]], axis=1)


__all__ = ["MASK_MIN", "attention_mask", "decoder_io_names", "merge_crops_numpy", "splice_llava_mini"]
