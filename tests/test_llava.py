"""LLaVA format: checkpoints written by transformers itself load, answer and match it token for token."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgevlm.errors import CheckpointError
from edgevlm.modeling.families import load_vlm
from edgevlm.zoo import get_vlm_recipe

from vlm_utils import CHAT, QWEN_CHAT, hf_llava_checkpoint, hf_llava_processor_checkpoint, make_image

transformers = pytest.importorskip("transformers")


def _hf_llava(tmp_path, layout="saved"):
    """A tiny random LlavaForConditionalGeneration saved by transformers, with a tokenizer."""
    d = tmp_path / "llava-tiny-hf"
    hf = hf_llava_checkpoint(d, sharpen=4.0)
    if layout == "v5":  # transformers 4.57 saves the llava-hf layout; transformers 5 saves its module names
        from safetensors.torch import load_file, save_file

        sd = load_file(str(d / "model.safetensors"))
        assert "language_model.lm_head.weight" in sd
        ren = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
               "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
        out = {}
        for k, v in sd.items():
            for a, b in ren.items():
                if k.startswith(a):
                    k = b + k[len(a):]
                    break
            out[k] = v
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    return hf, d


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
    return _hf_llava(tmp_path_factory.mktemp("llava"))


def _hf_inputs(vlm, image, prompt):
    """What transformers' LlavaProcessor feeds the model: the <image> token repeated once per patch."""
    embeds, pieces, n_img = vlm.prepare(image, prompt)
    image_id = vlm.language_model.config.vocab_size and get_vlm_recipe("llava_tiny").config["image_token_index"]
    ids = pieces.before + [image_id] * n_img + pieces.after
    return torch.tensor([ids]), vlm.pixel_values(image), embeds


def test_logits_and_32_greedy_tokens_match_transformers(hf_llava):
    hf, d = hf_llava
    vlm = load_vlm("llava_tiny", weights=d)
    image = make_image()
    ids, pixels, embeds = _hf_inputs(vlm, image, "What is in the picture?")
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        ours = vlm(embeds)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), float((ours - ref).abs().max())

    with torch.no_grad():
        ref_tokens = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    from edgevlm.modeling.vlm import GenerationConfig

    our_tokens = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=32)))
    assert len(our_tokens) == 32
    assert our_tokens == ref_tokens
    assert len(set(our_tokens)) > 1  # a real sequence, not one repeated token


def test_both_key_layouts_load_the_same_weights(tmp_path, hf_llava):
    hf, d_old = hf_llava
    _, d_new = _hf_llava(tmp_path, layout="v5")
    a, b = load_vlm("llava_tiny", weights=d_new), load_vlm("llava_tiny", weights=d_old)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_generate_text_and_stream_agree(hf_llava):
    _, d = hf_llava
    vlm = load_vlm("llava_tiny", weights=d)
    out = vlm.generate(make_image(), "Describe this image.", max_new_tokens=12)
    assert out.stats.image_tokens == 16 and out.stats.new_tokens == len(out.token_ids) > 0
    streamed = "".join(vlm.generate(make_image(), "Describe this image.", max_new_tokens=12, stream=True))
    assert streamed == out.text
    # sampling is seeded and differs from greedy for a flat random model
    s1 = vlm.generate(make_image(), "Describe.", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1)
    s2 = vlm.generate(make_image(), "Describe.", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=1)
    assert s1.token_ids == s2.token_ids


def test_processor_matches_transformers_tokenizer_and_clip_processor(hf_llava):
    _, d = hf_llava
    vlm = load_vlm("llava_tiny", weights=d)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    text = "USER: Ein schönes Bild? ASSISTANT:"
    assert vlm.tokenizer.encode(text) == fast(text, add_special_tokens=False)["input_ids"]
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    img = make_image(120)
    ref = proc(images=img, return_tensors="np")["pixel_values"]
    ours = vlm.pixel_values(img).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5


def test_mismatched_checkpoint_lists_keys(tmp_path, hf_llava):
    from safetensors.torch import load_file, save_file

    _, d = hf_llava
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("multi_modal_projector.linear_2.bias")
    sd["multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: connector.linear_2.bias.*mis-shaped: connector.linear_1"):
        load_vlm("llava_tiny", weights=bad)


