import os

import numpy as np
import pytest

# No model hub here or in CI: make hub look-ups fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def randomize_inference_stats(model, seed: int = 0):
    """Give BatchNorm statistics and layer scales non-trivial values, so that folding them is a real test."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if "layer_scale" in name or name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
    return model


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def sample_image():
    from pathlib import Path

    from edgevlm.resources import zoo_dir

    return Path(zoo_dir()) / "samples" / "digit_3.png"


@pytest.fixture(scope="session")
def fastvit():
    """A reparameterized random fastvit_t8 with a 10-class head, shared by the exporter tests."""
    import timm
    import torch

    from edgevlm.compress.reparam import reparameterize_model

    torch.manual_seed(0)
    return reparameterize_model(timm.create_model("fastvit_t8", num_classes=10))
