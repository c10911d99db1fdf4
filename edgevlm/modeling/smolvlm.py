"""SmolVLM (HuggingFaceTB/SmolVLM-256M-Instruct, -500M-Instruct): transformers ``model_type: idefics3`` or ``smolvlm``.

Vision tower: a SigLIP ViT (no pooling head) over 512-px tiles, its last hidden state after the final LayerNorm;
connector: pixel shuffle (space-to-depth of the patch grid by ``scale_factor``) then one Linear without bias
(``modality_projection.proj``); language model: SmolLM2, a Llama-architecture causal LM. An image is the tiles of
a row-major grid plus one global view, each ``image_seq_len`` embeddings, between the processor's
``<fake_token_around_image>``, ``<row_i_col_j>`` and ``<global-img>`` tokens (:mod:`edgevlm.data.crops`).
Paper: https://arxiv.org/abs/2504.05299; reference: transformers' Idefics3ForConditionalGeneration.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..data.crops import IDEFICS3_DEFAULTS, idefics3_text_runs, idefics3_tiles_with_grid
from ..data.images import load_image
from ..errors import CheckpointError, ConfigError
from ..processor import IMAGE_MARKER, ImageSpec, PromptPieces, PromptSpec, TextTokenizer
from ..zoo import VLMRecipe
from .checkpoint import fit_state_dict, load_checkpoint_dir, read_model_config
from .families import FAMILIES, Family
from .keymaps import rename_first
from .language import build_lm, check_vocab, lm_config, tie_missing_lm_head
from .llava import checkpoint_prompt_spec
from .vlm import VisionLanguageModel

MODEL_TYPES = ("idefics3", "smolvlm")
# The Idefics3/SmolVLM vision config's fields that a SigLIP vision config takes (the rest are bookkeeping).
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
CHECKPOINT_HELP = ("a SmolVLM / Idefics3 checkpoint directory (config.json with model_type idefics3 or smolvlm, "
                   "*.safetensors, tokenizer.json, preprocessor_config.json, processor_config.json, chat template)")


# -- blocks -------------------------------------------------------------------------------------------------
def reference_position_ids(side: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The position ids Idefics3's vision embeddings give a whole side×side patch grid, (1, side²), computed by the
    reference's rule (transformers 4.57 ``Idefics3VisionEmbeddings``): per axis, coordinates i/side·(1 − 1e-6) in the
    pixel dtype bucketed against the boundaries k/side. In float32 the factor puts every coordinate but the first
    just below its own boundary, so each axis reads ids 0, 0, 1, ..., side − 2 (in bfloat16 the factor rounds to 1
    and the ids are 0..side − 1; transformers PR #47133). edgevlm computes in float32 and follows the float32
    reference, which its conformance tests check."""
    bounds = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.arange(side, dtype=dtype) / side * (1 - 1e-6)
    b = torch.bucketize(coords, bounds, right=True)
    return (b[:, None] * side + b[None, :]).reshape(1, -1)


class SigLIPTower(nn.Module):
    """transformers' SigLIP vision transformer without the pooling head: (V, 3, S, S) -> (V, N, C) after the final
    LayerNorm, with Idefics3's position ids (:func:`reference_position_ids`). For whole tiles (no padding) it computes
    what Idefics3's vision transformer computes, and it traces with a dynamic number of views."""

    def __init__(self, vision_config: dict):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        cfg = SiglipVisionConfig(**{k: vision_config[k] for k in VISION_FIELDS if k in vision_config},
                                 vision_use_head=False)
        cfg._attn_implementation = "sdpa"
        self.tower = SiglipVisionModel(cfg)
        emb = self.tower.vision_model.embeddings
        emb.position_ids = reference_position_ids(self.grid).to(emb.position_ids.device)   # not in the state dict

    @property
    def out_dim(self) -> int:
        return int(self.tower.config.hidden_size)

    @property
    def grid(self) -> int:
        return int(self.tower.config.image_size) // int(self.tower.config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:            # (V, 3, S, S)
        return self.tower(pixel_values).last_hidden_state                       # (V, N, C)


class _Projection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x):
        return self.proj(x)


