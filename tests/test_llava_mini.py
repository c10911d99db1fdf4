"""LLaVA-Mini: a tiny checkpoint in the released on-disk layout loads and matches an independent
re-implementation of the reference forward (ictnlp/LLaVA-Mini ``encode_images_mini`` +
``prepare_inputs_labels_for_multimodal``) built from transformers' own CLIP, Llama decoder layers and
Llama causal LM; the uncompressed path is plain LLaVA; attach_compressor works on LLaVA checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.modeling.families import load_vlm
from edgevlm.modeling.vlm import GenerationConfig
from edgevlm.zoo import get_vlm_recipe

from vlm_utils import hf_llava_checkpoint, make_image, write_tokenizer

transformers = pytest.importorskip("transformers")
CFG = get_vlm_recipe("llava_mini_tiny").config
SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
            "<|eot_id|>")
PROMPT = "What is in the picture! Describe it."       # "!" is token 0: the reference masks it out of pre-fusion
IMAGE_TOKEN_INDEX = -200


def _llama_config():
    t = {k: v for k, v in CFG["text_config"].items() if k != "model_type"}
    cfg = transformers.LlamaConfig(**t)
    cfg._attn_implementation = "eager"   # the reference's 4D-mask path; edgevlm runs sdpa
    return cfg


def _clip_config():
    return transformers.CLIPVisionConfig(**{k: v for k, v in CFG["vision_config"].items() if k != "model_type"})


def mae_sincos(dim, grid):
    """MAE's get_2d_sincos_pos_embed (numpy, float32), as the reference's Resampler uses it."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)


def write_release(d, compressor_size=2, prefusion=2, seed=0, shards=3, clip=True):
    """Random weights in the released key names, sharded with an index, plus config.json and tokenizer."""
    torch.manual_seed(seed)
    lcfg, dim, hid = _llama_config(), CFG["vision_config"]["hidden_size"], CFG["text_config"]["hidden_size"]
    sd = {}
    lm = transformers.LlamaForCausalLM(lcfg)
    sd.update(lm.state_dict())
    if clip:
        vis = transformers.CLIPVisionModel(_clip_config())
        sd.update({f"model.vision_tower.vision_tower.{k}": v for k, v in vis.state_dict().items()})
    for i in range(prefusion):
        layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(lcfg, layer_idx=i)
        for k, v in layer.state_dict().items():
            sd[f"model.prefusion_layers.{i}.{k}"] = torch.randn_like(v) * (0.3 if v.dim() == 1 else 0.1) + \
                (1.0 if v.dim() == 1 else 0.0)
    sd.update({"model.mm_projector.0.weight": torch.randn(hid, dim) * 0.2, "model.mm_projector.0.bias": torch.randn(hid) * 0.1,
               "model.mm_projector.2.weight": torch.randn(hid, hid) * 0.2, "model.mm_projector.2.bias": torch.randn(hid) * 0.1})
    n = compressor_size ** 2
    sd.update({"model.compressor.query": torch.randn(n, dim) * 0.5,
               "model.compressor.pos_embed": torch.from_numpy(mae_sincos(dim, compressor_size)),
               "model.compressor.attn.in_proj_weight": torch.randn(3 * dim, dim) * 0.3,
               "model.compressor.attn.in_proj_bias": torch.randn(3 * dim) * 0.1,
               "model.compressor.attn.out_proj.weight": torch.randn(dim, dim) * 0.3,
               "model.compressor.attn.out_proj.bias": torch.randn(dim) * 0.1,
               **{f"model.compressor.{ln}.{p}": torch.randn(dim) * 0.2 + (1.0 if p == "weight" else 0.0)
                  for ln in ("ln_q", "ln_kv") for p in ("weight", "bias")}})
    sd = {k: v.contiguous() for k, v in sd.items()}
    d.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    keys, weight_map = sorted(sd), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * 4 for v in sd.values())}, "weight_map": weight_map}))
    conf = {**lcfg.to_dict(), "model_type": "llava_mini_llama", "architectures": ["LlavaMiniLlamaForCausalLM"],
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": dim, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
            "mm_patch_merge_type": "flat", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
            "use_mm_proj": True, "compressor_size": compressor_size, "resolution_ratio": 1,
            "prefusion_layer_num": prefusion, "image_aspect_ratio": "square", "tokenizer_padding_side": "right",
            "tokenizer_model_max_length": 4096, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
            "use_cache": True, "torch_dtype": "float32", "transformers_version": "4.43.1"}
    conf.pop("_attn_implementation_autoset", None)
    (d / "config.json").write_text(json.dumps(conf))
    write_tokenizer(d, extra_special=SPECIALS, bos="<|begin_of_text|>", eos="<|eot_id|>")
    return sd, d


