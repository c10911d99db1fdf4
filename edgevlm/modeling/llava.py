"""LLaVA format: any transformers ``model_type: llava`` checkpoint directory.

Vision tower: a transformers CLIP or SigLIP vision model, features from ``vision_feature_layer``
(CLS dropped for the ``default`` strategy); connector: the two-layer MLP projector; language model:
a transformers causal LM. Paper: https://arxiv.org/abs/2310.03744.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..processor import CLIP_MEAN, CLIP_STD, IMAGE_MARKER, ImageSpec, PromptSpec, TextTokenizer
from ..zoo import VLMRecipe
from .checkpoint import fit_state_dict, load_checkpoint_dir, read_model_config
from .connectors import MLPProjector
from .families import FAMILIES, Family
from .keymaps import rename_first
from .language import build_lm, check_vocab, lm_config, tie_missing_lm_head
from .vlm import VisionLanguageModel


class HFVisionTower(nn.Module):
    """A transformers vision model (CLIP, SigLIP) returning the hidden states of chosen layers."""

    def __init__(self, vision_config: dict, feature_layer: int | list[int] = -2, select: str = "default"):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        cfg = dict(vision_config)
        cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        cfg._attn_implementation = "sdpa"
        self.tower = AutoModel.from_config(cfg)
        self.feature_layer, self.select = feature_layer, select
        if select not in ("default", "full"):
            raise CheckpointError(f"vision_feature_select_strategy {select!r} is not supported",
                                  "use 'default' (drop CLS) or 'full'")

    @property
    def out_dim(self) -> int:
        n = 1 if isinstance(self.feature_layer, int) else len(self.feature_layer)
        return self.tower.config.hidden_size * n

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (V, 3, H, W)
        hs = self.tower(pixel_values, output_hidden_states=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else self.feature_layer
        feats = [hs[i][:, 1:] if self.select == "default" else hs[i] for i in layers]
        return torch.cat(feats, dim=-1)                                   # (V, N, C)


class LlavaModel(VisionLanguageModel):
    family = "llava"


# Checkpoint key map: Hugging Face LLaVA layouts -> edgevlm module names. Applied in order, once each.
KEY_RULES: tuple[tuple[str, str, str], ...] = (
    # transformers >= 4.52 save layout (LlavaForConditionalGeneration with an inner LlavaModel)
    (r"^model\.language_model\.", "language_model.model.", "model.language_model.layers.N.*, .embed_tokens, .norm"),
    (r"^lm_head\.", "language_model.lm_head.", "lm_head.weight"),
    (r"^model\.vision_tower\.", "vision.tower.", "model.vision_tower.vision_model.*"),
    (r"^model\.multi_modal_projector\.", "connector.", "model.multi_modal_projector.linear_{1,2}.*"),
    # legacy layout (llava-hf checkpoints saved before 4.52)
    (r"^language_model\.(model|lm_head)\.", r"language_model.\1.", "language_model.model.*, language_model.lm_head.*"),
    (r"^vision_tower\.", "vision.tower.", "vision_tower.vision_model.*"),
    (r"^multi_modal_projector\.", "connector.", "multi_modal_projector.linear_{1,2}.*"),
)


def map_keys(sd: dict) -> dict:
    return rename_first(sd, KEY_RULES)


def build(recipe: VLMRecipe, tokenizer: TextTokenizer | None = None, config: dict | None = None) -> LlavaModel:
    cfg = config or recipe.config
    text = lm_config(cfg["text_config"])
    vision = HFVisionTower(cfg["vision_config"], cfg.get("vision_feature_layer", -2),
                           cfg.get("vision_feature_select_strategy", "default"))
    connector = MLPProjector(vision.out_dim, text.hidden_size, cfg.get("projector_hidden_act", "gelu"),
                             bias=cfg.get("multimodal_projector_bias", True))
    lm = build_lm(text)
    image = dict(recipe.image)
    side = cfg["vision_config"].get("image_size")
    if config is not None and isinstance(side, int) and side > 0:
        image["size"] = side              # the checkpoint's tower (load() then applies its preprocessor_config)
    return LlavaModel(vision, connector, lm, image_spec=ImageSpec(**image),
                      prompt_spec=PromptSpec(**recipe.prompt), tokenizer=tokenizer, name=recipe.name)


def _read_config(path: Path) -> dict:
    cfg = read_model_config(path, "llava", "the whole checkpoint directory (config.json, *.safetensors, "
                            "tokenizer.json) as --weights")
    for part, default in (("vision_config", "clip_vision_model"), ("text_config", "llama")):
        sub = dict(cfg.get(part) or {})
        sub.setdefault("model_type", default)
        for k in ("architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version"):
            sub.pop(k, None)
        cfg[part] = sub
    return cfg


def _image_mode(p: dict) -> str:
    """The processor's layout: LlavaImageProcessor's ``do_pad`` pads to a square (mean-colour border) before the
    shortest-edge resize and centre crop (LLaVA-1.5's "pad"); CLIP's processor crops."""
    if p.get("do_pad") and p.get("image_processor_type", "").startswith("LlavaImageProcessor"):
        return "pad"
    if p.get("do_pad"):
        raise CheckpointError(f"{p.get('image_processor_type', 'this image processor')} with do_pad is not a "
                              "layout edgevlm reproduces", "use a checkpoint whose processor is CLIPImageProcessor "
                              "or LlavaImageProcessor")
    return "crop" if p.get("do_center_crop", True) else "squash"


def _image_spec(path: Path, recipe: VLMRecipe, cfg: dict | None = None) -> ImageSpec:
    """The checkpoint's own preprocessor_config.json wins over the recipe's defaults; without one, the size is
    its vision tower's (config.json ``vision_config.image_size``)."""
    f = path / "preprocessor_config.json"
    spec = dict(recipe.image)
    side = ((cfg or {}).get("vision_config") or {}).get("image_size")
    if isinstance(side, int) and side > 0:
        spec["size"] = side
    if f.is_file():
        p = json.loads(f.read_text())
        size = p.get("crop_size") or p.get("size") or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        spec.update(size=int(side or spec["size"]), mean=tuple(p.get("image_mean", CLIP_MEAN)),
                    std=tuple(p.get("image_std", CLIP_STD)),
                    mode=_image_mode(p),
                    interpolation={2: "bilinear", 3: "bicubic", 0: "nearest"}.get(p.get("resample", 3), "bicubic"))
    return ImageSpec(**spec)


def checkpoint_prompt_spec(path: Path, recipe: VLMRecipe, tokenizer: TextTokenizer) -> PromptSpec:
    """The checkpoint's chat template (rendered once for one user turn) or the recipe's template, with BOS as
    transformers' processor puts it: the one the rendered template starts with, else the one its tokenizer adds
    (:attr:`TextTokenizer.adds_bos`; the recipe decides only when that is unknown)."""
    tcfg = path / "tokenizer_config.json"
    chat = None
    for f in (tcfg, path / "chat_template.json"):          # later files win, as transformers reads them
        if f.is_file():
            chat = json.loads(f.read_text()).get("chat_template") or chat
    if (path / "chat_template.jinja").is_file():
        chat = (path / "chat_template.jinja").read_text()
    adds = recipe.prompt.get("bos", True) if tokenizer.adds_bos is None else tokenizer.adds_bos
    plain = PromptSpec(**{**recipe.prompt, "bos": adds})
    if not chat:
        return plain
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{prompt}"}]}]
    bos = tokenizer.tok.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    try:
        text = ImmutableSandboxedEnvironment().from_string(chat).render(
            messages=messages, add_generation_prompt=True, bos_token=bos or "")
    except Exception:  # a template written for other message shapes: the recipe's template still works
        return plain
    if text.count("{prompt}") != 1 or text.count(IMAGE_MARKER) != 1:
        return plain
    # transformers' apply_chat_template adds no special tokens to a text that starts with BOS, else its
    # tokenizer's own (processing_utils.ProcessorMixin.apply_chat_template)
    has_bos = bool(bos) and text.startswith(bos)
    return PromptSpec(template=text[len(bos):] if has_bos else text, bos=has_bos or adds,
                      stop=tuple(recipe.prompt.get("stop", ())))


def load(recipe: VLMRecipe, path: Path, revision: str | None = None) -> LlavaModel:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a LLaVA checkpoint is a directory",
                              "pass the directory holding config.json, the safetensors shards and tokenizer.json")
    cfg = _read_config(path)
    tokenizer = TextTokenizer.from_dir(path)
    model = build(recipe, tokenizer, cfg)
    sd = tie_missing_lm_head(model.language_model, map_keys(load_checkpoint_dir(path)), prefix="language_model.")
    fit_state_dict(model, sd, str(path), fix="pass a transformers LLaVA checkpoint (model_type llava) whose "
                   "config.json matches its weights")
    check_vocab(model.language_model, tokenizer, str(path))
    model.image_spec = _image_spec(path, recipe, cfg)
    model.prompt_spec = checkpoint_prompt_spec(path, recipe, tokenizer)
    return model


FAMILIES.add("llava", Family(
    name="llava", description="LLaVA format (transformers model_type llava): CLIP/SigLIP + MLP + causal LM",
    build=build, load=load, read_config=lambda recipe, path: _read_config(path),
    checkpoint_help="a Hugging Face LLaVA directory (config.json with model_type llava, *.safetensors, tokenizer.json)",
))
