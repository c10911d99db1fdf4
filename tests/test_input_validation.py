"""Bad user input is a one-line edgevlm error naming the problem and the fix, never a traceback (issue 22, point 3):
prompts that are not valid text, sampling settings out of range, high bit-depth and broken images, and damaged
safetensors weights of the default VLM."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from edgevlm.cli import main
from edgevlm.errors import CheckpointError, ConfigError, ImageError
from edgevlm.generation import GenerationConfig, check_prompt, pick_token
from edgevlm.processor import ImageSpec, PromptSpec, TextTokenizer, preprocess_image, tokenize_prompt

pytestmark = pytest.mark.usefixtures("no_writes_outside")   # see tests/conftest.py


def one_line_error(capsys, *needles):
    """stderr holds exactly one line, the edgevlm error, naming each needle and a fix."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error:"), err
    assert "Traceback" not in err and "fix:" in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- 1. prompts that are not valid text --------------------------------------------------------------------------

BAD_PROMPTS = [
    pytest.param("\udcff", "not valid UTF-8 (byte 0xff", id="argv-byte-0xff-via-surrogateescape"),
    pytest.param("What is \udce9t\udce9?", "not valid UTF-8 (byte 0xe9", id="latin-1-bytes-via-surrogateescape"),
    pytest.param("half an emoji \ud83d", "lone surrogate U+D83D", id="lone-high-surrogate"),
    pytest.param("\udfff tail", "lone surrogate U+DFFF", id="lone-low-surrogate"),
    pytest.param(b"How many circles?", "bytes, not text", id="bytes"),
    pytest.param(42, "int, not text", id="not-a-string"),
    pytest.param("\x00", "control character U+0000", id="nul-only"),           # the demo soak answered it
    pytest.param("how many\x1b[2J circles?", "control character U+001B", id="terminal-escape"),
]


@pytest.fixture(scope="module")
def byte_tokenizer():
    return TextTokenizer.bytes_only(300)


@pytest.mark.parametrize("prompt, needle", BAD_PROMPTS)
def test_bad_prompt_is_a_config_error_where_every_prompt_is_tokenized(prompt, needle, byte_tokenizer):
    with pytest.raises(ConfigError, match="prompt") as e:
        check_prompt(prompt)
    assert needle in str(e.value) and "fix:" in str(e.value)
    # eager models and the bundle runtime's template prompts go through tokenize_prompt ...
    with pytest.raises(ConfigError) as e:
        tokenize_prompt(byte_tokenizer, PromptSpec(), prompt)
    assert needle in str(e.value)
    # ... Moondream's prompts (eager and bundle) straight through TextTokenizer.encode
    if isinstance(prompt, str):
        with pytest.raises(ConfigError) as e:
            byte_tokenizer.encode(" " + prompt)
        assert needle in str(e.value)


def _pipeline(kind: str, tokenizer):
    """What VLMPipeline.prompt_pieces reads of a loaded bundle (exporting one is slow)."""
    prompt = ({"kind": "template", "template": "USER: <image>\n{prompt} ASSISTANT:", "bos": True} if kind == "template"
              else {"kind": "moondream", "prefix": [1, 2], "suffix": [3], "bos_id": 256, "space_before_text": True})
    return SimpleNamespace(spec={"prompt": prompt}, tokenizer=tokenizer)


@pytest.mark.parametrize("kind", ["template", "moondream"])
def test_bundle_runtime_refuses_invalid_prompt_text(kind, byte_tokenizer):
    from edgevlm.runtime.vlm import VLMPipeline

    fake = _pipeline(kind, byte_tokenizer)
    with pytest.raises(ConfigError, match=r"not valid UTF-8 \(byte 0xff"):
        VLMPipeline.prompt_pieces(fake, "Which colour is it?\udcff", True)
    pieces = VLMPipeline.prompt_pieces(fake, "Wie viele Kreise? ✓ 🙂", True)        # valid non-ASCII text is fine
    assert pieces.n_text > len("Wie viele Kreise?")


def test_valid_unicode_prompt_round_trips(byte_tokenizer):
    text = "Combien de cercles ? 🙂 — ½"
    assert check_prompt(text) == text
    assert byte_tokenizer.decode(byte_tokenizer.encode(text)) == text


