"""The zoo: every registered model is listed, counted, reparameterized and exported in tests."""
import numpy as np
import pytest

from edgevlm.errors import UnknownNameError
from edgevlm.zoo import get_recipe, list_models

from conftest import randomize_inference_stats

# Every registered model must appear here; test_every_registered_model_is_tested guards it.
TESTED = {
    "fastvit_t8", "fastvit_t12", "fastvit_s12", "fastvit_sa12", "fastvit_sa24", "fastvit_sa36", "fastvit_ma36",
    "tiny_vit_5m_224", "tiny_vit_11m_224", "tiny_vit_21m_224", "tiny_vit_21m_384", "tiny_vit_21m_512",
}
ALL = [r.name for r in list_models()]


def test_every_registered_model_is_tested():
    assert set(ALL) == TESTED, f"untested: {set(ALL) - TESTED}; stale: {TESTED - set(ALL)}"


def test_zoo_has_both_families():
    fams = {r.family for r in list_models()}
    assert fams == {"fastvit", "tinyvit"}


@pytest.mark.parametrize("name", ALL)
def test_recipe_params_match_timm_on_meta_device(name):
    import timm
    import torch

    r = get_recipe(name)
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == r.params


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError) as e:
        get_recipe("fastvit_t9")
    assert "fastvit_t8" in str(e.value)


@pytest.mark.parametrize("name", [n for n in ALL if get_recipe(n).reparameterizable])
def test_reparameterization_keeps_outputs(name):
    """Outputs before and after folding agree; the train-time branches are really gone."""
    import timm
    import torch

    from edgevlm.compress.reparam import count_branches, reparameterize_checked, reparameterize_model

    torch.manual_seed(0)
    model = randomize_inference_stats(timm.create_model(name, num_classes=10).eval())
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert count_branches(model) > 0
    folded, rec = reparameterize_checked(model, x)
    assert count_branches(folded) == 0
    assert rec["params_after"] < rec["params_before"]
    with torch.no_grad():
        ref = model(torch.from_numpy(x))
        out = folded(torch.from_numpy(x))
    scale = ref.abs().max().item()
    assert scale > 0.01  # the check below means something only with non-trivial outputs
    assert (ref - out).abs().max().item() <= 1e-5 * scale
    # Idempotent: folding a folded model changes nothing.
    again = reparameterize_model(folded)
    with torch.no_grad():
        assert torch.equal(again(torch.from_numpy(x)), out)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_model_exports_and_runs(name, tmp_path, sample_image):
    """Tiny input, random weights: export FP32 ONNX, check parity, run the bundle without torch."""
    from edgevlm import runtime
    from edgevlm.build import export_bundle
    from edgevlm.config import ExportConfig, QuantConfig

    out, m = export_bundle(ExportConfig(model=name, target="cpu", quant=QuantConfig(precision="fp32"),
                                        weights="random", num_classes=10, img_size=64, out=tmp_path / "b",
                                        validate_accuracy=False), quiet=True)
    par = m["artifacts"][0]["parity"]
    assert par["passed"] is True and par["max_abs_diff"] <= 1e-4
    assert m["model"]["input_size"] == 64 and m["weights"]["random"] is True
    preds = runtime.load(out).classify(sample_image, top_k=3)
    assert len(preds) == 3 and abs(sum(p.score for p in preds)) <= 1.0 + 1e-6
