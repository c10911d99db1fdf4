"""Moondream2 (vikhyatk/moondream2, 2025 checkpoint layout): SigLIP-shaped ViT over overlapping crops,
a two-layer MLP over [global | stitched local] features, Phi-1.5 as the language model, and region
heads that read and write box coordinates for ``detect`` / ``point``.

Reference: https://github.com/vikhyat/moondream (``moondream/torch/{vision,text,region,moondream}.py``).
The weights are the HF repo's single ``model.safetensors`` (``model.vision.*``, ``model.text.*``,
``model.region.*``); every hyperparameter is a dataclass default of the reference code, so the
architecture lives in models/moondream2.yaml and ``config.json`` is only checked for its model type.

What differs between the 2025 revisions is not the weights but the prompting and box decoding, so
the revision is pinned at load time (:data:`REVISIONS`); 2025-06-21 is refused (see :data:`REFUSED`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.crops import OVERLAP_DEFAULTS, overlap_crops_with_grid, overlap_params
from ..data.images import load_image
from ..errors import CheckpointError, ConfigError
from ..processor import ImageSpec, PromptPieces, PromptSpec, TextTokenizer
from ..zoo import VLMRecipe
from .checkpoint import PICKLE_SUFFIXES, _looks_like_safetensors, fit_state_dict, load_state_dict, read_model_config
from .families import FAMILIES, Family
from .language import build_lm, check_vocab, lm_config
from .vlm import Generation, GenerationConfig, GenerationStats, VisionLanguageModel

HUB_ID = "vikhyatk/moondream2"


# -- revisions ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Revision:
    """What a checkpoint revision's code does differently (the weights have one layout for all)."""

    space_before_text: bool       # question/object encoded as " " + text (2025-03-27 on); bare text before
    log_sizes: bool               # detect sizes: log2 bins (2025-03-27 on); linear bin/n_bins before
    captions: tuple[str, ...]     # caption lengths the revision has templates for
    max_tokens: int               # the reference's default answer length


REVISIONS = {
    "2025-01-09": Revision(False, False, ("short", "normal"), 512),
    "2025-03-27": Revision(True, True, ("short", "normal", "long"), 768),
    "2025-04-14": Revision(True, True, ("short", "normal", "long"), 768),
}
REFUSED = {
    "2025-06-21": "its code tokenizes with moondream/starmie-v1 (new vocabulary, BOS/EOS id 0, new prompt ids), "
                  "a tokenizer the vikhyatk/moondream2 repo does not ship (its tokenizer.json is the old GPT-2 one, "
                  "which gives garbage with these weights)",
}
# The most rows the runtime feeds one region-head path in a call (skills.Region feeds one; Core ML's flexible shapes
# need a bound).
REGION_MAX_ROWS = 16
OLD_LAYOUT = "2024 revisions (2024-03-04 .. 2024-08-26) use the old HF remote-code layout (vision_encoder.*, text_model.*)"


def _revision(recipe: VLMRecipe, revision: str | None) -> str:
    supported = [r for r in recipe.revisions if r in REVISIONS] or list(REVISIONS)
    if revision is None:
        return supported[-1]
    if revision in REFUSED:
        raise CheckpointError(f"{recipe.name} revision {revision} is not supported: {REFUSED[revision]}",
                              f"download one of {', '.join(supported)} "
                              f"(huggingface-cli download {HUB_ID} --revision {supported[-1]})")
    if revision not in supported:
        raise CheckpointError(f"{recipe.name} revision {revision!r} is not one edgevlm reads",
                              f"use one of: {', '.join(supported)}")
    return revision


