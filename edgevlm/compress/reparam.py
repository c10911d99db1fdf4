"""Structural reparameterization (FastViT RepMixer / MobileOne branches folded into single convs).

timm's walker does the folding; edgevlm adds the check that matters: the outputs before and
after agree, measured on real inputs, relative to the output's scale.
"""
from __future__ import annotations

import numpy as np

from ..errors import ExportError

REPARAM_RTOL = 1e-5


def _folded(m) -> bool:
    return getattr(m, "reparam_conv", None) is not None or getattr(m, "inference_mode", False) is True


def reparameterize_model(model, inplace: bool = False):
    """Fold every reparameterizable block, once: folding a folded model changes nothing.

    The per-block folding is timm's (``reparameterize()`` / ``fuse()`` / ``switch_to_deploy()``).
    The walk is ours because several timm blocks are not idempotent (RepMixer and
    ReparamLargeKernelConv delete their branches but keep ``inference_mode`` False, so a
    second ``reparameterize()`` fails); folded blocks are skipped and marked.
    """
    import copy

    if not inplace:
        model = copy.deepcopy(model)

    def walk(parent) -> None:
        for name, child in list(parent.named_children()):
            if _folded(child):
                continue
            if hasattr(child, "fuse"):
                child = child.fuse()
                setattr(parent, name, child)
            elif hasattr(child, "reparameterize"):
                child.reparameterize()
                if hasattr(child, "inference_mode"):
                    child.inference_mode = True
            elif hasattr(child, "switch_to_deploy"):
                child.switch_to_deploy()
            walk(child)

    walk(model)
    return model.eval()


def count_branches(model) -> int:
    """Blocks that still carry training-time branches (0 after reparameterization)."""
    return sum(1 for m in model.modules() if hasattr(m, "reparameterize") and not _folded(m))


def reparameterize_checked(model, x: np.ndarray) -> tuple[object, dict]:
    """Reparameterize a copy of ``model`` and prove the outputs did not move."""
    import torch

    model = model.eval()
    before_branches = count_branches(model)
    folded = reparameterize_model(model, inplace=False)
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x))
        ref, out = model(xt).double(), folded(xt).double()
    scale = float(ref.abs().max()) or 1.0
    diff = float((ref - out).abs().max())
    params_before = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in folded.parameters())
    rec = {"applied": True, "blocks_folded": before_branches, "params_before": params_before,
           "params_after": params_after, "max_abs_diff": diff, "max_rel_diff": diff / scale,
           "criterion": f"max_rel_diff <= {REPARAM_RTOL}", "passed": diff / scale <= REPARAM_RTOL}
    if not rec["passed"]:
        raise ExportError(f"reparameterization changed the outputs (relative diff {diff / scale:.2e})",
                          "report this model; export with a model that has no train-time branches")
    return folded, rec
