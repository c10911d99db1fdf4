"""What a VLM needs besides its weights: image preprocessing, a tokenizer, a prompt template.

Torch-free on purpose (numpy, Pillow, `tokenizers`), so that eager models and device bundles
share one processor and a bundle sees exactly the inputs the eager model was checked on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Extra image layouts (e.g. Moondream's overlapping crops): name -> fn(img, spec) -> (V, 3, H, W). The registry
# lives with them in edgevlm/data/crops.py (torch-free, so bundles can use them).
from .data.crops import IMAGE_LAYOUTS
from .data.images import ImageLike, load_image
from .errors import CheckpointError, ConfigError
from .generation import check_prompt

IMAGE_MARKER = "<image>"          # where image embeddings go in a template
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes pixel values.

    ``mode``: ``crop`` resizes the shorter side to ``size`` then centre-crops (CLIP, timm eval);
    ``squash`` resizes to ``size``x``size`` ignoring the aspect ratio (SigLIP, BLIP/EVA);
    ``pad`` pads to a square first (the image centred, the border the mean colour), then crops as ``crop`` does
    (LLaVA-1.5's "pad" aspect ratio; transformers' LlavaImageProcessor with ``do_pad``);
    any name in :data:`IMAGE_LAYOUTS` hands the image to that family's function.
    """

    size: int
    mode: str = "crop"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    options: dict = field(default_factory=dict)   # layout-specific (e.g. max_crops)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}", "use bilinear, bicubic or nearest")
        if self.mode not in ("crop", "squash", "pad") and self.mode not in IMAGE_LAYOUTS:
            raise ConfigError(f"unknown image mode {self.mode!r}",
                              f"use crop, squash, pad or one of: {', '.join(sorted(IMAGE_LAYOUTS)) or 'none'}")

    def to_dict(self) -> dict:
        return {"size": self.size, "mode": self.mode, "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std), "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSpec":
        return cls(size=int(d["size"]), mode=d.get("mode", "crop"), interpolation=d.get("interpolation", "bicubic"),
                   mean=tuple(d.get("mean", CLIP_MEAN)), std=tuple(d.get("std", CLIP_STD)),
                   options=dict(d.get("options", {})))


def normalize(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """(H, W, 3) uint8 image -> (3, H, W) float32, scaled by 1/255 and normalized."""
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def resize_crop(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Shorter side to ``size`` (the longer truncated, as Hugging Face's CLIP processor does), centre crop."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nw, nh = (size, new_long) if w <= h else (new_long, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _RESAMPLE[interpolation])
    top, left = (nh - size) // 2, (nw - size) // 2
    return img.crop((left, top, left + size, top + size))


def pad_square(img: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """The image centred on a square of its longer side, the border ``int(mean * 255)`` per channel (offset
    ``(long - short) // 2``, as transformers' LlavaImageProcessor.pad_to_square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(src: ImageLike, spec: ImageSpec) -> np.ndarray:
    """Decode (bomb guard on) and preprocess: returns (n_views, 3, H, W) float32."""
    img = load_image(src)
    if spec.mode in ("crop", "pad"):
        if spec.mode == "pad":
            img = pad_square(img, spec.mean)
        return normalize(resize_crop(img, spec.size, spec.interpolation), spec)[None]
    if spec.mode == "squash":
        return normalize(img.resize((spec.size, spec.size), _RESAMPLE[spec.interpolation]), spec)[None]
    return IMAGE_LAYOUTS[spec.mode](img, spec)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt template and the tokens around it.

    ``template`` holds ``{prompt}`` and, once, :data:`IMAGE_MARKER` where image embeddings go.
    """

    template: str = "USER: <image>\n{prompt} ASSISTANT:"
    bos: bool = True                       # prepend the tokenizer's BOS id
    stop: tuple[str, ...] = ()             # stop strings that are single tokens (e.g. "<|eot_id|>")

    def __post_init__(self) -> None:
        if self.template.count("{prompt}") != 1 or self.template.count(IMAGE_MARKER) > 1:
            raise ConfigError(f"prompt template {self.template!r} needs one {{prompt}} and at most one {IMAGE_MARKER}",
                              "fix the recipe's prompt template")

    def to_dict(self) -> dict:
        return {"template": self.template, "bos": self.bos, "stop": list(self.stop)}


# transformers' fast tokenizer classes that rebuild tokenizer.json's post-processor from tokenizer_config.json's
# ``add_bos_token`` when they load (their ``update_post_processor``), with the default each class assumes
_BOS_FLAG_CLASSES = {"LlamaTokenizer": True, "LlamaTokenizerFast": True, "CodeLlamaTokenizer": True,
                     "CodeLlamaTokenizerFast": True, "GemmaTokenizer": True, "GemmaTokenizerFast": True,
                     "GPTNeoXTokenizerFast": False}


class TextTokenizer:
    """A `tokenizers` tokenizer plus the special ids generation needs.

    ``adds_bos``: whether transformers' tokenizer for this checkpoint puts BOS in front of a text it encodes with
    its special tokens (as its processors do): the ``add_bos_token`` flag for the classes that read it, else what
    tokenizer.json's post-processor does; None when that is not known (a tokenizer made without a checkpoint)."""

    def __init__(self, tok, bos_id: int | None, eos_ids: tuple[int, ...], source: str, adds_bos: bool | None = None):
        self.tok, self.bos_id, self.eos_ids, self.source = tok, bos_id, tuple(eos_ids), source
        self.adds_bos = adds_bos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; text that is not valid Unicode (e.g. a prompt of bytes that were not UTF-8)
        is a ConfigError, not the tokenizer's exception: every prompt, eager or bundle, passes through here."""
        return self.tok.encode(check_prompt(text), add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    @classmethod
    def from_dir(cls, path: Path) -> "TextTokenizer":
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json`` / ``config.json`` for BOS/EOS)."""
        from tokenizers import Tokenizer

        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"no tokenizer.json in {path}",
                                  "copy the checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json) "
                                  "next to its weights")
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:
            raise CheckpointError(f"{tj} is not a readable tokenizer ({str(e)[:100]})", "download it again") from None
        cfg = _read_json(path / "tokenizer_config.json")
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")

        def tid(v):
            if isinstance(v, dict):
                v = v.get("content")
            return tok.token_to_id(v) if isinstance(v, str) else None

        bos = tid(cfg.get("bos_token"))
        if bos is None and not ("bos_token" in cfg and cfg["bos_token"] is None):
            # a tokenizer config saying bos_token null has none (Qwen2's), whatever the model config names
            bos = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos: list[int] = []
        for v in (gen.get("eos_token_id"), model_cfg.get("eos_token_id"), tid(cfg.get("eos_token"))):
            for i in v if isinstance(v, list) else [v]:
                if isinstance(i, int) and i not in eos:
                    eos.append(i)
        bos = bos if isinstance(bos, int) else None
        if bos is None:
            adds = False
        elif cfg.get("tokenizer_class") in _BOS_FLAG_CLASSES:
            adds = bool(cfg.get("add_bos_token", _BOS_FLAG_CLASSES[cfg["tokenizer_class"]]))
        else:
            first = tok.encode("a", add_special_tokens=True).ids[:1]
            adds = first == [bos]
        return cls(tok, bos, tuple(eos), str(path), adds_bos=adds)

    @classmethod
    def bytes_only(cls, vocab_size: int) -> "TextTokenizer":
        """A byte-level tokenizer for random-weight models (no merges: one token per byte)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        if vocab_size < 259:
            raise ConfigError(f"vocabulary of {vocab_size} is too small for a byte tokenizer", "use at least 259")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
        vocab.update({"<s>": 256, "</s>": 257, IMAGE_MARKER: 258})
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<s>", "</s>", IMAGE_MARKER])
        return cls(tok, 256, (257,), "bytes")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})", "download the checkpoint's config files again") \
            from None


@dataclass
class PromptPieces:
    """A tokenized prompt: ids before and after the image (``after`` is empty without an image)."""

    before: list[int]
    after: list[int]
    has_image: bool

    @property
    def n_text(self) -> int:
        return len(self.before) + len(self.after)


def tokenize_prompt(tokenizer: TextTokenizer, spec: PromptSpec, prompt: str, with_image: bool = True) -> PromptPieces:
    """Fill the template and tokenize the text on each side of the image marker."""
    if prompt is None or not check_prompt(prompt).strip():   # bytes, other types and broken text: says which
        raise ConfigError("the prompt is empty", "pass a question or an instruction, e.g. 'Describe this image.'")
    text = spec.template.replace("{prompt}", prompt)
    if IMAGE_MARKER in text and with_image:
        head, tail = text.split(IMAGE_MARKER, 1)
    else:
        head, tail = text.replace(IMAGE_MARKER, ""), ""
    before = ([tokenizer.bos_id] if spec.bos and tokenizer.bos_id is not None else []) + tokenizer.encode(head)
    return PromptPieces(before, tokenizer.encode(tail) if tail else [], IMAGE_MARKER in spec.template and with_image)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character decodes as U+FFFD)."""
        text = self.tokenizer.decode(self.ids)
        delta, self.text = text[len(self.text):], text
        return delta


def stream_text(tokenizer: TextTokenizer, token_ids):
    """Text pieces for a stream of token ids (eager models and bundles stream through this)."""
    dec = StreamDecoder(tokenizer)
    for tok in token_ids:
        delta = dec.push(tok)
        if delta:
            yield delta
    tail = dec.flush()
    if tail:
        yield tail
