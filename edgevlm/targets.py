"""Target device profiles, read from export/*.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import yaml

from .config import Precision
from .errors import ConfigError
from .registry import Registry
from .resources import targets_dir


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    format: str                     # onnx | ort | coreml
    runtime: str                    # onnxruntime | tensorrt | coreml
    precisions: tuple[Precision, ...]
    default_precision: Precision
    batch: dict
    providers: tuple[str, ...] = ()
    int8: dict = field(default_factory=dict)
    int4: dict = field(default_factory=dict)
    tensorrt: dict = field(default_factory=dict)
    minimum_deployment_target: dict = field(default_factory=dict)
    compute_units: str | None = None

    def check_precision(self, precision: Precision) -> None:
        if precision not in self.precisions:
            raise ConfigError(
                f"target {self.name} does not support {precision}",
                f"use --quant {' | '.join(p.value for p in self.precisions)}",
            )

    def to_dict(self) -> dict:
        d = {"name": self.name, "description": self.description, "format": self.format, "runtime": self.runtime,
             "batch": self.batch}
        for k in ("tensorrt", "minimum_deployment_target"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.providers:
            d["providers"] = list(self.providers)
        return d


TARGETS: Registry[TargetProfile] = Registry("target")


@lru_cache(maxsize=None)
def _load() -> Registry[TargetProfile]:
    for path in sorted(targets_dir().glob("*.yaml")):
        d = yaml.safe_load(path.read_text())
        d["precisions"] = tuple(Precision.parse(p) for p in d["precisions"])
        d["default_precision"] = Precision.parse(d["default_precision"])
        d["providers"] = tuple(d.get("providers", ()))
        TARGETS.add(d["name"], TargetProfile(**d))
    return TARGETS


def get_target(name: str) -> TargetProfile:
    return _load().get(name)


def list_targets() -> list[TargetProfile]:
    reg = _load()
    return [reg.get(n) for n in reg.names()]
