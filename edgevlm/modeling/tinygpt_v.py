"""TinyGPT-V (Yuan et al., https://arxiv.org/abs/2312.16862; github DLYuanGod/TinyGPT-V), from its released files.

    pixels (V, 3, S, S), S = 224 (stages 1-3) or 448 (stage 4)
      --vision: EVA ViT-g/14, 39 blocks, no final norm, CLS kept (timm ``Eva``) + ln_vision--> (V, 1+(S/14)^2, 1408)
      --connector: Q-Former (transformers ``Blip2QFormerModel``, 32 queries), llama_proj, llama_proj2--> (V, 32, 2560)
      --language model: Phi-2 with TinyGPT-V's changes (per-head q/k LayerNorm, RMSNorm on the attention output)

TinyGPT-V never shipped as one file. It is assembled, as its own code does, from four downloads
(the first three are the frozen pieces it was trained on, the fourth holds what it trained). Expected layout:

    WEIGHTS/
      eva_vit_g.pth                      LAVIS's EVA ViT-g, a plain state dict (or eva_vit_g.safetensors)
      blip2_pretrained_flant5xxl.pth     LAVIS BLIP-2 checkpoint {"model": ...}: Q-Former, query_tokens, ln_vision
      phi-2/                             Phi-2 in Hugging Face layout: config.json, model.safetensors (or shards),
                                         tokenizer.json (+ tokenizer_config.json); fused ``query_key_value``
                                         (TinyGPT-V's copy) or split ``q_proj/k_proj/v_proj`` (current microsoft/phi-2)
      TinyGPT-V_for_Stage4.pth           a stage checkpoint {"model": ..., "optimizer": ..., ...} (Stage1..Stage4):
                                         llama_proj(2), the LM's norm weights, LoRA A/B (stages 2-4)

Each file may be .pth (read with ``torch.load(weights_only=True)``, nothing else is unpickled) or .safetensors.
Later files win, as in TinyGPT-V's load order: EVA < BLIP-2 < Phi-2 < stage. LoRA (scale lora_alpha / r) is merged
into the weights at load. Unlike the reference (``strict=False``), every parameter must be filled and every
source key used or listed below as unused; anything else is reported.

The ``revision`` picks the stage: stage1-3 answer at 224 px with MiniGPT-4's ``###Human: ... ###Assistant:``
format, stage4 at 448 px with ``[INST] ... [/INST]``.
"""
from __future__ import annotations

import json
import re
from functools import cache, partial
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..processor import ImageSpec, PromptSpec, TextTokenizer
from ..zoo import VLMRecipe
from .checkpoint import fit_state_dict, load_checkpoint_dir, load_state_dict
from .families import FAMILIES, Family
from .language import check_vocab, lm_config
from .vision import timm_without_drop_path
from .vlm import VisionLanguageModel

LAYOUT = ("a directory with eva_vit_g.pth, blip2_pretrained_flant5xxl.pth, phi-2/ (config.json, model.safetensors, "
          "tokenizer.json) and TinyGPT-V_for_Stage<N>.pth (each .pth may also be .safetensors)")
EVA_FILE, BLIP2_FILE, PHI_DIR, STAGE_FILE = "eva_vit_g", "blip2_pretrained_flant5xxl", "phi-2", "TinyGPT-V_for_Stage{}"


# -- vision -----------------------------------------------------------------------------------------
class EVATower(nn.Module):
    """LAVIS's EVA ViT-g as timm's ``Eva`` (no final norm, CLS kept) followed by BLIP-2's ``ln_vision``."""

    def __init__(self, cfg: dict, image_size: int):
        super().__init__()
        from timm.models.eva import Eva

        dim = cfg["embed_dim"]
        kwargs = dict(img_size=image_size, patch_size=cfg["patch_size"], embed_dim=dim, depth=cfg["depth"],
                      num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_dim"] / dim,   # int(dim * ratio) == mlp_dim
                      qkv_bias=True, qkv_fused=True,                    # qkv.weight + q_bias/v_bias, k bias zero
                      norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=None,   # no layer scale
                      num_classes=0, global_pool="", use_post_transformer_norm=False, use_fc_norm=False,
                      class_token=True, use_abs_pos_emb=True, use_rot_pos_emb=False)
        with timm_without_drop_path("eva"):
            self.eva = Eva(**kwargs)
        self.ln_vision = nn.LayerNorm(dim)                                # torch default eps 1e-5, run in fp32

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:         # (V, 3, S, S)
        x = self.eva.forward_features(pixel_values)                        # (V, 1 + (S/14)^2, C), CLS first
        return self.ln_vision(x.float()).to(x.dtype)                       # (V, N, C)


