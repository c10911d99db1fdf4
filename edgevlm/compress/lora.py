"""LoRA and QLoRA on a VLM's language model through Hugging Face peft, merged back before export.

LoRA (https://arxiv.org/abs/2106.09685) trains low-rank updates ``B·A`` beside frozen linear layers;
:func:`merge_lora` folds them into the weights (peft's ``merge_and_unload``), so the exported model has
the original architecture and no peft dependency. QLoRA (https://arxiv.org/abs/2305.14314) keeps the
frozen base in 4-bit NF4 (bitsandbytes); merging then writes dequantized base + update as FP32 linear
layers — exactly the function that was trained. peft's own merge for bitsandbytes layers needs a GPU,
so the QLoRA merge here is edgevlm's (dequantize with bitsandbytes, add ``scaling · B @ A``).

Target modules are checked against the model before anything is built or trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BackendUnavailableError, ConfigError

# Attention and MLP projections by family (transformers' names); used when no targets are given.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "dense", "gate_proj", "up_proj", "down_proj", "fc1", "fc2")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()        # module-name suffixes; empty: the projections present (DEFAULT_TARGETS)
    quantize: str | None = None          # None (LoRA) or "nf4" (QLoRA)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"LoRA rank {self.r} must be at least 1", "pass e.g. --lora-r 8")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout {self.dropout} is out of range", "use a value in [0, 1)")
        if self.quantize not in (None, "nf4"):
            raise ConfigError(f"unknown QLoRA quantization {self.quantize!r}", "use nf4 (or none for plain LoRA)")
        object.__setattr__(self, "targets", tuple(self.targets))


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers a LoRA can target (the output head excluded)."""
    names = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The targets, each checked to name at least one linear layer (peft's suffix matching)."""
    available = linear_names(model)
    if not spec.targets:
        found = [t for t in DEFAULT_TARGETS if t in available]
        if not found:
            raise ConfigError(f"no default LoRA target in this language model (its linear layers: "
                              f"{', '.join(available)})", "pass --lora-targets NAME[,NAME]")
        return found
    modules = {name: m for name, m in model.named_modules()}
    missing = []
    for t in spec.targets:
        hits = [n for n, m in modules.items() if (n == t or n.endswith("." + t))]
        if not hits:
            missing.append(t)
        elif not any(isinstance(modules[n], nn.Linear) for n in hits):
            missing.append(f"{t} (not a linear layer)")
    if missing:
        raise ConfigError(f"LoRA target module(s) {', '.join(missing)} do not exist in the language model",
                          f"use some of its linear layers: {', '.join(available)}")
    return list(spec.targets)


def _require_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise BackendUnavailableError(
            "QLoRA needs bitsandbytes (4-bit NF4 base weights), which is not installed",
            "pip install 'bitsandbytes>=0.49' (its CPU backend works here; on GPUs use its CUDA build), "
            "or use plain LoRA (--mode lora without --qlora)") from None
    return bnb


def quantize_linears(model: nn.Module, skip=("lm_head",)) -> int:
    """Replace every nn.Linear (but ``skip``) by a bitsandbytes NF4 Linear4bit holding the same weights."""
    bnb = _require_bnb()
    n = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=child.weight.dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, q.to(child.weight.device))
                n += 1
    return n


def apply_lora(vlm, spec: LoraSpec):
    """Wrap ``vlm.language_model`` in a peft model; everything else in ``vlm`` is frozen. Returns the targets."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise BackendUnavailableError("LoRA needs peft", "pip install 'edgevlm[train]'") from None
    lm = vlm.language_model
    targets = resolve_targets(lm, spec)               # before any work
    if spec.quantize:
        _require_bnb()
    for p in vlm.parameters():
        p.requires_grad_(False)
    if spec.quantize:
        quantize_linears(lm)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets),
                     bias="none")
    vlm.language_model = get_peft_model(lm, cfg)
    return targets


def _is_4bit(layer) -> bool:
    return type(layer).__name__ == "Linear4bit"


def merge_lora(vlm) -> int:
    """Fold the LoRA updates into the language model's weights and drop peft's wrappers; returns how many
    layers were merged. QLoRA layers become FP32 ``nn.Linear`` (dequantized base + update)."""
    lm = vlm.language_model
    if not hasattr(lm, "merge_and_unload"):
        return 0
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in lm.named_modules() if isinstance(m, LoraLayer)]
    if any(_is_4bit(m.get_base_layer()) for _, m in layers):
        bnb = _require_bnb()
        base = lm.get_base_model()
        for name, m in layers:
            parent = base.get_submodule(name.split("base_model.model.", 1)[-1].rsplit(".", 1)[0])
            child = name.rsplit(".", 1)[-1]
            q = m.get_base_layer()
            w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
            for adapter in m.active_adapters:
                w = w + m.get_delta_weight(adapter).float()
            lin = nn.Linear(w.shape[1], w.shape[0], bias=q.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if q.bias is not None:
                    lin.bias.copy_(q.bias)
            setattr(parent, child, lin.to(w.device))
        vlm.language_model = base
        # any still-quantized linear layer (not a LoRA target) is dequantized too: the export is FP32
        _dequantize_rest(vlm.language_model, bnb)
        return len(layers)
    vlm.language_model = lm.merge_and_unload()
    return len(layers)


def _dequantize_rest(model: nn.Module, bnb) -> None:
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if _is_4bit(child):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                lin = nn.Linear(w.shape[1], w.shape[0], bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(w)
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
