"""Helpers that write tiny checkpoints in real on-disk formats (tokenizer files, configs)."""
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
