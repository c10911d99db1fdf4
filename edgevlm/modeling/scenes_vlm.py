"""edgevlm's own small VLM, trained here on the synthetic scenes task and shipped in models/.

Built from the zoo's parts: a reparameterizable FastViT tower (timm's ``FastVit`` with RepMixer
stages, truncated after ``stages`` stages, features as tokens), a LLaVA-Mini query compressor that
keeps N vision tokens followed by the LLaVA MLP projector, and a small Llama decoder; the tokenizer is
a byte-level BPE trained on the task's text with the `tokenizers` library.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..processor import ImageSpec, PromptSpec, TextTokenizer
from ..zoo import VLMRecipe
from .checkpoint import (_looks_like_safetensors, fit_state_dict, load_state_dict, read_metadata,
                         read_safetensors_header, resolve_file)
from .connectors import CompressedProjector, MLPProjector
from .families import FAMILIES, Family
from .language import build_lm, check_vocab
from .vision import timm_without_drop_path
from .vlm import VisionLanguageModel


PROB_SCALE = 3.0       # the description's class probabilities, scaled to a layer-normed feature's range


class CellHead(nn.Module):
    """Per feature-grid cell: logits of which shape and which colour is centred there (each with a last
    "none" class) and that object's box (cx, cy, w, h). Trained by the dense loss of `edgevlm train`."""

    def __init__(self, dim: int, n_shapes: int, n_colors: int):
        super().__init__()
        self.n_shapes, self.n_colors = n_shapes, n_colors
        self.linear = nn.Linear(dim, n_shapes + 1 + n_colors + 1 + 4)

    @property
    def width(self) -> int:
        return self.linear.out_features

    def forward(self, feats: torch.Tensor) -> torch.Tensor:             # (V, M, C) -> (V, M, width)
        return self.linear(feats)

    def objectness(self, logits: torch.Tensor) -> torch.Tensor:
        """(V, M, 1): the probability that some object is centred in the cell (1 - P(no shape))."""
        return 1 - logits[..., :self.n_shapes + 1].softmax(-1)[..., -1:]

    def describe(self, logits: torch.Tensor) -> torch.Tensor:
        """What the decoder is shown: class probabilities and the box, scaled to a layer-normed feature's
        range (probabilities x3, box centred and x6)."""
        s, c = self.n_shapes + 1, self.n_colors + 1
        return torch.cat([logits[..., :s].softmax(-1) * PROB_SCALE, logits[..., s:s + c].softmax(-1) * PROB_SCALE,
                          (logits[..., s + c:] - 0.5) * 6], -1)


