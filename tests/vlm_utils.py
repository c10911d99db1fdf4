"""Helpers that write tiny checkpoints in real on-disk formats (tokenizer files, configs), and one that resolves the
Python names the app READMEs map to their Swift/Kotlin ports."""
from __future__ import annotations

import json
from pathlib import Path

from edgevlm.processor import TextTokenizer



def write_tokenizer(folder: Path, extra_special: tuple[str, ...] = (), bos: str = "<s>", eos: str = "</s>") -> TextTokenizer:
    """A byte-level BPE tokenizer.json + tokenizer_config.json as Hugging Face writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = TextTokenizer.bytes_only(300)
    if extra_special:
        tok.tok.add_special_tokens(list(extra_special))
    tok.tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return TextTokenizer.from_dir(folder)


def make_image(size: int = 96, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size, size + 13, 3), dtype=np.uint8)


def hf_llava_checkpoint(folder: Path, sharpen: float = 1.0, **overrides):
    """A tiny random LlavaForConditionalGeneration (llava_tiny's config) saved by transformers + tokenizer.

    ``sharpen`` scales every weight: random init is so flat that greedy tokens tie; 4 makes them distinct.
    ``overrides``: LlavaConfig fields (e.g. ``vision_feature_layer=[-2, -1]``, ``vision_feature_select_strategy``).
    """
    import torch
    import transformers

    from edgevlm.zoo import get_vlm_recipe

    cfg = get_vlm_recipe("llava_tiny").config
    conf = transformers.LlavaConfig(
        vision_config=dict(cfg["vision_config"]), text_config=dict(cfg["text_config"]),
        image_token_index=cfg["image_token_index"], projector_hidden_act="gelu",
        **{"vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 16,
           **overrides})
    torch.manual_seed(0)
    hf = transformers.LlavaForConditionalGeneration(conf).eval()
    if sharpen != 1.0:
        with torch.no_grad():
            for p in hf.parameters():
                p.mul_(sharpen)
    hf.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return hf


def edgevlm_name(dotted: str):
    """The object ``edgevlm.<dotted>`` names: the longest prefix that is a module, then attributes (AttributeError
    names a Python name that is gone)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), -1, -1):
        try:
            owner = importlib.import_module(".".join(["edgevlm", *parts[:cut]]))
            break
        except ImportError:
            continue
    for part in parts[cut:]:
        owner = getattr(owner, part)
    return owner
