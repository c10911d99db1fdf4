"""LLaVA-Mini: one (or N) vision token(s) per image via query-based compression + modality pre-fusion.

Paper: Zhang et al., *LLaVA-Mini: Efficient Image and Video Large Multimodal Models with One Vision
Token*, ICLR 2025, https://arxiv.org/abs/2501.03895 · reference code: github.com/ictnlp/LLaVA-Mini
(``llavamini/model/llavamini_arch.py``: ``encode_images_mini``). One image, standard resolution:

    pixels (1, 3, 336, 336) --CLIP hidden_states[-2], CLS dropped--> F (1, M=576, C=1024)
    connector:  [P(F) (1, M, D) ; P(compress(F)) (1, N, D)]            P = the LLaVA MLP projector
    splice:     pre-fusion (K LM-sized decoder layers, causal) over [P(F) ; P(C) ; text (L)]
                -> LLM input [fused text before <image> ; N fused vision tokens ; fused text after]

so the language model reads N + L tokens instead of 576 + L. ``model.compress = False`` (or
``with model.uncompressed():``) is plain LLaVA on the same weights: 576 projected tokens spliced at
<image>, no compressor, no pre-fusion. :func:`attach_compressor` turns any loaded LLaVA-format model
into a LLaVA-Mini with fresh compressor and pre-fusion weights.

Released layout (``ICTNLP/llava-mini-llama-3.1-8b``): config.json ``model_type: llava_mini_llama``
(Llama fields at the top level plus ``mm_*``, ``compressor_size``, ``prefusion_layer_num``,
``resolution_ratio``), sharded safetensors with ``model.safetensors.index.json``, tokenizer.json.
The reference's own loader ignores the CLIP copy in the shards and loads
``openai/clip-vit-large-patch14-336`` separately; edgevlm reads the CLIP keys from the shards and,
when they are absent, from ``<checkpoint>/vision_tower/`` (a copy of that CLIP repo) or an explicit
``load(..., vision_weights=DIR)``.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..processor import ImageSpec, PromptPieces, PromptSpec, TextTokenizer
from ..zoo import VLMRecipe
from .checkpoint import fit_state_dict, load_checkpoint_dir, read_model_config
from .connectors import LlavaMiniConnector, MLPProjector, PreFusion, QueryCompressor
from .families import FAMILIES, Family
from .language import build_lm, check_vocab, lm_config
from .llava import HFVisionTower, LlavaModel
from .vlm import VisionLanguageModel


class _Fuse(nn.Module):
    """Pre-fusion over [M vision ; N compressed ; L text] with the keep mask; dropped (keep = False) positions
    come out as their input embedding, as :meth:`LlavaMiniModel.splice` uses them."""

    def __init__(self, fusion):
        super().__init__()
        self.fusion = fusion

    def forward(self, inputs_embeds, keep):
        x = self.fusion(inputs_embeds, keep)
        return torch.where(keep[None, :, None], x, inputs_embeds).float()


class LlavaMiniModel(VisionLanguageModel):
    """vision -> connector (projector + compressor) -> pre-fusion (in :meth:`splice`) -> language model."""

    family = "llava_mini"
    # The reference masks ``input_ids <= 0`` out of pre-fusion (the -200 <image> placeholder, and token
    # id 0, which is "!" in Llama-3): masked as keys, positions skip them, their output is the raw embedding.
    prefusion_skip_ids: tuple[int, ...] = (0,)

    def __init__(self, vision: nn.Module, connector: LlavaMiniConnector, fusion: PreFusion,
                 language_model: nn.Module, **kwargs):
        super().__init__(vision, connector, language_model, **kwargs)
        self.fusion = fusion

    def parts(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "connector": self.connector, "fusion": self.fusion,
                "language_model": self.language_model}

    @property
    def n_tokens(self) -> int:
        """Vision tokens per image the language model reads: N compressed, or all M uncompressed."""
        return self.connector.n_tokens

    @property
    def compress(self) -> bool:
        return self.connector.compress

    @compress.setter
    def compress(self, on: bool) -> None:
        self.connector.compress = bool(on)

    @contextmanager
    def uncompressed(self):
        """Plain LLaVA on the same weights for the duration (what `edgevlm info` compares against)."""
        before = self.compress
        self.compress = False
        try:
            yield self
        finally:
            self.compress = before

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[0] != 1:
            raise ConfigError(f"LLaVA-Mini takes one view per image, got {pixel_values.shape[0]}",
                              "use the recipe's image mode 'crop' (LLaVA-Mini-HD sub-images are not supported)")
        return super().encode_image(pixel_values)          # (1, M + N, D) compressed, (1, M, D) uncompressed

    def splice(self, pieces: PromptPieces, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Compressed: pre-fuse [image_embeds (1, M + N, D) ; text (1, L, D)], return (1, L + N, D)."""
        if image_embeds is None or not self.compress:
            return super().splice(pieces, image_embeds)     # text only (no fusion, as the reference) or LLaVA
        ids = pieces.before + pieces.after
        dev = self.language_model.get_input_embeddings().weight.device
        text = self.embed_tokens(torch.tensor([ids], device=dev))                   # (1, L, D)
        img = image_embeds.to(text.dtype)                                           # (1, M + N, D)
        n_img, n = img.shape[1], self.n_tokens
        skip = [i for i, t in enumerate(ids) if t in self.prefusion_skip_ids]
        keep = None
        if skip:
            keep = torch.ones(n_img + len(ids), dtype=torch.bool, device=dev)       # (M + N + L,)
            keep[[n_img + i for i in skip]] = False
        x = self.fusion(torch.cat([img, text], dim=1), keep)                        # (1, M + N + L, D)
        fused_text = x[:, n_img:]                                                   # (1, L, D)
        if skip:
            fused_text = torch.where(keep[n_img:, None], fused_text, text)          # skipped: raw embedding
        vis = x[:, n_img - n:n_img]                                                 # (1, N, D)
        b = len(pieces.before)
        return torch.cat([fused_text[:, :b], vis, fused_text[:, b:]], dim=1)        # (1, L + N, D)

    def export_parts(self, image) -> list:
        """The vision encoder, and (compressed) ``prefusion``: [M + N image tokens ; text] with the keep mask,
        dynamic length, dropped positions passed through as their input embedding (as :meth:`splice` does)."""
        from ..parts import PartRole, PartSpec

        parts = super().export_parts(image)
        if not self.compress:
            return parts
        m = parts[0].facts["image_tokens"]
        x = torch.randn(1, m + 8, self.hidden_size, generator=torch.Generator().manual_seed(0))
        keep = torch.ones(x.shape[1], dtype=torch.bool)
        keep[m + 1] = False                                   # one skipped text position, as a prompt's id 0
        parts.append(PartSpec("prefusion", _Fuse(self.fusion).eval(), ("inputs_embeds", "keep"), ("fused",),
                              (x, keep), role=PartRole.FEATURES, dynamic={"inputs_embeds": {1: "length"},
                                                                          "keep": {0: "length"}},
                              bounds={"length": m + int(self.max_context)},
                              facts={"image_tokens": m, "vision_tokens": int(self.n_tokens),
                                     "skip_ids": list(self.prefusion_skip_ids)}, what="LLaVA-Mini pre-fusion"))
        return parts

    def runtime_spec(self) -> dict:
        """Compressed: the runtime pre-fuses [M + N image tokens ; text] and keeps the last N image tokens."""
        spec = super().runtime_spec()
        if self.compress:
            spec["prefusion"] = {"n_tokens": int(self.n_tokens), "skip_ids": [int(i) for i in self.prefusion_skip_ids]}
        return spec

    def prepare(self, image, prompt: str):
        embeds, pieces, n_img = super().prepare(image, prompt)
        return embeds, pieces, (self.n_tokens if n_img and self.compress else n_img)