def test_eager_model_refuses_lone_surrogate_prompt():
    pytest.importorskip("transformers")
    from edgevlm.modeling.families import load_vlm

    vlm = load_vlm("llava_tiny", weights="random")
    with pytest.raises(ConfigError, match="lone surrogate U\\+D800"):
        vlm.generate(None, "\ud800 describe", max_new_tokens=2)


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "llava_tiny", "--weights", "random", "--prompt", "\udcff"],
    ["run", "/nonexistent-bundle", "--prompt", "\udcff"],
])
def test_cli_prompt_not_utf8_is_one_line(argv, capsys):
    assert main(argv) == 2
    one_line_error(capsys, "--prompt is not valid UTF-8 (byte 0xff")


def test_cli_prompt_bytes_from_a_real_argv():
    """`edgevlm generate --prompt $'\\xff'`: the byte reaches Python as U+DCFF; one line, exit code 2."""
    r = subprocess.run([sys.executable, "-m", "edgevlm", "generate", "--model", "llava_tiny", "--weights", "random",
                        "--prompt", b"\xff"], capture_output=True)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "not valid UTF-8 (byte 0xff" in lines[0] and "fix:" in lines[0], err


# -- 2. sampling settings ----------------------------------------------------------------------------------------

BAD_SAMPLING = [
    ({"temperature": float("nan")}, "temperature=nan is not a finite number"),
    ({"temperature": float("inf")}, "temperature=inf is not a finite number"),
    ({"temperature": -float("inf")}, "temperature=-inf is not a finite number"),
    ({"temperature": -0.5}, "temperature=-0.5 is negative"),
    ({"temperature": 5e-324}, "too small to sample with"),                    # the smallest denormal
    ({"temperature": 1e-310}, "too small to sample with"),
    ({"temperature": 1e300}, "absurdly large"),
    ({"temperature": "0.7"}, "is not a number"),
    ({"top_p": 0.0}, "outside (0, 1]"),
    ({"top_p": -0.1}, "outside (0, 1]"),
    ({"top_p": 1.5}, "outside (0, 1]"),
    ({"top_p": float("nan")}, "top_p=nan is not a finite number"),
    ({"top_p": float("inf")}, "top_p=inf is not a finite number"),
    ({"top_k": -1}, "top_k=-1 is negative"),
    ({"top_k": 2.5}, "top_k=2.5 is not a whole number"),
    ({"seed": -1}, "seed=-1 is negative"),
    ({"seed": 2**64}, "over 2**64 - 1"),
    ({"seed": 1.5}, "seed=1.5 is not a whole number"),
    ({"max_new_tokens": 0}, "less than one token"),
    ({"max_new_tokens": -3}, "less than one token"),
    ({"max_new_tokens": 10**12}, "more than any model's context"),
    ({"max_new_tokens": 8.0}, "not a whole number"),
    ({"max_new_tokens": True}, "not a whole number"),
]


@pytest.mark.parametrize("kwargs, needle", BAD_SAMPLING, ids=[f"{k}={v!r}" for (d, _) in BAD_SAMPLING
                                                               for k, v in d.items()])
def test_bad_sampling_setting_is_a_config_error(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**kwargs)
    assert needle in str(e.value) and "fix:" in str(e.value)


def test_sampling_settings_at_their_limits_are_accepted():
    cfg = GenerationConfig(max_new_tokens=np.int64(1), temperature=1e-6, top_p=1.0, top_k=0, seed=2**64 - 1)
    assert cfg.max_new_tokens == 1 and type(cfg.max_new_tokens) is int
    GenerationConfig(seed=0, top_p=1e-9, temperature=100.0, top_k=10**6)
    logits = np.array([0.0, 5.0, 4.9, -3.0], np.float32)
    rng = np.random.default_rng(0)
    # the smallest temperature allowed samples like greedy, no NaN / inf on the way
    assert {pick_token(logits, GenerationConfig(temperature=1e-6, seed=0), rng) for _ in range(20)} == {1}
    assert {pick_token(logits, GenerationConfig(temperature=100.0), rng) for _ in range(200)} == {0, 1, 2, 3}