def test_bad_checkpoint_directories(tmp_path, hf_llava):
    _, d = hf_llava
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_vlm("llava_tiny", weights=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vlm("llava_tiny", weights=tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "phi"}))
    with pytest.raises(CheckpointError, match="model_type 'phi'"):
        load_vlm("llava_tiny", weights=other)
    notok = tmp_path / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (notok / name).write_bytes((d / name).read_bytes())
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_vlm("llava_tiny", weights=notok)


# -- prompts tokenized as the checkpoint's own processor tokenizes them (issue 28) ----------------------------
def _chat_inputs(proc, image, prompt: str):
    """The processor's inputs for one user turn (the image, then the text) through its chat template."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": prompt}]}]
    return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


def _edgevlm_ids(vlm, image, prompt):
    embeds, pieces, n_img = vlm.prepare(image, prompt)
    image_id = vlm.tokenizer.token_id("<image>")
    return pieces.before + [image_id] * n_img + pieces.after, embeds


def _answers_as_transformers(d, ref, vlm, embeds) -> None:
    """transformers' LLaVA on the processor's inputs against edgevlm's on its own: logits within 1e-5 and 32
    greedy tokens equal."""
    from edgevlm.modeling.vlm import GenerationConfig

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(d).eval()
    with torch.no_grad():
        logits = hf(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"]).logits
        assert torch.allclose(vlm(embeds), logits, atol=1e-5, rtol=0)
        want = hf.generate(input_ids=ref["input_ids"], pixel_values=ref["pixel_values"], max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, ref["input_ids"].shape[1]:]
    assert list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=32))) == want.tolist()


@pytest.mark.parametrize("case", ["template, tokenizer adds BOS", "template, tokenizer adds none",
                                  "template starts with BOS", "no template, tokenizer adds BOS",
                                  "no template, tokenizer adds none", "Llama class, add_bos_token false"])
def test_prompt_ids_and_greedy_tokens_are_the_processors(tmp_path, case):
    """Same prompt ids as the checkpoint's own processor, logits within 1e-5 and 32 greedy tokens equal to
    transformers' generate on them. edgevlm used to put BOS first whenever the template text did not."""
    template = {"template starts with BOS": "{{ bos_token }}" + CHAT}.get(case, None if "no template" in case else CHAT)
    post_bos = "adds BOS" in case or "Llama" in case
    cls, flag = ("LlamaTokenizerFast", False) if "Llama" in case else (None, None)
    d, proc = hf_llava_processor_checkpoint(tmp_path, "ckpt", post_bos, template, cls, flag)
    vlm = load_vlm("llava_tiny", weights=d)
    image, prompt = make_image(), "What is in the picture?"
    if template is not None:
        ref = _chat_inputs(proc, image, prompt)
    else:
        text = vlm.prompt_spec.template.replace("{prompt}", prompt)      # the recipe's template, typed out
        ref = proc(text=text, images=image, return_tensors="pt")
    ids, embeds = _edgevlm_ids(vlm, image, prompt)
    assert ids == ref["input_ids"][0].tolist()
    bos_first = ids[0] == vlm.tokenizer.bos_id
    assert bos_first == (case in ("template, tokenizer adds BOS", "template starts with BOS",
                                  "no template, tokenizer adds BOS"))
    assert ids.count(vlm.tokenizer.bos_id) <= 1
    _answers_as_transformers(d, ref, vlm, embeds)


