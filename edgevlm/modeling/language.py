"""Language models: Hugging Face transformers causal LMs (Llama, Qwen2, Phi, ...) built from configs.

The classes are transformers' own, so their logits are the reference by construction; what edgevlm
adds is building them from a recipe (also on the meta device, for parameter counts and FLOPs),
mapping other checkpoints' key names onto them, and the decode loop in :mod:`.vlm`.
"""
from __future__ import annotations

from ..errors import CheckpointError, ConfigError

SUPPORTED = ("llama", "qwen2", "phi", "mistral", "gemma", "stablelm")


def lm_config(cfg: dict):
    """A transformers ``PretrainedConfig`` from a dict holding ``model_type`` and its fields."""
    from transformers import AutoConfig

    cfg = dict(cfg)
    model_type = cfg.pop("model_type", None)
    if model_type not in SUPPORTED:
        raise ConfigError(f"language model type {model_type!r} is not supported",
                          f"use one of: {', '.join(SUPPORTED)}")
    return AutoConfig.for_model(model_type, **cfg)


def build_lm(config, dtype=None):
    """A randomly initialised causal LM in eval mode (on the current default device; meta works)."""
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(config, dict):
        config = lm_config(config)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def tie_missing_lm_head(model, sd: dict, prefix: str = "") -> dict:
    """Checkpoints with tied embeddings may omit ``lm_head.weight``; fill it from the embeddings."""
    head, emb = prefix + "lm_head.weight", prefix + "model.embed_tokens.weight"
    if head not in sd and emb in sd and getattr(model.config, "tie_word_embeddings", False):
        sd = dict(sd)
        sd[head] = sd[emb]
    return sd


def check_vocab(model, tokenizer, source: str) -> None:
    """A tokenizer whose ids overflow the embedding table would index out of range mid-generation."""
    if tokenizer is None:
        return
    n_emb = model.get_input_embeddings().weight.shape[0]
    if tokenizer.vocab_size > n_emb:
        raise CheckpointError(
            f"the tokenizer in {source} has {tokenizer.vocab_size} tokens but the language model embeds {n_emb}",
            "use the tokenizer files that came with these weights",
        )
