"""Every backbone of the zoo, converted to a Core ML ML Program as the ios exporter converts it, runs through edgevlm's
reference ML-program interpreter with every op covered and answers like eager PyTorch (FP32 program, random weights:
the ops, not the weights, are what is checked). FastViT takes 64 px here; TinyViT's window attention is built for its
recipe's input size, which it keeps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="the ios target converts with coremltools (the coreml extra)")
pytest.importorskip("timm", reason="the zoo's backbones are timm models")

from edgevlm.runtime.mil import load_package
from edgevlm.zoo import list_models

BACKBONES = sorted(r.name for r in list_models())


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_zoo_backbone_runs_through_the_interpreter_like_eager(name, tmp_path):
    import timm
    from timm.utils.model import reparameterize_model

    from edgevlm.exporters import coreml as C
    from edgevlm.zoo import get_recipe

    torch.manual_seed(0)
    model = reparameterize_model(timm.create_model(name, pretrained=False, num_classes=10).eval())
    size = 64 if name.startswith("fastvit") else int(get_recipe(name).input_size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
        traced = torch.jit.trace(model, x)
    with C._quiet():
        C.convert(traced, size, "iOS16", fp16=False).save(str(tmp_path / "m.mlpackage"))
    prog = load_package(tmp_path / "m.mlpackage")
    assert prog.uncovered == [], prog.uncovered
    out = prog.predict({"pixel_values": x.numpy()})["logits"]
    err = float(np.abs(out - ref).max() / max(1e-6, np.abs(ref).max()))
    assert err < 1e-4, f"{name}: max |diff| / max |eager| = {err:.2e}"