CLI_SAMPLING = [
    (["--temperature", "nan"], "temperature=nan"),
    (["--temperature", "inf"], "temperature=inf"),
    (["--temperature=-1"], "temperature=-1.0 is negative"),
    (["--temperature", "1e-320"], "too small to sample with"),
    (["--top-p", "0"], "top_p=0.0 is outside (0, 1]"),
    (["--top-p", "1.5"], "top_p=1.5 is outside (0, 1]"),
    (["--top-p", "nan"], "top_p=nan"),
    (["--seed=-1"], "seed=-1 is negative"),
    (["--max-new-tokens", "0"], "max_new_tokens=0"),
    (["--max-new-tokens", "99999999999"], "max_new_tokens=99999999999"),
]


@pytest.mark.parametrize("command", ["generate", "run"])
@pytest.mark.parametrize("opts, needle", CLI_SAMPLING, ids=[" ".join(o) for o, _ in CLI_SAMPLING])
def test_cli_bad_sampling_is_one_line_before_loading(command, opts, needle, capsys):
    head = (["generate", "--model", "llava_tiny", "--weights", "random"] if command == "generate"
            else ["run", "/nonexistent-bundle"])          # checked before the bundle is looked for
    assert main([*head, "--prompt", "How many circles?", *opts]) == 2
    one_line_error(capsys, needle)


# -- 3. images: high bit depth, broken files ---------------------------------------------------------------------

SIDE = 48
SPEC = ImageSpec(size=SIDE, mode="crop", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))   # pixel values / 255


