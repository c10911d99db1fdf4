"""The VLM families and ``load_vlm``: one entry point from a zoo name + weights to a model.

Each family module (llava.py, llava_mini.py, tinygpt_v.py, moondream2.py) registers a
:class:`Family` with two functions: ``build`` makes the architecture of a recipe with random
weights (on any device, including ``meta`` for parameter counts), ``load`` reads a real checkpoint
in the family's released layout. ``load_vlm`` resolves weights (a path, a hub id, ``random``) and
dispatches.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from ..registry import Registry
from ..zoo import VLMRecipe, get_vlm_recipe

FAMILY_MODULES = ("llava", "llava_mini", "tinygpt_v", "moondream2", "scenes_vlm", "smolvlm")


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    build: Callable            # (recipe, tokenizer | None) -> VisionLanguageModel with random weights
    load: Callable             # (recipe, path: Path, revision: str | None) -> VisionLanguageModel
    checkpoint_help: str       # what a user's --weights must hold, named in errors
    refused_revisions: dict = field(default_factory=dict)   # revision -> why edgevlm cannot read it
    hub_revisions: bool = True  # False: revisions name checkpoint stages in one repo, not git revisions
    # (recipe, checkpoint directory) -> the config ``build`` takes, for families whose checkpoints vary in
    # architecture (LLaVA format): `edgevlm info` on a checkpoint counts its own architecture, not the recipe's
    read_config: Callable | None = None


FAMILIES: Registry[Family] = Registry("VLM family")


@cache
def _families() -> Registry[Family]:
    for mod in FAMILY_MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:  # a family module not present in this build (tests guard the list)
            if e.name != f"{__package__}.{mod}":
                raise
    return FAMILIES


def get_family(name: str) -> Family:
    return _families().get(name)


def build_vlm(name_or_recipe, device: str = "cpu", dtype=None, tokenizer=None):
    """The recipe's architecture with random weights (``device='meta'`` allocates nothing)."""
    import torch

    recipe = name_or_recipe if isinstance(name_or_recipe, VLMRecipe) else get_vlm_recipe(name_or_recipe)
    fam = get_family(recipe.family)
    with torch.device(device):
        model = fam.build(recipe, tokenizer)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _fetch(recipe: VLMRecipe, hub_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.pth"]))
    except Exception as e:  # offline mode, network errors, unknown repo or revision
        raise CheckpointError(
            f"could not fetch {hub_id}{'@' + revision if revision else ''} for {recipe.name} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:100]})",
            f"download it on a connected machine (huggingface-cli download {hub_id}) and pass --weights DIR",
        ) from None


def load_vlm(name: str, weights: str | Path | None = None, revision: str | None = None, dtype=None):
    """A VLM from the zoo with its weights. ``name``: a zoo name, or a checkpoint as Hugging Face users name
    one (a local directory or a hub id with an optional ``@revision``; :func:`edgevlm.zoo.resolve_vlm`).

    ``weights``: a checkpoint directory or file in the family's released layout, a Hugging Face
    hub id (fetched when a hub is reachable), ``random`` (random weights, byte-level tokenizer;
    for tests and speed measurements), or None for the recipe's shipped weights or hub id.
    """
    import torch

    from ..zoo import resolve_vlm

    ref = resolve_vlm(str(name), None if weights is None else str(weights), revision)
    if ref is not None:                    # a checkpoint directory or hub id named as the model
        name, weights, revision = ref.name, ref.weights, ref.revision
    recipe = get_vlm_recipe(name)
    fam = get_family(recipe.family)
    if revision in fam.refused_revisions:
        raise CheckpointError(f"{recipe.name} revision {revision} is not supported: {fam.refused_revisions[revision]}",
                              f"use one of: {', '.join(recipe.revisions)}")
    if revision is not None and recipe.revisions and revision not in recipe.revisions:
        raise CheckpointError(f"{recipe.name} revision {revision!r} is not one edgevlm reads",
                              f"use one of: {', '.join(recipe.revisions)}")
    if weights is None:
        if recipe.default_weights:
            weights = str(recipe.shipped_weights(recipe.default_weights))
        elif recipe.hub_id:
            weights = recipe.hub_id
        else:
            raise ConfigError(f"{recipe.name} has no default weights", f"pass weights: {fam.checkpoint_help}")
    if str(weights) == "random":
        from ..processor import TextTokenizer

        torch.manual_seed(0)
        model = build_vlm(recipe)
        if model.tokenizer is None:  # no tokenizer without a checkpoint: one token per byte
            model.tokenizer = TextTokenizer.bytes_only(model.language_model.get_input_embeddings().num_embeddings)
        model.weights_source = "random"
    else:
        path = Path(weights)
        if not path.exists():
            if "/" in str(weights) and not str(weights).startswith((".", "/")) and str(weights).count("/") == 1:
                path = _fetch(recipe, str(weights), revision if fam.hub_revisions else None)
            else:
                raise CheckpointError(f"no checkpoint at {weights}", f"pass {fam.checkpoint_help}")
        model = fam.load(recipe, path, revision).eval()
        model.weights_source = str(weights)
    if dtype is not None:
        model = model.to(dtype)
    return model
