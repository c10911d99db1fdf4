"""edgevlm's own small VLM, trained here on the synthetic scenes task and shipped in models/.

Built from the zoo's parts: a reparameterizable FastViT tower (timm's ``FastVit`` with RepMixer
stages, truncated after ``stages`` stages, features as tokens), a LLaVA-Mini query compressor that
keeps N vision tokens followed by the LLaVA MLP projector, and a small Llama decoder; the tokenizer is
a byte-level BPE trained on the task's text with the `tokenizers` library.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..processor import ImageSpec, PromptSpec, TextTokenizer
from ..zoo import VLMRecipe
from .checkpoint import fit_state_dict, load_state_dict, read_metadata, resolve_file
from .connectors import CompressedProjector
from .families import FAMILIES, Family
from .language import build_lm, check_vocab
from .vision import timm_without_drop_path
from .vlm import VisionLanguageModel


class FastViTTower(nn.Module):
    """timm FastViT (RepMixer) stem + the first ``n_stages`` stages; output (V, H'·W', C) tokens."""

    def __init__(self, layers, embed_dims, mlp_ratios, n_stages: int, layer_scale_init: float = 1e-5):
        super().__init__()
        from timm.models.fastvit import FastVit

        # layer_scale_init: timm's 1e-5 starts every RepMixer/MLP block as the identity, which suits 300 ImageNet
        # epochs; trained from scratch for minutes, only the stem and downsampling convs learn at first.
        with timm_without_drop_path("fastvit"):
            net = FastVit(layers=tuple(layers), embed_dims=tuple(embed_dims), mlp_ratios=tuple(mlp_ratios),
                          token_mixers=("repmixer",) * len(layers), num_classes=0,
                          layer_scale_init_value=layer_scale_init)
        self.stem, self.stages = net.stem, net.stages[:n_stages]
        self.out_dim = int(embed_dims[n_stages - 1])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:      # (V, 3, H, W)
        # contiguous: with a channels-last input (an HWC array permuted), torch 2.14's CPU backward through
        # these convolutions corrupts the heap ("corrupted double-linked list"); seen while training.
        x = self.stages(self.stem(pixel_values.contiguous()))            # (V, C, H', W')
        return x.flatten(2).transpose(1, 2)                              # (V, H'·W', C)


class ScenesVLM(VisionLanguageModel):
    family = "edgevlm"


def build(recipe: VLMRecipe, tokenizer: TextTokenizer | None = None) -> ScenesVLM:
    cfg = recipe.config
    v = cfg["vision"]
    tower = FastViTTower(v["layers"], v["embed_dims"], v["mlp_ratios"], v["stages"], v.get("layer_scale_init", 1e-5))
    lm = build_lm(dict(cfg["text"]))   # the vocabulary is fixed by the recipe; check_vocab guards tokenizers
    connector = CompressedProjector(tower.out_dim, lm.config.hidden_size, cfg["vision_tokens"],
                                    heads=cfg.get("compressor_heads", 4))
    return ScenesVLM(tower, connector, lm, image_spec=ImageSpec(**recipe.image), prompt_spec=PromptSpec(**recipe.prompt),
                     tokenizer=tokenizer, name=recipe.name)


def save(model: ScenesVLM, path: Path, facts: dict) -> None:
    """Weights (FP16 storage halves the file; they load back to FP32) with the tokenizer in the metadata."""
    import json

    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    meta = {"edgevlm": json.dumps(facts), "tokenizer": model.tokenizer.tok.to_str()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)


def load(recipe: VLMRecipe, path: Path, revision: str | None = None) -> ScenesVLM:
    """A safetensors file written by :func:`save` (the tokenizer travels in its metadata)."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    path = resolve_file(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "tokenizer" not in meta:
        raise CheckpointError(f"{path} carries no tokenizer", "pass a checkpoint written by `edgevlm train "
                              "--model edgevlm_scenes` (its tokenizer is stored in the safetensors metadata)")
    facts = read_metadata(path)
    tok = Tokenizer.from_str(meta["tokenizer"])
    tokenizer = TextTokenizer(tok, tok.token_to_id("<s>"), (tok.token_to_id("</s>"),), str(path))
    with torch.device("cpu"):
        model = build(recipe, tokenizer)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path).items()}
    fit_state_dict(model, sd, str(path), fix=f"pass weights trained for {recipe.name} (`edgevlm train --model "
                   f"{recipe.name}`)")
    check_vocab(model.language_model, tokenizer, str(path))
    model.facts = facts
    return model


FAMILIES.add("edgevlm", Family(
    name="edgevlm", description="edgevlm's own: FastViT tower + LLaVA-Mini compressor + MLP + small Llama",
    build=build, load=load,
    checkpoint_help="a safetensors file written by `edgevlm train --model edgevlm_scenes`",
))
