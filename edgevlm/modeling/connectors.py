"""Connectors: image features (V, N, C) -> language-model embeddings (V, N', D).

The LLaVA MLP projector lives here; token compressors (LLaVA-Mini) are connectors too, so that any
LLaVA-style model can carry one.
"""
from __future__ import annotations

from torch import nn


def activation(name: str) -> nn.Module:
    """Activations by their Hugging Face config names (``gelu`` is exact erf GELU)."""
    table = {"gelu": lambda: nn.GELU(), "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
             "gelu_new": lambda: nn.GELU(approximate="tanh"), "quick_gelu": lambda: _QuickGELU(),
             "relu": lambda: nn.ReLU(), "silu": lambda: nn.SiLU()}
    if name not in table:
        from ..errors import ConfigError

        raise ConfigError(f"unknown activation {name!r}", f"use one of: {', '.join(table)}")
    return table[name]()


class _QuickGELU(nn.Module):
    def forward(self, x):
        import torch

        return x * torch.sigmoid(1.702 * x)


class MLPProjector(nn.Module):
    """LLaVA-1.5's two-layer MLP (https://arxiv.org/abs/2310.03744): Linear -> act -> Linear.

    Parameter names (linear_1, linear_2) are transformers' ``LlavaMultiModalProjector``'s.
    """

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x):                      # (V, N, C)
        return self.linear_2(self.act(self.linear_1(x)))   # (V, N, D)