# -- connector --------------------------------------------------------------------------------------
class QFormerConnector(nn.Module):
    """BLIP-2's Q-Former over the image features, then TinyGPT-V's two linear projections (nothing between)."""

    def __init__(self, qcfg: dict, vision_dim: int, num_query_tokens: int, proj_dim: int, lm_dim: int):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        conf = Blip2QFormerConfig(**qcfg, encoder_hidden_size=vision_dim, use_qformer_text_input=False)
        self.query_tokens = nn.Parameter(torch.empty(1, num_query_tokens, conf.hidden_size))
        nn.init.normal_(self.query_tokens, std=conf.initializer_range)
        self.qformer = Blip2QFormerModel(conf)
        self.llama_proj = nn.Linear(conf.hidden_size, proj_dim)             # MiniGPT-4's projection (to 4096)
        self.llama_proj2 = nn.Linear(proj_dim, lm_dim)                      # TinyGPT-V's (4096 -> Phi-2's 2560)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:                # (V, N, C)
        # repeat, not expand: a no-grad view of a parameter breaks torch's FlopCounterMode (edgevlm info)
        q = self.query_tokens.repeat(feats.shape[0], 1, 1)                  # (V, Q, H)
        h = self.qformer(query_embeds=q, encoder_hidden_states=feats).last_hidden_state   # (V, Q, H)
        return self.llama_proj2(self.llama_proj(h.to(self.llama_proj.weight.dtype)))     # (V, Q, P) -> (V, Q, D)


# -- language model ---------------------------------------------------------------------------------
@cache
def _phi_classes():
    """The Phi subclasses, defined once on first use (transformers is imported lazily, as in the other families)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.phi.modeling_phi import PhiDecoderLayer, PhiForCausalLM

    class TinyGPTVPhiDecoderLayer(PhiDecoderLayer):
        """Phi's parallel block with TinyGPT-V's RMSNorm on the attention branch:
        ``x + rms(attn(ln(x))) + mlp(ln(x))``. Built around an existing layer's modules (no second allocation)."""

        def __init__(self, layer: PhiDecoderLayer, config):
            super(PhiDecoderLayer, self).__init__()
            self.self_attn, self.mlp = layer.self_attn, layer.mlp
            self.input_layernorm, self.resid_dropout = layer.input_layernorm, layer.resid_dropout
            self.post_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.attn_rmsnorm_eps)

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None,
                    **kwargs):                                               # (B, T, D)
            h = self.input_layernorm(hidden_states)
            attn, weights = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                                           past_key_values=past_key_values, output_attentions=output_attentions,
                                           use_cache=use_cache, cache_position=cache_position,
                                           position_embeddings=position_embeddings, **kwargs)   # (B, T, D)
            attn = self.resid_dropout(self.post_layernorm(attn))
            out = attn + self.resid_dropout(self.mlp(h)) + hidden_states      # (B, T, D)
            return (out, weights) if output_attentions else (out,)

    class TinyGPTVPhiForCausalLM(PhiForCausalLM):
        """transformers' Phi with ``qk_layernorm`` (per-head LayerNorm on q and k before RoPE, as TinyGPT-V) and,
        with ``config.attn_rmsnorm``, the RMSNorm on each layer's attention output."""

        def __init__(self, config):
            super().__init__(config)
            if getattr(config, "attn_rmsnorm", False):
                self.model.layers = nn.ModuleList(TinyGPTVPhiDecoderLayer(layer, config) for layer in self.model.layers)

    return TinyGPTVPhiDecoderLayer, TinyGPTVPhiForCausalLM


def build_phi(text_config: dict, attn_rmsnorm: bool = True):
    """TinyGPT-V's Phi-2 (random init) from a Phi config dict; ``attn_rmsnorm=False`` leaves transformers' block."""
    cfg = lm_config(dict(text_config))
    cfg.qk_layernorm = True                      # always on in TinyGPT-V's copy, whatever phi-2/config.json says
    cfg.attn_rmsnorm, cfg.attn_rmsnorm_eps = attn_rmsnorm, 1e-6
    cfg._attn_implementation = "sdpa"
    return _phi_classes()[1](cfg).eval()


# -- the family -------------------------------------------------------------------------------------
class TinyGPTVModel(VisionLanguageModel):
    family = "tinygpt_v"
    stage = "stage4"


