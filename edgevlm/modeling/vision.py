"""Vision backbones (TinyViT, FastViT) from timm, with weights from files, hubs or the zoo.

Architectures come from timm; edgevlm adds weight resolution, strict key checks with
readable errors, head-size handling and the facts a bundle needs (preprocessing, labels).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, ConfigError
from ..registry import Registry
from ..zoo import ModelRecipe, PreprocessSpec, get_recipe
from .checkpoint import PICKLE_SUFFIXES, fit_state_dict, load_state_dict, read_metadata, resolve_file
from .keymaps import apple_fastvit_reparam_fixups, cream_tinyvit_to_timm, is_cream_tinyvit

# Per-family filters that turn an upstream checkpoint layout into timm's key names: timm's own
# filters, plus edgevlm's key maps (keymaps.py) where timm's do not cover the released files.
CHECKPOINT_FILTERS: Registry[Callable] = Registry("checkpoint filter")


@CHECKPOINT_FILTERS.register("fastvit")
def _fastvit_filter(sd, model):
    from timm.models.fastvit import checkpoint_filter_fn

    # timm recognises its own layout by a train-time stem key; a reparameterized timm checkpoint
    # lacks it and would be remapped as if it were apple's original layout.
    if any(k.startswith(("stem.", "stages.")) for k in sd):
        return sd
    return apple_fastvit_reparam_fixups(checkpoint_filter_fn(sd, model))


@CHECKPOINT_FILTERS.register("tinyvit")
def _tinyvit_filter(sd, model):
    from timm.models.tiny_vit import checkpoint_filter_fn

    # timm's filter keeps key names (and looks attention_biases up by them): rename Cream's layout first.
    if is_cream_tinyvit(sd):
        sd = cream_tinyvit_to_timm(sd)
    return checkpoint_filter_fn(sd, model)


# Key names of the classifier weight, in timm layout and in the upstream layouts.
HEAD_KEYS = ("head.fc.weight", "head.weight", "module.head.weight", "model.head.weight")


@dataclass
class Backbone:
    """A built backbone with everything the exporter and the bundle need to know."""

    model: "torch.nn.Module"  # noqa: F821
    recipe: ModelRecipe
    num_classes: int
    preprocess: PreprocessSpec
    labels: list[str]
    weights: dict = field(default_factory=dict)   # source, kind, sha256, random, dataset, ...

    @property
    def dataset(self) -> str | None:
        """The labelled evaluation set these weights were trained for (e.g. 'digits'), if any."""
        return self.weights.get("dataset")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_backbone(recipe: ModelRecipe, num_classes: int, inference_mode: bool = False):
    """A timm model in eval mode with random weights."""
    import timm

    kwargs = {"num_classes": num_classes}
    if inference_mode:
        kwargs["inference_mode"] = True
    return timm.create_model(recipe.name, pretrained=False, **kwargs).eval()


def _head_classes(sd: dict) -> int | None:
    for k in HEAD_KEYS:
        if k in sd and sd[k].ndim == 2:
            return int(sd[k].shape[0])
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_labels(n: int) -> list[str]:
    return [f"class_{i}" for i in range(n)]


def _imagenet_labels(model, n: int) -> list[str]:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            return [info.index_to_description(i) for i in range(n)]
    except Exception:
        pass
    return _default_labels(n)


def _check_classes(requested: int | None, found: int, source: str) -> None:
    if requested is not None and requested != found:
        raise CheckpointError(
            f"--num-classes {requested} does not match the {found}-class head in {source}",
            f"omit --num-classes (the head size is read from the checkpoint) or pass --num-classes {found}",
        )


def load_backbone(name: str, weights: str | None = None, num_classes: int | None = None,
                  seed: int = 0) -> Backbone:
    """Build ``name`` and load ``weights``: a path, a shipped tag, a hub id, or 'random'."""
    import torch

    recipe = get_recipe(name)
    if weights is None:
        if recipe.default_weights is None:
            raise ConfigError(
                f"{name} has no shipped weights, so --weights is required",
                f"pass --weights PATH (safetensors or .pth), a hub id ({recipe.describe_weights()}), or random",
            )
        weights = recipe.default_weights
    tag = weights[len(name) + 1:] if weights.startswith(name + ".") else weights

    if weights == "random":
        n = num_classes or 1000
        torch.manual_seed(seed)
        model = build_backbone(recipe, n)
        return Backbone(model, recipe, n, recipe.preprocess, _default_labels(n),
                        {"source": "random", "kind": "random", "random": True, "seed": seed})
    if tag in recipe.weights:
        return _from_file(recipe, recipe.shipped_weights(tag), num_classes, kind="shipped", tag=tag)
    if Path(weights).expanduser().exists():
        return _from_file(recipe, Path(weights).expanduser(), num_classes, kind="file")
    if weights.endswith((".safetensors",) + PICKLE_SUFFIXES) or os.sep in weights:
        raise CheckpointError(f"no checkpoint at {weights}", "check the path, or pass --weights random")
    return _from_hub(recipe, weights, num_classes)


def _from_file(recipe: ModelRecipe, path: Path, num_classes: int | None, kind: str, tag: str | None = None):
    path = resolve_file(path)
    sd = load_state_dict(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("model") and meta["model"] != recipe.name:
        raise CheckpointError(f"{path} holds {meta['model']} weights, not {recipe.name}",
                              f"pass --model {meta['model']}")
    inference_mode = any("reparam_conv" in k for k in sd)
    found = _head_classes(sd)
    if found is None:
        raise CheckpointError(f"{path} has no classifier head ({' / '.join(HEAD_KEYS[:2])})",
                              "export a classification checkpoint (with its head)")
    _check_classes(num_classes, found, str(path))
    model = build_backbone(recipe, found, inference_mode=inference_mode)
    sd = CHECKPOINT_FILTERS.get(recipe.family)(sd, model) if recipe.family in CHECKPOINT_FILTERS else sd
    fit_state_dict(model, sd, str(path))
    pre = PreprocessSpec.from_dict(meta["preprocess"]) if "preprocess" in meta else recipe.preprocess
    labels = meta.get("labels") or (
        _imagenet_labels(model, found) if found in (1000, 21841) else _default_labels(found))
    info = {"source": str(path) if kind == "file" else f"{recipe.name}.{tag}", "kind": kind, "random": False,
            "sha256": _sha256(path), "format": "pth.tar" if path.name.endswith(".pth.tar") else path.suffix.lstrip(".")}
    for k in ("dataset", "trained_with", "val_accuracy", "epochs"):
        if k in meta:
            info[k] = meta[k]
    return Backbone(model.eval(), recipe, found, pre, list(labels), info)


def _from_hub(recipe: ModelRecipe, hub_id: str, num_classes: int | None) -> Backbone:
    import timm

    name = hub_id[len("hf-hub:"):] if hub_id.startswith("hf-hub:") else hub_id
    if "/" not in name and "." not in name:
        raise CheckpointError(
            f"unknown weights {hub_id!r} for {recipe.name}",
            f"pass a path, random, or one of: {recipe.describe_weights()}",
        )
    arch = name.split("/")[-1].split(".")[0]
    if "/" not in name and arch != recipe.name:
        raise CheckpointError(f"hub id {hub_id} is for {arch}, not {recipe.name}", f"pass --model {arch}")
    timm_id = hub_id if hub_id.startswith("hf-hub:") or "/" not in name else f"hf-hub:{name}"
    try:
        model = timm.create_model(timm_id, pretrained=True)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise CheckpointError(f"{hub_id} is not a known pretrained tag",
                                  f"use one of: {recipe.describe_weights()}") from None
        raise CheckpointError(f"could not fetch {hub_id} ({str(e).splitlines()[0][:120]})",
                              "download model.safetensors on a connected machine and pass --weights PATH") from None
    except Exception as e:  # network errors, offline mode, missing files on the hub
        raise CheckpointError(
            f"could not fetch {hub_id} from the model hub ({type(e).__name__}: {str(e).splitlines()[0][:100]})",
            "download model.safetensors on a connected machine and pass --weights PATH",
        ) from None
    found = model.num_classes
    _check_classes(num_classes, found, hub_id)
    cfg = model.pretrained_cfg
    pre = PreprocessSpec(input_size=cfg["input_size"][-1], interpolation=cfg.get("interpolation", "bicubic"),
                         crop_pct=cfg.get("crop_pct", 1.0), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    return Backbone(model.eval(), recipe, found, pre, _imagenet_labels(model, found),
                    {"source": hub_id, "kind": "hub", "random": False})


def timm_without_drop_path(timm_module: str):
    """Build a timm model with zero drop-path rates, also under FakeTensorMode.

    timm turns its drop-path schedule into floats with ``tensor.item()``/``tolist()``, which a fake
    (shape-only) tensor cannot answer; the parameter counts and FLOP counts build models that way.
    Inference has no drop path, so the schedule is all zeros.
    """
    from unittest import mock

    def zeros(rate, depths, stagewise: bool = False, **_):
        if isinstance(depths, int):
            return [0.0] * depths
        return [[0.0] * d for d in depths] if stagewise else [0.0] * sum(depths)

    return mock.patch(f"timm.models.{timm_module}.calculate_drop_path_rates", zeros)