def _gradient16() -> np.ndarray:
    """A 16-bit grayscale image using the whole range 0..65535 (diagonal gradient plus a few exact levels)."""
    y, x = np.mgrid[:SIDE, :SIDE]
    a = ((x + y) * 65535 // (2 * SIDE - 2)).astype(np.uint16)
    a[0, :4] = [0, 255, 32768, 65535]
    return a


def _eight_bit_reference(tmp_path, a16):
    ref = tmp_path / "gray8.png"
    Image.fromarray((a16.astype(np.float64) / 257).round().astype(np.uint8), "L").save(ref)
    return preprocess_image(ref, SPEC)


def _as_png16(tmp_path, a16):
    f = tmp_path / "gray16.png"
    Image.fromarray(a16).save(f)                       # mode I;16 -> a 16-bit grayscale PNG
    with Image.open(f) as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() == 65535
    return f


@pytest.mark.parametrize("form", ["png-file", "png-bytes", "opened-png", "mode-I", "mode-I;16B", "mode-F"])
def test_high_bit_depth_grayscale_reaches_the_model_as_its_8bit_version(form, tmp_path):
    a16 = _gradient16()
    png = _as_png16(tmp_path, a16)
    src = {"png-file": lambda: png,
           "png-bytes": lambda: png.read_bytes(),
           "opened-png": lambda: Image.open(png),
           "mode-I": lambda: Image.fromarray(a16.astype(np.int32)),
           "mode-I;16B": lambda: Image.frombytes("I;16B", (SIDE, SIDE), a16.astype(">u2").tobytes()),
           "mode-F": lambda: Image.fromarray(a16.astype(np.float32) / 65535)}[form]()
    got = preprocess_image(src, SPEC)
    ref = _eight_bit_reference(tmp_path, a16)
    assert got.shape == ref.shape == (1, 3, SIDE, SIDE)
    assert np.abs(got - ref).max() <= 1 / 255 + 1e-6
    assert got.min() == 0.0 and got.max() == 1.0 and 0.4 < got.mean() < 0.6     # not clipped to white
    assert np.all(got[0, :, 0, 1] == 1 / 255)                                   # 255/65535 of full scale: level 1


def test_8bit_range_images_in_wide_modes_keep_their_levels(tmp_path):
    a8 = (np.arange(SIDE * SIDE) % 256).reshape(SIDE, SIDE).astype(np.uint8)
    ref = preprocess_image(Image.fromarray(a8, "L"), SPEC)
    assert np.array_equal(preprocess_image(Image.fromarray(a8.astype(np.int32)), SPEC), ref)        # mode I, 0..255
    assert np.array_equal(preprocess_image(Image.fromarray(a8.astype(np.float32)), SPEC), ref)      # mode F, 0..255


@pytest.mark.parametrize("make, needle", [
    (lambda: Image.fromarray(np.full((SIDE, SIDE), -5, np.int32)), "32-bit integer image with values -5..-5"),
    (lambda: Image.fromarray(np.full((SIDE, SIDE), 70000, np.int32)), "outside 16-bit 0..65535"),
    (lambda: Image.fromarray(np.linspace(-1, 3, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)),
     "neither 0..1 nor 0..255"),
    (lambda: Image.fromarray(np.full((SIDE, SIDE), np.nan, np.float32)), "NaN or infinite"),
], ids=["I-negative", "I-over-16bit", "F-out-of-range", "F-nan"])
def test_wide_mode_images_out_of_range_are_refused(make, needle):
    with pytest.raises(ImageError) as e:
        preprocess_image(make(), SPEC)
    assert needle in str(e.value) and "fix:" in str(e.value)


def _png(tmp_path) -> bytes:
    f = tmp_path / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(f)
    return f.read_bytes()


@pytest.mark.parametrize("make, needle", [
    (lambda d: d[: len(d) // 2], "not a decodable image"),                           # truncated
    (lambda d: d[:40], "not a decodable image"),                                     # only the header
    (lambda d: b"II*\x00" + b"\x00" * 64, "not a decodable image"),                  # a TIFF it cannot read
    (lambda d: b"\x00\x01 not an image at all" * 8, "not a decodable image"),        # no image format
], ids=["truncated-half", "truncated-header", "broken-tiff", "unknown-format"])
def test_pillow_failures_are_image_errors_naming_the_file(make, needle, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(make(_png(tmp_path)))
    with pytest.raises(ImageError) as e:
        preprocess_image(bad, SPEC)
    assert str(bad) in str(e.value) and needle in str(e.value) and "fix:" in str(e.value)


def test_lazily_opened_truncated_image_is_an_image_error_naming_it(tmp_path):
    bad = tmp_path / "cut.png"
    bad.write_bytes(_png(tmp_path)[:-300])
    with Image.open(bad) as im, pytest.raises(ImageError) as e:     # Pillow reads the header only, until load()
        preprocess_image(im, SPEC)
    assert str(bad) in str(e.value)


def test_cli_truncated_image_is_one_line(tmp_path, capsys):
    bad = tmp_path / "cut.png"
    bad.write_bytes(_png(tmp_path)[:200])
    assert main(["generate", "--model", "llava_tiny", "--weights", "random", "--image", str(bad),
                 "--prompt", "Describe."]) == 2
    one_line_error(capsys, str(bad), "not a decodable image")


def test_decompression_bomb_guard_stays_on(tmp_path):
    from edgevlm.data import images

    f = tmp_path / "bomb.png"
    Image.new("L", (9000, 8000)).save(f)                   # 72 MP, over the 64 MP limit, a small file
    with pytest.raises(ImageError, match="over the limit|decompression bomb"):
        preprocess_image(f, SPEC)
    assert Image.MAX_IMAGE_PIXELS == images.MAX_PIXELS


# -- 4. damaged weights of the default VLM ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes_weights(tmp_path_factory):
    """A valid edgevlm_scenes_tiny safetensors file (random weights, with its tokenizer in the metadata)."""
    pytest.importorskip("timm")
    from edgevlm.modeling.families import load_vlm
    from edgevlm.modeling.scenes_vlm import save

    f = tmp_path_factory.mktemp("w") / "scenes_tiny.safetensors"
    save(load_vlm("edgevlm_scenes_tiny", weights="random"), f, {"model": "edgevlm_scenes_tiny"})
    return f


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _largest(header: dict) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: math.prod(header[k]["shape"]))


def _edit(fn):
    def make(data: bytes) -> bytes:
        header, body = _split(data)
        return fn(header, body)
    return make


def _retype(header, body, dtype):
    header[_largest(header)]["dtype"] = dtype
    return _join(header, body)


def _reshape(header, body):
    name = _largest(header)
    header[name]["shape"] = header[name]["shape"][::-1] + [1]   # same bytes, a shape the model does not have
    return _join(header, body)


def _past_end(header, body):
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    return _join(header, body)


def _resize_bytes(header, body):
    header[_largest(header)]["shape"][0] *= 2
    return _join(header, body)


DAMAGE = [
    pytest.param(lambda d: d[: len(d) // 2], "past the end of the file", id="truncated-data"),
    pytest.param(lambda d: d[:5], "too short for a safetensors file", id="truncated-to-5-bytes"),
    pytest.param(lambda d: d[:8 + 100], "larger than the file", id="truncated-header"),
    pytest.param(lambda d: struct.pack("<Q", len(d) * 4) + d[8:], "larger than the file", id="header-length-too-big"),
    pytest.param(lambda d: struct.pack("<Q", 2**40) + d[8:], "is absurd (over 100,000,000)", id="header-length-absurd"),
    pytest.param(lambda d: d[:8] + b"#" + d[9:], "header is not JSON", id="header-not-json"),
    pytest.param(lambda d: d[:8] + b"\xff" + d[9:], "header is not JSON", id="header-not-utf8"),
    pytest.param(lambda d: _join([1, 2], _split(d)[1]), "not an object", id="header-is-a-list"),
    pytest.param(_edit(_past_end), "past the end of the file", id="offsets-past-end"),
    pytest.param(_edit(lambda h, b: _retype(h, b, "F128")), "dtype 'F128', which edgevlm cannot read",
                 id="unknown-dtype"),
    pytest.param(_edit(_resize_bytes), "bytes but its offsets span", id="shape-disagrees-with-offsets"),
    pytest.param(_edit(lambda h, b: _join(h, b + b"\x00" * 16)), "bytes after its last tensor", id="trailing-bytes"),
    pytest.param(_edit(lambda h, b: _retype(h, b, "I16")), "of a non-float dtype", id="float-weights-as-int16"),
    pytest.param(_edit(_reshape), "mis-shaped", id="wrong-shape-for-the-model"),
]


@pytest.mark.parametrize("damage, needle", DAMAGE)
def test_damaged_default_vlm_weights_are_checkpoint_errors(damage, needle, scenes_weights, tmp_path):
    from edgevlm.modeling.families import load_vlm

    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(damage(scenes_weights.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        load_vlm("edgevlm_scenes_tiny", weights=bad)
    msg = str(e.value)
    assert str(bad) in msg and needle in msg, msg
    assert "fix:" in msg and ("again" in msg or "edgevlm train" in msg)


def test_valid_weights_still_load_and_the_shipped_header_is_accepted(scenes_weights):
    from edgevlm.modeling.checkpoint import read_safetensors_header
    from edgevlm.modeling.families import load_vlm
    from edgevlm.resources import zoo_dir

    assert load_vlm("edgevlm_scenes_tiny", weights=scenes_weights).facts == {"model": "edgevlm_scenes_tiny"}
    shipped = zoo_dir() / "weights" / "edgevlm_scenes.safetensors"
    if shipped.is_file() and shipped.stat().st_size > 1000:       # not a Git LFS pointer
        header = read_safetensors_header(shipped)
        assert "tokenizer" in header["metadata"] and len(header["tensors"]) > 10


class _Unpickled:
    def __reduce__(self):
        return (open, ("/tmp/edgevlm-was-unpickled", "w"))


def test_default_vlm_never_unpickles(tmp_path):
    import os
    import pickle

    from edgevlm.modeling.families import load_vlm

    marker = "/tmp/edgevlm-was-unpickled"
    if os.path.exists(marker):
        os.remove(marker)
    for name in ("weights.pth", "weights.safetensors"):
        f = tmp_path / name
        f.write_bytes(pickle.dumps({"state_dict": _Unpickled()}))
        with pytest.raises(CheckpointError) as e:
            load_vlm("edgevlm_scenes_tiny", weights=f)
        assert str(f) in str(e.value) and "safetensors" in str(e.value)
    assert not os.path.exists(marker)


def test_cli_damaged_weights_are_one_line(scenes_weights, tmp_path, capsys):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(scenes_weights.read_bytes()[:-1000])
    assert main(["generate", "--model", "edgevlm_scenes_tiny", "--weights", str(bad), "--prompt", "x"]) == 2
    one_line_error(capsys, str(bad), "past the end of the file")
