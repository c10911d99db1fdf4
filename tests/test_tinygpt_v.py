"""TinyGPT-V from its four released pieces, written here in their real on-disk formats at test size.

The references are computed independently of edgevlm's modules: LAVIS's EVA and BERT Q-Former math and
TinyGPT-V's modified Phi block written out by hand from the raw (LAVIS / TinyGPT-V named) tensors, with
the LoRA branch run explicitly; the unmodified Phi path is checked against transformers' PhiForCausalLM.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from edgevlm.errors import CheckpointError
from edgevlm.modeling.families import get_family, load_vlm
from edgevlm.modeling.vlm import GenerationConfig
from edgevlm.zoo import get_vlm_recipe

from vlm_utils import make_image, write_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

R = get_vlm_recipe("tinygpt_v_tiny")
VC, QC, TC = R.config["vision"], R.config["qformer"], R.config["text_config"]
NQ, PROJ, ALPHA = R.config["num_query_tokens"], R.config["proj_dim"], R.config["lora_alpha"]
D, NH, NL = TC["hidden_size"], TC["num_attention_heads"], TC["num_hidden_layers"]
HD = D // NH
LORA_R = 8
LORA = "llama_model.base_model.model.model."   # peft-wrapped prefix (stages 2-4)
PLAIN = "llama_model.model."                   # stage 1 (no LoRA)


class NotATensor:
    """Stands in for a pickled object of some project class inside a .pth."""

    def __init__(self):
        self.payload = [1, 2, 3]


# -- writing the four pieces ------------------------------------------------------------------------
def _rnd(g, *shape, s=0.2):
    return torch.randn(*shape, generator=g) * s


def eva_file(g, grid=2) -> dict:
    """eva_vit_g.pth: a plain state dict in LAVIS names, pretrained at `grid`x`grid` patches, with one extra block."""
    d, m, p = VC["embed_dim"], VC["mlp_dim"], VC["patch_size"]
    sd = {"cls_token": _rnd(g, 1, 1, d), "pos_embed": _rnd(g, 1, 1 + grid * grid, d),
          "patch_embed.proj.weight": _rnd(g, d, 3, p, p, s=0.05), "patch_embed.proj.bias": _rnd(g, d)}
    for b in range(VC["depth"] + 1):   # EVA-CLIP-g has a 40th block BLIP-2 leaves out
        pre = f"blocks.{b}."
        for n in ("norm1", "norm2"):
            sd[pre + n + ".weight"], sd[pre + n + ".bias"] = 1 + _rnd(g, d), _rnd(g, d)
        sd.update({pre + "attn.qkv.weight": _rnd(g, 3 * d, d), pre + "attn.q_bias": _rnd(g, d),
                   pre + "attn.v_bias": _rnd(g, d), pre + "attn.proj.weight": _rnd(g, d, d),
                   pre + "attn.proj.bias": _rnd(g, d), pre + "mlp.fc1.weight": _rnd(g, m, d),
                   pre + "mlp.fc1.bias": _rnd(g, m), pre + "mlp.fc2.weight": _rnd(g, d, m),
                   pre + "mlp.fc2.bias": _rnd(g, d)})
    return sd


def blip2_file(g) -> dict:
    """blip2_pretrained_flant5xxl.pth["model"]: LAVIS BERT Q-Former names, ln_vision, and keys TinyGPT-V ignores."""
    h, i, c = QC["hidden_size"], QC["intermediate_size"], VC["embed_dim"]
    sd = {"query_tokens": _rnd(g, 1, NQ, h), "ln_vision.weight": 1 + _rnd(g, c), "ln_vision.bias": _rnd(g, c),
          "Qformer.bert.embeddings.LayerNorm.weight": 1 + _rnd(g, h),
          "Qformer.bert.embeddings.LayerNorm.bias": _rnd(g, h),
          "Qformer.bert.embeddings.position_ids": torch.arange(16)[None], "t5_proj.weight": _rnd(g, 8, h),
          "t5_proj.bias": _rnd(g, 8)}

    def lin(name, out, inp):
        sd[name + ".weight"], sd[name + ".bias"] = _rnd(g, out, inp), _rnd(g, out)

    def ln(name):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + _rnd(g, h), _rnd(g, h)

    for layer in range(QC["num_hidden_layers"]):
        pre = f"Qformer.bert.encoder.layer.{layer}."
        kinds = ("attention", "crossattention") if layer % 2 == 0 else ("attention",)
        for kind in kinds:
            kv_in = c if kind == "crossattention" else h
            lin(pre + kind + ".self.query", h, h)
            lin(pre + kind + ".self.key", h, kv_in)
            lin(pre + kind + ".self.value", h, kv_in)
            lin(pre + kind + ".output.dense", h, h)
            ln(pre + kind + ".output.LayerNorm")
        lin(pre + "intermediate_query.dense", i, h)
        lin(pre + "output_query.dense", h, i)
        ln(pre + "output_query.LayerNorm")
    return sd


def phi_file(g) -> dict:
    """TinyGPT-V's phi-2 folder (HF 4.36 layout): fused query_key_value, rows per head [q, k, v]; fp16 on disk."""
    V, m = TC["vocab_size"], TC["intermediate_size"]
    sd = {"model.embed_tokens.weight": _rnd(g, V, D, s=1.0), "model.final_layernorm.weight": 1 + _rnd(g, D),
          "model.final_layernorm.bias": _rnd(g, D), "lm_head.weight": _rnd(g, V, D), "lm_head.bias": _rnd(g, V)}
    for i in range(NL):
        pre = f"model.layers.{i}."
        sd.update({pre + "input_layernorm.weight": 1 + _rnd(g, D), pre + "input_layernorm.bias": _rnd(g, D),
                   pre + "self_attn.query_key_value.weight": _rnd(g, 3 * D, D),
                   pre + "self_attn.query_key_value.bias": _rnd(g, 3 * D),
                   pre + "self_attn.dense.weight": _rnd(g, D, D), pre + "self_attn.dense.bias": _rnd(g, D),
                   pre + "mlp.fc1.weight": _rnd(g, m, D), pre + "mlp.fc1.bias": _rnd(g, m),
                   pre + "mlp.fc2.weight": _rnd(g, D, m), pre + "mlp.fc2.bias": _rnd(g, D)})
    return {k: v.half() for k, v in sd.items()}