# -- the reference forward, re-implemented from ictnlp/LLaVA-Mini with transformers modules ----------------


def _sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def reference_lm(sd):
    lm = transformers.LlamaForCausalLM(_llama_config()).eval()
    lm.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.layers.", "model.embed_tokens.",
                                                                       "model.norm.", "lm_head."))})
    return lm


def reference_clip(sd):
    clip = transformers.CLIPVisionModel(_clip_config()).eval()
    clip.load_state_dict(_sub(sd, "model.vision_tower.vision_tower."))
    return clip


@torch.no_grad()
def reference_inputs_embeds(sd, input_ids, pixels, prefusion):
    """``encode_images_mini`` (parts == 1) and the <image> splice, for one prompt with IMAGE_TOKEN_INDEX."""
    from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    lcfg = _llama_config()
    emb = sd["model.embed_tokens.weight"]
    text = emb[input_ids.clamp(min=0)]                                           # (1, L, D)
    pad = input_ids <= 0
    feats = reference_clip(sd)(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]   # (1, M, C)
    # Resampler
    c = _sub(sd, "model.compressor.")
    dim = feats.shape[-1]
    pe = c["pos_embed"]
    src, tgt = int(math.sqrt(pe.shape[0])), int(math.sqrt(feats.shape[1]))
    pe_k = pe if src == tgt else F.interpolate(pe.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                                               mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    mha = torch.nn.MultiheadAttention(dim, 8, batch_first=True)
    mha.load_state_dict(_sub(c, "attn."))
    kv = F.layer_norm(feats, (dim,), c["ln_kv.weight"], c["ln_kv.bias"])
    q = F.layer_norm(c["query"], (dim,), c["ln_q.weight"], c["ln_q.bias"]) + pe
    comp, _ = mha(q.unsqueeze(0), kv + pe_k.unsqueeze(0), kv)                    # (1, N, C)

    def proj(x):
        h = F.gelu(x @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
        return h @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]

    comp, glob = proj(comp), proj(feats)
    x = torch.cat([glob, comp, text], dim=1)
    mask = torch.cat([torch.zeros(1, glob.shape[1] + comp.shape[1], dtype=torch.bool), pad], dim=1)
    attn = _prepare_4d_causal_attention_mask(~mask, (1, x.shape[1]), x, 0)
    pos = (~mask).long().cumsum(-1) - 1
    pos.masked_fill_(mask, 1)
    rope = LlamaRotaryEmbedding(config=lcfg)
    for i in range(prefusion):
        layer = LlamaDecoderLayer(lcfg, layer_idx=i).eval()
        layer.load_state_dict(_sub(sd, f"model.prefusion_layers.{i}."))
        out = layer(x, attention_mask=attn, position_ids=pos, position_embeddings=rope(x, pos))
        x = out[0] if isinstance(out, tuple) else out
    L = input_ids.shape[1]
    fused = x[:, -L:]
    vis = x[:, -L - comp.shape[1]:-L]
    fused = fused * (~pad).unsqueeze(-1).int() + text * pad.unsqueeze(-1)
    at = int((input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0])
    return torch.cat([fused[:, :at], vis, fused[:, at + 1:]], dim=1)


# -- tests ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_release(tmp_path_factory.mktemp("llava_mini") / "llava-mini-tiny")


@pytest.mark.parametrize("size", [1, 2, 4])
def test_released_layout_matches_reference_forward(tmp_path, size):
    sd, d = write_release(tmp_path / f"c{size}", compressor_size=size)
    vlm = load_vlm("llava_mini_tiny", weights=d)
    assert vlm.tokenizer.token_id("!") == 0 and vlm.tokenizer.bos_id == vlm.tokenizer.token_id("<|begin_of_text|>")
    image = make_image()
    embeds, pieces, n_img = vlm.prepare(image, PROMPT)
    assert n_img == size ** 2 and embeds.shape[1] == pieces.n_text + size ** 2
    ids = torch.tensor([pieces.before + [IMAGE_TOKEN_INDEX] + pieces.after])
    assert 0 in pieces.after       # the "!" quirk is exercised
    ref = reference_inputs_embeds(sd, ids, vlm.pixel_values(image), prefusion=2)
    assert ref.shape == embeds.shape
    assert torch.allclose(embeds, ref, atol=1e-5, rtol=0), float((embeds - ref).abs().max())
    lm = reference_lm(sd)
    with torch.no_grad():
        ours, theirs = vlm(embeds), lm(inputs_embeds=ref).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), float((ours - theirs).abs().max())

    out = vlm.generate(image, PROMPT, max_new_tokens=8)
    assert out.stats.image_tokens == size ** 2
    with torch.no_grad():
        ref_tokens = lm.generate(inputs_embeds=ref, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0].tolist()
    our_tokens = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=8)))
    assert our_tokens == ref_tokens


