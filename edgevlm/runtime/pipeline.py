"""The classification pipeline: image -> preprocessing (numpy/Pillow) -> backend -> top-k labels."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import preprocess


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float  # softmax probability


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """A loaded classification bundle."""

    def __init__(self, path: Path, manifest: dict, session):
        self.path = Path(path)
        self.manifest = manifest
        self.session = session
        self.labels: list[str] = manifest["labels"]
        self.preprocessing: dict = manifest["preprocessing"]

    @property
    def backend(self) -> str:
        return self.session.name

    def preprocess(self, image) -> np.ndarray:
        """(1, 3, H, W) float32, exactly as at export time."""
        return preprocess(image, self.preprocessing)[None]

    def logits(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Logits for a preprocessed (N, 3, H, W) batch, split to the backend's batch limit."""
        step = self.session.fixed_batch or batch_size
        return np.concatenate([self.session.run(x[i:i + step]) for i in range(0, len(x), step)])

    def classify(self, image, top_k: int = 5) -> list[Prediction]:
        probs = softmax(self.logits(self.preprocess(image))[0].astype(np.float64))
        top = np.argsort(-probs)[: max(1, min(top_k, len(probs)))]
        return [Prediction(self.labels[i], int(i), float(probs[i])) for i in top]

    def verify(self):
        """Run the bundle's golden cases; a :class:`edgevlm.runtime.golden.Report` (``.passed``, ``.rows``)."""
        from .golden import verify

        return verify(self)
