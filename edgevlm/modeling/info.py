"""What a VLM is made of and what one image costs: parts, parameters, vision tokens, prefill FLOPs.

Counted, not estimated: the model is built under PyTorch's FakeTensorMode (shapes only, no memory,
so an 8B model takes seconds) and every matmul/conv/attention of one prefill is counted by
``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..zoo import VLMRecipe, get_vlm_recipe

TEXT_TOKENS = 64   # prompt length the FLOPs are counted with (stated in every report)


@dataclass
class PathCost:
    """One way of running a model (e.g. compressed or not): tokens and FLOPs per stage of a prefill."""

    label: str
    vision_tokens: int
    llm_input_tokens: int
    flops: dict            # stage -> FLOPs (vision, connector, fusion, language_model)

    @property
    def total(self) -> int:
        return sum(self.flops.values())


def _count(fn) -> tuple[object, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = fn()
    return out, int(fc.get_total_flops())


def measure_path(model, label: str, text_tokens: int = TEXT_TOKENS) -> PathCost:
    """FLOPs of one prefill: image -> vision -> connector -> splice (fusion) -> language model."""
    import torch

    from ..processor import PromptPieces

    spec = model.image_spec
    views = model.info_views() if hasattr(model, "info_views") else 1
    pv = torch.zeros(views, 3, spec.size, spec.size)
    with torch.no_grad():
        feats, f_vis = _count(lambda: model.vision(pv))
        img, f_con = _count(lambda: model.connector(feats))
        img = img.reshape(1, -1, img.shape[-1])
        half = text_tokens // 2
        pieces = PromptPieces(before=[1] * half, after=[1] * (text_tokens - half), has_image=True)
        embeds, f_fuse = _count(lambda: model.splice(pieces, img))
        _, f_lm = _count(lambda: model.language_model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1))
    # image tokens = what the LM sees beyond the prompt (LLaVA-Mini's connector also emits the 576 it fuses)
    return PathCost(label, int(embeds.shape[1]) - text_tokens, int(embeds.shape[1]),
                    {"vision": f_vis, "connector": f_con, "fusion": f_fuse, "language_model": f_lm})


def part_params(model) -> dict[str, int]:
    return {name: sum(p.numel() for p in part.parameters()) for name, part in model.parts().items()}


def describe(name_or_recipe, text_tokens: int = TEXT_TOKENS, checkpoint=None) -> dict:
    """Parts, parameter counts and per-image prefill cost of a zoo VLM (and its uncompressed path).
    ``checkpoint``: a checkpoint directory (its config.json at least) the recipe reads: families whose
    checkpoints vary in architecture (``Family.read_config``) are counted as that checkpoint is built."""
    from pathlib import Path

    from torch._subclasses.fake_tensor import FakeTensorMode

    from .families import get_family

    recipe = name_or_recipe if isinstance(name_or_recipe, VLMRecipe) else get_vlm_recipe(name_or_recipe)
    fam = get_family(recipe.family)
    config = fam.read_config(recipe, Path(checkpoint)) if checkpoint is not None and fam.read_config else None
    with FakeTensorMode():
        model = (fam.build(recipe, None) if config is None else fam.build(recipe, None, config)).eval()
        params = part_params(model)
        paths = [measure_path(model, "as built", text_tokens)]
        if hasattr(model, "uncompressed"):
            with model.uncompressed():
                paths.append(measure_path(model, "uncompressed (LLaVA path)", text_tokens))
        parts = {n: type(p).__name__ for n, p in model.parts().items()}
        views = model.info_views() if hasattr(model, "info_views") else 1
        size = model.image_spec.size
    return {"model": recipe.name if checkpoint is None else str(checkpoint), "family": recipe.family,
            "parts": parts, "params": params, "params_total": sum(params.values()), "text_tokens": text_tokens,
            "image_size": size,
            "views": views,
            "paths": [{"label": p.label, "vision_tokens": p.vision_tokens, "llm_input_tokens": p.llm_input_tokens,
                       "flops": p.flops, "flops_total": p.total} for p in paths]}
