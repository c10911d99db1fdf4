"""The model zoo: recipes read from models/*.yaml into typed, registered entries."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from .errors import ConfigError
from .registry import Registry
from .resources import zoo_dir


@dataclass(frozen=True)
class PreprocessSpec:
    """Image preprocessing, in the words of timm's pretrained configs."""

    input_size: int
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ConfigError(f"unknown interpolation {self.interpolation!r}", "use bilinear, bicubic or nearest")
        if not 0.5 <= self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct {self.crop_pct} is out of range", "use a value in [0.5, 1.0]")

    @property
    def resize(self) -> int:
        """The shorter side before the centre crop."""
        return int(math.floor(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        return {
            "input_size": self.input_size, "resize": self.resize, "interpolation": self.interpolation,
            "crop_pct": self.crop_pct, "mean": list(self.mean), "std": list(self.std),
            "channel_order": "RGB", "layout": "NCHW", "scale": 1 / 255,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(int(d["input_size"]), d.get("interpolation", "bicubic"), float(d.get("crop_pct", 1.0)),
                   tuple(d.get("mean", cls.mean)), tuple(d.get("std", cls.std)))


@dataclass(frozen=True)
class ModelRecipe:
    name: str
    family: str
    task: str
    builder: str
    params: int
    input_size: int
    reparameterizable: bool
    preprocess: PreprocessSpec
    hub_tags: tuple[str, ...] = ()
    weights: dict = field(default_factory=dict)     # shipped tag -> path relative to models/
    default_weights: str | None = None
    card: str | None = None
    source: Path | None = None

    def shipped_weights(self, tag: str) -> Path:
        return zoo_dir() / self.weights[tag]

    def describe_weights(self) -> str:
        tags = [f"{t} (shipped)" for t in self.weights] + [f"{self.name}.{t} (hub)" for t in self.hub_tags]
        return ", ".join(tags) or "none"


MODELS: Registry[ModelRecipe] = Registry("model")


@dataclass(frozen=True)
class VLMRecipe:
    """A vision-language model: its family, architecture config, processor and where weights come from."""

    name: str
    family: str
    params: int                        # expected parameter count (the published figure for real sizes)
    config: dict                       # architecture, interpreted by the family's builder
    image: dict                        # processor.ImageSpec fields
    prompt: dict                       # processor.PromptSpec fields
    hub_id: str | None = None          # Hugging Face repo of the released checkpoint
    revisions: tuple[str, ...] = ()    # checkpoint revisions edgevlm reads
    tiny: bool = False                 # a test-size variant with the family's architecture
    published_params: float | None = None  # the figure the authors publish (tests compare within 2%)
    published_parts: tuple[str, ...] = ()  # the parts that figure counts (empty: the whole model)
    weights: dict = field(default_factory=dict)
    default_weights: str | None = None
    card: str | None = None
    source: Path | None = None
    task: str = "vlm"
    training: dict = field(default_factory=dict)   # how the shipped weights were trained (`edgevlm train`)
    model_types: tuple[str, ...] = ()  # config.json model_type(s) of the checkpoints this recipe reads, when a
    #                                    user names the checkpoint itself (a directory or hub id) as the model

    def shipped_weights(self, tag: str) -> Path:
        return zoo_dir() / self.weights[tag]


VLMS: Registry[VLMRecipe] = Registry("VLM")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _vlm_recipe(name: str, d: dict, path: Path) -> VLMRecipe:
    return VLMRecipe(name=name, family=d["family"], params=int(d["params"]), config=d.get("config", {}),
                     image=d["image"], prompt=d.get("prompt", {}), hub_id=d.get("hub_id"),
                     revisions=tuple(d.get("revisions", ())), tiny=bool(d.get("tiny", False)),
                     published_params=float(d["published_params"]) if d.get("published_params") else None,
                     published_parts=tuple(d.get("published_parts", ())),
                     weights=dict(d.get("weights", {})), default_weights=d.get("default_weights"),
                     card=d.get("card"), source=path, training=dict(d.get("training", {})),
                     model_types=tuple(d.get("model_types", ())))


def _recipes_from(path: Path) -> list:
    data = yaml.safe_load(path.read_text())
    shared = {k: v for k, v in data.items() if k != "variants"}
    out = []
    for name, over in data["variants"].items():
        d = _merge(shared, over)
        if d.get("task") == "vlm":
            out.append(_vlm_recipe(name, d, path))
            continue
        pre = dict(d.get("preprocess", {}))
        out.append(ModelRecipe(
            name=name, family=d["family"], task=d["task"], builder=d["builder"], params=int(d["params"]),
            input_size=int(d["input_size"]), reparameterizable=bool(d.get("reparameterizable", False)),
            preprocess=PreprocessSpec(input_size=int(d["input_size"]), **pre),
            hub_tags=tuple(d.get("hub_tags", ())), weights=dict(d.get("weights", {})),
            default_weights=d.get("default_weights"), card=d.get("card"), source=path,
        ))
    return out


@lru_cache(maxsize=None)
def _load() -> Registry[ModelRecipe]:
    for path in sorted(zoo_dir().glob("*.yaml")):
        for recipe in _recipes_from(path):
            if recipe.name in MODELS or recipe.name in VLMS:
                raise ConfigError(f"{recipe.name} is defined twice ({path.name})", "rename one of the variants")
            (VLMS if recipe.task == "vlm" else MODELS).add(recipe.name, recipe)
    return MODELS


def get_recipe(name: str) -> ModelRecipe:
    reg = _load()
    if name in VLMS and name not in reg:
        raise ConfigError(f"{name} is a vision-language model; this command takes a vision backbone",
                          f"use `edgevlm generate --model {name}` or `edgevlm info --model {name}`")
    return reg.get(name)


def get_vlm_recipe(name: str) -> VLMRecipe:
    _load()
    return VLMS.get(name)


def is_vlm(name: str) -> bool:
    _load()
    return name in VLMS


@dataclass(frozen=True)
class ModelRef:
    """A VLM named as a user named it, resolved: the zoo recipe that reads it, its weights and revision."""

    name: str
    weights: str | None
    revision: str | None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.\-/]+)?$")


def resolve_vlm(ref: str, weights: str | None = None, revision: str | None = None) -> ModelRef | None:
    """A model reference as Hugging Face users write it: a zoo name, a local checkpoint directory (its
    config.json's ``model_type`` picks the recipe), or a hub id with an optional ``@revision`` (a recipe's own hub
    id, else the hub's config.json, read through huggingface_hub, which honours ``HF_HUB_OFFLINE`` and
    ``HF_HOME``). None when ``ref`` names no VLM (a backbone's name, or nothing edgevlm knows)."""
    _load()
    ref = str(ref)
    if ref in VLMS:
        return ModelRef(ref, weights, revision)
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            return None
        _one_checkpoint(ref, weights)
        return ModelRef(_recipe_for(_model_type(path / "config.json"), ref), str(path), revision)
    if not _HUB_ID.match(ref):
        return None
    repo, _, rev = ref.partition("@")
    if rev and revision and rev != revision:
        raise ConfigError(f"{ref} names revision {rev} and --revision says {revision}", "give the revision once")
    rev = rev or revision
    _one_checkpoint(ref, weights)
    for recipe in (VLMS.get(n) for n in VLMS.names()):
        if recipe.hub_id == repo:
            return ModelRef(recipe.name, repo, rev)
    try:
        from huggingface_hub import hf_hub_download

        config = Path(hf_hub_download(repo, "config.json", revision=rev))
    except Exception as e:               # offline, unreachable, unknown repo or revision: the library's own words
        raise ConfigError(f"could not read {repo}'s config.json from the Hugging Face hub or its cache "
                          f"({type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''})",
                          f"download it on a connected machine (huggingface-cli download {repo}) and pass the "
                          "directory") from None
    return ModelRef(_recipe_for(_model_type(config), repo), repo, rev)


def checkpoint_config_dir(ref: ModelRef) -> Path | None:
    """Where a resolved reference's config.json lies, when its weights are a user's checkpoint (a directory, or a
    hub id other than the recipe's own, from the Hugging Face cache); None for a zoo name's own weights."""
    w = ref.weights
    if w is None or w == "random":
        return None
    if Path(w).expanduser().is_dir():
        return Path(w).expanduser()
    recipe = VLMS.get(ref.name)
    if not _HUB_ID.match(w) or w == recipe.hub_id:
        return None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(w, "config.json", revision=ref.revision)).parent
    except Exception as e:
        raise ConfigError(f"could not read {w}'s config.json from the Hugging Face hub or its cache "
                          f"({type(e).__name__})", f"download it on a connected machine (huggingface-cli download "
                          f"{w}) and pass the directory") from None


