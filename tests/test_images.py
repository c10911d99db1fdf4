"""Image decoding and preprocessing: safe, strict, and equal to timm's eager transforms."""
import numpy as np
import pytest
from PIL import Image

from edgevlm.data.images import load_image, preprocess
from edgevlm.errors import ImageError
from edgevlm.zoo import PreprocessSpec, get_recipe


def test_non_image_file_is_refused(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("not an image")
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert "not a decodable image" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no image file"):
        load_image(tmp_path / "x.png")


def test_decompression_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(p)  # 81 MP of pixels in a few kB
    assert p.stat().st_size < 100_000
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert "MP" in str(e.value) or "bomb" in str(e.value)


def test_too_small_image_is_refused(tmp_path):
    p = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(p)
    with pytest.raises(ImageError, match="smaller than"):
        load_image(p)


def test_array_input_must_be_uint8():
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((32, 32, 3), np.float32))


@pytest.mark.parametrize("name", ["fastvit_t8", "tiny_vit_5m_224", "fastvit_ma36", "tiny_vit_21m_384"])
def test_preprocessing_matches_timm_eval_transform(name, rng):
    """Our numpy/Pillow path gives the tensors timm's own eval transform gives."""
    from timm.data import create_transform

    r = get_recipe(name)
    pre = r.preprocess
    tf = create_transform(input_size=(3, pre.input_size, pre.input_size), interpolation=pre.interpolation,
                          mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct, crop_mode="center")
    img = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    ours = preprocess(img, pre)
    theirs = tf(img).numpy()
    assert ours.shape == theirs.shape == (3, pre.input_size, pre.input_size)
    assert np.abs(ours - theirs).max() < 1e-5


def test_preprocess_accepts_manifest_dict(rng):
    pre = PreprocessSpec(64, "bilinear", 1.0, (0.5,) * 3, (0.5,) * 3)
    img = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    assert np.array_equal(preprocess(img, pre), preprocess(img, pre.to_dict()))
