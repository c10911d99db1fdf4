"""Where the shipped data lives: models/ (the zoo) and export/ (target profiles).

In a checkout they are the top-level folders; in a wheel they are the packages
``edgevlm._zoo`` and ``edgevlm._targets`` (see pyproject.toml).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=None)
def _locate(package: str, folder: str) -> Path:
    checkout = _REPO / folder
    if (checkout / ".edgevlm-data").exists():
        return checkout
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return checkout


def zoo_dir() -> Path:
    """The folder of model recipes, cards, shipped weights and sample images."""
    return _locate("edgevlm._zoo", "models")


def targets_dir() -> Path:
    """The folder of target device profiles."""
    return _locate("edgevlm._targets", "export")