class PixelShuffleConnector(nn.Module):
    """Idefics3's connector: each r×r block of the s×s patch grid becomes one token of r²·C features (ordered row
    offset, column offset, channel), tokens in raster order, then ``modality_projection.proj``: (V, s², C) ->
    (V, s²/r², D)."""

    def __init__(self, in_dim: int, out_dim: int, scale_factor: int):
        super().__init__()
        self.scale = int(scale_factor)
        self.modality_projection = _Projection(in_dim * self.scale ** 2, out_dim)

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:                         # (V, N, C)
        v, n, c = x.shape
        r = self.scale
        side = int(round(int(n) ** 0.5))
        if side * side != n or side % r:
            raise ConfigError(f"{n} patches are not a square grid divisible by the scale factor {r}",
                              "use a vision image_size / patch_size that is a multiple of scale_factor")
        x = x.reshape(v * (side // r), r, side // r, r, c)                      # (V*s', r, s', r, C), rank 5
        x = x.permute(0, 2, 1, 3, 4)                                            # (V*s', s', r, r, C)
        return x.reshape(v, (side // r) ** 2, r * r * c)                        # (V, s'², r²C)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:                     # (V, N, C)
        return self.modality_projection(self.shuffle(feats))                    # (V, N/r², D)


class SmolVLMModel(VisionLanguageModel):
    """SmolVLM: tiles + a global view per image, each view's embeddings in its own slot of the prompt."""

    family = "smolvlm"

    def __init__(self, vision, connector, language_model, *, image_token_id: int | None = None, **kw):
        super().__init__(vision, connector, language_model, **kw)
        self.image_token_id = image_token_id

    @property
    def image_seq_len(self) -> int:
        return (self.vision.grid // self.connector.scale) ** 2

    def info_views(self) -> int:
        """Views of a square image at the processor's longest edge (FLOP counts): its full grid plus the global."""
        opts = {**IDEFICS3_DEFAULTS, **self.image_spec.options}
        if not opts["splitting"]:
            return 1
        side = -(-int(opts["longest_edge"]) // self.image_spec.size)
        return side * side + 1

    # -- image -> views -------------------------------------------------------------------------------
    def image_views(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(V, 3, S, S) pixel values (tiles row-major, the global view last) and the (rows, cols) grid."""
        arr, grid = idefics3_tiles_with_grid(load_image(image), self.image_spec)
        return torch.from_numpy(arr).to(next(self.vision.parameters()).dtype), grid

    def pixel_values(self, image) -> torch.Tensor:
        return self.image_views(image)[0]

    def export_parts(self, image) -> list:
        """One vision encoder graph (tower + pixel shuffle + projection) over a dynamic number of views:
        (V, 3, S, S) -> (1, V*T, D); the runtime cuts it into V slots of T (``image.mode`` idefics3_tiles)."""
        from ..parts import PartSpec
        from .vlm import EncodeImage

        px = self.pixel_values(image)
        px = px if px.shape[0] >= 2 else torch.cat([px, px])              # traced at V >= 2 (dynamic)
        return [PartSpec("vision_encoder", EncodeImage(self).eval(), ("pixel_values",), ("image_embeds",), (px,),
                         dynamic={"pixel_values": {0: "views"}}, bounds={"views": self.info_views()},
                         facts={"input_shape": [-1, *px.shape[1:]], "image_tokens_per_view": self.image_seq_len},
                         what="SmolVLM vision encoder")]

    # -- prompt ---------------------------------------------------------------------------------------
    def text_runs(self, prompt: str, grid: tuple[int, int] | None) -> list[list[int]]:
        """Token ids between the view slots (``views + 1`` runs; one run without an image), BOS first as the
        processor puts it."""
        tok = self.require_tokenizer()
        if prompt is None or not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("the prompt is empty", "pass a question or an instruction, e.g. 'Describe this image.'")
        runs = [tok.encode(t) if t else [] for t in idefics3_text_runs(self.prompt_spec.template, prompt, grid)]
        if self.prompt_spec.bos and tok.bos_id is not None:
            runs[0] = [tok.bos_id] + runs[0]
        return runs

    def prompt_ids(self, image, prompt: str) -> list[int]:
        """The ids transformers' processor gives for this image and prompt (``<image>`` repeated per slot)."""
        grid = self.image_views(image)[1] if image is not None else None
        runs = self.text_runs(prompt, grid)
        ids = list(runs[0])
        for run in runs[1:]:
            ids += [int(self.image_token_id)] * self.image_seq_len + run
        return ids

    def prepare(self, image, prompt: str) -> tuple[torch.Tensor, PromptPieces, int]:
        """(inputs_embeds (1, T, D), the text around the image, image embeddings spliced)."""
        dev = self.language_model.get_input_embeddings().weight.device
        grid, img = None, None
        if image is not None:
            pixels, grid = self.image_views(image)
            img = self.encode_image(pixels.to(dev))                              # (1, V*T, D)
        runs = self.text_runs(prompt, grid)
        seq = [self.embed_tokens(torch.tensor([runs[0]], device=dev))]
        for v, run in enumerate(runs[1:]):
            seq.append(img[:, v * self.image_seq_len:(v + 1) * self.image_seq_len].to(seq[0].dtype))
            if run:
                seq.append(self.embed_tokens(torch.tensor([run], device=dev)))
        pieces = PromptPieces(runs[0], [i for run in runs[1:] for i in run], img is not None)
        return torch.cat(seq, dim=1), pieces, 0 if img is None else int(img.shape[1])


# -- checkpoint keys ----------------------------------------------------------------------------------------
# transformers Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration -> edgevlm. First match wins.
KEY_RULES: tuple[tuple[str, str, str], ...] = (
    (r"^model\.vision_model\.", "vision.tower.vision_model.", "model.vision_model.{embeddings,encoder,post_layernorm}.*"),
    (r"^model\.connector\.", "connector.", "model.connector.modality_projection.proj.weight"),
    (r"^model\.text_model\.", "language_model.model.", "model.text_model.{embed_tokens,layers.N,norm}.*"),
    (r"^lm_head\.", "language_model.lm_head.", "lm_head.weight (absent when tied)"),
)


def map_keys(sd: dict) -> dict:
    return rename_first(sd, KEY_RULES)


# -- build / load -------------------------------------------------------------------------------------------
def _image_spec(recipe: VLMRecipe) -> ImageSpec:
    spec = ImageSpec(**{**recipe.image, "options": {**IDEFICS3_DEFAULTS, **recipe.image.get("options", {})}})
    if spec.mode != "idefics3_tiles":
        raise ConfigError(f"{recipe.name} image mode is {spec.mode!r}", "smolvlm needs mode: idefics3_tiles")
    return spec


def build(recipe: VLMRecipe, tokenizer: TextTokenizer | None = None, config: dict | None = None,
          image_spec: ImageSpec | None = None) -> SmolVLMModel:
    cfg = config or recipe.config
    text = lm_config(cfg["text_config"])
    vision = SigLIPTower(cfg["vision_config"])
    connector = PixelShuffleConnector(vision.out_dim, text.hidden_size, int(cfg.get("scale_factor", 2)))
    spec = image_spec or _image_spec(recipe)
    if image_spec is None and config is not None:     # a checkpoint's config: tiles of its tower's size
        spec = ImageSpec(**{**spec.to_dict(), "size": int(cfg["vision_config"]["image_size"])})
    if spec.size != int(cfg["vision_config"]["image_size"]):
        raise ConfigError(f"{recipe.name}: tiles of {spec.size} px but a vision tower of "
                          f"{cfg['vision_config']['image_size']} px", "make image.size the vision image_size")
    return SmolVLMModel(vision, connector, build_lm(text), image_token_id=cfg.get("image_token_id"),
                        image_spec=spec, prompt_spec=PromptSpec(**recipe.prompt), tokenizer=tokenizer,
                        name=recipe.name)


def _read_config(path: Path) -> dict:
    try:
        peek = json.loads((path / "config.json").read_text()).get("model_type")
    except Exception:            # read_model_config says what is wrong with the file
        peek = None
    cfg = read_model_config(path, peek if peek in MODEL_TYPES else MODEL_TYPES[0], CHECKPOINT_HELP,
                            note=f"; smolvlm reads model_type {' or '.join(MODEL_TYPES)}")
    for part, default in (("vision_config", None), ("text_config", "llama")):
        sub = dict(cfg.get(part) or {})
        if default:
            sub.setdefault("model_type", default)
        for k in ("architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version"):
            sub.pop(k, None)
        cfg[part] = sub
    if "image_size" not in cfg["vision_config"] or "patch_size" not in cfg["vision_config"]:
        raise CheckpointError(f"{path / 'config.json'} has no vision_config image_size/patch_size",
                              "download config.json again")
    return cfg


# transformers' PILImageResampling numbers -> the names edgevlm's layouts take
_RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _checkpoint_image_spec(path: Path, recipe: VLMRecipe, cfg: dict) -> ImageSpec:
    """The checkpoint's preprocessor_config.json (Idefics3ImageProcessor / SmolVLMImageProcessor) as an ImageSpec;
    settings edgevlm does not reproduce exactly are refused, never run differently."""
    f = path / "preprocessor_config.json"
    base = _image_spec(recipe)
    side = int(cfg["vision_config"]["image_size"])
    if not f.is_file():
        return ImageSpec(**{**base.to_dict(), "size": side})
    try:
        p = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f} is not valid JSON ({str(e)[:100]})", "download it again") from None
    fix = f"use the checkpoint's released {f.name} (edgevlm reproduces its processor exactly, or not at all)"

    def refuse(what: str):
        raise CheckpointError(f"{f} sets {what}, which edgevlm's SmolVLM processor does not reproduce", fix)

    for key, want in (("do_rescale", True), ("do_normalize", True), ("do_resize", True), ("do_convert_rgb", True)):
        if p.get(key, want) is not want:
            refuse(f"{key}={p[key]}")
    if abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
        refuse(f"rescale_factor={p['rescale_factor']}")
    if p.get("resample", 1) not in _RESAMPLE:
        refuse(f"resample={p['resample']}")
    tile = (p.get("max_image_size") or {}).get("longest_edge", side)
    if tile != side:
        refuse(f"max_image_size {tile} px for a vision tower of {side} px")
    longest = (p.get("size") or {}).get("longest_edge")
    if not isinstance(longest, int) or longest < 1:
        refuse(f"size={p.get('size')!r} (edgevlm reads size.longest_edge)")
    opts = {"longest_edge": longest, "splitting": bool(p.get("do_image_splitting", True)),
            "resample": _RESAMPLE[p.get("resample", 1)]}
    return ImageSpec(size=side, mode="idefics3_tiles", interpolation=base.interpolation,
                     mean=tuple(p.get("image_mean", base.mean)), std=tuple(p.get("image_std", base.std)),
                     options={**base.options, **opts})


def _check_processor(path: Path, model: SmolVLMModel) -> None:
    """processor_config.json's image_seq_len must be what the connector makes per view; the tokenizer must have
    the image token the config names."""
    f = path / "processor_config.json"
    if f.is_file():
        try:
            n = json.loads(f.read_text()).get("image_seq_len")
        except ValueError as e:
            raise CheckpointError(f"{f} is not valid JSON ({str(e)[:100]})", "download it again") from None
        if n is not None and int(n) != model.image_seq_len:
            raise CheckpointError(f"{f} says image_seq_len {n} but the vision tower and scale_factor make "
                                  f"{model.image_seq_len} tokens per view", "use the processor files of these weights")
    tid = model.tokenizer.token_id(IMAGE_MARKER)
    if tid is None or (model.image_token_id is not None and tid != int(model.image_token_id)):
        raise CheckpointError(f"the tokenizer in {path} has {IMAGE_MARKER} as id {tid}, config.json's image_token_id "
                              f"is {model.image_token_id}", "use the tokenizer files that came with these weights")


def load(recipe: VLMRecipe, path: Path, revision: str | None = None) -> SmolVLMModel:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; a SmolVLM checkpoint is a directory", f"pass {CHECKPOINT_HELP}")
    cfg = _read_config(path)
    tokenizer = TextTokenizer.from_dir(path)
    spec = _checkpoint_image_spec(path, recipe, cfg)
    model = build(recipe, tokenizer, cfg, image_spec=spec)
    sd = tie_missing_lm_head(model.language_model, map_keys(load_checkpoint_dir(path)), prefix="language_model.")
    fit_state_dict(model, sd, str(path), fix="pass a transformers Idefics3/SmolVLM checkpoint whose config.json "
                   "matches its weights")
    check_vocab(model.language_model, tokenizer, str(path))
    _check_processor(path, model)
    model.prompt_spec = checkpoint_prompt_spec(path, recipe, tokenizer)
    return model


FAMILIES.add("smolvlm", Family(
    name="smolvlm", description="SmolVLM (transformers idefics3 / smolvlm): SigLIP over 512-px tiles + pixel "
    "shuffle + Linear + SmolLM2",
    build=build, load=load, checkpoint_help=CHECKPOINT_HELP, read_config=lambda recipe, path: _read_config(path),
))