def _stage(recipe: VLMRecipe, revision: str | None) -> tuple[str, dict]:
    stages = recipe.config["stages"]
    stage = revision or recipe.config.get("default_stage", "stage4")
    if stage not in stages:
        raise CheckpointError(f"{recipe.name} revision {stage!r} is not a TinyGPT-V stage edgevlm reads",
                              f"use one of: {', '.join(stages)}")
    return stage, stages[stage]


def build(recipe: VLMRecipe, tokenizer: TextTokenizer | None = None, stage: str | None = None,
          text_config: dict | None = None) -> TinyGPTVModel:
    cfg = recipe.config
    stage, st = _stage(recipe, stage)
    vision = EVATower(cfg["vision"], st["image_size"])
    lm = build_phi(text_config or cfg["text_config"])
    connector = QFormerConnector(cfg["qformer"], cfg["vision"]["embed_dim"], cfg["num_query_tokens"],
                                 cfg["proj_dim"], lm.config.hidden_size)
    image = ImageSpec(**{**recipe.image, "size": st["image_size"]})
    prompt = PromptSpec(**{**recipe.prompt, "template": st["template"]})
    model = TinyGPTVModel(vision, connector, lm, image_spec=image, prompt_spec=prompt, tokenizer=tokenizer,
                          name=recipe.name)
    model.stage = stage
    return model


# Key map, TinyGPT-V's module names -> ours. Every source is first named as in TinyGPT-V's model
# (eva_vit_g.pth gets "visual_encoder.", Phi-2 gets "llama_model."), then the first matching rule applies.
_LM = r"llama_model\.(?:base_model\.model\.)?"   # peft's LoRA wrapper (stages 2-4) adds base_model.model.
KEY_RULES: tuple[tuple[str, str], ...] = (
    # EVA ViT-g (LAVIS names equal timm's Eva names)
    (r"visual_encoder\.(cls_token|pos_embed)$", r"vision.eva.\1"),                 # (1,1,C), (1,1+g*g,C)
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision.eva.patch_embed.proj.\1"),  # conv 14x14/14
    (r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"vision.eva.blocks.\1.norm\2.\3"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision.eva.blocks.\1.attn.qkv.weight"),   # (3C, C)
    (r"visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$", r"vision.eva.blocks.\1.attn.\2_bias"),      # no k bias
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"vision.eva.blocks.\1.attn.proj.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)$", r"vision.eva.blocks.\1.mlp.fc\2.\3"),
    (r"ln_vision\.(weight|bias)$", r"vision.ln_vision.\1"),                         # from the BLIP-2 file
    # Q-Former: LAVIS BERT -> transformers Blip2QFormerModel
    (r"query_tokens$", "connector.query_tokens"),                                    # (1, 32, 768)
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$", r"connector.qformer.layernorm.\1"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)$",
     r"connector.qformer.encoder.layer.\1.\2.attention.\3.\4"),                      # cross k/v: (768, 1408)
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)$",
     r"connector.qformer.encoder.layer.\1.\2.output.\3.\4"),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.(weight|bias)$",
     r"connector.qformer.encoder.layer.\1.intermediate_query.dense.\2"),            # query FFN 768 -> 3072
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.output_query\.(dense|LayerNorm)\.(weight|bias)$",
     r"connector.qformer.encoder.layer.\1.output_query.\2.\3"),
    # projections (stage file)
    (r"llama_proj\.(weight|bias)$", r"connector.llama_proj.\1"),                     # (4096, 768)
    (r"llama_proj2\.(weight|bias)$", r"connector.llama_proj2.\1"),                   # (2560, 4096)
    # Phi-2 (HF 4.36 layout; query_key_value is split into q/k/v before these rules, see split_qkv)
    (_LM + r"model\.embed_tokens\.weight$", "language_model.model.embed_tokens.weight"),
    (_LM + r"model\.layers\.(\d+)\.(input_layernorm|post_layernorm)\.(weight|bias)$",  # post_layernorm: RMSNorm
     r"language_model.model.layers.\1.\2.\3"),
    (_LM + r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|dense)\.(weight|bias)$",
     r"language_model.model.layers.\1.self_attn.\2.\3"),
    (_LM + r"model\.layers\.(\d+)\.self_attn\.([qk]_layernorm)\.(weight|bias)$",     # (head_dim,), per head
     r"language_model.model.layers.\1.self_attn.\2.\3"),
    (_LM + r"model\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"language_model.model.layers.\1.mlp.\2.\3"),
    (_LM + r"model\.final_layernorm\.(weight|bias)$", r"language_model.model.final_layernorm.\1"),
    (_LM + r"lm_head\.(weight|bias)$", r"language_model.lm_head.\1"),                # (51200, 2560) + bias
)
# Source keys TinyGPT-V does not use (it loads with strict=False and they stay out of its model).
UNUSED = tuple(re.compile(p) for p in (
    r"visual_encoder\.(norm|fc_norm|head)\.",            # EVA-CLIP's final norm / head: BLIP-2 drops them
    r"Qformer\.cls\.",                                   # BERT LM head of the Q-Former (set to None)
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)",   # text embeddings (None)
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",   # text FFN (None; queries use *_query)
    r"(t5_proj|t5_model|opt_proj|opt_model|llm_proj|llm_model)\.",   # BLIP-2's own LM side
    r"llama_model\..*rotary_emb\.inv_freq$",             # a buffer, recomputed
))
_LORA = re.compile(_LM + r"model\.layers\.(\d+)\.self_attn\.(query_key_value|dense)\.lora_([AB])"
                   r"(?:\.default)?\.weight$")   # peft 0.2 names, or >= 0.3 with .default
