"""A VLM as three parts with clear boundaries: vision tower -> connector -> language model.

Each part is exported and quantized on its own later, so the boundaries are tensors:

    pixel values (V, 3, H, W) --vision--> features (V, N, C) --connector--> image embeds (1, T_img, D)
    prompt ids --embed--> (1, T_txt, D); image embeds spliced at the template's <image> marker
    inputs_embeds (1, T, D) --language model (Hugging Face causal LM, KV cache)--> next-token logits

Families (llava.py, llava_mini.py, tinygpt_v.py, moondream2.py) build these parts from their real
checkpoints and override :meth:`VisionLanguageModel.splice` or the skills where they differ.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..generation import (Generation, GenerationConfig, GenerationStats, decode_loop,  # noqa: F401  (re-exported)
                          pick_token)
from ..processor import (ImageSpec, PromptPieces, PromptSpec, TextTokenizer, preprocess_image, stream_text,
                         tokenize_prompt)


class EncodeImage(nn.Module):
    """``model.encode_image`` as a module with float32 output: the traced vision encoder part."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, pixel_values):
        return self.m.encode_image(pixel_values).float()


class VisionLanguageModel(nn.Module):
    """vision tower + connector + Hugging Face causal LM, with a processor and a KV-cache decode loop."""

    family = "vlm"
    # Moondream lets BOS and the image tokens attend to each other both ways during prefill; set to
    # True and the prefill gets a 4D mask with that prefix bidirectional (the rest stays causal).
    bidirectional_image_prefix = False
    # Extra outputs the family needs from decoder.onnx besides logits and the KV cache (names the exporter knows:
    # "hidden" = the last position's hidden state before the final norm, (1, D), which Moondream's region heads read).
    decoder_outputs: tuple[str, ...] = ()
    # What export-time parity and calibration use for this family (the scenes model reads its own task's prompt
    # and pictures; others a generic question and photos).
    parity_prompt = "What is in this image?"
    calibration_dataset: str | None = None
    # The prompts of the golden cases every bundle carries (edgevlm.runtime.golden), one case each.
    golden_prompts: tuple[str, ...] = ("What is in this image?", "How many shapes are there?")

    def __init__(self, vision: nn.Module, connector: nn.Module, language_model: nn.Module, *,
                 image_spec: ImageSpec, prompt_spec: PromptSpec, tokenizer: TextTokenizer | None = None,
                 name: str = "vlm", max_context: int | None = None):
        super().__init__()
        self.vision, self.connector, self.language_model = vision, connector, language_model
        self.image_spec, self.prompt_spec, self.tokenizer, self.name = image_spec, prompt_spec, tokenizer, name
        cfg = language_model.config
        self.max_context = int(max_context or getattr(cfg, "max_position_embeddings", 2048))

    # -- parts ------------------------------------------------------------------------------------
    def parts(self) -> dict[str, nn.Module]:
        """The named parts, in data-flow order (what `edgevlm info` lists and exporters split on)."""
        return {"vision": self.vision, "connector": self.connector, "language_model": self.language_model}

    def export_parts(self, image) -> list:
        """The bundle's graphs besides the token embedding and the decoder, as data (:class:`edgevlm.parts.PartSpec`),
        with example inputs made from ``image``: here one vision encoder (tower + connector). Families whose image
        path is not one graph (Moondream's crops, LLaVA-Mini's pre-fusion) return their own list."""
        from ..parts import PartSpec

        px = self.pixel_values(image)
        enc = EncodeImage(self).eval()
        with torch.no_grad():
            n = int(enc(px).shape[1])
        return [PartSpec("vision_encoder", enc, ("pixel_values",), ("image_embeds",), (px,),
                         facts={"input_shape": list(px.shape), "image_tokens": n}, what="vision encoder")]

    @property
    def hidden_size(self) -> int:
        return int(self.language_model.config.hidden_size)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)                    # (B, T, D)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(V, 3, H, W) views of one image -> (1, T_img, D) embeddings for the language model."""
        feats = self.vision(pixel_values)                                          # (V, N, C)
        emb = self.connector(feats)                                                # (V, N', D)
        return emb.reshape(1, -1, emb.shape[-1])

    def splice(self, pieces: PromptPieces, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Prompt embeddings with the image embeddings at the marker: (1, T, D)."""
        dev = self.language_model.get_input_embeddings().weight.device
        seq = [self.embed_tokens(torch.tensor([pieces.before], device=dev))]
        if image_embeds is not None:
            seq.append(image_embeds.to(seq[0].dtype))
        if pieces.after:
            seq.append(self.embed_tokens(torch.tensor([pieces.after], device=dev)))
        return torch.cat(seq, dim=1)

    # -- processor --------------------------------------------------------------------------------
    def require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ConfigError(f"{self.name} has no tokenizer", "load it from a checkpoint directory with tokenizer.json")
        return self.tokenizer

    def pixel_values(self, image) -> torch.Tensor:
        dtype = next(self.vision.parameters()).dtype
        return torch.from_numpy(preprocess_image(image, self.image_spec)).to(dtype)

    def prefill_mask(self, n_tokens: int, n_prefix: int, dtype: torch.dtype) -> torch.Tensor | None:
        """None (causal) or a (1, 1, T, T) additive mask where the first ``n_prefix`` positions see each other."""
        if not self.bidirectional_image_prefix or n_prefix <= 1:
            return None
        allowed = torch.ones(n_tokens, n_tokens, dtype=torch.bool).tril()
        allowed[:n_prefix, :n_prefix] = True
        mask = torch.zeros(n_tokens, n_tokens, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[None, None]

    def prepare(self, image, prompt: str) -> tuple[torch.Tensor, PromptPieces, int]:
        """Image + prompt -> (inputs_embeds (1, T, D), the tokenized prompt, image tokens)."""
        pieces = tokenize_prompt(self.require_tokenizer(), self.prompt_spec, prompt, with_image=image is not None)
        img = None
        if image is not None:
            if not pieces.has_image:
                raise ConfigError(f"{self.name}'s prompt template has no <image> marker", "fix the recipe's template")
            img = self.encode_image(self.pixel_values(image))
        embeds = self.splice(pieces, img)
        return embeds, pieces, 0 if img is None else int(img.shape[1])

    def runtime_spec(self) -> dict:
        """What a bundle's torch-free runtime needs besides the graphs: how pixels are made, how the
        prompt is assembled around the image, when to stop (the manifest's ``generation`` block)."""
        tok = self.require_tokenizer()
        cfg = self.language_model.config
        return {
            "family": self.family, "image": self.image_spec.to_dict(),
            "prompt": {"kind": "template", "template": self.prompt_spec.template, "bos": bool(self.prompt_spec.bos),
                       "bos_id": tok.bos_id},
            "stop_ids": [int(i) for i in self.stop_ids()], "eos_ids": [int(i) for i in tok.eos_ids],
            "context_length": int(self.max_context), "bidirectional_image_prefix": bool(self.bidirectional_image_prefix),
            "hidden_size": self.hidden_size, "vocab_size": int(cfg.vocab_size),
        }

    # -- forward and generation -------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Logits for every position of a spliced sequence: (1, T, V)."""
        return self.language_model(inputs_embeds=inputs_embeds, use_cache=False).logits

    def stop_ids(self) -> tuple[int, ...]:
        tok = self.require_tokenizer()
        extra = tuple(i for i in (tok.token_id(s) for s in self.prompt_spec.stop) if i is not None)
        return tuple(dict.fromkeys(tok.eos_ids + extra))

    @torch.inference_mode()
    def decode_tokens(self, inputs_embeds: torch.Tensor, cfg: GenerationConfig,
                      stats: GenerationStats | None = None, prefix: int = 0) -> Iterator[int]:
        """Prefill once, then one token per step with the KV cache kept between steps.

        ``prefix``: positions that attend bidirectionally in the prefill (see ``bidirectional_image_prefix``).
        """
        stats = stats or GenerationStats()
        rng = np.random.default_rng(cfg.seed)          # the runtime's sampler and seeding (edgevlm.generation)
        dev = inputs_embeds.device
        state = {}

        def prefill():
            mask = self.prefill_mask(int(inputs_embeds.shape[1]), prefix, inputs_embeds.dtype)
            kwargs = {"attention_mask": mask.to(dev)} if mask is not None else {}
            out = self.language_model(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1, **kwargs)
            state["cache"] = out.past_key_values
            return out.logits[0, -1]

        def step(tok: int):
            out = self.language_model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=state["cache"],
                                      use_cache=True)
            state["cache"] = out.past_key_values
            return out.logits[0, -1]

        yield from decode_loop(prefill, step, lambda logits: pick_token(logits.float().cpu().numpy(), cfg, rng), cfg, stats,
                               int(inputs_embeds.shape[1]), self.max_context)

    def generate(self, image, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stream: bool = False):
        """Answer ``prompt`` about ``image`` (a path, bytes, PIL image or array; None for text only).

        Returns a :class:`Generation`, or with ``stream=True`` an iterator of text pieces.
        """
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, top_k, seed, self.stop_ids())
        with torch.inference_mode():
            embeds, pieces, n_img = self.prepare(image, prompt)
        stats = GenerationStats(prompt_tokens=pieces.n_text, image_tokens=n_img)
        prefix = len(pieces.before) + n_img if self.bidirectional_image_prefix and n_img else 0
        if stream:
            return self._stream(embeds, cfg, stats, prefix)
        ids = list(self.decode_tokens(embeds, cfg, stats, prefix))
        return Generation(self.require_tokenizer().decode(ids), ids, stats)

    def _stream(self, embeds, cfg, stats, prefix: int = 0) -> Iterator[str]:
        yield from stream_text(self.require_tokenizer(), self.decode_tokens(embeds, cfg, stats, prefix))