def stage_file(g, prefix=LORA, lora=True, default_suffix=False, extra: dict | None = None) -> dict:
    """TinyGPT-V_for_Stage<N>.pth["model"]: what the stage trained (projections, LM norm weights, LoRA A/B)."""
    h = QC["hidden_size"]
    sd = {"llama_proj.weight": _rnd(g, PROJ, h), "llama_proj.bias": _rnd(g, PROJ),
          "llama_proj2.weight": _rnd(g, D, PROJ), "llama_proj2.bias": _rnd(g, D),
          prefix + "final_layernorm.weight": 1 + _rnd(g, D)}
    dflt = ".default" if default_suffix else ""
    for i in range(NL):
        pre = f"{prefix}layers.{i}."
        sd.update({pre + "input_layernorm.weight": 1 + _rnd(g, D), pre + "post_layernorm.weight": 1 + _rnd(g, D),
                   pre + "self_attn.q_layernorm.weight": 1 + _rnd(g, HD),
                   pre + "self_attn.k_layernorm.weight": 1 + _rnd(g, HD)})
        if lora:
            for mod, out in (("query_key_value", 3 * D), ("dense", D)):
                sd[f"{pre}self_attn.{mod}.lora_A{dflt}.weight"] = _rnd(g, LORA_R, D)
                sd[f"{pre}self_attn.{mod}.lora_B{dflt}.weight"] = _rnd(g, out, LORA_R, s=0.1)
    sd.update(extra or {})
    return sd


def save_stage(path, model_sd):
    """As MiniGPT-4's runner saves it: model, optimizer state, config, epoch (only plain containers and tensors)."""
    opt = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}},
           "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}]}
    cfg = {"model": {"arch": "minigpt_v2", "lora_r": LORA_R, "image_size": 448}, "run": {"max_epoch": 50}}
    torch.save({"model": model_sd, "optimizer": opt, "config": cfg, "epoch": 49}, path)