def _one_checkpoint(ref: str, weights: str | None) -> None:
    if weights is not None and str(weights) != ref:
        raise ConfigError(f"the model {ref} is a checkpoint and --weights names another ({weights})",
                          "name the checkpoint once: as the model, or as --weights with its zoo model")


def _model_type(config: Path) -> str:
    import json

    try:
        cfg = json.loads(config.read_text())
    except (ValueError, OSError, RecursionError) as e:
        raise ConfigError(f"{config} is not readable JSON ({str(e).splitlines()[0][:100] if str(e) else e})",
                          "download config.json again") from None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not isinstance(mt, str):
        raise ConfigError(f"{config} names no model_type", "pass a Hugging Face checkpoint directory (config.json "
                          "with model_type)")
    return mt


def _recipe_for(model_type: str, where: str) -> str:
    readers = {mt: r.name for r in (VLMS.get(n) for n in VLMS.names()) for mt in r.model_types}
    if model_type not in readers:
        raise ConfigError(f"{where} is a {model_type!r} checkpoint, which edgevlm does not read",
                          f"supported model_type values: {', '.join(sorted(readers))}")
    return readers[model_type]


def list_vlms() -> list[VLMRecipe]:
    _load()
    return [VLMS.get(n) for n in VLMS.names()]


def list_models() -> list[ModelRecipe]:
    reg = _load()
    return [reg.get(n) for n in reg.names()]


# The model `edgevlm export` (and the demo) use when no --model is given: edgevlm's own VLM, trained here
# and shipped in models/weights. DEFAULT_BACKBONE is the default image classifier (`edgevlm eval`, docs).
DEFAULT_MODEL = "edgevlm_scenes"
DEFAULT_BACKBONE = "fastvit_t8"
