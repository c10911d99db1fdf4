"""Connectors: image features (V, N, C) -> language-model embeddings (V, N', D).

The LLaVA MLP projector lives here; token compressors (LLaVA-Mini) are connectors too, so that any
LLaVA-style model can carry one.
"""
from __future__ import annotations

import torch
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


# -- LLaVA-Mini (https://arxiv.org/abs/2501.03895): query-based compression and modality pre-fusion ----------


def sincos_2d(dim: int, grid: int):
    """MAE-style fixed 2-D sin-cos table, (grid², dim), rows in raster order; as the reference (MAE's
    meshgrid with w first) the first half encodes the column, the second half the row."""
    if dim % 4:
        from ..errors import ConfigError

        raise ConfigError(f"sin-cos position table needs a width divisible by 4, got {dim}", "use e.g. 1024")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))     # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def one(pos):                                                                        # (grid², dim/2)
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()                              # (grid², dim)


def _square(n: int, what: str) -> int:
    side = int(round(int(n) ** 0.5))      # int(): a traced size (torch.jit.trace) is a tensor
    if side * side != n:
        from ..errors import ConfigError

        raise ConfigError(f"{what} must be a square number (n×n), got {n}", "use 1, 4, 16, 64, 144, ...")
    return side


class QueryCompressor(nn.Module):
    """LLaVA-Mini's compressor: N = n×n learnable queries cross-attend to the M vision features.

    out = MHA(q = ln_q(query) + PE_N, k = ln_kv(F) + PE_M, v = ln_kv(F)) with fixed 2-D sin-cos PE
    (PE_M: the n×n table bicubically resized to the feature grid); no residual, no FFN. Parameter
    names are the released checkpoint's ``model.compressor.*`` (query, pos_embed, attn.in_proj_*,
    attn.out_proj.*, ln_q, ln_kv). It acts on the vision features *before* the projector.
    """

    def __init__(self, dim: int, n_tokens: int = 1, heads: int = 8):
        super().__init__()
        self.grid = _square(n_tokens, "the number of compressed vision tokens")
        self.num_queries = n_tokens
        self.query = nn.Parameter(torch.empty(n_tokens, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, self.grid), requires_grad=False)   # in the state dict
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q, self.ln_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's fresh init: queries ~ N(0, 0.02), layer norms identity, MHA's own init."""
        with torch.no_grad():
            if self.query.device.type != "meta":
                self.query.normal_(0.0, 0.02)
                self.pos_embed.copy_(sincos_2d(self.query.shape[1], self.grid))
        for ln in (self.ln_q, self.ln_kv):
            nn.init.ones_(ln.weight)
            nn.init.zeros_(ln.bias)

    def key_pos(self, m: int):
        """The n×n table resized (bicubic) to the √m×√m feature grid: (m, C)."""
        import torch.nn.functional as F

        side = _square(m, "the number of vision features")
        if side == self.grid:
            return self.pos_embed
        # An eager call without gradients keeps the resized table; torch.jit.trace (what coremltools reads) then takes
        # it as a constant while the table is unchanged (same tensor, same version counter): Core ML's converter has
        # no bicubic resize. torch.export never reads it (ONNX has a cubic Resize).
        key = (m, id(self.pos_embed), self.pos_embed._version)
        if torch.jit.is_tracing() and getattr(self, "_key_pos", (None,))[0] == key:
            return self._key_pos[1]
        pe = self.pos_embed.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)   # (1, C, n, n)
        pe = F.interpolate(pe, size=(side, side), mode="bicubic", align_corners=False)       # (1, C, s, s)
        out = pe.permute(0, 2, 3, 1).reshape(m, -1).to(self.pos_embed.dtype)
        if not (torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.compiler.is_exporting()):
            self._key_pos = (key, out)
        return out

    def forward(self, feats):                                                 # (V, M, C)
        kv = self.ln_kv(feats)                                                # (V, M, C)
        k = kv + self.key_pos(feats.shape[1]).to(kv.dtype)                    # (V, M, C)
        q = (self.ln_q(self.query) + self.pos_embed).to(kv.dtype)             # (N, C)
        q = q.unsqueeze(0).expand(feats.shape[0], -1, -1)                     # (V, N, C)
        out, _ = self.attn(q, k, kv, need_weights=False)                      # (V, N, C)
        return out


class LlavaMiniConnector(nn.Module):
    """LLaVA projector + query compressor. Compressed: [P(F) ; P(compress(F))], (V, M + N, D) — the M
    projected "global" tokens feed pre-fusion only, the last N are the vision tokens the LLM sees.
    ``compress = False`` is plain LLaVA: P(F), (V, M, D), on the same weights.
    """

    def __init__(self, projector: nn.Module, compressor: QueryCompressor):
        super().__init__()
        self.projector, self.compressor, self.compress = projector, compressor, True

    @property
    def n_tokens(self) -> int:
        return self.compressor.num_queries

    def forward(self, feats):                                                 # (V, M, C)
        glob = self.projector(feats)                                          # (V, M, D)
        if not self.compress:
            return glob
        return torch.cat([glob, self.projector(self.compressor(feats))], dim=1)   # (V, M + N, D)


class PreFusion(nn.Module):
    """Modality pre-fusion: K decoder layers of the language model's own class (LlamaDecoderLayer for
    Llama) with its rotary embedding, run causally over [M vision ; N compressed ; text] with positions
    counting only kept tokens (dropped tokens are masked as keys, as the reference's ``input_ids <= 0``).
    Parameter names ``layers.{i}.*`` are the released ``model.prefusion_layers.{i}.*``.
    """

    def __init__(self, language_model: nn.Module, n_layers: int):
        super().__init__()
        base = language_model.model
        cfg = language_model.config
        layer_cls, rope_cls = type(base.layers[0]), type(base.rotary_emb)
        self.layers = nn.ModuleList(layer_cls(cfg, layer_idx=i) for i in range(n_layers))
        self.rotary = rope_cls(config=cfg)
        self.init_std = float(getattr(cfg, "initializer_range", 0.02))

    def reset_parameters(self) -> None:
        """transformers' init for new decoder layers: Linear ~ N(0, initializer_range), norms = 1."""
        for m in self.layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, self.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
                nn.init.ones_(m.weight)

    def forward(self, x, keep=None):                                          # x (1, L, D), keep (L,) bool
        """``keep``: None (every token kept, plain causal attention) or a (L,) bool mask."""
        L = x.shape[1]
        if keep is None:
            pos = torch.arange(L, device=x.device)[None]                      # (1, L)
            mask = None                                                       # plain causal
        else:
            pos = (torch.cumsum(keep.long(), 0) - 1).masked_fill(~keep, 1)[None]
            allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril() & keep[None, :]
            mask = torch.zeros(L, L, dtype=x.dtype, device=x.device).masked_fill(
                ~allowed, torch.finfo(x.dtype).min)[None, None]               # (1, 1, L, L)
        rope = self.rotary(x, pos)                                            # (cos, sin), each (1, L, head_dim)
        for layer in self.layers:
            out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
            x = out[0] if isinstance(out, tuple) else out                     # (1, L, D)
        return x


class CompressedProjector(nn.Module):
    """Compress then project: a :class:`QueryCompressor` over the tower's features (V, M, C) gives
    N tokens, the MLP projector maps them to the language model's width: (V, N, D). The compressor
    sees the features at the tower's width, as LLaVA-Mini's does; no pre-fusion (the edgevlm default)."""

    def __init__(self, in_dim: int, out_dim: int, n_tokens: int, heads: int = 4, act: str = "gelu"):
        super().__init__()
        self.compressor = QueryCompressor(in_dim, n_tokens, heads)
        self.projector = MLPProjector(in_dim, out_dim, act)

    @property
    def n_tokens(self) -> int:
        return self.compressor.num_queries

    def forward(self, feats):                                          # (V, M, C)
        return self.projector(self.compressor(feats))                  # (V, N, D)