# -- building and attaching -------------------------------------------------------------------------


def build(recipe: VLMRecipe, tokenizer: TextTokenizer | None = None, config: dict | None = None) -> LlavaMiniModel:
    """Random weights from a recipe-shaped config (vision_config, text_config, compressor_tokens, ...)."""
    cfg = config or recipe.config
    vision = HFVisionTower(cfg["vision_config"], cfg.get("vision_feature_layer", -2),
                           cfg.get("vision_feature_select_strategy", "default"))
    lm = build_lm(lm_config(cfg["text_config"]))
    projector = MLPProjector(vision.out_dim, lm.config.hidden_size, cfg.get("projector_hidden_act", "gelu"))
    compressor = QueryCompressor(vision.out_dim, int(cfg.get("compressor_tokens", 1)), int(cfg.get("compressor_heads", 8)))
    fusion = PreFusion(lm, int(cfg.get("prefusion_layers", 4)))
    return LlavaMiniModel(vision, LlavaMiniConnector(projector, compressor), fusion, lm,
                          image_spec=ImageSpec(**recipe.image), prompt_spec=PromptSpec(**recipe.prompt),
                          tokenizer=tokenizer, name=recipe.name)


def attach_compressor(llava_model: LlavaModel, n_tokens: int = 1, prefusion_layers: int = 4,
                      heads: int = 8) -> LlavaMiniModel:
    """A LLaVA-Mini around a loaded LLaVA-format model: its vision tower, projector and LM are shared
    (not copied); the compressor (``n_tokens`` = n×n queries, ``heads`` attention heads) and the
    ``prefusion_layers`` decoder layers are new, initialised as the reference initialises them. They
    need training before the compressed path answers well; ``compress = False`` is the LLaVA model.
    """
    if not isinstance(llava_model, LlavaModel) or not isinstance(llava_model.connector, MLPProjector):
        raise ConfigError(f"attach_compressor takes a LLaVA-format model, got {type(llava_model).__name__}",
                          "load one with load_vlm('<a llava recipe>', weights=DIR)")
    if prefusion_layers < 0:
        raise ConfigError(f"prefusion_layers={prefusion_layers}", "use 0 or more (the paper uses 4)")
    ref = next(llava_model.language_model.parameters())
    with torch.device(ref.device):
        compressor = QueryCompressor(llava_model.vision.out_dim, n_tokens, heads)
        fusion = PreFusion(llava_model.language_model, prefusion_layers)
        fusion.reset_parameters()
    vdtype = next(llava_model.connector.parameters()).dtype
    mini = LlavaMiniModel(llava_model.vision, LlavaMiniConnector(llava_model.connector, compressor.to(vdtype)),
                          fusion.to(ref.dtype), llava_model.language_model, image_spec=llava_model.image_spec,
                          prompt_spec=llava_model.prompt_spec, tokenizer=llava_model.tokenizer,
                          name=f"{llava_model.name}+llava_mini{n_tokens}", max_context=llava_model.max_context)
    mini.weights_source = getattr(llava_model, "weights_source", None)
    return mini.eval()


