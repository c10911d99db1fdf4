"""Moondream2's skills on a bundle, without torch: ``caption``, ``query``, ``detect`` and ``point`` as the eager
``MoondreamModel`` runs them (``edgevlm.modeling.moondream2``), token for token and bin for bin.

>>> vlm = runtime.load("bundles/moondream2-cpu-int8")
>>> vlm.caption("photo.jpg", length="short")
>>> vlm.detect("photo.jpg", "car")        # [{"x_min": ..., "y_min": ..., "x_max": ..., "y_max": ...}, ...]

What the skills need besides the graphs is the ``generation.skills`` block of the manifest (written by
``MoondreamModel.runtime_spec``): caption templates, detect/point templates, the EOS id, the size bin rule and the
default answer length. detect/point also need

* the ``region`` part (``region.onnx``, :class:`Region`): the coordinate/size Fourier encoders and MLP decoders;
* a decoder that gives the last position's hidden state before the final LayerNorm, which the region decoders read:
  the ONNX decoder of a family that declares it (``OrtDecoder.gives_hidden``). llama.cpp does not expose that state
  (its embeddings output is after the final norm), so a bundle opened with the llama.cpp decoder refuses them.

The region loop (:func:`locate`): prefill [BOS, image, template with the object]; while the next token is not EOS,
decode x from the hidden state, feed its encoding, decode y, feed it, (detect:) decode (w, h), feed it, then read the
next token's logits. The pipeline (``VLMPipeline``) is passed in; this module imports nothing from ``runtime.vlm``.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from ..errors import BundleError, ConfigError
from ..generation import Generation, GenerationConfig, GenerationStats

SKILLS = ("caption", "query", "detect", "point")


def skills_spec(pipe, skill: str) -> dict:
    """The bundle's ``generation.skills`` block, or a ConfigError when its model has no such skill."""
    spec = pipe.spec.get("skills")
    if not isinstance(spec, dict):
        family = pipe.manifest.get("model", {}).get("family", "this model")
        raise ConfigError(f"{pipe.path} ({family}) has no {skill} skill",
                          "ask with generate(image, prompt) (CLI: drop --skill); caption, query, detect and point "
                          "are Moondream2's")
    return spec


def assemble(pipe, image, ids: list[int]) -> tuple[np.ndarray, int, int]:
    """[BOS, image embeddings, ``ids``] -> (inputs_embeds (1, T, D), bidirectional prefix, image tokens), as
    ``MoondreamModel.embed_prompt``: BOS and the image attend both ways; no image, no prefix."""
    seq = [pipe.embed_ids([int(pipe.spec["prompt"]["bos_id"])])]
    n_img = 0
    if image is not None:
        img = pipe.encode_image(image)
        n_img = int(img.shape[1])
        seq.append(img.astype(np.float32))
    prefix = 1 + n_img if image is not None else 0
    seq.append(pipe.embed_ids(list(ids)))
    return np.concatenate(seq, 1), prefix, n_img


def text(pipe, image, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
         seed: int | None = None, stream: bool = False) -> Generation | Iterator[str]:
    """Decode after [BOS, image, ``ids``] (``MoondreamModel._text``): a Generation, or text pieces."""
    cfg = GenerationConfig(max_new_tokens, temperature, top_p, 0, seed, pipe.stop_ids)
    t0 = time.perf_counter()
    embeds, prefix, n_img = assemble(pipe, image, ids)
    stats = GenerationStats(prompt_tokens=1 + len(ids), image_tokens=n_img)
    stats.encode_s = time.perf_counter() - t0
    return pipe.run_embeds(embeds, cfg, stats, prefix, stream)


