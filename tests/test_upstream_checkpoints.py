"""Checkpoints in the layouts their authors release load into timm's models and compute the same outputs.

apple/ml-fastvit ships ``fastvit_*.pth.tar`` (unfused) and ``fastvit_*_reparam.pth.tar`` (reparameterized),
each a dict with "state_dict", in the layout of its models/fastvit.py: a flat ``network`` list in which
the stages' blocks, the patch embeddings between them and the positional encodings sit side by side.
microsoft/Cream ships TinyViT ``tiny_vit_*.pth`` files, a dict with "model", in the layout of its
TinyViT/models/tiny_vit.py. Here a random timm model is written out in those layouts (by undoing the
documented renames), saved as upstream saves it, loaded with ``load_backbone`` and compared.
"""
import re

import pytest
import torch

from conftest import randomize_inference_stats
from edgevlm.modeling.vision import load_backbone

# timm -> apple/ml-fastvit module names (models/fastvit.py, models/modules/{mobileone,replknet}.py).
_TIMM_TO_APPLE_FASTVIT = (
    (r"^stem\.", "patch_embed."),
    (r"\.conv_kxk\.", ".rbr_conv."),
    (r"\.conv_scale\.", ".rbr_scale."),
    (r"\.identity\.", ".rbr_skip."),
    (r"\.large_conv\.", ".lkb_origin."),
    (r"\.proj\.0\.reparam_conv\.", ".proj.0.lkb_reparam."),
    (r"\.mlp\.", ".convffn."),
    (r"\.se\.fc1\.", ".se.reduce."),
    (r"\.se\.fc2\.", ".se.expand."),
    (r"\.(layer_scale(?:_\d)?)\.gamma$", r".\1"),
    (r"^final_conv\.", "conv_exp."),
    (r"^head\.fc\.", "head."),
)

# timm -> microsoft/Cream TinyViT module names (TinyViT/models/tiny_vit.py).
_TIMM_TO_CREAM_TINYVIT = (
    (r"^patch_embed\.conv1\.", "patch_embed.seq.0."),
    (r"^patch_embed\.conv2\.", "patch_embed.seq.2."),
    (r"\.conv\.weight$", ".c.weight"),
    (r"^stages\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample."),
    (r"^stages\.(\d+)\.blocks\.", r"layers.\1.blocks."),
    (r"^head\.norm\.", "norm_head."),
    (r"^head\.fc\.", "head."),
)


def _rename(rules, key):
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key, count=1)
    return key


def _flat_network_index(model) -> dict[str, str]:
    """timm's per-stage prefixes -> ml-fastvit's flat ``network.N`` prefixes, in forward order."""
    prefixes, n = {}, 0
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, torch.nn.Identity):
            prefixes[f"stages.{s}.downsample."] = f"network.{n}."
            n += 1
        if not isinstance(stage.pos_emb, torch.nn.Identity):
            prefixes[f"stages.{s}.pos_emb.pos_enc."] = f"network.{n}.pe."
            prefixes[f"stages.{s}.pos_emb."] = f"network.{n}."     # folded RepCPE: network.N.reparam_conv
            n += 1
        prefixes[f"stages.{s}.blocks."] = f"network.{n}."
        n += 1
    return prefixes


def to_apple_fastvit(model) -> dict:
    prefixes = _flat_network_index(model)
    out = {}
    for k, v in model.state_dict().items():
        for timm_prefix, apple_prefix in prefixes.items():
            if k.startswith(timm_prefix):
                k = apple_prefix + k[len(timm_prefix):]
                break
        out[_rename(_TIMM_TO_APPLE_FASTVIT, k)] = v.clone()
    return out


def to_cream_tinyvit(model) -> dict:
    out = {_rename(_TIMM_TO_CREAM_TINYVIT, k): v.clone() for k, v in model.state_dict().items()}
    # Cream's released checkpoints were saved while attention_bias_idxs was still a persistent buffer.
    for name, buf in model.named_buffers():
        if name.endswith("attention_bias_idxs"):
            out[_rename(_TIMM_TO_CREAM_TINYVIT, name)] = buf.clone()
    return out


