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


# -- LLaVA checkpoints with the processor transformers saves (issue 28's conformance matrix) ------------------
CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}{% if c['type'] == "
        "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def hf_llava_processor_checkpoint(tmp_path, name: str, post_bos: bool, template: str | None, tokenizer_class=None,
                                  add_bos_token=None, pad: bool = False, bos_token: str | None = "<s>",
                                  **overrides):
    """A tiny LLaVA checkpoint whose LlavaProcessor (tokenizer, image processor, chat template) transformers
    itself saves; ``post_bos``: its tokenizer.json post-processor puts BOS first; ``pad``: LlavaImageProcessor
    padding to a square (mean-colour border) instead of CLIP's processor; ``bos_token=None``: a tokenizer with no
    BOS token at all (Qwen2's)."""
    import transformers
    from tokenizers import Tokenizer, processors

    d = tmp_path / name
    hf_llava_checkpoint(d, sharpen=4.0, **overrides)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = (processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                        special_tokens=[("<s>", bos)]) if post_bos else None)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token="</s>")
    kind = transformers.LlavaImageProcessor if pad else transformers.CLIPImageProcessor
    ip = kind(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, **({"do_pad": True} if pad else {}))
    proc = transformers.LlavaProcessor(image_processor=ip, tokenizer=fast, patch_size=14,
                                       vision_feature_select_strategy=overrides.get(
                                           "vision_feature_select_strategy", "default"), num_additional_image_tokens=1,
                                       chat_template=template)
    proc.save_pretrained(d)
    if tokenizer_class is not None:                  # a class that reads add_bos_token (Llama's)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = tokenizer_class
        if add_bos_token is not None:
            cfg["add_bos_token"] = add_bos_token
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d, transformers.AutoProcessor.from_pretrained(d)


QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == "
             "'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


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
