"""``edgevlm.export``: the one entry to the export pipeline for every model kind.

>>> import edgevlm
>>> out, manifest = edgevlm.export()                                   # the default model (a VLM), cpu, int8
>>> out, manifest = edgevlm.export("moondream2", target="jetson", precision="int4", weights="random")
>>> out, manifest = edgevlm.export("fastvit_t8", target="ios", num_classes=10)

The model's name picks its kind (a zoo VLM or a vision backbone); the keyword options are the fields of that
kind's typed config (:class:`edgevlm.config.VLMExportConfig`, :class:`edgevlm.config.ExportConfig` with its
:class:`~edgevlm.config.QuantConfig`), checked there. An option of the other kind is refused, never ignored.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import ExportConfig, QuantConfig, VLMExportConfig
from .errors import ConfigError

_QUANT = {f.name for f in dataclasses.fields(QuantConfig)} - {"precision"}


def options_of(kind_config) -> set[str]:
    """The keyword options ``export`` takes for a kind (its config's fields, the classifier's quant fields flat)."""
    names = {f.name for f in dataclasses.fields(kind_config)} - {"model", "quant"}
    return names | (_QUANT if kind_config is ExportConfig else set())


def config_for(model: str | None = None, target: str | None = None, precision: str | None = None, **options):
    """The typed config of ``model``'s kind from flat options; refuses an option that kind does not take."""
    from .zoo import DEFAULT_MODEL, is_vlm, resolve_vlm

    name = model or DEFAULT_MODEL
    ref = resolve_vlm(name, options.get("weights"), options.get("revision"))
    if ref is not None:                    # a checkpoint directory or hub id named as the model
        name = ref.name
        options.update({k: v for k, v in (("weights", ref.weights), ("revision", ref.revision)) if v is not None})
    vlm = is_vlm(name)
    kind = VLMExportConfig if vlm else ExportConfig
    unknown = sorted(set(options) - options_of(kind))
    if unknown:
        other = ExportConfig if vlm else VLMExportConfig
        what = "a vision-language model" if vlm else "a vision backbone"
        known_elsewhere = [u for u in unknown if u in options_of(other)]
        raise ConfigError(f"option(s) {', '.join(unknown)} do not apply to {name}, {what}"
                          + (" (they are for the other model kind)" if known_elsewhere else ""),
                          f"use: {', '.join(sorted(options_of(kind)))}")
    if target is not None:
        options["target"] = target
    if vlm:
        return VLMExportConfig(model=name, precision=precision, **options)
    quant = QuantConfig(precision=precision, **{k: options.pop(k) for k in list(options) if k in _QUANT})
    return ExportConfig(model=name, quant=quant, **options)


def export_config(cfg, quiet: bool = False, model=None) -> tuple[Path, dict]:
    """Run the pipeline on a typed config of either kind; ``model``: an already loaded VLM to export."""
    if isinstance(cfg, VLMExportConfig):
        from .build_vlm import export_vlm_bundle

        return export_vlm_bundle(cfg, quiet=quiet, model=model)
    if model is not None:
        raise ConfigError("passing a loaded model is for VLMs", "export a backbone by its zoo name and --weights")
    from .build import export_bundle

    return export_bundle(cfg, quiet=quiet)


def export(model: str | None = None, target: str | None = None, precision: str | None = None, *, quiet: bool = False,
           **options) -> tuple[Path, dict]:
    """Export ``model`` (a zoo name; default: the shipped default model) for ``target`` (default cpu) at ``precision``
    (default: the target profile's) to a validated bundle; returns (bundle path, manifest). A typed config
    (``ExportConfig`` / ``VLMExportConfig``) may be passed as ``model`` instead."""
    if isinstance(model, (ExportConfig, VLMExportConfig)):
        if options or precision is not None or target is not None:
            raise ConfigError("pass either a config or options, not both", "put the options into the config")
        return export_config(model, quiet=quiet)
    return export_config(config_for(model, target, precision, **options), quiet=quiet)