_QKV = re.compile(_LM + r"model\.layers\.(\d+)\.self_attn\.query_key_value\.(weight|bias)$")
_EVA_BLOCK = re.compile(r"visual_encoder\.blocks\.(\d+)\.")


def split_qkv(fused: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TinyGPT-V's fused ``query_key_value`` rows are per head ``[q(hd), k(hd), v(hd)]``: -> q, k, v rows."""
    per_head = fused.reshape(n_heads, 3, fused.shape[0] // (3 * n_heads), *fused.shape[1:])
    return tuple(per_head[:, i].reshape(-1, *fused.shape[1:]) for i in range(3))


def resample_pos_embed(pos: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(1, 1+g*g, C) -> (1, n_tokens, C): bicubic on the grid (align_corners=False, no antialias), CLS kept (LAVIS)."""
    g0, g1 = int(round((pos.shape[1] - 1) ** 0.5)), int(round((n_tokens - 1) ** 0.5))
    grid = pos[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2).float()              # (1, C, g0, g0)
    grid = torch.nn.functional.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g1 * g1, -1).to(pos.dtype)], dim=1)


def map_keys(sd: dict, n_heads: int, source: str) -> tuple[dict, dict]:
    """TinyGPT-V-named tensors -> (ours, LoRA factors {(layer, module): {"A": .., "B": ..}}).

    Keys no rule knows keep their name prefixed with ``source:`` so that the strict load lists them.
    """
    out, lora = {}, {}
    for k, v in sd.items():
        if m := _LORA.match(k):
            lora.setdefault((int(m[1]), m[2]), {})[m[3]] = v
            continue
        if m := _QKV.match(k):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_qkv(v, n_heads)):
                out[f"language_model.model.layers.{m[1]}.self_attn.{name}.{m[2]}"] = part
            continue
        if any(p.match(k) for p in UNUSED):
            continue
        for pattern, repl in KEY_RULES:
            new, n = re.subn("^" + pattern, repl, k)
            if n:
                out[new] = v
                break
        else:
            out[f"{source}:{k}"] = v
    return out, lora


def merge_lora(sd: dict, lora: dict, alpha: float, n_heads: int, source: str) -> None:
    """W += (alpha / r) * B @ A, for the fused qkv (split like its base weight) and the attention's dense."""
    for (i, module), f in sorted(lora.items()):
        if set(f) != {"A", "B"}:
            raise CheckpointError(f"{source} has only lora_{''.join(f)} for layer {i} {module}",
                                  "use the complete stage checkpoint")
        delta = (alpha / f["A"].shape[0]) * (f["B"].float() @ f["A"].float())          # (out, in)
        names = ("q_proj", "k_proj", "v_proj") if module == "query_key_value" else ("dense",)
        parts = split_qkv(delta, n_heads) if module == "query_key_value" else (delta,)
        for name, d in zip(names, parts):
            key = f"language_model.model.layers.{i}.self_attn.{name}.weight"
            if key not in sd:
                raise CheckpointError(f"{source} has LoRA for {key} but no base weight came with phi-2/",
                                      f"pass {LAYOUT}")
            sd[key] = sd[key].float() + d       # fp32: rounding back to fp16 phi-2 weights would lose the delta


def _find(path: Path, stem: str) -> Path:
    for suffix in (".pth", ".safetensors", ".pt", ".bin"):
        if (path / f"{stem}{suffix}").is_file():
            return path / f"{stem}{suffix}"
    raise CheckpointError(f"no {stem}.pth (or .safetensors) in {path}", f"TinyGPT-V needs {LAYOUT}")


def _phi_config(phi: Path) -> dict:
    f = phi / "config.json"
    if not f.is_file():
        raise CheckpointError(f"no phi-2/config.json in {phi.parent}", f"TinyGPT-V needs {LAYOUT}")
    cfg = json.loads(f.read_text())
    if cfg.get("model_type") != "phi":
        raise CheckpointError(f"{f} has model_type {cfg.get('model_type')!r}, not 'phi'",
                              "use Phi-2 in transformers' format (TinyGPT-V's phi-2 folder or microsoft/phi-2); "
                              "the old remote-code phi-msft layout (Wqkv, transformer.h) is not read")
    drop = ("architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version", "auto_map",
            "bos_token_id", "eos_token_id", "qk_layernorm")
    return {k: v for k, v in cfg.items() if k not in drop}


def _tokenizer(phi: Path) -> TextTokenizer:
    """Phi-2's tokenizer; EOS is ``<|endoftext|>`` (some phi-2 configs carry Llama's ids 1/2, wrong for this vocab)."""
    tok = TextTokenizer.from_dir(phi)
    eot = tok.token_id("<|endoftext|>")
    return TextTokenizer(tok.tok, None, (eot,) if eot is not None else tok.eos_ids, tok.source)


def load(recipe: VLMRecipe, path: Path, revision: str | None = None) -> TinyGPTVModel:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; TinyGPT-V comes in four pieces", f"pass {LAYOUT}")
    stage, st = _stage(recipe, revision)
    phi = path / PHI_DIR
    if not phi.is_dir():
        raise CheckpointError(f"no {PHI_DIR}/ directory in {path}", f"TinyGPT-V needs {LAYOUT}")
    files = {"eva": _find(path, EVA_FILE), "blip2": _find(path, BLIP2_FILE),
             "stage": _find(path, STAGE_FILE.format(stage[-1]))}
    text_config = {**recipe.config["text_config"], **_phi_config(phi)}
    tokenizer = _tokenizer(phi)
    model = build(recipe, tokenizer, stage, text_config)
    n_heads, depth = model.language_model.config.num_attention_heads, recipe.config["vision"]["depth"]

    sd, lora = {}, {}
    sources = (("eva", "visual_encoder.", load_state_dict(files["eva"])),
               ("blip2", "", load_state_dict(files["blip2"])),
               ("phi-2", "llama_model.", load_checkpoint_dir(phi)), ("stage", "", load_state_dict(files["stage"])))
    for name, prefix, raw in sources:
        raw = {(k if k.startswith(prefix) else prefix + k): v for k, v in raw.items()}
        raw = {k: v for k, v in raw.items()          # EVA-CLIP-g's 40th block: BLIP-2 uses the 39 before it
               if not ((m := _EVA_BLOCK.match(k)) and int(m[1]) >= depth)}
        mapped, factors = map_keys(raw, n_heads, name)
        sd.update(mapped)
        lora.update(factors)
    merge_lora(sd, lora, float(recipe.config["lora_alpha"]), n_heads, files["stage"].name)
    own = model.state_dict()
    pos = "vision.eva.pos_embed"
    if pos in sd and sd[pos].shape[1] != own[pos].shape[1]:     # 224 px EVA weights, 448 px stage 4
        sd[pos] = resample_pos_embed(sd[pos], own[pos].shape[1])
    for i in range(model.language_model.config.num_hidden_layers):   # never trained or stored: TinyGPT-V's init
        for n in ("q_layernorm", "k_layernorm"):
            key = f"language_model.model.layers.{i}.self_attn.{n}.bias"
            sd.setdefault(key, torch.zeros_like(own[key]))
    fit_state_dict(model, sd, str(path), fix=f"pass {LAYOUT}, with the stage file of revision {stage}")
    check_vocab(model.language_model, tokenizer, str(phi))
    return model


FAMILIES.add("tinygpt_v", Family(
    name="tinygpt_v", description="TinyGPT-V: EVA ViT-g + BLIP-2 Q-Former + 2 projections + Phi-2 (QK-norm, RMSNorm)",
    build=build, load=load, checkpoint_help=LAYOUT, hub_revisions=False,
))
