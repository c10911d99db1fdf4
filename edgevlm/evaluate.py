"""`edgevlm eval`: task accuracy of a bundle (through the runtime) or an eager zoo model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ConfigError
from .report import table, write_json


def _digits(pre: dict | object, split: str, limit: int | None):
    from .data import digits
    from .zoo import PreprocessSpec

    pre = PreprocessSpec.from_dict(pre) if isinstance(pre, dict) else pre
    if split not in digits.SPLITS:
        raise ConfigError(f"the {split} split is the scenes task's; the digits of an image classifier have "
                          f"{', '.join(digits.SPLITS)}", "pass --split test")
    x, y = digits.arrays(split, pre)
    return (x[:limit], y[:limit]) if limit else (x, y)


def evaluate_vlm(name: str, split: str = "test", limit: int | None = None, weights: str | None = None,
                 json_out=None, quiet: bool = False) -> dict:
    """An eager zoo VLM on the scenes task (bundles come with the VLM export)."""
    from . import evaluate_scenes
    from .modeling.families import load_vlm

    vlm = load_vlm(name, weights=weights)
    if getattr(vlm, "facts", {}).get("dataset") != "scenes":
        raise ConfigError(f"{name} with weights {weights or 'default'} was not trained on the scenes task",
                          "evaluate edgevlm_scenes (the shipped default VLM) or weights trained with "
                          "`edgevlm train --model edgevlm_scenes`")

    def answer(image, question, kind):
        return vlm.generate(image, question, max_new_tokens=96).text.strip()

    res = evaluate_scenes.run(answer, split, limit, progress=None if quiet else print)
    res.update({"model": name, "precision": "fp32", "engine": "eager PyTorch", "weights": vlm.weights_source})
    if not quiet:
        print(table(evaluate_scenes.rows(res), title=f"{name} (eager FP32) on the scenes {split} split: "
                    f"{res['scenes']} scenes, every question of each ({res['seconds']} s)"))
    write_json(json_out or Path("benchmarks/results") / f"eval-{name}-{split}.json", res)
    return res


def evaluate_vlm_bundle(vlm, split: str = "test", limit: int | None = None, json_out=None, quiet: bool = False) -> dict:
    """A VLM bundle (as the runtime runs it) on the scenes task."""
    from . import evaluate_scenes

    m = vlm.manifest
    if m["weights"].get("dataset") != "scenes":
        raise ConfigError(f"{vlm.path} holds {m['model']['name']}, which was not trained on the scenes task",
                          "evaluate a bundle exported from edgevlm_scenes")

    def answer(image, question, kind):
        return vlm.generate(image, question, max_new_tokens=96).text.strip()

    res = evaluate_scenes.run(answer, split, limit, progress=None if quiet else print)
    res.update({"model": m["model"]["name"], "bundle": str(vlm.path), "precision": m["precision"],
                "engine": vlm.backend, "weights": m["weights"].get("source")})
    if not quiet:
        print(table(evaluate_scenes.rows(res), title=f"{vlm.path} ({m['precision']}, {vlm.backend}) on the scenes "
                    f"{split} split: {res['scenes']} scenes, every question of each ({res['seconds']} s)"))
    write_json(json_out or Path("benchmarks/results") / f"eval-{Path(vlm.path).name}-{vlm.backend.replace('.', '')}"
               f"-{split}.json", res)
    return res


def evaluate(model_or_bundle: str, split: str = "test", limit: int | None = None, weights: str | None = None,
             json_out=None, quiet: bool = False, decoder: str | None = None) -> dict:
    from .zoo import is_vlm

    if is_vlm(model_or_bundle):
        return evaluate_vlm(model_or_bundle, split, limit, weights, json_out, quiet)
    path = Path(model_or_bundle)
    if (path / "manifest.json").is_file():
        from . import runtime

        clf = runtime.load(path, decoder=decoder)
        if clf.manifest.get("task") == "vlm":
            return evaluate_vlm_bundle(clf, split, limit, json_out, quiet)
        m = clf.manifest
        if m["weights"].get("dataset") != "digits":
            raise ConfigError(f"{path} was exported from weights with no labelled evaluation set",
                              "export weights trained with `edgevlm train` (e.g. --weights digits)")
        x, y = _digits(m["preprocessing"], split, limit)
        logits = clf.logits(x)
        name, precision, engine = m["model"]["name"], m["precision"], clf.backend
    else:
        import torch

        from .modeling.vision import load_backbone

        bb = load_backbone(model_or_bundle, weights)
        if bb.dataset != "digits":
            raise ConfigError(f"weights {bb.weights['source']} carry no labelled evaluation set",
                              "evaluate weights trained with `edgevlm train`, e.g. --weights digits")
        x, y = _digits(bb.preprocess, split, limit)
        with torch.no_grad():
            logits = np.concatenate([bb.model(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)])
        name, precision, engine = bb.recipe.name, "fp32", "eager pytorch"
    pred = logits.argmax(1)
    per_class = {str(c): float((pred[y == c] == c).mean()) for c in np.unique(y)}
    res = {"model": name, "precision": precision, "engine": engine, "task": "digits", "split": split,
           "images": int(len(y)), "top1": float((pred == y).mean()), "per_class": per_class}
    if not quiet:
        print(table([{k: res[k] for k in ("model", "precision", "engine", "split", "images", "top1")}],
                    title="edgevlm eval (top-1 on scikit-learn's handwritten digits)"))
        print("per class: " + "  ".join(f"{c}:{a:.3f}" for c, a in per_class.items()))
    if json_out:
        write_json(json_out, res)
    return res