def caption(pipe, image, length: str = "normal", stream: bool = False, max_new_tokens: int | None = None,
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
    """A caption of ``length`` (short / normal, long from revision 2025-03-27): text, or pieces with ``stream``."""
    spec = skills_spec(pipe, "caption")
    caps = spec.get("caption") or {}
    if length not in caps:
        raise ConfigError(f"caption length {length!r} is not in this bundle", f"use one of: {', '.join(caps)}")
    out = text(pipe, image, caps[length], max_new_tokens or int(spec.get("max_tokens", 64)), temperature, top_p,
               seed, stream)
    return out if stream else out.text


def query(pipe, image, question: str, stream: bool = False, max_new_tokens: int | None = None,
          temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
    """The answer to ``question`` (the bundle's query template, as ``generate``): text, or pieces with ``stream``."""
    spec = skills_spec(pipe, "query")
    out = pipe.generate(image, question, max_new_tokens or int(spec.get("max_tokens", 64)), temperature, top_p, 0,
                        seed, stream=stream)
    return out if stream else out.text


class Region:
    """region.onnx (``MoondreamModel.export_parts``): four independent paths, each fed its own rows; a call feeds 0
    rows to the paths it does not need, since ONNX Runtime runs every node whatever outputs are fetched (Core ML:
    one zero row, its smallest flexible size; ``graph.min_rows``)."""

    OUTPUTS = ("coord_embed", "size_embed", "coord_logits", "size_logits")

    def __init__(self, graph, hidden_size: int):
        missing = [o for o in self.OUTPUTS if o not in graph.outputs]
        if missing:
            raise BundleError(f"{graph.path.name} is not the region heads' graph: it lacks the output(s) "
                              f"{', '.join(missing)}", "re-export the bundle with `edgevlm export`")
        self.graph = graph
        self.index = {o: graph.outputs.index(o) for o in self.OUTPUTS}
        n = int(getattr(graph, "min_rows", 0))       # Core ML's flexible shapes start at 1: one zero row there
        self.empty = {"coord": np.zeros((n, 1), np.float32), "size": np.zeros((n, 2), np.float32),
                      "coord_hidden": np.zeros((n, hidden_size), np.float32),
                      "size_hidden": np.zeros((n, hidden_size), np.float32)}

    def _run(self, output: str, **feeds) -> np.ndarray:
        return self.graph(**{**self.empty, **feeds})[self.index[output]]

    def decode_coordinate(self, hidden: np.ndarray) -> float:
        """The bin centre of the argmax, in [0, 1) (``MoondreamRegion.decode_coordinate``)."""
        logits = self._run("coord_logits", coord_hidden=np.asarray(hidden, np.float32).reshape(1, -1))[0]
        return int(np.argmax(logits)) / logits.shape[-1]

    def encode_coordinate(self, c: float) -> np.ndarray:                              # -> (1, 1, D)
        return self._run("coord_embed", coord=np.array([[c]], np.float32))

    def decode_size(self, hidden: np.ndarray, log_scale: bool) -> tuple[float, float]:
        """(w, h) from the argmax bins: 2^(bin / (bins - 1) * 10 - 10) with log sizes, else bin / bins."""
        logits = self._run("size_logits", size_hidden=np.asarray(hidden, np.float32).reshape(1, -1))[0]   # (2, bins)
        bins = logits.shape[-1]
        w_bin, h_bin = (int(b) for b in np.argmax(logits, axis=-1))
        if log_scale:
            return tuple(2.0 ** (b / (bins - 1) * 10.0 - 10.0) for b in (w_bin, h_bin))
        return w_bin / bins, h_bin / bins

    def encode_size(self, w: float, h: float) -> np.ndarray:                         # -> (1, 1, D)
        return self._run("size_embed", size=np.array([[w, h]], np.float32))


def _check_locate(pipe, kind: str) -> dict:
    """The skills block, after the checks that refuse detect/point: no region part, or a decoder without the
    pre-final-norm hidden state (llama.cpp, or an ONNX decoder exported without the ``hidden`` output)."""
    spec = skills_spec(pipe, kind)
    if kind not in spec:
        raise ConfigError(f"{pipe.path} has no {kind} template in its skills", "re-export the bundle")
    if "region" not in pipe.manifest["parts"]:
        raise BundleError(f"{pipe.path} has no region part (Moondream2's region heads), so it cannot {kind}",
                          "re-export the bundle with this edgevlm from a 2025 checkpoint that has them "
                          "(model.region.* in model.safetensors)")
    dec = pipe.decoder
    if not getattr(dec, "gives_hidden", False):
        if dec.name == "llama.cpp":
            fix = ("open the bundle with its ONNX decoder: runtime.load(path, decoder='onnxruntime') (CLI: "
                   "--decoder-backend onnxruntime)" if "decoder" in pipe.manifest["parts"] else
                   "re-export the bundle with --decoder onnx or --decoder both")
            raise ConfigError(f"{kind} reads the language model's hidden state before its final LayerNorm, which the "
                              "llama.cpp decoder does not give", fix)
        raise BundleError(f"{getattr(getattr(dec, 'graph', None), 'path', 'the decoder')} has no 'hidden' output, "
                          f"which {kind} reads", "re-export the bundle with this edgevlm")
    return spec


def locate(pipe, image, kind: str, obj: str, max_objects: int = 50) -> list[dict]:
    """``MoondreamModel._locate`` on the bundle: boxes (detect) or points (point) of ``obj``."""
    if kind not in ("detect", "point"):
        raise ConfigError(f"unknown region skill {kind!r}", "use detect or point")
    spec = _check_locate(pipe, kind)
    if image is None:
        raise ConfigError(f"{kind} needs an image", "pass an image")
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 0:
        raise ConfigError(f"max_objects must be a whole number >= 0, got {max_objects!r}", "pass e.g. 50")
    if not isinstance(obj, str) or not obj.strip():
        raise ConfigError("the object is empty", "pass a non-empty object, e.g. 'cat'")
    space = " " if pipe.spec["prompt"].get("space_before_text") else ""
    t = spec[kind]
    ids = list(t["prefix"]) + pipe.tokenizer.encode(space + obj) + list(t["suffix"])
    region = pipe.region_heads()
    embeds, prefix, _ = assemble(pipe, image, ids)
    n = int(embeds.shape[1])
    eos, per_object, log_sizes = int(spec["eos_id"]), (3 if kind == "detect" else 2), bool(spec.get("log_sizes"))
    dec, out = pipe.decoder, []
    dec.reset()
    try:
        logits = dec.prefill(embeds[0], prefix)
        while int(np.argmax(logits)) != eos and len(out) < max_objects and n + per_object <= pipe.context_length:
            x = region.decode_coordinate(dec.last_hidden)
            dec.step_embeds(region.encode_coordinate(x))
            y = region.decode_coordinate(dec.last_hidden)
            nxt = region.encode_coordinate(y)
            if kind == "detect":
                dec.step_embeds(nxt)
                w, h = region.decode_size(dec.last_hidden, log_sizes)
                nxt = region.encode_size(w, h)
                clip = lambda v: min(max(v, 0.0), 1.0)  # as the eager model (the reference leaves boxes unclipped)
                out.append({"x_min": clip(x - w / 2), "y_min": clip(y - h / 2),
                            "x_max": clip(x + w / 2), "y_max": clip(y + h / 2)})
            else:
                out.append({"x": x, "y": y})
            logits = dec.step_embeds(nxt)
            n += per_object
    finally:
        dec.reset()
    return out


def detect(pipe, image, obj: str, max_objects: int = 50) -> list[dict]:
    """Boxes of ``obj`` as {x_min, y_min, x_max, y_max}, normalized to [0, 1]."""
    return locate(pipe, image, "detect", obj, max_objects)


def point(pipe, image, obj: str, max_objects: int = 50) -> list[dict]:
    """Centre points of ``obj`` as {x, y}, normalized to [0, 1)."""
    return locate(pipe, image, "point", obj, max_objects)


__all__ = ["SKILLS", "Region", "assemble", "caption", "detect", "locate", "point", "query", "skills_spec", "text"]
