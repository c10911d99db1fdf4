"""SmolVLM (Idefics3 / SmolVLM format): checkpoints written by transformers itself load, tokenize as their own
processor does, and answer as transformers does, token for token; the bundle's torch-free runtime answers the same."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.modeling.families import load_vlm
from edgevlm.modeling.vlm import GenerationConfig
from edgevlm.zoo import get_vlm_recipe

from vlm_utils import make_image, write_tokenizer

transformers = pytest.importorskip("transformers")

# SmolVLM-Instruct's chat template, as its chat_template.json renders it (one user turn: "User:" then the image,
# the text, "<end_of_utterance>\n"; "Assistant:" for the generation prompt), written for this test.
CHAT = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
        "{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}"
        "<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}")
SPECIAL = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>",
           *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))


def hf_smolvlm_checkpoint(folder, splitting: bool = True, model_type: str = "idefics3", sharpen: float = 4.0):
    """A tiny random Idefics3 (or SmolVLM) model with smolvlm_tiny's sizes, saved by transformers with its own
    processor (image processor, tokenizer, chat template, image_seq_len); returns (model, processor reloaded)."""
    cfg = get_vlm_recipe("smolvlm_tiny").config
    img = get_vlm_recipe("smolvlm_tiny").image
    cls = {"idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration),
           "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration)}[model_type]
    conf = cls[0](vision_config=dict(cfg["vision_config"]), text_config=dict(cfg["text_config"]),
                  scale_factor=cfg["scale_factor"], image_token_id=cfg["image_token_id"], pad_token_id=0)
    torch.manual_seed(0)
    hf = cls[1](conf).eval()
    with torch.no_grad():      # random init is so flat that greedy tokens tie; scaled weights make them distinct
        for p in hf.parameters():
            p.mul_(sharpen)
    hf.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, extra_special=SPECIAL, bos="<|im_start|>", eos="<end_of_utterance>")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|im_start|>",
                                                eos_token="<end_of_utterance>")
    ip = transformers.Idefics3ImageProcessor(size={"longest_edge": img["options"]["longest_edge"]},
                                             max_image_size={"longest_edge": img["size"]}, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3, do_image_splitting=splitting)
    n_tokens = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"] // cfg["scale_factor"]) ** 2
    transformers.Idefics3Processor(image_processor=ip, tokenizer=fast, image_seq_len=n_tokens,
                                   chat_template=CHAT).save_pretrained(folder)
    return hf, transformers.Idefics3Processor.from_pretrained(folder)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("smolvlm") / "smolvlm-tiny-hf"
    hf, proc = hf_smolvlm_checkpoint(d)
    return d, hf, proc


def _processor_inputs(proc, image, prompt):
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": prompt}]}]
    return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    return_tensors="pt")


def _same_as_transformers(vlm, hf, ref, image, prompt):
    """Prompt ids equal, pixel values within 1e-6, logits within 1e-5, 32 greedy tokens equal."""
    ids = vlm.prompt_ids(image, prompt)
    assert ids == ref["input_ids"][0].tolist()
    ours_px = vlm.pixel_values(image)
    theirs_px = ref["pixel_values"][0]
    assert ours_px.shape == theirs_px.shape, (ours_px.shape, theirs_px.shape)
    assert float((ours_px - theirs_px).abs().max()) < 1e-6
    embeds, pieces, n_img = vlm.prepare(image, prompt)
    assert embeds.shape[1] == len(ids) and n_img == ids.count(vlm.image_token_id)
    kw = {k: ref[k] for k in ("pixel_values", "pixel_attention_mask") if k in ref}
    with torch.no_grad():
        logits = hf(input_ids=ref["input_ids"], **kw).logits
        ours = vlm(embeds)
        assert ours.shape == logits.shape
        assert torch.allclose(ours, logits, atol=1e-5, rtol=0), float((ours - logits).abs().max())
        want = hf.generate(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"], **kw, max_new_tokens=32,
                           min_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, ref["input_ids"].shape[1]:].tolist()
    got = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=32)))
    assert got == want
    assert len(set(got)) > 1            # a real sequence, not one repeated token


@pytest.mark.parametrize("size", [(96, 109), (40, 90), (30, 20), (64, 64)], ids=["96x109", "40x90", "30x20", "64x64"])
def test_tiles_ids_logits_and_32_greedy_tokens_match_transformers(ckpt, size):
    """Image splitting (the released processors' default): tiles + global view, the processor's row/column tokens
    and "\\n"s, for non-square images in both orientations, one smaller than a tile (resized up to the longest
    edge, as the processor does) and a square one."""
    d, hf, proc = ckpt
    vlm = load_vlm("smolvlm_tiny", weights=d)
    rng = np.random.default_rng(sum(size))
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    prompt = "What is in the picture?"
    ref = _processor_inputs(proc, image, prompt)
    rows, cols = vlm.image_views(image)[1]
    assert ref["pixel_values"].shape[1] == (rows * cols + 1 if rows else 1)
    _same_as_transformers(vlm, hf, ref, image, prompt)


def test_grids_follow_the_processor(ckpt):
    """The (rows, cols) grid the processor reports for many sizes, from the image size alone."""
    from edgevlm.data.crops import idefics3_grid, idefics3_params

    d, _, proc = ckpt
    vlm = load_vlm("smolvlm_tiny", weights=d)
    p = idefics3_params(vlm.image_spec)
    seen = set()
    for h, w in [(5, 4), (33, 10), (97, 31), (200, 7), (7, 200), (96, 96), (95, 33), (50, 51)]:
        out = proc.image_processor(np.zeros((h, w, 3), np.uint8), return_row_col_info=True)
        grid = idefics3_grid(h, w, **p)
        assert grid == (out["rows"][0][0], out["cols"][0][0]), (h, w)
        seen.add(grid)
    assert len(seen) >= 4


def test_one_global_view_without_splitting(tmp_path):
    """do_image_splitting false: one squashed view, <fake><global-img><image>*N<fake>, same answers."""
    d = tmp_path / "nosplit"
    hf, proc = hf_smolvlm_checkpoint(d, splitting=False)
    vlm = load_vlm(str(d))
    assert vlm.image_spec.options["splitting"] is False
    image, prompt = make_image(), "Describe this image."
    ref = _processor_inputs(proc, image, prompt)
    assert ref["pixel_values"].shape[1] == 1 and vlm.pixel_values(image).shape[0] == 1
    _same_as_transformers(vlm, hf, ref, image, prompt)


def test_smolvlm_model_type_and_processor_call(tmp_path):
    """A SmolVLMForConditionalGeneration checkpoint (model_type smolvlm) loads as the directory alone, and the
    processor called on typed-out text (not the chat template) gives the same ids."""
    d = tmp_path / "smol"
    hf, proc = hf_smolvlm_checkpoint(d, model_type="smolvlm")
    assert json.loads((d / "config.json").read_text())["model_type"] == "smolvlm"
    vlm = load_vlm(str(d))
    assert vlm.family == "smolvlm" and vlm.weights_source == str(d)
    image, prompt = make_image(70), "How many shapes?"
    text = "<|im_start|>" + vlm.prompt_spec.template.replace("{prompt}", prompt)
    ref = proc(text=text, images=[image], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == _processor_inputs(proc, image, prompt)["input_ids"][0].tolist()
    _same_as_transformers(vlm, hf, ref, image, prompt)


def test_checkpoint_named_as_the_model_or_as_weights(ckpt):
    from edgevlm.zoo import resolve_vlm

    d, _, _ = ckpt
    ref = resolve_vlm(str(d))
    assert (ref.name, ref.weights) == ("smolvlm_256m", str(d))
    a, b = load_vlm(str(d)), load_vlm("smolvlm_tiny", weights=d)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    image = make_image()
    out = a.generate(image, "Describe.", max_new_tokens=8)
    assert out.token_ids == b.generate(image, "Describe.", max_new_tokens=8).token_ids
    assert out.stats.image_tokens == a.image_seq_len * a.pixel_values(image).shape[0]
    assert "".join(a.generate(image, "Describe.", max_new_tokens=8, stream=True)) == out.text
    # `edgevlm info` counts the checkpoint's own architecture, not the 256M recipe that reads it
    from edgevlm.modeling.info import describe

    info = describe(ref.name, checkpoint=d)
    assert info["params_total"] == sum(p.numel() for p in a.parameters()) < 50e6
    assert info["image_size"] == a.image_spec.size and info["views"] >= 1


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("change, match", [
    ({"do_resize": False}, "do_resize=False"),
    ({"resample": 0}, "resample=0"),
    ({"rescale_factor": 0.5}, "rescale_factor=0.5"),
    ({"max_image_size": {"longest_edge": 64}}, "max_image_size 64 px for a vision tower of 32 px"),
    ({"size": {"height": 96, "width": 96}}, "size=.*longest_edge"),
])
def test_processor_settings_edgevlm_cannot_reproduce_are_refused(tmp_path, ckpt, change, match):
    d = _copy(ckpt[0], tmp_path / "bad")
    f = d / "preprocessor_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **change}))
    with pytest.raises(CheckpointError, match=match) as e:
        load_vlm(str(d))
    assert e.value.fix and "\n" not in str(e.value.problem)


def test_mismatched_files_are_refused(tmp_path, ckpt):
    d = _copy(ckpt[0], tmp_path / "seq")
    (d / "processor_config.json").write_text(json.dumps({"image_seq_len": 9, "processor_class": "Idefics3Processor"}))
    with pytest.raises(CheckpointError, match="image_seq_len 9 but .* make 4 tokens per view"):
        load_vlm(str(d))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="model_type 'llava'"):
        load_vlm("smolvlm_tiny", weights=other)
    with pytest.raises(CheckpointError, match="is a file"):
        load_vlm("smolvlm_tiny", weights=ckpt[0] / "model.safetensors")


def test_released_sizes_on_the_meta_device():
    """SmolVLM-256M-Instruct and -500M-Instruct as built from their configs (nothing allocated): the recipes'
    counts, within 2% of the hub's 256M and 507M, and the parts' split (SigLIP-B/16 at 512 px, a 16·768-wide
    projection, SmolLM2-135M / -360M with an untied head over 49,280 tokens)."""
    from edgevlm.modeling.families import build_vlm
    from edgevlm.modeling.info import part_params

    for name, published, text in (("smolvlm_256m", 256e6, 576), ("smolvlm_500m", 507e6, 960)):
        recipe = get_vlm_recipe(name)
        model = build_vlm(recipe, device="meta")
        parts = part_params(model)
        assert sum(parts.values()) == recipe.params
        assert abs(recipe.params / published - 1) < 0.02, (name, recipe.params)
        assert parts["connector"] == 768 * 16 * text
        assert model.image_seq_len == 64 and model.info_views() == 17
        emb = model.language_model.get_input_embeddings().weight
        assert model.language_model.lm_head.weight is not emb and tuple(emb.shape) == (49280, text)


def test_an_empty_prompt_is_refused(ckpt):
    vlm = load_vlm("smolvlm_tiny", weights=ckpt[0])
    with pytest.raises(ConfigError, match="the prompt is empty"):
        vlm.generate(make_image(), "  ")


def test_text_only_prompt_has_no_image_block(ckpt):
    d, hf, _ = ckpt
    vlm = load_vlm("smolvlm_tiny", weights=d)
    ids = vlm.prompt_ids(None, "Hello")
    fake = vlm.tokenizer.token_id("<fake_token_around_image>")
    assert fake not in ids and vlm.image_token_id not in ids
    embeds, _, n_img = vlm.prepare(None, "Hello")
    assert n_img == 0 and embeds.shape[1] == len(ids)
    with torch.no_grad():
        assert torch.allclose(vlm(embeds), hf(input_ids=torch.tensor([ids])).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_bundle_runtime_answers_as_eager(tmp_path, ckpt):
    """`edgevlm export` of the transformers-written checkpoint (cpu, fp32, ONNX and GGUF decoders): the bundle's
    parity record says the same greedy tokens as eager on both decoders, and the torch-free runtime gives eager's
    tokens on tiled non-square images and on a text-only prompt."""
    from edgevlm import runtime
    from edgevlm.cli import main

    d = ckpt[0]
    out = tmp_path / "bundle"
    assert main(["export", "--model", "smolvlm_tiny", "--weights", str(d), "--target", "cpu", "--quant", "fp32",
                 "--decoder", "both", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["family"] == "smolvlm" and m["generation"]["image"]["mode"] == "idefics3_tiles"
    results = m["parity"]["results"]
    assert {r["backend"] for r in results} == {"onnxruntime", "llama.cpp"}
    assert all(r["same_greedy_tokens"] and r["passed"] for r in results) and results[0]["new_tokens"] > 1
    eager = load_vlm("smolvlm_tiny", weights=d)
    rng = np.random.default_rng(3)
    cases = [(rng.integers(0, 256, (96, 109, 3), dtype=np.uint8), "What is in the picture?"),
             (rng.integers(0, 256, (40, 90, 3), dtype=np.uint8), "Describe this image."), (None, "Hello there")]
    for backend in ("onnxruntime", "llama.cpp"):
        pipe = runtime.load(out, decoder=backend)
        try:
            for image, prompt in cases:
                want = eager.generate(image, prompt, max_new_tokens=32)
                got = pipe.generate(image, prompt, max_new_tokens=32)
                assert got.token_ids == want.token_ids, (backend, prompt)
                assert got.stats.image_tokens == want.stats.image_tokens
                assert len(want.token_ids) > 1
        finally:
            pipe.close()