# -- the released layout ------------------------------------------------------------------------------

# Released checkpoint keys -> edgevlm module names (prefixes; first match wins, applied once).
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("model.layers.", "language_model.model.layers."),
    ("model.embed_tokens.", "language_model.model.embed_tokens."),
    ("model.norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
    ("model.prefusion_layers.", "fusion.layers."),
    ("model.mm_projector.0.", "connector.projector.linear_1."),
    ("model.mm_projector.2.", "connector.projector.linear_2."),
    ("model.compressor.", "connector.compressor."),                  # query, pos_embed, attn.*, ln_q, ln_kv
    ("model.vision_tower.vision_tower.", "vision.tower."),          # .vision_model.* (CLIP ViT-L/14-336)
    ("vision_model.", "vision.tower.vision_model."),                # a separate CLIP checkpoint (vision_tower/)
)
# Buffers older transformers saved and current ones rebuild (not weights).
IGNORED_SUFFIXES = ("embeddings.position_ids", "rotary_emb.inv_freq")
# config.json fields that are not the Llama language model's.
_NOT_LM = ("architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version", "model_type",
           "compressor_size", "prefusion_layer_num", "resolution_ratio", "image_aspect_ratio", "use_mm_proj",
           "image_grid_pinpoints", "tokenizer_padding_side", "tokenizer_model_max_length",
           "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "mm_")


def map_keys(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith(IGNORED_SUFFIXES):
            continue
        for old, new in KEY_RULES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def read_config(path: Path, recipe: VLMRecipe) -> dict:
    """A released config.json -> the recipe-shaped config :func:`build` takes (CLIP's from the recipe:
    the release names it, ``mm_vision_tower``, rather than storing its config)."""
    f = path / "config.json"
    c = read_model_config(path, "llava_mini_llama", "the whole checkpoint directory (config.json, "
                          "model-*.safetensors with model.safetensors.index.json, tokenizer.json) as --weights",
                          "; transformers LLaVA checkpoints load with the llava family and take attach_compressor()")
    if "compressor_size" not in c:
        raise CheckpointError(f"{f} has no compressor_size", "pass a LLaVA-Mini checkpoint (the reference "
                              "builds no compressor without it)")
    unsupported = [(c.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu", "mm_projector_type"),
                   (int(c.get("resolution_ratio", 1)) != 1, "resolution_ratio (LLaVA-Mini-HD)"),
                   (c.get("image_aspect_ratio") not in (None, "square"), "image_aspect_ratio"),
                   (bool(c.get("mm_use_im_start_end")), "mm_use_im_start_end"),
                   ("unpad" in str(c.get("mm_patch_merge_type", "flat")), "mm_patch_merge_type"),
                   (c.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"),
                    "mm_vision_select_feature")]
    bad = [f"{name}={c.get(name.split()[0])!r}" for cond, name in unsupported if cond]
    if bad:
        raise CheckpointError(f"{f} uses settings edgevlm does not implement: {', '.join(bad)}",
                              "use the released standard-resolution checkpoint (mlp2x_gelu, resolution_ratio 1, "
                              "square images)")
    vision = dict(recipe.config["vision_config"])
    if c.get("mm_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
        raise CheckpointError(f"{f} has mm_hidden_size {c['mm_hidden_size']} but {recipe.name}'s vision tower "
                              f"({c.get('mm_vision_tower', '?')}) has {vision['hidden_size']}",
                              "pick the recipe whose vision tower the checkpoint was trained with")
    text = {k: v for k, v in c.items() if not k.startswith(_NOT_LM)}
    text["model_type"] = "llama"
    return {**recipe.config, "vision_config": vision, "text_config": text, "projector_hidden_act": "gelu",
            "vision_feature_layer": int(c.get("mm_vision_select_layer", -2)),
            "vision_feature_select_strategy": "full" if c.get("mm_vision_select_feature") == "cls_patch"
            else "default",
            "compressor_tokens": int(c["compressor_size"]) ** 2,
            "prefusion_layers": int(c.get("prefusion_layer_num", 4))}


def _clip_weights(path: Path, vision_weights: str | Path | None) -> dict:
    """CLIP vision weights from a separate transformers CLIP checkpoint (CLIPModel or CLIPVisionModel)."""
    d = Path(vision_weights) if vision_weights else path / "vision_tower"
    if not d.exists():
        raise CheckpointError(
            f"{path} holds no CLIP vision-tower weights (model.vision_tower.vision_tower.vision_model.*)"
            + (f" and there is nothing at {d}" if vision_weights else ""),
            f"put a copy of openai/clip-vit-large-patch14-336 (its model.safetensors) in {path / 'vision_tower'}, "
            "or call edgevlm.modeling.llava_mini.load(recipe, path, vision_weights=CLIP_DIR)")
    sd = {k: v for k, v in load_checkpoint_dir(d).items() if k.startswith("vision_model.")}
    if not sd:
        raise CheckpointError(f"{d} has no vision_model.* weights", "pass a transformers CLIP checkpoint "
                              "(openai/clip-vit-large-patch14-336)")
    return map_keys(sd)


def load(recipe: VLMRecipe, path: Path, revision: str | None = None,
         vision_weights: str | Path | None = None) -> LlavaMiniModel:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a LLaVA-Mini checkpoint is a directory",
                              "pass the directory holding config.json, the safetensors shards and tokenizer.json")
    cfg = read_config(path, recipe)
    tokenizer = TextTokenizer.from_dir(path)
    model = build(recipe, tokenizer, cfg)
    sd = map_keys(load_checkpoint_dir(path))
    if not any(k.startswith("vision.tower.") for k in sd) or vision_weights:
        sd = {k: v for k, v in sd.items() if not k.startswith("vision.tower.")} | _clip_weights(path, vision_weights)
    pe = "connector.compressor.pos_embed"          # a fixed table; written by the reference, rebuilt if absent
    if pe not in sd and any(k.startswith("connector.compressor.") for k in sd):
        sd[pe] = model.connector.compressor.pos_embed.detach().clone()
    fit_state_dict(model, sd, str(path), fix="pass a LLaVA-Mini checkpoint in the released layout "
                   "(ICTNLP/llava-mini-llama-3.1-8b) whose config.json matches its weights")
    check_vocab(model.language_model, tokenizer, str(path))
    return model


FAMILIES.add("llava_mini", Family(
    name="llava_mini",
    description="LLaVA-Mini: CLIP + MLP + query compressor (N vision tokens) + pre-fusion layers + Llama",
    build=build, load=load, read_config=read_config,
    checkpoint_help="a LLaVA-Mini directory as released (config.json with model_type llava_mini_llama, "
                    "model-*.safetensors + model.safetensors.index.json, tokenizer.json; CLIP weights in the "
                    "shards or in DIR/vision_tower/)",
))