class FastViTTower(nn.Module):
    """timm FastViT (RepMixer) stem + the first ``n_stages`` stages; output (V, H'·W', C) tokens.

    With ``cells = (shapes, colours)`` a :class:`CellHead` reads every token, and the tower's output is
    [layer-normed features ; the head's description of the cell] (C + head width channels): the decoder is
    shown what the supervised head sees in each cell, not left to rediscover it from the raw features.
    Probes on a frozen trained tower (fresh compressor and decoder, 32 scenes x 8 questions a step, teacher-forced
    exact match on the short-answer kinds after 200 steps): 65% with the description, 62% for a decoder handed
    the true objects as tokens, 52-54% (150-300 steps, an earlier tower) on the raw features alone.
    The first full training run with it (run 6 in models/edgevlm_scenes.md) did not confirm the gain on
    colour and exists questions; ``cells`` is a recipe switch so that runs can compare.

    ``gate`` (recipe switch ``vision.gate``) scales the features of each cell by the head's objectness
    (detached: the dense loss alone decides where objects are), so a cell next to the red star no longer looks
    red to the decoder. Probe on run 8's frozen tower (fresh connector and decoder, 16 scenes x 16 questions a
    step, about 670 steps, teacher-forced exact match on 300 validation scenes): 79.1% gated against 66.6%
    ungated. Off in the shipped recipe: trained jointly, run 9 (gate with cell words) reached 65.0% and run 10
    (the gate alone) 80.6% validation exact match, against 82.0% without (run 8).
    """

    def __init__(self, layers, embed_dims, mlp_ratios, n_stages: int, layer_scale_init: float = 1e-5,
                 cells: tuple[int, int] | None = None, gate: bool = False):
        super().__init__()
        from timm.models.fastvit import FastVit

        # layer_scale_init: timm's 1e-5 starts every RepMixer/MLP block as the identity, which suits 300 ImageNet
        # epochs; trained from scratch for minutes, only the stem and downsampling convs learn at first.
        with timm_without_drop_path("fastvit"):
            net = FastVit(layers=tuple(layers), embed_dims=tuple(embed_dims), mlp_ratios=tuple(mlp_ratios),
                          token_mixers=("repmixer",) * len(layers), num_classes=0,
                          layer_scale_init_value=layer_scale_init)
        self.stem, self.stages = net.stem, net.stages[:n_stages]
        self.feat_dim = int(embed_dims[n_stages - 1])
        self.cells = CellHead(self.feat_dim, *cells) if cells else None
        if gate and self.cells is None:
            raise ValueError("gate needs the cell head (vision.cells in the recipe)")
        self.gate = bool(gate)
        self.out_dim = self.feat_dim + (self.cells.width if self.cells is not None else 0)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:    # (V, 3, H, W) -> (V, H'·W', C)
        # contiguous: with a channels-last input (an HWC array permuted), torch 2.14's CPU backward through
        # these convolutions corrupts the heap ("corrupted double-linked list"); seen while training.
        x = self.stages(self.stem(pixel_values.contiguous()))            # (V, C, H', W')
        return x.flatten(2).transpose(1, 2)

    def forward_with_cells(self, pixel_values: torch.Tensor):
        """(tokens, raw features, cell logits or None): training needs all three from one pass."""
        x = self.features(pixel_values)
        if self.cells is None:
            return x, x, None
        logits = self.cells(x)
        feats = nn.functional.layer_norm(x, x.shape[-1:])
        if self.gate:           # the head's objectness, as the dense loss trained it (the decoder does not move it)
            feats = feats * self.cells.objectness(logits).detach()
        tokens = torch.cat([feats, self.cells.describe(logits)], -1)
        return tokens, x, logits

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_with_cells(pixel_values)[0]


class CellWords(nn.Module):
    """Each cell's shape and colour, said in the decoder's own words: the head's class probabilities (read
    from the description the tower appends) weight the decoder's input embeddings of the class names
    (" red", " star"; a name of several tokens is their mean), times a learned scale.

    A question that names "the red star" can then find its cell by matching the same embedding. Probe
    (run 8's frozen tower, fresh connector and decoder, 16 scenes x 16 questions a step, teacher-forced
    exact match on 300 validation scenes, about 670 steps): position questions 93.7% with the words,
    77.6% without. The table is the decoder's, shared and not copied: it is not a second weight in the file.
    Trained jointly (run 9 of the card, with the gate) the model fell from 82.0% to 65.0% validation exact match
    ("is there ...?" stayed at chance), so the shipped recipe leaves ``cell_words`` off.
    """

    def __init__(self, offset: int, n_shapes: int, n_colors: int, embedding: nn.Embedding,
                 token_ids: list[list[int]], scale: float = 10.0):
        super().__init__()
        if len(token_ids) != n_shapes + n_colors or not all(token_ids):
            raise ValueError(f"CellWords needs the token ids of {n_shapes} shape and {n_colors} colour names, "
                             f"got {len(token_ids)} lists")
        self.offset, self.n_shapes, self.n_colors = offset, n_shapes, n_colors
        self._embedding = (embedding,)              # a tuple: not registered, so not a second state-dict entry
        width = max(len(t) for t in token_ids)
        self.register_buffer("ids", torch.tensor([t + [0] * (width - len(t)) for t in token_ids]), persistent=False)
        self.register_buffer("mask", torch.tensor([[1.0] * len(t) + [0.0] * (width - len(t)) for t in token_ids]),
                             persistent=False)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:            # (V, M, C) -> (V, M, D)
        d = feats[..., self.offset:]
        s = self.n_shapes + 1
        probs = torch.cat([d[..., :self.n_shapes], d[..., s:s + self.n_colors]], -1) / PROB_SCALE
        table = self._embedding[0].weight[self.ids]                              # (W, L, D)
        words = (table * self.mask[..., None]).sum(1) / self.mask.sum(1, keepdim=True)
        return self.scale * (probs @ words.to(probs.dtype))


def class_name_ids(tokenizer: TextTokenizer, shapes, colors) -> list[list[int]]:
    """Token ids of " circle", ..., " red", ...: the words the questions use for each class."""
    return [tokenizer.encode(" " + w) for w in (*shapes, *colors)]