# -- vision -------------------------------------------------------------------------------------------
class FusedAttention(nn.Module):
    """Bidirectional multi-head attention with one qkv Linear (rows [q | k | v])."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # (V, N, C)
        v_, n, c = x.shape
        q, k, v = self.qkv(x).view(v_, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (V, H, N, d)
        y = F.scaled_dot_product_attention(q, k, v)                               # (V, H, N, d)
        return self.proj(y.transpose(1, 2).reshape(v_, n, c))                      # (V, N, C)


class MLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, inner: int, out: int | None = None):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inner), nn.Linear(inner, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-LN transformer block (LayerNorm eps 1e-5, as the reference's F.layer_norm default)."""

    def __init__(self, dim: int, heads: int, ff_dim: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), FusedAttention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim, ff_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                          # (V, N, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MoondreamVision(nn.Module):
    """The SigLIP-So400m-shaped encoder of moondream ``vision.py``: Linear patch embedding over
    flattened (channel, row, column) patches, learned positions, pre-LN blocks, a final LayerNorm."""

    def __init__(self, dim: int, layers: int, heads: int, ff_dim: int, patch_size: int, crop_size: int):
        super().__init__()
        self.patch_size, self.side = patch_size, crop_size // patch_size
        self.patch_emb = nn.Linear(3 * patch_size * patch_size, dim)
        self.pos_emb = nn.Parameter(torch.randn(1, self.side * self.side, dim) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, ff_dim) for _ in range(layers))
        self.post_ln = nn.LayerNorm(dim)

    @property
    def n_patches(self) -> int:
        return self.side * self.side

    def patchify(self, x: torch.Tensor) -> torch.Tensor:                         # (V, 3, S, S)
        v_, c, p, s = x.shape[0], x.shape[1], self.patch_size, self.side
        # (V, C, sy, py, sx, px) -> (V, sy*sx, C*py*px), through tensors of rank 5 at most (Core ML's limit)
        x = x.reshape(v_ * c, s, p, s, p).permute(0, 1, 3, 2, 4)                  # (V*C, sy, sx, py, px)
        x = x.reshape(v_, c, s * s, p * p).permute(0, 2, 1, 3)                    # (V, N, C, py*px)
        return x.reshape(v_, s * s, c * p * p)                                    # (V, N, 3*p*p)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:               # (V, 3, S, S)
        x = self.patch_emb(self.patchify(pixel_values)) + self.pos_emb            # (V, N, C)
        for block in self.blocks:
            x = block(x)
        return self.post_ln(x)                                                    # (V, N, C)


