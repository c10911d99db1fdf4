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


# -- the bad-input corpus: nothing outside the test's scratch is written, no sentinel is read -----------------------
# Modules of the corpus (tests/test_containment.py, test_input_validation.py, test_manifest.py) set
# ``pytestmark = pytest.mark.usefixtures("no_writes_outside")``. An audit hook sees every file Python opens (native
# loaders' own opens are checked by the access-time snapshots in test_containment.py): opening for writing anywhere but
# the test's tmp_path, the system temp folder (edgevlm's scratch and staging) or bytecode caches fails the test, as does
# opening /etc/hostname (the escape tests' absolute-path target) for anything.
_AUDIT: dict = {"allowed": None, "bad": []}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
SENTINELS = ("/etc/hostname",)


def _audit(event, args):
    if event != "open" or _AUDIT["allowed"] is None:
        return
    path, mode, flags = args
    if path is None or isinstance(path, int):
        return
    p = os.path.abspath(os.fsdecode(path))
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
    if p in SENTINELS or (writing and not p.endswith(".pyc") and not p.startswith(_AUDIT["allowed"])):
        _AUDIT["bad"].append(f"{'wrote' if writing else 'read'} {p}")


import sys  # noqa: E402

sys.addaudithook(_audit)


@pytest.fixture
def no_writes_outside(tmp_path):
    import tempfile

    _AUDIT["allowed"], _AUDIT["bad"] = (str(tmp_path), tempfile.gettempdir(), "/dev/"), []
    try:
        yield
    finally:
        _AUDIT["allowed"] = None
    assert not _AUDIT["bad"], f"files outside the test's scratch were touched: {_AUDIT['bad'][:5]}"