class CellProjector(nn.Module):
    """Every cell token, uncompressed (``vision_tokens: 0`` in the recipe): a learned position per cell is
    added to the tower's token, then LLaVA's MLP projector; (V, M, C) -> (V, M, D).

    Why the default model does not compress inside the model: a probe on a frozen trained tower (fresh
    connector and decoder, 16 scenes x 16 questions a step, 600 steps, teacher-forced exact match) reached
    76% with every cell (colour questions 95%) against 58% through a 16-query LLaVA-Mini compressor (colour
    questions 13%, chance): averaging cells in the compressor's attention loses which colour belongs to
    which shape. Compression is a measured deployment step instead (`edgevlm distill --attach-compressor N`).
    """

    def __init__(self, in_dim: int, out_dim: int, n_cells: int, words: CellWords | None = None):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(n_cells, in_dim) * 0.02)
        self.projector = MLPProjector(in_dim, out_dim)
        self.words = words

    @property
    def n_tokens(self) -> int:
        return self.pos.shape[0]

    def forward(self, feats):                                          # (V, M, C)
        if feats.shape[1] != self.pos.shape[0]:
            raise ValueError(f"{feats.shape[1]} vision tokens for a projector of {self.pos.shape[0]} cells: "
                             "the image size must be the recipe's")
        out = self.projector(feats + self.pos.to(feats.dtype))
        return out if self.words is None else out + self.words(feats)


def grid_side(recipe: VLMRecipe) -> int:
    """The tower's feature grid side: FastViT's stem divides by 4, each stage after the first by 2."""
    return int(recipe.image["size"]) // (4 * 2 ** (int(recipe.config["vision"]["stages"]) - 1))


def cell_words(tower: "FastViTTower", lm, tokenizer: TextTokenizer, name: str) -> CellWords:
    from ..data import scenes

    if tower.cells is None:
        raise ValueError(f"{name}: cell_words needs the cell head (vision.cells in the recipe)")
    if (tower.cells.n_shapes, tower.cells.n_colors) != (len(scenes.SHAPES), len(scenes.COLORS)):
        raise ValueError(f"{name}: cell_words names the scenes task's {len(scenes.SHAPES)} shapes and "
                         f"{len(scenes.COLORS)} colours; the recipe's cell head has {tower.cells.n_shapes} and "
                         f"{tower.cells.n_colors}")
    return CellWords(tower.feat_dim, tower.cells.n_shapes, tower.cells.n_colors, lm.get_input_embeddings(),
                     class_name_ids(tokenizer, scenes.SHAPES, scenes.COLORS))


class ScenesVLM(VisionLanguageModel):
    family = "edgevlm"
    parity_prompt = "describe the image."       # its own task's prompt and pictures (edgevlm.data.scenes)
    calibration_dataset = "scenes"
    golden_prompts = ("describe the image.", "how many shapes are there?")


def build(recipe: VLMRecipe, tokenizer: TextTokenizer | None = None) -> ScenesVLM:
    cfg = recipe.config
    v = cfg["vision"]
    tower = FastViTTower(v["layers"], v["embed_dims"], v["mlp_ratios"], v["stages"], v.get("layer_scale_init", 1e-5),
                         cells=tuple(v["cells"]) if v.get("cells") else None, gate=bool(v.get("gate", False)))
    lm = build_lm(dict(cfg["text"]))   # the vocabulary is fixed by the recipe; check_vocab guards tokenizers
    if cfg["vision_tokens"]:
        connector = CompressedProjector(tower.out_dim, lm.config.hidden_size, cfg["vision_tokens"],
                                        heads=cfg.get("compressor_heads", 4))
    else:
        words = None
        if cfg.get("cell_words"):
            # the class names' ids come from the model's tokenizer; a model built without one (random weights)
            # gets the byte tokenizer that `load_vlm(..., weights="random")` gives it anyway
            tokenizer = tokenizer or TextTokenizer.bytes_only(lm.get_input_embeddings().num_embeddings)
            words = cell_words(tower, lm, tokenizer, recipe.name)
        connector = CellProjector(tower.out_dim, lm.config.hidden_size, grid_side(recipe) ** 2, words)
    return ScenesVLM(tower, connector, lm, image_spec=ImageSpec(**recipe.image), prompt_spec=PromptSpec(**recipe.prompt),
                     tokenizer=tokenizer, name=recipe.name)


