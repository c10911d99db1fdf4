"""Weights from files and hubs: safe loading, head sizes, and errors that name the fix."""
import pickle

import pytest
import torch

from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.modeling.vision import load_backbone


def _save_random(name, path, num_classes=10, fmt="safetensors"):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    m = timm.create_model(name, num_classes=num_classes).eval()
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return m


def _same_outputs(a, b):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def test_safetensors_file_loads_exactly(tmp_path):
    ref = _save_random("fastvit_t8", tmp_path / "w.safetensors")
    bb = load_backbone("fastvit_t8", str(tmp_path / "w.safetensors"))
    assert bb.num_classes == 10 and bb.weights["kind"] == "file" and len(bb.weights["sha256"]) == 64
    assert _same_outputs(ref, bb.model)


def test_hugging_face_directory_layout_loads(tmp_path):
    (tmp_path / "repo").mkdir()
    ref = _save_random("fastvit_t8", tmp_path / "repo" / "model.safetensors")
    bb = load_backbone("fastvit_t8", str(tmp_path / "repo"))
    assert _same_outputs(ref, bb.model)


def test_weights_only_pth_state_dict_loads(tmp_path):
    ref = _save_random("fastvit_t8", tmp_path / "w.pth", fmt="pth")
    assert _same_outputs(ref, load_backbone("fastvit_t8", str(tmp_path / "w.pth")).model)


class _Evil:
    def __reduce__(self):
        return (print, ("this would run at unpickling time",))


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    with p.open("wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError) as e:
        load_backbone("fastvit_t8", str(p))
    assert "pickle" in str(e.value) and "safetensors" in str(e.value)


def test_truncated_safetensors_is_reported(tmp_path):
    _save_random("fastvit_t8", tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_backbone("fastvit_t8", str(tmp_path / "cut.safetensors"))
    assert "corrupt" in str(e.value) or "truncated" in str(e.value)


def test_missing_checkpoint_is_reported(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_backbone("fastvit_t8", str(tmp_path / "nope.safetensors"))
    assert "no checkpoint" in str(e.value)


def test_wrong_architecture_lists_keys(tmp_path):
    _save_random("tiny_vit_5m_224", tmp_path / "tv.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_backbone("fastvit_t8", str(tmp_path / "tv.safetensors"))
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg and "stem." in msg


def test_shape_mismatch_is_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_random("fastvit_t8", tmp_path / "w.safetensors")
    sd = load_file(str(tmp_path / "w.safetensors"))
    sd["stem.0.conv_kxk.0.conv.weight"] = torch.zeros(1, 1, 1, 1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_backbone("fastvit_t8", str(tmp_path / "bad.safetensors"))
    assert "mis-shaped" in str(e.value) and "stem.0.conv_kxk.0.conv.weight" in str(e.value)


def test_imagenet22k_head_is_read_from_checkpoint(tmp_path):
    """timm's default TinyViT tag carries a 21,841-class head: the size comes from the weights."""
    _save_random("tiny_vit_5m_224", tmp_path / "in22k.safetensors", num_classes=21841)
    bb = load_backbone("tiny_vit_5m_224", str(tmp_path / "in22k.safetensors"))
    assert bb.num_classes == 21841 and len(bb.labels) == 21841
    with pytest.raises(CheckpointError) as e:
        load_backbone("tiny_vit_5m_224", str(tmp_path / "in22k.safetensors"), num_classes=1000)
    assert "21841" in str(e.value) and "omit --num-classes" in str(e.value)


def test_reparameterized_checkpoint_loads(tmp_path):
    """A checkpoint saved after folding (reparam_conv keys) builds the model in inference mode."""
    import timm
    from safetensors.torch import save_file

    from edgevlm.compress.reparam import reparameterize_model

    m = reparameterize_model(timm.create_model("fastvit_t8", num_classes=10).eval())
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "rep.safetensors"))
    assert _same_outputs(m, load_backbone("fastvit_t8", str(tmp_path / "rep.safetensors")).model)


def test_hub_id_without_network_says_how_to_get_the_file():
    with pytest.raises(CheckpointError) as e:
        load_backbone("fastvit_t8", "fastvit_t8.apple_in1k")
    assert "--weights PATH" in str(e.value)


def test_hub_id_for_another_model_is_refused():
    with pytest.raises(CheckpointError) as e:
        load_backbone("fastvit_t8", "tiny_vit_5m_224.in1k")
    assert "--model tiny_vit_5m_224" in str(e.value)


def test_model_without_shipped_weights_needs_weights():
    with pytest.raises(ConfigError) as e:
        load_backbone("fastvit_sa12")
    assert "--weights" in str(e.value)


def test_random_weights_are_marked_random():
    bb = load_backbone("fastvit_t8", "random", num_classes=5)
    assert bb.weights["random"] is True and bb.num_classes == 5 and bb.labels[0] == "class_0"


def test_shipped_digits_weights_carry_their_facts():
    bb = load_backbone("fastvit_t8")
    assert bb.dataset == "digits" and bb.labels == [str(i) for i in range(10)]
    assert bb.preprocess.input_size == 64 and bb.weights["kind"] == "shipped"
