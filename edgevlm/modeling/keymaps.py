"""Key-name maps from upstream checkpoint layouts to timm's.

timm already remaps apple/ml-fastvit's unfused layout (``timm.models.fastvit.checkpoint_filter_fn``);
these tables cover what it does not:

* microsoft/Cream TinyViT releases (``tiny_vit_*_{1k,22k_distill,22kto1k_distill}.pth``, a dict with
  "model"). timm's TinyViT filter only unwraps "model" and resizes attention bias tables; the module
  names themselves (``patch_embed.seq``, ``layers.N``, ``norm_head``, Conv2d_BN's ``c``) are Cream's.
* apple/ml-fastvit reparameterized releases (``fastvit_*_reparam.pth.tar``), whose large-kernel
  convolution (``lkb_reparam``) and folded positional encoding (``network.N.reparam_conv``) timm's
  filter leaves under names the timm model does not have.

Each table holds one rename rule per line: a regular expression, its replacement (a string, or a
function of the match) and the upstream names it comes from. Rules apply in order, each once per key.
"""
from __future__ import annotations

import re
from typing import Callable, Union

Replacement = Union[str, Callable[["re.Match[str]"], str]]
Rule = tuple[str, Replacement, str]


def _next_stage(m: "re.Match[str]") -> str:
    # Cream merges patches at the END of layer N; timm downsamples at the START of stage N + 1.
    return f"stages.{int(m.group(1)) + 1}.downsample."


# microsoft/Cream TinyViT/models/tiny_vit.py (TinyViT, ConvLayer, BasicLayer, Conv2d_BN) -> timm tiny_vit.
CREAM_TINYVIT_RULES: tuple[Rule, ...] = (
    (r"^patch_embed\.seq\.0\.", "patch_embed.conv1.", "patch_embed.seq.0.c.weight, patch_embed.seq.0.bn.*"),
    (r"^patch_embed\.seq\.2\.", "patch_embed.conv2.", "patch_embed.seq.2.c.weight (seq.1 is the GELU)"),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", "layers.N.blocks.M.* (MBConv, TinyViTBlock)"),
    (r"^layers\.(\d+)\.downsample\.", _next_stage, "layers.N.downsample.conv{1,2,3}.* (PatchMerging)"),
    (r"\.c\.weight$", ".conv.weight", "Conv2d_BN child 'c' (conv1.c.weight, local_conv.c.weight, ...)"),
    (r"^norm_head\.", "head.norm.", "norm_head.weight, norm_head.bias"),
    (r"^head\.(weight|bias)$", r"head.fc.\1", "head.weight, head.bias (nn.Linear classifier)"),
)

# Keys that hold no weights: Cream's releases were saved while attention_bias_idxs was a persistent
# buffer (layers.N.blocks.M.attn.attention_bias_idxs); timm rebuilds it as a non-persistent buffer.
CREAM_TINYVIT_DROP = (r"\.attention_bias_idxs$",)

# apple/ml-fastvit models/modules/replknet.py and models/fastvit.py (RepCPE) in inference mode, applied
# AFTER timm's fastvit filter (which already renamed network.N -> stages.S.* and the other modules).
APPLE_FASTVIT_REPARAM_RULES: tuple[Rule, ...] = (
    (r"\.proj\.0\.lkb_reparam\.", ".proj.0.reparam_conv.", "network.N.proj.0.lkb_reparam.{weight,bias}"),
    (r"^stages\.(\d+)\.blocks\.reparam_conv\.", r"stages.\1.pos_emb.reparam_conv.",
     "network.N.reparam_conv.{weight,bias} (folded RepCPE; timm files it as stages.S.blocks.reparam_conv)"),
)


def _apply(rules: tuple[Rule, ...], key: str) -> str:
    for pattern, repl, _source in rules:
        key = re.sub(pattern, repl, key, count=1)
    return key


def rename_first(sd: dict, rules: tuple[Rule, ...]) -> dict:
    """Each key renamed by the first rule that changes it (the later rules are not tried); a key no rule matches
    stays as it is. The Hugging Face VLM layouts (LLaVA, SmolVLM) map this way."""
    out = {}
    for key, value in sd.items():
        for pattern, repl, _source in rules:
            new = re.sub(pattern, repl, key, count=1)
            if new != key:
                key = new
                break
        out[key] = value
    return out


def is_cream_tinyvit(sd: dict) -> bool:
    """True for a state dict in microsoft/Cream's TinyViT layout (as opposed to timm's)."""
    return any(k.startswith(("patch_embed.seq.", "layers.", "norm_head.")) for k in sd)


def cream_tinyvit_to_timm(sd: dict) -> dict:
    """Rename a Cream TinyViT state dict to timm's names, dropping the attention_bias_idxs buffers.

    Attention bias tables keep their Cream shape; timm's ``checkpoint_filter_fn`` resizes them afterwards.
    """
    out = {}
    for k, v in sd.items():
        if any(re.search(p, k) for p in CREAM_TINYVIT_DROP):
            continue
        out[_apply(CREAM_TINYVIT_RULES, k)] = v
    return out


def apple_fastvit_reparam_fixups(sd: dict) -> dict:
    """Finish timm's remap of a reparameterized apple/ml-fastvit checkpoint (a no-op for other layouts)."""
    return {_apply(APPLE_FASTVIT_REPARAM_RULES, k): v for k, v in sd.items()}