def test_a_checkpoint_is_named_as_hugging_face_users_name_it(tmp_path, hf_llava):
    """The checkpoint directory as the model (family from its config.json), `--weights DIR` alone, and a hub id
    through huggingface_hub's own cache (HF_HOME, offline): each loads the LLaVA reader; an unknown
    model_type is one line naming the supported ones (issue 28)."""
    from edgevlm.errors import ConfigError
    from edgevlm.zoo import resolve_vlm

    _, d = hf_llava
    ref = resolve_vlm(str(d))
    assert (ref.name, ref.weights) == ("llava_1_5_7b", str(d))
    vlm = load_vlm(str(d))
    assert vlm.family == "llava" and vlm.weights_source == str(d)
    assert vlm.generate(make_image(), "Describe.", max_new_tokens=4).token_ids

    from edgevlm.cli import main

    out = tmp_path / "b"
    assert main(["export", "--weights", str(d), "--target", "cpu", "--quant", "fp32", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["weights"]["source"] == str(d) and m["model"]["family"] == "llava"
    # the default bundle name is the checkpoint's, not the recipe that reads it
    from edgevlm.build_vlm import default_out
    from edgevlm.config import Precision, VLMExportConfig

    assert default_out(VLMExportConfig(model=ref.name, weights=str(d)), Precision.FP32).name == \
        f"{d.name}-cpu-fp32"
    assert default_out(VLMExportConfig(model="llava_1_5_7b", weights="someone/My-LLaVA"), Precision.INT4).name == \
        "My-LLaVA-cpu-int4"
    assert default_out(VLMExportConfig(model="llava_tiny", weights="random"), Precision.FP32).name == \
        "llava_tiny-cpu-fp32"

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ConfigError, match="'qwen2_vl' checkpoint.*supported model_type values: idefics3, llava, "):
        resolve_vlm(str(odd))
    with pytest.raises(ConfigError, match="--weights names another"):
        resolve_vlm(str(d), weights=str(odd))


def test_a_hub_id_resolves_through_the_hugging_face_cache(tmp_path, monkeypatch, hf_llava):
    """A hub id that is no zoo recipe's: its config.json comes from huggingface_hub (here its offline cache, laid
    out as the library lays it out), and its model_type picks the reader; nothing cached offline is one line."""
    from edgevlm.errors import ConfigError
    from edgevlm.zoo import resolve_vlm

    _, d = hf_llava
    home = tmp_path / "hf"
    snap = home / "hub" / "models--someone--tiny-llava" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((d / "config.json").read_text())
    refs = home / "hub" / "models--someone--tiny-llava" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    import importlib

    importlib.reload(c)
    try:
        ref = resolve_vlm("someone/tiny-llava@main")
        assert (ref.name, ref.weights, ref.revision) == ("llava_1_5_7b", "someone/tiny-llava", "main")
        with pytest.raises(ConfigError, match="could not read someone/absent's config.json"):
            resolve_vlm("someone/absent")
    finally:
        monkeypatch.undo()
        importlib.reload(c)


@pytest.mark.parametrize("features", [{"vision_feature_layer": [-2, -1]}, {"vision_feature_layer": -1},
                                      {"vision_feature_select_strategy": "full"},
                                      {"vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "full"}])
def test_vision_feature_options_match_transformers(tmp_path, features):
    """The vision-feature options LLaVA configs use (one layer or a list, CLS dropped or kept): same prompt ids as
    the processor (its image-token count follows the strategy), logits within 1e-5, 32 greedy tokens equal."""
    d, proc = hf_llava_processor_checkpoint(tmp_path, "ckpt", True, CHAT, **features)
    vlm = load_vlm(str(d))
    image, prompt = make_image(), "What is in the picture?"
    ref = _chat_inputs(proc, image, prompt)
    ids, embeds = _edgevlm_ids(vlm, image, prompt)
    assert ids == ref["input_ids"][0].tolist()
    _answers_as_transformers(d, ref, vlm, embeds)


def test_a_qwen2_style_tokenizer_without_bos_matches_transformers(tmp_path):
    """A tokenizer with no BOS token at all (Qwen2's: none in its config, none added by its class or
    post-processor) and a ChatML template: same prompt ids as the processor (no BOS anywhere), logits within 1e-5,
    32 greedy tokens equal."""
    d, proc = hf_llava_processor_checkpoint(tmp_path, "qwen", False, QWEN_CHAT, "Qwen2TokenizerFast", bos_token=None)
    assert json.loads((d / "tokenizer_config.json").read_text()).get("bos_token") is None
    vlm = load_vlm(str(d))
    assert vlm.tokenizer.bos_id is None and vlm.prompt_spec.bos is False
    image, prompt = make_image(), "What is in the picture?"
    ref = _chat_inputs(proc, image, prompt)
    ids, embeds = _edgevlm_ids(vlm, image, prompt)
    assert ids == ref["input_ids"][0].tolist()
    assert ids[0] != vlm.tokenizer.token_id("<s>")
    _answers_as_transformers(d, ref, vlm, embeds)


@pytest.mark.parametrize("pad", [False, True], ids=["crop", "pad"])
@pytest.mark.parametrize("shape", [(50, 90), (90, 50)], ids=["landscape", "portrait"])
def test_non_square_images_are_preprocessed_as_the_image_processor(tmp_path, pad, shape):
    """Non-square images through the checkpoint's own image processor, CLIP's crop and LlavaImageProcessor's pad to
    a square: the same pixel values (within float rounding), then the same prompt ids, logits within 1e-5 and 32
    greedy tokens equal."""
    d, proc = hf_llava_processor_checkpoint(tmp_path, "ckpt", True, CHAT, pad=pad)
    vlm = load_vlm(str(d))
    assert vlm.image_spec.mode == ("pad" if pad else "crop")
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    from edgevlm.processor import preprocess_image

    ref = _chat_inputs(proc, image, "What is it?")
    ours = preprocess_image(image, vlm.image_spec)
    np.testing.assert_allclose(ours, ref["pixel_values"].numpy(), atol=1e-5)
    if pad:     # the border is the mean colour: normalized, close to 0 (not the crop's image content)
        border = ours[0, :, 0, :] if shape[0] < shape[1] else ours[0, :, :, 0]
        assert np.abs(border).max() < 0.02
    ids, embeds = _edgevlm_ids(vlm, image, "What is it?")
    assert ids == ref["input_ids"][0].tolist()
    _answers_as_transformers(d, ref, vlm, embeds)


def test_a_pad_layout_other_than_llavas_is_refused(tmp_path):
    """do_pad from an image processor whose padding edgevlm does not reproduce: one line, at load."""
    d, _ = hf_llava_processor_checkpoint(tmp_path, "ckpt", True, CHAT)
    cfg = json.loads((d / "preprocessor_config.json").read_text())
    cfg.update(do_pad=True, image_processor_type="LlavaNextImageProcessor")
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="LlavaNextImageProcessor with do_pad is not a layout"):
        load_vlm(str(d))


def test_every_command_takes_a_checkpoint_as_users_name_it(tmp_path, hf_llava, capsys):
    """info, eval and finetune take the checkpoint directory as the model, as export and generate do: info counts
    the checkpoint's own architecture (not the 7B recipe that reads it), eval reaches the scenes check, finetune
    trains it."""
    from edgevlm.cli import main
    from edgevlm.modeling.info import describe

    _, d = hf_llava
    out = tmp_path / "info.json"
    assert main(["info", "--model", str(d), "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    tiny = describe("llava_tiny")
    assert info["model"] == str(d) and info["family"] == "llava"
    assert info["params_total"] == tiny["params_total"] == get_vlm_recipe("llava_tiny").params
    assert info["image_size"] == 56 and info["paths"][0]["vision_tokens"] == tiny["paths"][0]["vision_tokens"]
    assert describe("llava_1_5_7b")["params_total"] > 1000 * info["params_total"]
    capsys.readouterr()
    assert main(["eval", str(d), "--limit", "1"]) != 0           # one line: the checkpoint is not a scenes model
    assert f"with weights {d} was not trained on the scenes task" in capsys.readouterr().err
    run = tmp_path / "ft"
    assert main(["finetune", "--model", str(d), "--mode", "connector", "--out", str(run), "--steps", "1",
                 "--limit", "2", "--val-limit", "1", "--batch-size", "2", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1, summary


@pytest.mark.parametrize("case", ["Qwen2-style tokenizer, no BOS token", "non-square image, pad (LlavaImageProcessor)"])
def test_fp32_bundles_answer_as_transformers(tmp_path, case):
    """The conformance matrix (benchmarks/conformance.py) through a bundle: the FP32 bundle of a checkpoint saved by
    transformers, run by the torch-free runtime with its ONNX decoder and its GGUF decoder (llama.cpp), gives the
    processor's prompt ids, the last position's logits within 1e-5 of the largest logit, and transformers' 32
    greedy tokens."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import conformance
    finally:
        sys.path.remove(str(root / "benchmarks"))
    engines = ("onnx", "gguf") if importlib.util.find_spec("llama_cpp") else ("onnx",)
    rows = conformance.run_case(case, tmp_path, engines)
    assert [r["engine"] for r in rows] == list(engines)
    for r in rows:
        assert r["prompt_ids_equal"], r
        assert r["greedy_tokens_equal"] == r["greedy_tokens"] == 32, r
        assert r["max_logit_diff_rel"] < 1e-5, r
    if "gguf" not in engines:
        pytest.skip("llama-cpp-python is not installed: the ONNX decoder passed, the GGUF decoder was not run")