def test_language_model_and_clip_equal_transformers(release):
    sd, d = release
    vlm = load_vlm("llava_mini_tiny", weights=d)
    ids = torch.tensor([[5, 17, 200, 3, 99, 0, 42]])
    with torch.no_grad():
        assert torch.allclose(vlm.language_model(input_ids=ids).logits, reference_lm(sd)(input_ids=ids).logits,
                              atol=1e-5, rtol=0)
        pixels = vlm.pixel_values(make_image(120))
        ref = reference_clip(sd)(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.allclose(vlm.vision(pixels), ref, atol=1e-5, rtol=0)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    assert np.abs(proc(images=make_image(120), return_tensors="np")["pixel_values"] - pixels.numpy()).max() < 1e-5


def test_prefusion_equals_llama_decoder_layers_with_reference_mask(release):
    from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    sd, d = release
    vlm = load_vlm("llava_mini_tiny", weights=d)
    torch.manual_seed(1)
    x = torch.randn(1, 30, 64)
    keep = torch.ones(30, dtype=torch.bool)
    keep[[21, 25]] = False
    with torch.no_grad():
        ours = vlm.fusion(x, keep)
        cfg = _llama_config()
        mask = _prepare_4d_causal_attention_mask(keep[None], (1, 30), x, 0)
        pos = (keep.long().cumsum(0) - 1).masked_fill(~keep, 1)[None]
        ref = x
        for i in range(2):
            layer = LlamaDecoderLayer(cfg, layer_idx=i).eval()
            layer.load_state_dict(_sub(sd, f"model.prefusion_layers.{i}."))
            out = layer(ref, attention_mask=mask, position_ids=pos, position_embeddings=LlamaRotaryEmbedding(cfg)(ref, pos))
            ref = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(ours[0, keep], ref[0, keep], atol=1e-5, rtol=0)
        # without dropped tokens it is plain causal attention over positions 0..L-1
        plain = LlamaDecoderLayer(cfg, layer_idx=0).eval()
        plain.load_state_dict(_sub(sd, "model.prefusion_layers.0."))
        p = torch.arange(30)[None]
        one = plain(x, attention_mask=_prepare_4d_causal_attention_mask(None, (1, 30), x, 0), position_ids=p,
                    position_embeddings=LlamaRotaryEmbedding(cfg)(x, p))
        one = one[0] if isinstance(one, tuple) else one
        assert torch.allclose(vlm.fusion.layers[0](x, position_ids=p, position_embeddings=vlm.fusion.rotary(x, p)),
                              one, atol=1e-5, rtol=0)


def test_sincos_table_and_missing_pos_embed(tmp_path):
    from safetensors.torch import load_file, save_file

    from edgevlm.modeling.connectors import sincos_2d

    for g in (1, 2, 3, 8):
        assert np.abs(sincos_2d(32, g).numpy() - mae_sincos(32, g)).max() < 1e-6
    sd, d = write_release(tmp_path / "nope", compressor_size=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"].pop("model.compressor.pos_embed")
    part = load_file(str(shard))
    del part["model.compressor.pos_embed"]
    save_file(part, str(shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    vlm = load_vlm("llava_mini_tiny", weights=d)
    assert torch.allclose(vlm.connector.compressor.pos_embed, sd["model.compressor.pos_embed"], atol=1e-6)


def test_uncompressed_path_is_plain_llava(release):
    from edgevlm.modeling.llava import LlavaModel

    _, d = release
    vlm = load_vlm("llava_mini_tiny", weights=d)
    plain = LlavaModel(vlm.vision, vlm.connector.projector, vlm.language_model, image_spec=vlm.image_spec,
                       prompt_spec=vlm.prompt_spec, tokenizer=vlm.tokenizer)
    image = make_image()
    with vlm.uncompressed():
        embeds, pieces, n_img = vlm.prepare(image, PROMPT)
        out = vlm.generate(image, PROMPT, max_new_tokens=4)
    assert vlm.compress and n_img == 16 and out.stats.image_tokens == 16   # (56 / 14)², as 576 at 336 px
    ref, _, n_ref = plain.prepare(image, PROMPT)
    assert n_ref == 16 and torch.equal(embeds, ref)
    with torch.no_grad():
        assert torch.equal(vlm(embeds), plain(ref))
    assert out.token_ids == plain.generate(image, PROMPT, max_new_tokens=4).token_ids


def test_info_compares_compressed_and_uncompressed():
    from edgevlm.modeling.info import describe

    d = describe("llava_mini_tiny", text_tokens=20)
    assert set(d["params"]) == {"vision", "connector", "fusion", "language_model"}
    a, b = d["paths"]
    assert a["llm_input_tokens"] == 4 + 20 and b["llm_input_tokens"] == 16 + 20
    assert a["flops"]["fusion"] > 0 and b["flops"]["fusion"] == 0
    assert a["flops"]["language_model"] < b["flops"]["language_model"]


def _hf_llava_dir(tmp_path):
    hf_llava_checkpoint(tmp_path / "llava-hf")
    return tmp_path / "llava-hf"


def test_attach_compressor_to_a_llava_checkpoint(tmp_path):
    from edgevlm.modeling.llava_mini import LlavaMiniModel, attach_compressor

    llava = load_vlm("llava_tiny", weights=_hf_llava_dir(tmp_path))
    image = make_image()
    base_embeds, _, n_base = llava.prepare(image, "Describe this image.")
    for n in (1, 4, 16):
        mini = attach_compressor(llava, n_tokens=n, prefusion_layers=2)
        assert isinstance(mini, LlavaMiniModel) and mini.language_model is llava.language_model
        out = mini.generate(image, "Describe this image.", max_new_tokens=6)
        assert out.stats.image_tokens == n and len(out.token_ids) >= 1
        embeds, pieces, _ = mini.prepare(image, "Describe this image.")
        assert embeds.shape[1] == pieces.n_text + n
        with mini.uncompressed():
            un, _, n_un = mini.prepare(image, "Describe this image.")
            assert n_un == n_base == 16 and torch.equal(un, base_embeds)
            with torch.no_grad():
                assert torch.equal(mini(un), llava(base_embeds))
    with pytest.raises(ConfigError, match="square"):
        attach_compressor(llava, n_tokens=3)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_mismatched_keys_are_listed(tmp_path, release):
    from safetensors.torch import load_file, save_file

    _, d = release
    bad = _copy(d, tmp_path / "bad")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    shard = bad / index["weight_map"]["model.prefusion_layers.1.mlp.up_proj.weight"]
    part = load_file(str(shard))
    del part["model.prefusion_layers.1.mlp.up_proj.weight"]
    part["model.compressor.kv_proj.weight"] = torch.zeros(2, 2)
    save_file(part, str(shard))
    with pytest.raises(CheckpointError, match=r"1 missing: fusion.layers.1.mlp.up_proj.weight.*"
                                              r"1 unexpected: connector.compressor.kv_proj.weight"):
        load_vlm("llava_mini_tiny", weights=bad)
    shapes = _copy(d, tmp_path / "shapes")
    conf = json.loads((shapes / "config.json").read_text())
    conf["compressor_size"] = 3
    (shapes / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"2 mis-shaped: connector.compressor.pos_embed: checkpoint "
                                              r"\(4, 32\) vs model \(9, 32\), connector.compressor.query"):
        load_vlm("llava_mini_tiny", weights=shapes)


def test_bad_checkpoint_directories(tmp_path, release):
    _, d = release
    shard = _copy(d, tmp_path / "shard")
    (shard / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00003.safetensors listed in "
                                              "model.safetensors.index.json is missing"):
        load_vlm("llava_mini_tiny", weights=shard)
    notok = _copy(d, tmp_path / "notok")
    (notok / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_vlm("llava_mini_tiny", weights=notok)
    other = _copy(d, tmp_path / "other")
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "model_type": "llava_llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llava_llama', not 'llava_mini_llama'"):
        load_vlm("llava_mini_tiny", weights=other)
    (other / "config.json").write_text(json.dumps({**conf, "resolution_ratio": 2}))
    with pytest.raises(CheckpointError, match="resolution_ratio"):
        load_vlm("llava_mini_tiny", weights=other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vlm("llava_mini_tiny", weights=tmp_path / "empty")


def test_clip_weights_from_a_separate_directory(tmp_path, release):
    """The reference loads CLIP from openai/clip-vit-large-patch14-336; a checkpoint without it says so."""
    from safetensors.torch import save_file

    sd, d = release
    _, noclip = write_release(tmp_path / "noclip", clip=False)
    with pytest.raises(CheckpointError, match=r"no CLIP vision-tower weights.*fix: put a copy of "
                                              r"openai/clip-vit-large-patch14-336"):
        load_vlm("llava_mini_tiny", weights=noclip)
    (noclip / "vision_tower").mkdir()
    clip = {k[len("model.vision_tower.vision_tower."):]: v for k, v in sd.items() if "vision_tower" in k}
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)   # a full CLIPModel file
    save_file(clip, str(noclip / "vision_tower" / "model.safetensors"))
    vlm = load_vlm("llava_mini_tiny", weights=noclip)
    ref = load_vlm("llava_mini_tiny", weights=d)
    for (k, a), b in zip(vlm.vision.state_dict().items(), ref.vision.state_dict().values()):
        assert torch.equal(a, b), k