def _random_model(name, seed=0, **kwargs):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    randomize_inference_stats(model, seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            if k.endswith("attention_biases"):    # zeros at init: give the mapping something to get wrong
                p.normal_()
    return model


def _assert_same_outputs(model, path, name, size):
    backbone = load_backbone(name, str(path))
    assert backbone.num_classes == 10
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), backbone.model(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# A few names as apple/ml-fastvit's checkpoints spell them (shapes for T8 / SA12 with a 10-class head).
FASTVIT_T8_KEYS = {
    "patch_embed.0.rbr_conv.0.conv.weight": (48, 3, 3, 3),
    "patch_embed.0.rbr_scale.bn.running_var": (48,),
    "patch_embed.2.rbr_skip.weight": (48,),
    "network.0.0.token_mixer.norm.rbr_skip.running_mean": (48,),
    "network.0.0.token_mixer.mixer.rbr_conv.0.conv.weight": (48, 1, 3, 3),
    "network.0.0.token_mixer.layer_scale": (48, 1, 1),
    "network.0.1.convffn.conv.conv.weight": (48, 1, 7, 7),
    "network.0.1.layer_scale": (48, 1, 1),
    "network.1.proj.0.lkb_origin.conv.weight": (96, 1, 7, 7),
    "network.1.proj.0.small_conv.bn.weight": (96,),
    "network.1.proj.1.rbr_conv.0.conv.weight": (96, 96, 1, 1),
    "network.2.1.convffn.fc1.weight": (288, 96, 1, 1),
    "network.5.proj.0.lkb_origin.conv.weight": (384, 1, 7, 7),
    "network.6.1.convffn.fc2.bias": (384,),
    "conv_exp.se.reduce.weight": (48, 768, 1, 1),
    "conv_exp.rbr_conv.0.conv.weight": (768, 1, 3, 3),
    "head.weight": (10, 768),
}
FASTVIT_T8_REPARAM_KEYS = {
    "patch_embed.0.reparam_conv.weight": (48, 3, 3, 3),
    "network.0.0.token_mixer.reparam_conv.bias": (48,),
    "network.0.0.convffn.conv.bn.running_var": (48,),
    "network.1.proj.0.lkb_reparam.weight": (96, 1, 7, 7),
    "network.1.proj.1.reparam_conv.weight": (96, 96, 1, 1),
    "conv_exp.reparam_conv.weight": (768, 1, 3, 3),
    "conv_exp.se.expand.bias": (768,),
}
FASTVIT_SA12_KEYS = {          # RepCPE sits between the last patch embedding and the attention stage
    "network.5.proj.0.lkb_origin.conv.weight": (512, 1, 7, 7),
    "network.6.pe.weight": (512, 1, 7, 7),
    "network.7.0.norm.running_mean": (512,),
    "network.7.0.token_mixer.qkv.weight": (1536, 512),
    "network.7.0.layer_scale_1": (512, 1, 1),
    "network.7.1.layer_scale_2": (512, 1, 1),
}
FASTVIT_SA12_REPARAM_KEYS = {
    "network.6.reparam_conv.weight": (512, 1, 7, 7),
    "network.7.0.token_mixer.proj.bias": (512,),
}


@pytest.mark.parametrize("name, reparam, documented", [
    ("fastvit_t8", False, FASTVIT_T8_KEYS),
    ("fastvit_t8", True, FASTVIT_T8_REPARAM_KEYS),
    ("fastvit_sa12", False, FASTVIT_SA12_KEYS),
    ("fastvit_sa12", True, FASTVIT_SA12_REPARAM_KEYS),
])
def test_apple_fastvit_pth_tar_loads(tmp_path, name, reparam, documented):
    model = _random_model(name, inference_mode=reparam)
    sd = to_apple_fastvit(model)
    for key, shape in documented.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("stem.", "stages.", "final_conv.")) for k in sd)

    path = tmp_path / f"{name}{'_reparam' if reparam else ''}.pth.tar"
    torch.save({"state_dict": sd}, path)
    _assert_same_outputs(model, path, name, 256)


# A few names as microsoft/Cream's TinyViT checkpoints spell them (TinyViT-5M with a 10-class head).
CREAM_TINYVIT_5M_KEYS = {
    "patch_embed.seq.0.c.weight": (32, 3, 3, 3),
    "patch_embed.seq.0.bn.running_var": (32,),
    "patch_embed.seq.2.c.weight": (64, 32, 3, 3),
    "layers.0.blocks.0.conv1.c.weight": (256, 64, 1, 1),
    "layers.0.blocks.1.conv3.bn.bias": (64,),
    "layers.0.downsample.conv1.c.weight": (128, 64, 1, 1),    # timm: stages.1.downsample
    "layers.1.blocks.0.attn.attention_biases": (4, 49),
    "layers.1.blocks.0.attn.attention_bias_idxs": (49, 49),
    "layers.1.blocks.0.attn.qkv.weight": (384, 128),
    "layers.1.blocks.0.mlp.norm.weight": (128,),
    "layers.1.blocks.0.local_conv.c.weight": (128, 1, 3, 3),
    "layers.2.downsample.conv2.c.weight": (320, 1, 3, 3),
    "layers.2.blocks.5.attn.attention_biases": (5, 196),
    "layers.3.blocks.1.mlp.fc2.weight": (320, 1280),
    "norm_head.weight": (320,),
    "head.weight": (10, 320),
}


def test_cream_tinyvit_pth_loads(tmp_path):
    model = _random_model("tiny_vit_5m_224")
    sd = to_cream_tinyvit(model)
    for key, shape in CREAM_TINYVIT_5M_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layers.3.downsample.conv1.c.weight" not in sd          # the last layer does not merge patches
    assert not any(k.startswith(("stages.", "head.fc.", "head.norm.")) for k in sd)

    path = tmp_path / "tiny_vit_5m_22kto1k_distill.pth"
    torch.save({"model": sd}, path)
    _assert_same_outputs(model, path, "tiny_vit_5m_224", 224)


def test_cream_keymap_round_trip():
    from edgevlm.modeling.keymaps import cream_tinyvit_to_timm, is_cream_tinyvit

    model = _random_model("tiny_vit_5m_224")
    cream = to_cream_tinyvit(model)
    assert is_cream_tinyvit(cream) and not is_cream_tinyvit(model.state_dict())
    back = cream_tinyvit_to_timm(cream)
    assert sorted(back) == sorted(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