class MoondreamConnector(nn.Module):
    """Global features next to the local crops' features stitched (inner margins dropped) and
    average-pooled back to the global grid, then the projection MLP: (V, N, C) -> (1, N, D)."""

    def __init__(self, enc_dim: int, inner: int, out_dim: int, side: int, overlap_margin: int):
        super().__init__()
        self.side, self.margin = side, overlap_margin
        self.fc1, self.fc2 = nn.Linear(2 * enc_dim, inner), nn.Linear(inner, out_dim)

    @staticmethod
    def guess_grid(n_local: int) -> tuple[int, int]:
        """The most square (rows, cols) with rows*cols == n_local; exact for square grids only."""
        rows = max(r for r in range(1, int(math.isqrt(n_local)) + 1) if n_local % r == 0)
        return rows, n_local // rows

    def stitch(self, local: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # (rows*cols, N, C)
        rows, cols = grid
        s, m, c = self.side, self.margin, local.shape[-1]
        tiles = local.view(rows, cols, s, s, c)                                   # (rows, cols, s, s, C)
        step = s - 2 * m
        out = local.new_zeros(rows * step + 2 * m, cols * step + 2 * m, c)        # (H', W', C)
        for r in range(rows):
            y0, y1 = (0 if r == 0 else m), (s if r == rows - 1 else s - m)
            for q in range(cols):
                x0, x1 = (0 if q == 0 else m), (s if q == cols - 1 else s - m)
                out[r * step + y0:r * step + y1, q * step + x0:q * step + x1] = tiles[r, q, y0:y1, x0:x1]
        return out

    def merge(self, feats: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:  # (V, N, C)
        grid = grid or self.guess_grid(feats.shape[0] - 1)
        if grid[0] * grid[1] != feats.shape[0] - 1:
            raise ConfigError(f"{feats.shape[0]} views do not make a global view plus a {grid[0]}x{grid[1]} grid",
                              "pass the views and grid from overlap_crops_with_grid together")
        local = self.stitch(feats[1:], grid).permute(2, 0, 1)                     # (C, H', W')
        local = F.adaptive_avg_pool2d(local, (self.side, self.side))              # (C, s, s)
        local = local.permute(1, 2, 0).reshape(self.side * self.side, -1)         # (N, C)
        return torch.cat([feats[0], local], dim=-1)                               # (N, 2C): global first

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.merge(feats, grid)                                               # (N, 2C)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))[None]            # (1, N, D)


class _Float(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x).float()


class _Projector(nn.Module):
    """MoondreamConnector after the merge: fc1 -> GELU (tanh) -> fc2, (N, 2C) -> (1, N, D)."""

    def __init__(self, conn: MoondreamConnector):
        super().__init__()
        self.fc1, self.fc2 = conn.fc1, conn.fc2

    def forward(self, merged_features):
        return self.fc2(F.gelu(self.fc1(merged_features), approximate="tanh"))[None].float()


# -- region heads -------------------------------------------------------------------------------------
class MoondreamRegion(nn.Module):
    """Moondream ``region.py``: Fourier-feature encoders that turn a coordinate / a (w, h) size into an
    input embedding, and MLP decoders that read bins from the text model's pre-final-LN hidden state."""

    def __init__(self, dim: int, coord_feat_dim: int, coord_out_dim: int, size_feat_dim: int,
                 size_out_dim: int, inner_dim: int):
        super().__init__()
        self.coord_features = nn.Parameter(torch.randn(1, coord_feat_dim // 2))   # stored already transposed
        self.coord_encoder = nn.Linear(coord_feat_dim, dim)
        self.coord_decoder = MLP(dim, inner_dim, coord_out_dim)
        self.size_features = nn.Parameter(torch.randn(2, size_feat_dim // 2))
        self.size_encoder = nn.Linear(size_feat_dim, dim)
        self.size_decoder = MLP(dim, inner_dim, size_out_dim)

    @staticmethod
    def fourier(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:           # (..., k) @ (k, F)
        f = 2 * math.pi * (x @ freqs)
        return torch.cat([f.cos(), f.sin()], dim=-1)                              # (..., 2F)

    def encode_coordinate(self, c: float) -> torch.Tensor:                       # -> (1, 1, D)
        x = torch.tensor([[c]], dtype=self.coord_features.dtype, device=self.coord_features.device)
        return self.coord_encoder(self.fourier(x, self.coord_features))[None]

    def decode_coordinate(self, hidden: torch.Tensor) -> float:                  # (D,) -> bin centre in [0, 1)
        logits = self.coord_decoder(hidden)
        return int(torch.argmax(logits)) / logits.shape[-1]

    def encode_size(self, w: float, h: float) -> torch.Tensor:                   # -> (1, 1, D)
        x = torch.tensor([[w, h]], dtype=self.size_features.dtype, device=self.size_features.device)
        return self.size_encoder(self.fourier(x, self.size_features))[None]

    def decode_size(self, hidden: torch.Tensor, log_scale: bool) -> tuple[float, float]:
        logits = self.size_decoder(hidden).view(2, -1)                            # rows: width, height
        bins = logits.shape[-1]
        w_bin, h_bin = (int(b) for b in torch.argmax(logits, dim=-1))
        if log_scale:  # bin = (log2(s) + 10) / 10 * (bins - 1), sizes from 2^-10 to 1
            return tuple(2.0 ** (b / (bins - 1) * 10.0 - 10.0) for b in (w_bin, h_bin))
        return w_bin / bins, h_bin / bins


class RegionGraph(nn.Module):
    """The region heads as one graph of four independent rows-in, rows-out paths (the bundle's ``region`` part):

        coord (Nc, 1) -> coord_embed (Nc, 1, D)          coord_hidden (Nh, D) -> coord_logits (Nh, bins)
        size (Ns, 2)  -> size_embed (Ns, 1, D)           size_hidden (Nz, D)  -> size_logits (Nz, 2, bins)

    Each path has its own input and row count, and any count may be 0: ONNX Runtime runs every node of a graph
    whatever outputs are fetched, so a call feeds 0 rows to the paths it does not need (the decoders are 25M and
    33M MACs at Moondream2's size; the encoders nearly nothing). Float32 in and out whatever the heads' dtype."""

    def __init__(self, region: MoondreamRegion):
        super().__init__()
        self.r = region

    def forward(self, coord, size, coord_hidden, size_hidden):
        r, dt = self.r, self.r.coord_features.dtype
        coord_embed = r.coord_encoder(r.fourier(coord.to(dt), r.coord_features))[:, None]       # (Nc, 1, D)
        size_embed = r.size_encoder(r.fourier(size.to(dt), r.size_features))[:, None]           # (Ns, 1, D)
        coord_logits = r.coord_decoder(coord_hidden.to(dt))                                      # (Nh, bins)
        size_logits = r.size_decoder(size_hidden.to(dt))                                         # (Nz, 2 * bins)
        size_logits = size_logits.reshape(size_logits.shape[0], 2, size_logits.shape[-1] // 2)  # rows: w, h
        return coord_embed.float(), size_embed.float(), coord_logits.float(), size_logits.float()


# -- the model ----------------------------------------------------------------------------------------
class MoondreamModel(VisionLanguageModel):
    """Moondream2: BOS + image embeddings form a bidirectional prefix, prompts are the reference's
    token-id templates (``config.tokens``), and the skills return structured results."""

    family = "moondream2"
    bidirectional_image_prefix = True
    decoder_outputs = ("hidden",)    # detect/point read the pre-final-LN hidden state (see _lm_step)

    def __init__(self, vision, connector, language_model, region: MoondreamRegion | None, *, tokens: dict,
                 revision: str, **kw):
        super().__init__(vision, connector, language_model, **kw)
        self.region, self.tokens, self.revision, self.rules = region, tokens, revision, REVISIONS[revision]

    def parts(self) -> dict[str, nn.Module]:
        parts = super().parts()
        if self.region is not None:
            parts["region"] = self.region
        return parts

    def published_param_count(self) -> int:
        """Vision + connector + text (the published 1.86B figure predates the region heads)."""
        return sum(p.numel() for k, m in super().parts().items() for p in m.parameters())

    def info_views(self) -> int:
        """Views of the most expensive image (a full grid of local crops) for FLOP counts."""
        return 1 + int(overlap_params(self.image_spec)["max_crops"])

    # -- image -> prefix ------------------------------------------------------------------------------
    def image_views(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """(V, 3, S, S) pixel values (global view first) and the (rows, cols) grid of local crops."""
        arr, grid = overlap_crops_with_grid(load_image(image), self.image_spec)
        return torch.from_numpy(arr).to(next(self.vision.parameters()).dtype), grid

    def pixel_values(self, image) -> torch.Tensor:
        return self.image_views(image)[0]

    def encode_image(self, pixel_values: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(V, 3, S, S) -> (1, N, D). Pass the grid from :meth:`image_views` (guessed if square)."""
        return self.connector(self.vision(pixel_values), grid)                   # (1, N, D)

    def export_parts(self, image) -> list:
        """Two graphs, since the connector stitches crops along a Python grid: ``vision_tower`` (dynamic views)
        and ``vision_projector`` over the merged features (the runtime merges with ``merge_crops_numpy``); and, when
        the checkpoint has them, the ``region`` heads that detect and point read on the decoder's hidden state."""
        from ..parts import PartRole, PartSpec

        views, _ = self.image_views(image)
        views = views if views.shape[0] >= 2 else torch.cat([views, views])       # traced at V >= 2 (dynamic)
        with torch.no_grad():
            feats = self.vision(views)                                            # (V, N, C)
        merged = torch.cat([feats[0], feats[0]], dim=-1).float()                  # (N, 2C)
        return [
            PartSpec("vision_tower", _Float(self.vision).eval(), ("pixel_values",), ("image_features",), (views,),
                     dynamic={"pixel_values": {0: "views"}}, bounds={"views": self.info_views()},
                     what="Moondream vision tower",
                     facts={"features": [int(feats.shape[1]), int(feats.shape[2])]}),
            PartSpec("vision_projector", _Projector(self.connector).eval(), ("merged_features",), ("image_embeds",),
                     (merged,), role=PartRole.FEATURES, what="Moondream projector",
                     facts={"merge": {"side": int(self.connector.side), "margin": int(self.connector.margin),
                                      "function": "edgevlm.runtime.vlm_ops.merge_crops_numpy"}}),
        ] + self._region_part()

    def embed_prompt(self, image, ids: list[int]) -> tuple[torch.Tensor, int]:
        """[BOS, image embeddings, prompt ids] -> ((1, T, D), length of the bidirectional prefix)."""
        dev = self.language_model.get_input_embeddings().weight.device
        seq = [self.embed_tokens(torch.tensor([[self.tokens["bos_id"]]], device=dev))]   # (1, 1, D)
        if image is not None:
            pixels, grid = self.image_views(image)
            seq.append(self.encode_image(pixels.to(dev), grid).to(seq[0].dtype))       # (1, N, D)
        n_prefix = sum(int(s.shape[1]) for s in seq)
        if ids:
            seq.append(self.embed_tokens(torch.tensor([ids], device=dev)))             # (1, T_txt, D)
        return torch.cat(seq, dim=1), (n_prefix if image is not None else 0)

    # -- prompts (the reference's token-id templates) -------------------------------------------------
    def _text_ids(self, text: str, what: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"the {what} is empty", f"pass a non-empty {what}, e.g. 'What is in this image?'")
        return self.require_tokenizer().encode((" " if self.rules.space_before_text else "") + text)

    def query_ids(self, question: str) -> list[int]:
        t = self.tokens["query"]
        return list(t["prefix"]) + self._text_ids(question, "question") + list(t["suffix"])

    def prepare(self, image, prompt: str) -> tuple[torch.Tensor, PromptPieces, int]:
        """The query prompt: (inputs_embeds (1, T, D), [BOS] + query ids, image tokens)."""
        ids = self.query_ids(prompt)
        embeds, n_prefix = self.embed_prompt(image, ids)
        bos = [int(self.tokens["bos_id"])]
        pieces = PromptPieces(bos, ids, True) if image is not None else PromptPieces(bos + ids, [], False)
        return embeds, pieces, max(n_prefix - 1, 0)

    def forward(self, inputs_embeds: torch.Tensor, n_prefix: int | None = None) -> torch.Tensor:
        """Logits (1, T, V). The first ``n_prefix`` positions attend both ways (default BOS + image)."""
        n = int(inputs_embeds.shape[1])
        if n_prefix is None:
            n_prefix = 1 + self.vision.n_patches if n > self.vision.n_patches else 0
        mask = self.prefill_mask(n, n_prefix, inputs_embeds.dtype)
        kw = {"attention_mask": mask.to(inputs_embeds.device)} if mask is not None else {}
        return self.language_model(inputs_embeds=inputs_embeds, use_cache=False, **kw).logits

    def stop_ids(self) -> tuple[int, ...]:
        return (int(self.tokens["eos_id"]),)

    def runtime_spec(self) -> dict:
        """Moondream prompts with token-id templates around the query and merges crops by a grid."""
        spec = super().runtime_spec()
        q = self.tokens["query"]
        spec["prompt"] = {"kind": "moondream", "bos_id": int(self.tokens["bos_id"]), "prefix": [int(i) for i in q["prefix"]],
                          "suffix": [int(i) for i in q["suffix"]], "space_before_text": bool(self.rules.space_before_text)}
        spec["vision"] = {"kind": "moondream_crops", "side": int(self.connector.side), "margin": int(self.connector.margin)}
        spec["skills"] = self.skills_spec()
        return spec

    def skills_spec(self) -> dict:
        """What the torch-free runtime's skills (``edgevlm.runtime.skills``) need: the caption lengths of this
        revision and their token ids, the detect/point templates, the EOS id that ends the object list, the size
        bin rule and the default answer length."""
        ids = lambda xs: [int(i) for i in xs]  # noqa: E731
        t = self.tokens
        return {"caption": {k: ids(v) for k, v in t["caption"].items() if k in self.rules.captions},
                **{k: {"prefix": ids(t[k]["prefix"]), "suffix": ids(t[k]["suffix"])} for k in ("detect", "point")},
                "eos_id": int(t["eos_id"]), "log_sizes": bool(self.rules.log_sizes),
                "max_tokens": int(self.rules.max_tokens)}

    def _region_part(self) -> list:
        """The region heads as the bundle's ``region`` part (:class:`RegionGraph`, role ``heads``: kept FP32 at every
        bundle precision, since the runtime takes the argmax of its bins), when the checkpoint has them."""
        from ..parts import PartRole, PartSpec

        if self.region is None:
            return []
        r, d = self.region, self.hidden_size
        g = torch.Generator().manual_seed(0)
        example = (torch.rand(3, 1, generator=g), torch.rand(3, 2, generator=g) * 0.5,
                   torch.randn(2, d, generator=g), torch.randn(2, d, generator=g))
        rows = {"coord": "n_coord", "size": "n_size", "coord_hidden": "n_coord_hidden", "size_hidden": "n_size_hidden"}
        return [PartSpec("region", RegionGraph(r).eval(), tuple(rows), ("coord_embed", "size_embed", "coord_logits",
                         "size_logits"), example, role=PartRole.HEADS, dynamic={k: {0: v} for k, v in rows.items()},
                         bounds={v: REGION_MAX_ROWS for v in rows.values()},
                         what="Moondream region heads",
                         facts={"coord_bins": int(r.coord_decoder.fc2.out_features),
                                "size_bins": int(r.size_decoder.fc2.out_features) // 2,
                                "reads": "decoder output 'hidden' (pre-final-LN hidden state of the last position)"})]

    # -- text skills ----------------------------------------------------------------------------------
    def _text(self, image, ids: list[int], stream: bool, max_new_tokens: int, temperature: float = 0.0,
              top_p: float = 1.0, top_k: int = 0, seed: int | None = None):
        cfg = GenerationConfig(max_new_tokens, temperature, top_p, top_k, seed, self.stop_ids())
        with torch.inference_mode():
            embeds, n_prefix = self.embed_prompt(image, ids)
        stats = GenerationStats(prompt_tokens=1 + len(ids), image_tokens=max(n_prefix - 1, 0))
        if stream:
            return self._stream(embeds, cfg, stats, n_prefix)
        out = list(self.decode_tokens(embeds, cfg, stats, prefix=n_prefix))
        return Generation(self.require_tokenizer().decode(out), out, stats)

    def generate(self, image, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stream: bool = False):
        """A query: ``prompt`` is the question. A :class:`Generation`, or text pieces with ``stream=True``."""
        return self._text(image, self.query_ids(prompt), stream, max_new_tokens, temperature, top_p, top_k, seed)

    def query(self, image, question: str, stream: bool = False, max_new_tokens: int | None = None,
              temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        """The answer text (or an iterator of text pieces). Greedy by default; the reference samples
        with temperature 0.5, top_p 0.3."""
        out = self._text(image, self.query_ids(question), stream, max_new_tokens or self.rules.max_tokens,
                         temperature, top_p, 0, seed)
        return out if stream else out.text

    def caption(self, image, length: str = "normal", stream: bool = False, max_new_tokens: int | None = None,
                temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        """A caption of ``length`` short / normal (/ long from 2025-03-27): text or an iterator of pieces."""
        if length not in self.rules.captions or length not in self.tokens["caption"]:
            raise ConfigError(f"caption length {length!r} is not in revision {self.revision}",
                              f"use one of: {', '.join(self.rules.captions)}")
        out = self._text(image, list(self.tokens["caption"][length]), stream,
                         max_new_tokens or self.rules.max_tokens, temperature, top_p, 0, seed)
        return out if stream else out.text

    # -- region skills --------------------------------------------------------------------------------
    def _lm_step(self, embeds: torch.Tensor, cache=None, mask=None):
        """One cached LM call -> (last pre-final-LN hidden (D,), last logits (V,), cache)."""
        lm, seen = self.language_model, []
        hook = lm.model.final_layernorm.register_forward_hook(lambda m, a, o: seen.append(a[0][0, -1]))
        try:
            out = lm.model(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, use_cache=True)
        finally:
            hook.remove()
        return seen[0], lm.lm_head(out.last_hidden_state[0, -1]), out.past_key_values

    @torch.inference_mode()
    def _locate(self, image, kind: str, obj: str, max_objects: int) -> list[dict]:
        if self.region is None:
            raise ConfigError(f"{self.name} was loaded from a checkpoint without region heads (model.region.*), "
                              f"so it cannot {kind}", f"use a 2025 {HUB_ID} checkpoint, which has them")
        if image is None:
            raise ConfigError(f"{kind} needs an image", "pass an image")
        t = self.tokens[kind]
        embeds, n_prefix = self.embed_prompt(image, list(t["prefix"]) + self._text_ids(obj, "object")
                                             + list(t["suffix"]))
        n = int(embeds.shape[1])
        mask = self.prefill_mask(n, n_prefix, embeds.dtype).to(embeds.device)
        hidden, logits, cache = self._lm_step(embeds, None, mask)
        eos, per_object, out = int(self.tokens["eos_id"]), (3 if kind == "detect" else 2), []
        while int(torch.argmax(logits)) != eos and len(out) < max_objects and n + per_object <= self.max_context:
            x = self.region.decode_coordinate(hidden)
            hidden, _, cache = self._lm_step(self.region.encode_coordinate(x).to(embeds.dtype), cache)
            y = self.region.decode_coordinate(hidden)
            nxt = self.region.encode_coordinate(y)
            if kind == "detect":
                hidden, _, cache = self._lm_step(nxt.to(embeds.dtype), cache)
                w, h = self.region.decode_size(hidden, self.rules.log_sizes)
                nxt = self.region.encode_size(w, h)
                clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731  (the reference leaves boxes unclipped)
                out.append({"x_min": clip(x - w / 2), "y_min": clip(y - h / 2),
                            "x_max": clip(x + w / 2), "y_max": clip(y + h / 2)})
            else:
                out.append({"x": x, "y": y})
            hidden, logits, cache = self._lm_step(nxt.to(embeds.dtype), cache)
            n += per_object
        return out

    def detect(self, image, object: str, max_objects: int = 50) -> list[dict]:
        """Boxes of ``object`` as {x_min, y_min, x_max, y_max}, normalized to [0, 1]."""
        return self._locate(image, "detect", object, max_objects)

    def point(self, image, object: str, max_objects: int = 50) -> list[dict]:
        """Centre points of ``object`` as {x, y}, normalized to [0, 1)."""
        return self._locate(image, "point", object, max_objects)


# -- checkpoint keys ----------------------------------------------------------------------------------
# model.safetensors name (the "model." prefix optional) -> edgevlm name. One rule per upstream name;
# "{qkv}" splits the fused tensor's rows [q | k | v] into three. Rules apply in order, first match wins.
KEY_RULES: tuple[tuple[str, str, str], ...] = (
    (r"^vision\.patch_emb\.(weight|bias)$", r"vision.patch_emb.\1", "Linear over 3*p*p flattened patches"),
    (r"^vision\.pos_emb$", "vision.pos_emb", "(1, N, C) parameter, no .weight"),
    (r"^vision\.blocks\.(\d+)\.(ln1|ln2)\.(weight|bias)$", r"vision.blocks.\1.\2.\3", "pre-LNs"),
    (r"^vision\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$", r"vision.blocks.\1.attn.\2.\3",
     "fused qkv (kept fused), out proj"),
    (r"^vision\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"vision.blocks.\1.mlp.\2.\3", "block MLP"),
    (r"^vision\.post_ln\.(weight|bias)$", r"vision.post_ln.\1", "final vision LayerNorm"),
    (r"^vision\.proj_mlp\.(fc1|fc2)\.(weight|bias)$", r"connector.\1.\2", "projection MLP (in 2*C)"),
    (r"^text\.wte$", "language_model.model.embed_tokens.weight", "token embeddings, no .weight"),
    (r"^text\.blocks\.(\d+)\.ln\.(weight|bias)$", r"language_model.model.layers.\1.input_layernorm.\2",
     "the one LayerNorm of a parallel Phi block"),
    (r"^text\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"language_model.model.layers.\1.self_attn.{qkv}_proj.\2",
     "fused qkv -> q_proj, k_proj, v_proj"),
    (r"^text\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"language_model.model.layers.\1.self_attn.dense.\2",
     "attention output"),
    (r"^text\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"language_model.model.layers.\1.mlp.\2.\3",
     "block MLP"),
    (r"^text\.post_ln\.(weight|bias)$", r"language_model.model.final_layernorm.\1", "final LayerNorm"),
    (r"^text\.lm_head\.(weight|bias)$", r"language_model.lm_head.\1", "untied head with bias"),
    (r"^region\.(coord_features|size_features)$", r"region.\1", "Fourier frequencies, no .weight"),
    (r"^region\.(coord_encoder|size_encoder)\.(weight|bias)$", r"region.\1.\2", "Fourier features -> D"),
    (r"^region\.(coord_decoder|size_decoder)\.(fc1|fc2)\.(weight|bias)$", r"region.\1.\2.\3", "hidden -> bins"),
)


def map_keys(sd: dict, qkv_sizes: tuple[int, int, int]) -> dict:
    """Rename a moondream state dict to edgevlm's names; unknown keys keep their name (and are listed
    as unexpected by the strict load)."""
    out = {}
    for key, value in sd.items():
        name = key[len("model."):] if key.startswith("model.") else key
        for pattern, repl, _source in KEY_RULES:
            if m := re.match(pattern, name):
                new = m.expand(repl)
                if "{qkv}" in new and value.shape[0] == sum(qkv_sizes):
                    for part, t in zip("qkv", torch.split(value, list(qkv_sizes), dim=0)):
                        out[new.replace("{qkv}", part)] = t
                else:
                    out[new] = value
                break
        else:
            out[key] = value
    return out


# -- build / load -------------------------------------------------------------------------------------
def _image_spec(recipe: VLMRecipe) -> ImageSpec:
    spec = ImageSpec(**{**recipe.image, "options": {**OVERLAP_DEFAULTS, **recipe.image.get("options", {})}})
    if spec.mode != "overlap_crops":
        raise ConfigError(f"{recipe.name} image mode is {spec.mode!r}", "moondream2 needs mode: overlap_crops")
    return spec


def build(recipe: VLMRecipe, tokenizer: TextTokenizer | None = None, revision: str | None = None,
          with_region: bool = True) -> MoondreamModel:
    cfg, spec = recipe.config, _image_spec(recipe)
    v, opts = cfg["vision"], spec.options
    vision = MoondreamVision(v["dim"], v["layers"], v["heads"], v["ff_dim"], int(opts["patch_size"]), spec.size)
    text = lm_config(cfg["text"])
    connector = MoondreamConnector(v["dim"], v["proj_inner_dim"], text.hidden_size, vision.side,
                                   int(opts["overlap_margin"]))
    r = cfg["region"]
    region = MoondreamRegion(text.hidden_size, r["coord_feat_dim"], r["coord_out_dim"], r["size_feat_dim"],
                             r["size_out_dim"], r["inner_dim"]) if with_region else None
    return MoondreamModel(vision, connector, build_lm(text), region, tokens=cfg["tokens"],
                          revision=_revision(recipe, revision), image_spec=spec,
                          prompt_spec=PromptSpec(**recipe.prompt), tokenizer=tokenizer, name=recipe.name)


CHECKPOINT_HELP = (f"the {HUB_ID} snapshot directory of a 2025 revision (config.json, model.safetensors, "
                   "tokenizer.json), or its model.safetensors file with tokenizer.json next to it")


def _check_config(folder: Path) -> None:
    read_model_config(folder, "moondream1", CHECKPOINT_HELP)


def _tokenizer(folder: Path, revision: str) -> TextTokenizer:
    try:
        return TextTokenizer.from_dir(folder)
    except CheckpointError as e:
        raise CheckpointError(e.problem, f"copy tokenizer.json and tokenizer_config.json of {HUB_ID} (revision "
                              f"{revision}; the GPT-2 tokenizer is the same for {', '.join(REVISIONS)}) into "
                              f"{folder}") from None


def load(recipe: VLMRecipe, path: Path, revision: str | None = None) -> MoondreamModel:
    """A 2025-layout moondream2 checkpoint. ``path``: the snapshot directory (config.json checked), or
    a model.safetensors file whose folder also holds tokenizer.json."""
    revision = _revision(recipe, revision)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = path / "model.safetensors" if path.is_dir() else path
    if path.is_dir():
        if not file.is_file():
            pickles = sorted(f.name for f in path.iterdir() if f.name.endswith(PICKLE_SUFFIXES))
            raise CheckpointError(f"no model.safetensors in {path}" + (f" (found {', '.join(pickles)})" if pickles
                                                                       else ""),
                                  f"moondream2 is published as safetensors; pass {CHECKPOINT_HELP}")
        _check_config(path)
    if not file.is_file() or file.stat().st_size == 0 or not _looks_like_safetensors(file):
        raise CheckpointError(f"{file} is not a safetensors file" + (" (it looks like a pickle)"
                              if file.is_file() and file.name.endswith(PICKLE_SUFFIXES) else ""),
                              f"edgevlm does not unpickle moondream2 weights; pass {CHECKPOINT_HELP}")
    tokenizer = _tokenizer(folder, revision)
    sd = load_state_dict(file)
    if any(k.startswith(("vision_encoder.", "text_model.")) for k in sd):
        raise CheckpointError(f"{file} is in the {OLD_LAYOUT}", f"download revision {', '.join(REVISIONS)}")
    text = lm_config(recipe.config["text"])
    head = text.hidden_size // text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    sd = map_keys(sd, (text.hidden_size, kv * head, kv * head))
    model = build(recipe, tokenizer, revision, with_region=any(k.startswith("region.") for k in sd))
    fit_state_dict(model, sd, str(file), fix=f"pass a 2025 {HUB_ID} model.safetensors (revisions "
                   f"{', '.join(REVISIONS)}) for {recipe.name}")
    check_vocab(model.language_model, tokenizer, str(folder))
    eos = int(model.tokens["eos_id"])
    if tokenizer.eos_ids and eos not in tokenizer.eos_ids:
        raise CheckpointError(f"the tokenizer in {folder} ends text with id {tokenizer.eos_ids[0]}, "
                              f"{recipe.name} with {eos}", f"use the GPT-2 tokenizer.json of {HUB_ID} "
                              f"(revision {revision}), not another model's")
    return model


FAMILIES.add("moondream2", Family(
    name="moondream2", description="Moondream2 (2025 layout): SigLIP-shaped ViT over overlapping crops + MLP + "
    "Phi-1.5, with region heads for detect/point",
    build=build, load=load, checkpoint_help=CHECKPOINT_HELP, refused_revisions=REFUSED,
))