def write_phi_dir(folder, sd, model_type="phi"):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {**{k: v for k, v in TC.items() if k != "model_type"}, "model_type": model_type,
           "_name_or_path": "susnato/phi-2", "architectures": ["PhiForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
           "qk_layernorm": False, "resid_pdrop": 0.1, "embd_pdrop": 0.0, "torch_dtype": "float16",
           "transformers_version": "4.35.2"}
    (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(folder, extra_special=("<|endoftext|>", "###"), bos="<|endoftext|>", eos="<|endoftext|>")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A TinyGPT-V directory as a user assembles it from the four downloads (stage 4 and stage 1 files)."""
    g = torch.Generator().manual_seed(0)
    d = tmp_path_factory.mktemp("tinygpt_v")
    raw = {"eva": eva_file(g), "blip2": blip2_file(g), "phi": phi_file(g)}
    # stage 4 of 2023-12-28 also carries a fine-tuned Q-Former: its query_tokens must win over BLIP-2's
    raw["stage4"] = stage_file(g, extra={"query_tokens": _rnd(g, 1, NQ, QC["hidden_size"])})
    raw["stage1"] = stage_file(g, prefix=PLAIN, lora=False)
    torch.save(raw["eva"], d / "eva_vit_g.pth")
    torch.save({"model": raw["blip2"]}, d / "blip2_pretrained_flant5xxl.pth")
    write_phi_dir(d / "phi-2", raw["phi"])
    save_stage(d / "TinyGPT-V_for_Stage4.pth", raw["stage4"])
    save_stage(d / "TinyGPT-V_for_Stage1.pth", raw["stage1"])
    return d, raw


@pytest.fixture(scope="module")
def vlm(ckpt):
    return load_vlm("tinygpt_v_tiny", weights=ckpt[0], revision="stage4")


# -- independent references -------------------------------------------------------------------------
def ref_eva(eva, blip2, x):
    """LAVIS VisionTransformer (39-block style, no final norm) + ln_vision; pos embed resampled as LAVIS does."""
    d, nh, p = VC["embed_dim"], VC["num_heads"], VC["patch_size"]
    hd, B = d // nh, x.shape[0]
    pos, grid = eva["pos_embed"], x.shape[-1] // p
    if pos.shape[1] != 1 + grid * grid:
        g0 = int((pos.shape[1] - 1) ** 0.5)
        pt = pos[:, 1:].reshape(1, g0, g0, d).permute(0, 3, 1, 2)
        pt = F.interpolate(pt, size=(grid, grid), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], pt.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    h = F.conv2d(x, eva["patch_embed.proj.weight"], eva["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = torch.cat([eva["cls_token"].expand(B, -1, -1), h], dim=1) + pos
    N = h.shape[1]
    for b in range(VC["depth"]):
        w = {k[len(f"blocks.{b}."):]: v for k, v in eva.items() if k.startswith(f"blocks.{b}.")}
        y = F.layer_norm(h, (d,), w["norm1.weight"], w["norm1.bias"], 1e-6)
        bias = torch.cat([w["attn.q_bias"], torch.zeros_like(w["attn.v_bias"]), w["attn.v_bias"]])
        qkv = F.linear(y, w["attn.qkv.weight"], bias).reshape(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4)
        a = ((qkv[0] * hd ** -0.5) @ qkv[1].transpose(-2, -1)).softmax(-1) @ qkv[2]
        h = h + F.linear(a.transpose(1, 2).reshape(B, N, d), w["attn.proj.weight"], w["attn.proj.bias"])
        y = F.layer_norm(h, (d,), w["norm2.weight"], w["norm2.bias"], 1e-6)
        y = F.gelu(F.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"]))          # exact erf GELU
        h = h + F.linear(y, w["mlp.fc2.weight"], w["mlp.fc2.bias"])
    return F.layer_norm(h, (d,), blip2["ln_vision.weight"], blip2["ln_vision.bias"], 1e-5)


def ref_qformer(sd, img, query_tokens):
    """LAVIS BertModel over query embeddings only (post-LN layers, cross-attention every 2nd layer)."""
    h_dim, nh = QC["hidden_size"], QC["num_attention_heads"]
    hd, B = h_dim // nh, img.shape[0]

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def ln(x, name):
        return F.layer_norm(x, (h_dim,), sd[name + ".weight"], sd[name + ".bias"], 1e-12)

    def attn(x, kv, pre):
        q, k, v = (lin(t, f"{pre}.self.{n}").reshape(B, -1, nh, hd).transpose(1, 2)
                   for t, n in ((x, "query"), (kv, "key"), (kv, "value")))
        a = ((q @ k.transpose(-1, -2)) / hd ** 0.5).softmax(-1) @ v
        return ln(lin(a.transpose(1, 2).reshape(B, -1, h_dim), pre + ".output.dense") + x, pre + ".output.LayerNorm")

    h = ln(query_tokens.expand(B, -1, -1), "Qformer.bert.embeddings.LayerNorm")
    for layer in range(QC["num_hidden_layers"]):
        pre = f"Qformer.bert.encoder.layer.{layer}"
        h = attn(h, h, pre + ".attention")
        if layer % 2 == 0:
            h = attn(h, img, pre + ".crossattention")
        ff = lin(F.gelu(lin(h, pre + ".intermediate_query.dense")), pre + ".output_query.dense")
        h = ln(ff + h, pre + ".output_query.LayerNorm")
    return h


def ref_connector(blip2, stage, img):
    qt = stage.get("query_tokens", blip2["query_tokens"])
    h = ref_qformer(blip2, img, qt)
    h = F.linear(h, stage["llama_proj.weight"], stage["llama_proj.bias"])
    return F.linear(h, stage["llama_proj2.weight"], stage["llama_proj2.bias"])


def ref_phi(phi, stage, embeds, prefix=LORA):
    """TinyGPT-V's modeling_phi.py forward: fused per-head qkv, q/k LayerNorm before partial RoPE, RMSNorm on the
    attention output, parallel MLP; LoRA run as its own branch y = Wx + b + (alpha/r) B(A(x))."""
    phi = {k: v.float() for k, v in phi.items()}
    B, T, _ = embeds.shape
    rot = int(HD * TC["partial_rotary_factor"])
    inv = 1.0 / (TC["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):                                          # (B, H, T, hd)
        r, rest = x[..., :rot], x[..., rot:]
        half = torch.cat([-r[..., rot // 2:], r[..., :rot // 2]], -1)
        return torch.cat([r * cos + half * sin, rest], -1)

    def proj(x, i, mod):
        y = F.linear(x, phi[f"model.layers.{i}.self_attn.{mod}.weight"], phi[f"model.layers.{i}.self_attn.{mod}.bias"])
        a = stage.get(f"{prefix}layers.{i}.self_attn.{mod}.lora_A.weight")
        if a is not None:
            b = stage[f"{prefix}layers.{i}.self_attn.{mod}.lora_B.weight"]
            y = y + (ALPHA / a.shape[0]) * F.linear(F.linear(x, a), b)
        return y

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = embeds
    for i in range(NL):
        x = F.layer_norm(h, (D,), stage[f"{prefix}layers.{i}.input_layernorm.weight"],
                         phi[f"model.layers.{i}.input_layernorm.bias"], 1e-5)
        qkv = proj(x, i, "query_key_value").view(B, T, NH, 3, HD)
        q = F.layer_norm(qkv[..., 0, :], (HD,), stage[f"{prefix}layers.{i}.self_attn.q_layernorm.weight"], None, 1e-5)
        k = F.layer_norm(qkv[..., 1, :], (HD,), stage[f"{prefix}layers.{i}.self_attn.k_layernorm.weight"], None, 1e-5)
        q, k, v = rope(q.transpose(1, 2)), rope(k.transpose(1, 2)), qkv[..., 2, :].transpose(1, 2)
        a = ((q @ k.transpose(-1, -2)) / HD ** 0.5 + mask).softmax(-1) @ v
        a = proj(a.transpose(1, 2).reshape(B, T, D), i, "dense")
        a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6) * stage[f"{prefix}layers.{i}.post_layernorm.weight"]
        fc1 = F.linear(x, phi[f"model.layers.{i}.mlp.fc1.weight"], phi[f"model.layers.{i}.mlp.fc1.bias"])
        m = F.linear(F.gelu(fc1, approximate="tanh"), phi[f"model.layers.{i}.mlp.fc2.weight"],
                     phi[f"model.layers.{i}.mlp.fc2.bias"])
        h = h + a + m
    h = F.layer_norm(h, (D,), stage[f"{prefix}final_layernorm.weight"], phi["model.final_layernorm.bias"], 1e-5)
    return F.linear(h, phi["lm_head.weight"], phi["lm_head.bias"])


def ref_embeds(raw, stage, pieces, pixels):
    """Prompt embeddings with the 32 (here 4) image tokens between the text pieces, as get_context_emb does."""
    emb = raw["phi"]["model.embed_tokens.weight"].float()
    img = ref_connector(raw["blip2"], stage, ref_eva(raw["eva"], raw["blip2"], pixels))
    return torch.cat([emb[pieces.before][None], img.reshape(1, -1, D), emb[pieces.after][None]], dim=1)


def close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


# -- conformance ------------------------------------------------------------------------------------
def test_parts_and_logits_match_the_reference_math(ckpt, vlm):
    _, raw = ckpt
    pixels = vlm.pixel_values(make_image())
    assert pixels.shape == (1, 3, 42, 42)                  # stage 4 size; EVA weights resampled from 2x2 to 3x3
    with torch.no_grad():
        feats = vlm.vision(pixels)
        close(feats, ref_eva(raw["eva"], raw["blip2"], pixels))
        assert feats.shape == (1, 1 + 9, VC["embed_dim"])  # CLS kept
        close(vlm.connector(feats), ref_connector(raw["blip2"], raw["stage4"], feats))
        embeds, pieces, n_img = vlm.prepare(make_image(), "What is this?")
        assert n_img == NQ
        close(embeds, ref_embeds(raw, raw["stage4"], pieces, pixels))
        close(vlm(embeds), ref_phi(raw["phi"], raw["stage4"], embeds))


def test_timm_eva_equals_lavis_math_without_resampling(ckpt):
    _, raw = ckpt
    m = load_vlm("tinygpt_v_tiny", weights=ckpt[0], revision="stage1")
    pixels = m.pixel_values(make_image(seed=3))
    assert pixels.shape == (1, 3, 28, 28)
    with torch.no_grad():
        close(m.vision(pixels), ref_eva(raw["eva"], raw["blip2"], pixels))


def test_unmodified_phi_path_equals_transformers(vlm, ckpt):
    """With the RMSNorm off, our LM is transformers' PhiForCausalLM (qk_layernorm=True) on the same weights, which
    the test derives itself: fused rows de-interleaved per head after adding (alpha/r) B @ A."""
    from edgevlm.modeling.tinygpt_v import build_phi

    _, raw = ckpt
    phi, st = {k: v.float() for k, v in raw["phi"].items()}, raw["stage4"]
    sd = {k: v for k, v in phi.items() if "query_key_value" not in k}
    for i in range(NL):
        pre, spre = f"model.layers.{i}.", f"{LORA}layers.{i}."
        for mod in ("query_key_value", "dense"):
            w = phi[pre + f"self_attn.{mod}.weight"] + (ALPHA / LORA_R) * (
                st[spre + f"self_attn.{mod}.lora_B.weight"] @ st[spre + f"self_attn.{mod}.lora_A.weight"])
            if mod == "dense":
                sd[pre + "self_attn.dense.weight"] = w
                continue
            w, b = w.view(NH, 3, HD, D), phi[pre + "self_attn.query_key_value.bias"].view(NH, 3, HD)
            for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
                sd[pre + f"self_attn.{n}.weight"] = w[:, j].reshape(D, D)
                sd[pre + f"self_attn.{n}.bias"] = b[:, j].reshape(D)
        sd[pre + "input_layernorm.weight"] = st[spre + "input_layernorm.weight"]
        for n in ("q_layernorm", "k_layernorm"):
            sd[pre + f"self_attn.{n}.weight"] = st[spre + f"self_attn.{n}.weight"]
            sd[pre + f"self_attn.{n}.bias"] = torch.zeros(HD)
    sd["model.final_layernorm.weight"] = st[f"{LORA}final_layernorm.weight"]
    conf = transformers.PhiConfig(**{k: v for k, v in TC.items() if k != "model_type"}, qk_layernorm=True)
    hf = transformers.PhiForCausalLM(conf).eval()
    hf.load_state_dict(sd, strict=True)

    ours = build_phi(TC, attn_rmsnorm=False)
    lm_sd = {k[len("language_model."):]: v for k, v in vlm.state_dict().items()
             if k.startswith("language_model.") and "post_layernorm" not in k}
    ours.load_state_dict(lm_sd, strict=True)
    x = torch.randn(1, 11, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        close(ours(inputs_embeds=x).logits, hf(inputs_embeds=x).logits)


def test_kv_cache_greedy_decode_equals_reference_recomputation(ckpt, vlm):
    _, raw = ckpt
    embeds, _, _ = vlm.prepare(make_image(), "Describe the image.")
    ours = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=10)))
    emb, seq, ref = raw["phi"]["model.embed_tokens.weight"].float(), embeds, []
    with torch.no_grad():
        for _ in range(10):
            tok = int(ref_phi(raw["phi"], raw["stage4"], seq)[0, -1].argmax())
            ref.append(tok)
            seq = torch.cat([seq, emb[tok][None, None]], dim=1)
    assert ours == ref
    assert len(set(ours)) > 1


def test_stage1_reads_the_plain_prefix_at_224_style_size_and_its_prompt(ckpt):
    _, raw = ckpt
    m = load_vlm("tinygpt_v_tiny", weights=ckpt[0], revision="stage1")
    assert m.stage == "stage1" and m.image_spec.size == 28 and m.image_spec.mode == "squash"
    assert m.prompt_spec.template.startswith("###Human: <Img><image></Img> {prompt}###Assistant:")
    assert m.prompt_spec.bos is False
    embeds, _, _ = m.prepare(make_image(), "Hi")
    with torch.no_grad():
        close(m(embeds), ref_phi(raw["phi"], raw["stage1"], embeds, prefix=PLAIN))
    # stage 1 has no LoRA: q/k/v are Phi-2's fused rows de-interleaved, unchanged
    w = raw["phi"]["model.layers.0.self_attn.query_key_value.weight"].float().view(NH, 3, HD, D)
    assert torch.equal(m.language_model.model.layers[0].self_attn.k_proj.weight, w[:, 1].reshape(D, D))


def test_sources_override_in_reference_order_and_unstored_biases_are_zero(ckpt, vlm):
    _, raw = ckpt
    assert torch.equal(vlm.connector.query_tokens, raw["stage4"]["query_tokens"])          # stage over BLIP-2
    lay = vlm.language_model.model.layers[1]
    assert torch.equal(lay.input_layernorm.weight, raw["stage4"][f"{LORA}layers.1.input_layernorm.weight"])
    assert torch.equal(lay.input_layernorm.bias, raw["phi"]["model.layers.1.input_layernorm.bias"].float())
    assert not lay.self_attn.q_layernorm.bias.any() and not lay.self_attn.k_layernorm.bias.any()
    assert vlm.language_model.config.qk_layernorm is True     # forced on although phi-2/config.json says false


def test_other_layouts_load_identical_weights(tmp_path, ckpt, vlm):
    """safetensors pieces, current microsoft/phi-2's split q/k/v, and peft >= 0.3's `.default` LoRA names."""
    from safetensors.torch import save_file

    d, raw = ckpt
    g = torch.Generator().manual_seed(0)
    eva, blip2, phi = eva_file(g), blip2_file(g), phi_file(g)     # same seed: the same tensors as the fixture
    assert torch.equal(eva["pos_embed"], raw["eva"]["pos_embed"])
    st = {k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default."): v
          for k, v in raw["stage4"].items()}
    split = {}
    for k, v in phi.items():
        if "query_key_value" in k:
            parts = v.view(NH, 3, HD, *v.shape[1:])
            for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
                split[k.replace("query_key_value", n)] = parts[:, j].reshape(D, *v.shape[1:]).contiguous()
        else:
            split[k] = v
    save_file(eva, str(tmp_path / "eva_vit_g.safetensors"))
    save_file({k: v.contiguous() for k, v in blip2.items()}, str(tmp_path / "blip2_pretrained_flant5xxl.safetensors"))
    save_file(st, str(tmp_path / "TinyGPT-V_for_Stage4.safetensors"))
    write_phi_dir(tmp_path / "phi-2", split)
    other = load_vlm("tinygpt_v_tiny", weights=tmp_path, revision="stage4")
    for (ka, va), (kb, vb) in zip(other.state_dict().items(), vlm.state_dict().items()):
        assert ka == kb and torch.allclose(va, vb, atol=1e-6, rtol=0), ka


def test_generate_stream_and_stop_ids(vlm):
    out = vlm.generate(make_image(), "Describe this image.", max_new_tokens=12)
    assert out.stats.image_tokens == NQ and out.stats.new_tokens == len(out.token_ids) > 0
    assert "".join(vlm.generate(make_image(), "Describe this image.", max_new_tokens=12, stream=True)) == out.text
    tok = vlm.tokenizer
    # <|endoftext|> and "###" stop; phi-2's config.json eos_token_id=2 (a Llama id) must not
    assert set(vlm.stop_ids()) == {tok.token_id("<|endoftext|>"), tok.token_id("###")}
    assert vlm.prompt_spec.template == "[INST] <Img><image></Img> {prompt} [/INST]" and not vlm.prompt_spec.bos


# -- bad input --------------------------------------------------------------------------------------
def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pickled_object_in_a_pth_is_refused(tmp_path, ckpt):
    d = _copy(ckpt[0], tmp_path / "w")
    torch.save({"model": {"x": NotATensor()}}, d / "eva_vit_g.pth")
    with pytest.raises(CheckpointError, match=r"eva_vit_g\.pth is a pickle .*will not be unpickled.*safetensors"):
        load_vlm("tinygpt_v_tiny", weights=d)


def test_missing_pieces_are_named(tmp_path, ckpt):
    d = _copy(ckpt[0], tmp_path / "w")
    (d / "blip2_pretrained_flant5xxl.pth").unlink()
    with pytest.raises(CheckpointError, match=r"no blip2_pretrained_flant5xxl\.pth .*phi-2/"):
        load_vlm("tinygpt_v_tiny", weights=d)
    with pytest.raises(CheckpointError, match=r"no TinyGPT-V_for_Stage2\.pth"):
        load_vlm("tinygpt_v_tiny", weights=ckpt[0], revision="stage2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no phi-2/ directory"):
        load_vlm("tinygpt_v_tiny", weights=tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_vlm("tinygpt_v_tiny", weights=ckpt[0] / "eva_vit_g.pth")


def test_mismatched_keys_are_listed(tmp_path, ckpt):
    _, raw = ckpt
    d = _copy(ckpt[0], tmp_path / "w")
    st = dict(raw["stage4"])
    st.pop(f"{LORA}layers.1.post_layernorm.weight")
    st[f"{LORA}layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    st["llama_proj2.weight"] = torch.zeros(D + 1, PROJ)
    save_stage(d / "TinyGPT-V_for_Stage4.pth", st)
    with pytest.raises(CheckpointError, match=r"1 missing: language_model\.model\.layers\.1\.post_layernorm\.weight"
                       r".*1 unexpected: stage:llama_model\.base_model\.model\.model\.layers\.0\.self_attn\.rotary"
                       r".*1 mis-shaped: connector\.llama_proj2\.weight"):
        load_vlm("tinygpt_v_tiny", weights=d)


def test_unsupported_revision_and_phi_layout(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="use one of: stage1, stage2, stage3, stage4"):
        load_vlm("tinygpt_v_tiny", weights=ckpt[0], revision="stage5")
    with pytest.raises(CheckpointError, match="use one of: stage1, stage2, stage3, stage4"):
        get_family("tinygpt_v").load(R, ckpt[0], "main")
    d = _copy(ckpt[0], tmp_path / "w")
    cfg = json.loads((d / "phi-2" / "config.json").read_text())
    (d / "phi-2" / "config.json").write_text(json.dumps({**cfg, "model_type": "phi-msft"}))
    with pytest.raises(CheckpointError, match="phi-msft.*not read"):
        load_vlm("tinygpt_v_tiny", weights=d)