def save(model: ScenesVLM, path: Path, facts: dict) -> None:
    """Weights (FP16 storage halves the file; they load back to FP32) with the tokenizer in the metadata."""
    import json

    from safetensors.torch import save_file

    sd = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    meta = {"edgevlm": json.dumps(facts), "tokenizer": model.tokenizer.tok.to_str()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)


def with_overrides(recipe: VLMRecipe, overrides: dict, where: str = "") -> VLMRecipe:
    """The recipe with a distilled student's reductions (``edgevlm distill --vision-tokens/--text-layers``
    store them in the weights' metadata), so a student loads, evaluates and exports under its base name."""
    import copy
    from dataclasses import replace

    if not overrides:
        return recipe
    if not isinstance(overrides, dict):
        raise CheckpointError(f"{where} has config overrides that are not a mapping ({str(overrides)[:60]})",
                              "write the file with this edgevlm version's `edgevlm distill`")
    unknown = sorted(set(overrides) - {"vision_tokens", "text_layers"})
    if unknown:
        raise CheckpointError(f"{where} asks for config overrides edgevlm does not know: {unknown}",
                              "write the file with this edgevlm version's `edgevlm distill`")
    for key, least in (("vision_tokens", 0), ("text_layers", 1)):
        v = overrides.get(key, least)
        if not isinstance(v, int) or isinstance(v, bool) or v < least:
            raise CheckpointError(f"{where} asks for {key}={str(v)[:40]}, not a whole number of at least {least}",
                                  "write the file again with `edgevlm distill`")
    conf = copy.deepcopy(recipe.config)
    if "vision_tokens" in overrides:
        conf["vision_tokens"] = int(overrides["vision_tokens"])
    if "text_layers" in overrides:
        conf["text"] = dict(conf["text"], num_hidden_layers=int(overrides["text_layers"]))
    return replace(recipe, config=conf)


def load(recipe: VLMRecipe, path: Path, revision: str | None = None) -> ScenesVLM:
    """A safetensors file written by :func:`save` (the tokenizer travels in its metadata).

    Only safetensors (nothing is unpickled); its header is checked before anything is read, so a truncated or
    damaged file, or one of wrong dtypes or shapes, is a CheckpointError naming the file and the fix."""
    from tokenizers import Tokenizer

    path = resolve_file(path)
    fix = (f"download or copy the file again (the shipped weights come with edgevlm: reinstall it), or train it "
           f"again with `edgevlm train --model {recipe.name}`")
    if path.suffix != ".safetensors" and not _looks_like_safetensors(path):
        raise CheckpointError(f"{path} is not a safetensors file ({recipe.name} reads its weights only from "
                              "safetensors and unpickles nothing)",
                              f"pass the .safetensors file that `edgevlm train --model {recipe.name}` wrote")
    meta = read_safetensors_header(path, fix)["metadata"]
    if "tokenizer" not in meta:
        raise CheckpointError(f"{path} carries no tokenizer", "pass a checkpoint written by `edgevlm train "
                              "--model edgevlm_scenes` (its tokenizer is stored in the safetensors metadata)")
    facts = read_metadata(path)
    recipe = with_overrides(recipe, (facts or {}).get("config_overrides") or {}, str(path))
    try:
        tok = Tokenizer.from_str(meta["tokenizer"])
    except Exception as e:
        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} carries a tokenizer that does not load ({why})", fix) from None
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if bos is None or eos is None:
        raise CheckpointError(f"{path} carries a tokenizer without the <s> and </s> tokens", fix)
    tokenizer = TextTokenizer(tok, bos, (eos,), str(path))
    with torch.device("cpu"):
        model = build(recipe, tokenizer)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path, fix).items()}
    fit_state_dict(model, sd, str(path), fix=f"pass weights trained for {recipe.name} (`edgevlm train --model "
                   f"{recipe.name}`)")
    check_vocab(model.language_model, tokenizer, str(path))
    model.facts = facts
    return model


FAMILIES.add("edgevlm", Family(
    name="edgevlm", description="edgevlm's own: FastViT tower + LLaVA-Mini compressor + MLP + small Llama",
    build=build, load=load,
    checkpoint_help="a safetensors file written by `edgevlm train --model edgevlm_scenes`",
))
