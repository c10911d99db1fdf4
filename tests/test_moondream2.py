"""Moondream2: tiny random checkpoints in the HF repo's exact on-disk layout load, match references
we did not write (transformers Phi and SigLIP, the reference's own math), crop like the reference
and run every skill; bad checkpoints fail with errors that say what to do."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from edgevlm.data.crops import overlap_crop_grid, overlap_crops_with_grid, stitched_size
from edgevlm.errors import CheckpointError, ConfigError
from edgevlm.modeling.families import get_family, load_vlm
from edgevlm.processor import ImageSpec, preprocess_image
from edgevlm.zoo import get_vlm_recipe

from vlm_utils import make_image, write_tokenizer

transformers = pytest.importorskip("transformers")
CFG = get_vlm_recipe("moondream2_tiny").config
IMG = get_vlm_recipe("moondream2_tiny").image
V, T, R = CFG["vision"], CFG["text"], CFG["region"]
P, S = IMG["options"]["patch_size"], IMG["size"]            # patch 14, crop 112 -> 8x8 patches
N = (S // P) ** 2


def _raw_state_dict(seed: int = 0, region: bool = True) -> dict:
    """Tensors under the names and shapes of the HF model.safetensors (notes §1a), at tiny dims."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    def lin(name, out, inp, scale=None):
        sd[name + ".weight"] = rnd(out, inp, scale=scale or 1.5 / math.sqrt(inp))
        sd[name + ".bias"] = rnd(out, scale=0.1)

    def ln(name, dim):
        sd[name + ".weight"] = 1 + rnd(dim, scale=0.1)
        sd[name + ".bias"] = rnd(dim, scale=0.1)

    sd: dict = {}
    c, d = V["dim"], T["hidden_size"]
    lin("model.vision.patch_emb", c, 3 * P * P)
    sd["model.vision.pos_emb"] = rnd(1, N, c)
    for i in range(V["layers"]):
        b = f"model.vision.blocks.{i}"
        ln(b + ".ln1", c), lin(b + ".attn.qkv", 3 * c, c), lin(b + ".attn.proj", c, c)
        ln(b + ".ln2", c), lin(b + ".mlp.fc1", V["ff_dim"], c), lin(b + ".mlp.fc2", c, V["ff_dim"])
    ln("model.vision.post_ln", c)
    lin("model.vision.proj_mlp.fc1", V["proj_inner_dim"], 2 * c)
    lin("model.vision.proj_mlp.fc2", d, V["proj_inner_dim"])
    sd["model.text.wte"] = rnd(T["vocab_size"], d, scale=1.0)
    for i in range(T["num_hidden_layers"]):
        b = f"model.text.blocks.{i}"
        ln(b + ".ln", d), lin(b + ".attn.qkv", 3 * d, d), lin(b + ".attn.proj", d, d)
        lin(b + ".mlp.fc1", T["intermediate_size"], d), lin(b + ".mlp.fc2", d, T["intermediate_size"])
    ln("model.text.post_ln", d)
    lin("model.text.lm_head", T["vocab_size"], d, scale=4 / math.sqrt(d))
    if region:
        sd["model.region.coord_features"] = rnd(1, R["coord_feat_dim"] // 2, scale=2.0)
        lin("model.region.coord_encoder", d, R["coord_feat_dim"])
        lin("model.region.coord_decoder.fc1", R["inner_dim"], d), lin("model.region.coord_decoder.fc2",
                                                                       R["coord_out_dim"], R["inner_dim"])
        sd["model.region.size_features"] = rnd(2, R["size_feat_dim"] // 2, scale=2.0)
        lin("model.region.size_encoder", d, R["size_feat_dim"])
        lin("model.region.size_decoder.fc1", R["inner_dim"], d), lin("model.region.size_decoder.fc2",
                                                                      R["size_out_dim"], R["inner_dim"])
    return sd


def _write(folder, sd=None, tokenizer=True, config=True):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = _raw_state_dict() if sd is None else sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config:  # as the HF repo has it: no hyperparameters, the code's defaults apply
        (folder / "config.json").write_text(json.dumps({
            "architectures": ["HfMoondream"], "auto_map": {"AutoConfig": "hf_moondream.HfConfig",
                                                           "AutoModelForCausalLM": "hf_moondream.HfMoondream"},
            "config": {}, "model_type": "moondream1", "torch_dtype": "float32", "transformers_version": "4.44.0"}))
    if tokenizer:
        write_tokenizer(folder, extra_special=("<|endoftext|>",), bos="<|endoftext|>", eos="<|endoftext|>")
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("md2") / "moondream2-tiny")


@pytest.fixture(scope="module")
def vlm(ckpt):
    return load_vlm("moondream2_tiny", weights=ckpt, revision="2025-04-14")


def _hf_phi(sd: dict):
    """transformers' PhiForCausalLM with the moondream text weights, names converted here."""
    conf = transformers.PhiConfig(**{k: v for k, v in T.items() if k != "model_type"})
    conf._attn_implementation = "eager"
    hf = transformers.PhiForCausalLM(conf).eval()
    d, out = T["hidden_size"], {"model.embed_tokens.weight": sd["model.text.wte"]}
    for i in range(T["num_hidden_layers"]):
        src, dst = f"model.text.blocks.{i}.", f"model.layers.{i}."
        for wb in ("weight", "bias"):
            q, k, v = sd[src + "attn.qkv." + wb].split(d)
            out.update({dst + "self_attn.q_proj." + wb: q, dst + "self_attn.k_proj." + wb: k,
                        dst + "self_attn.v_proj." + wb: v, dst + "self_attn.dense." + wb: sd[src + "attn.proj." + wb],
                        dst + "input_layernorm." + wb: sd[src + "ln." + wb],
                        dst + "mlp.fc1." + wb: sd[src + "mlp.fc1." + wb], dst + "mlp.fc2." + wb: sd[src + "mlp.fc2." + wb],
                        "model.final_layernorm." + wb: sd["model.text.post_ln." + wb],
                        "lm_head." + wb: sd["model.text.lm_head." + wb]})
    hf.load_state_dict(out, strict=True)
    return hf


def _reference_text(sd: dict, x: torch.Tensor, n_prefix: int, hidden: bool = False):
    """Moondream's text decoder written from its math (notes §3d): parallel blocks, rotary on the first
    half of each head with half-split pairs and interleaved output, a bidirectional prefix."""
    d, h = T["hidden_size"], T["num_attention_heads"]
    hd = d // h
    rot = hd // 2
    n = x.shape[1]
    pos = torch.arange(n, dtype=torch.float32)
    inv = 1.0 / (T["rope_theta"] ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    ang = pos[:, None] * inv[None]                                      # (n, rot/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(t):                                                        # (1, h, n, hd)
        a, b, rest = t[..., :rot // 2], t[..., rot // 2:rot], t[..., rot:]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        return torch.cat([torch.stack([ra, rb], -1).flatten(-2), rest], -1)

    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[:n_prefix, :n_prefix] = True
    ln = lambda t, p: torch.nn.functional.layer_norm(t, (d,), sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    lin = lambda t, p: t @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    for i in range(T["num_hidden_layers"]):
        b = f"model.text.blocks.{i}"
        y = ln(x, b + ".ln")
        q, k, v = (t.view(1, n, h, hd).transpose(1, 2) for t in lin(y, b + ".attn.qkv").split(d, -1))
        att = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=allowed)
        a = lin(att.transpose(1, 2).reshape(1, n, d), b + ".attn.proj")
        m = lin(torch.nn.functional.gelu(lin(y, b + ".mlp.fc1"), approximate="tanh"), b + ".mlp.fc2")
        x = x + a + m
    logits = lin(ln(x, "model.text.post_ln"), "model.text.lm_head")
    return (logits, x) if hidden else logits                            # x: the pre-final-LN hidden state


# -- (1) text model -----------------------------------------------------------------------------------
def test_text_model_through_key_map_equals_transformers_phi(vlm):
    sd = _raw_state_dict()
    hf = _hf_phi(sd)
    ids = torch.randint(0, 259, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ours = hf(input_ids=ids).logits, vlm.language_model(input_ids=ids).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), float((ours - ref).abs().max())


def test_full_prefill_matches_reference_math_and_phi_with_bidirectional_prefix(vlm):
    sd = _raw_state_dict()
    image = make_image(150)
    embeds, pieces, n_img = vlm.prepare(image, "What is this?")
    assert n_img == N and embeds.shape[1] == 1 + N + len(pieces.after)
    with torch.no_grad():
        ours = vlm(embeds)                                              # BOS + image attend both ways
        ref = _reference_text(sd, embeds, 1 + N)
        causal = _reference_text(sd, embeds, 0)
        mask = torch.ones(embeds.shape[1], embeds.shape[1], dtype=torch.bool).tril()
        mask[:1 + N, :1 + N] = True
        hf = _hf_phi(sd)(inputs_embeds=embeds, attention_mask=torch.zeros(mask.shape).masked_fill(
            ~mask, torch.finfo(torch.float32).min)[None, None]).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), float((ours - ref).abs().max())
    assert torch.allclose(ours, hf, atol=1e-5, rtol=0)
    assert (ours - causal).abs().max() > 1e-3                           # the prefix mask matters


def test_cached_greedy_decode_equals_full_recompute(vlm):
    from edgevlm.modeling.vlm import GenerationConfig

    embeds, _, _ = vlm.prepare(make_image(150), "What is this?")
    toks = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=12), prefix=1 + N))
    seq, ref = embeds, []
    with torch.no_grad():
        for _ in range(len(toks)):
            t = int(vlm(seq, n_prefix=1 + N)[0, -1].argmax())
            ref.append(t)
            seq = torch.cat([seq, vlm.embed_tokens(torch.tensor([[t]]))], 1)
    assert toks == ref and len(toks) == 12 and len(set(toks)) > 1


# -- (2) vision encoder -------------------------------------------------------------------------------
def test_vision_encoder_equals_transformers_siglip(vlm):
    sd = _raw_state_dict()
    c = V["dim"]
    conf = transformers.SiglipVisionConfig(hidden_size=c, intermediate_size=V["ff_dim"], num_hidden_layers=V["layers"],
                                           num_attention_heads=V["heads"], image_size=S, patch_size=P,
                                           layer_norm_eps=1e-5, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    sig = transformers.SiglipVisionModel(conf).eval()
    out = {"vision_model.embeddings.patch_embedding.weight": sd["model.vision.patch_emb.weight"].view(c, 3, P, P),
           "vision_model.embeddings.patch_embedding.bias": sd["model.vision.patch_emb.bias"],
           "vision_model.embeddings.position_embedding.weight": sd["model.vision.pos_emb"][0]}
    for wb in ("weight", "bias"):
        out["vision_model.post_layernorm." + wb] = sd["model.vision.post_ln." + wb]
        for i in range(V["layers"]):
            s, t = f"model.vision.blocks.{i}.", f"vision_model.encoder.layers.{i}."
            q, k, v = sd[s + "attn.qkv." + wb].split(c)
            out.update({t + "self_attn.q_proj." + wb: q, t + "self_attn.k_proj." + wb: k,
                        t + "self_attn.v_proj." + wb: v, t + "self_attn.out_proj." + wb: sd[s + "attn.proj." + wb],
                        t + "layer_norm1." + wb: sd[s + "ln1." + wb], t + "layer_norm2." + wb: sd[s + "ln2." + wb],
                        t + "mlp.fc1." + wb: sd[s + "mlp.fc1." + wb], t + "mlp.fc2." + wb: sd[s + "mlp.fc2." + wb]})
    sig.load_state_dict(out, strict=True)
    px, _ = vlm.image_views(make_image(200, seed=3))
    with torch.no_grad():
        ref, ours = sig(pixel_values=px).last_hidden_state, vlm.vision(px)
    assert ours.shape == (px.shape[0], N, c)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), float((ours - ref).abs().max())


def test_connector_stitches_each_patch_from_the_crop_that_owns_it(vlm):
    side, m = S // P, IMG["options"]["overlap_margin"]
    step = side - 2 * m
    for grid in ((1, 1), (2, 3), (3, 1)):
        local = torch.zeros(grid[0] * grid[1], side, side, 2)
        for r in range(grid[0]):                 # each crop's features = the global (row, col) it sees
            for c in range(grid[1]):
                ys, xs = torch.meshgrid(torch.arange(side) + r * step, torch.arange(side) + c * step, indexing="ij")
                local[r * grid[1] + c] = torch.stack([ys, xs], -1).float()
        out = vlm.connector.stitch(local.view(-1, side * side, 2), grid)
        assert out.shape[:2] == stitched_size(grid, side, m) == (grid[0] * step + 2 * m, grid[1] * step + 2 * m)
        ys, xs = torch.meshgrid(torch.arange(out.shape[0]), torch.arange(out.shape[1]), indexing="ij")
        assert torch.equal(out, torch.stack([ys, xs], -1).float())


# -- (3) crops ----------------------------------------------------------------------------------------
# (H, W) -> (rows, cols), worked by hand from the reference's select_tiling with the real sizes:
# margin 56 px, window 266 px, max 12 crops (notes §3a).
GRIDS = {(378, 378): (1, 1), (300, 5000): (1, 1), (768, 1024): (3, 4), (480, 640): (2, 4), (1080, 1920): (2, 4),
         (2000, 400): (6, 1), (1000, 1000): (3, 3), (600, 900): (2, 4), (412, 1612): (2, 6)}


@pytest.mark.parametrize("hw", GRIDS, ids=[f"{h}x{w}" for h, w in GRIDS])
def test_crop_grid_matches_reference_rule(hw):
    assert overlap_crop_grid(*hw) == GRIDS[hw]


def test_crops_are_the_global_view_then_row_major_windows_of_the_resized_image():
    spec = ImageSpec(**get_vlm_recipe("moondream2").image)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    views, grid = overlap_crops_with_grid(img, spec)
    assert grid == (2, 4) and views.shape == (9, 3, 378, 378) and views.dtype == np.float32
    assert np.array_equal(views, preprocess_image(img, spec))          # the registered layout gives the same
    norm = lambda a: (np.asarray(a, np.float32) / 255 - 0.5) / 0.5   # noqa: E731
    assert np.allclose(views[0], norm(img.resize((378, 378), Image.LANCZOS)).transpose(2, 0, 1))
    big = np.asarray(img.resize((4 * 266 + 112, 2 * 266 + 112), Image.LANCZOS))   # 1176 x 644
    for r in range(2):
        for c in range(4):
            tile = big[r * 266:r * 266 + 378, c * 266:c * 266 + 378]
            assert np.allclose(views[1 + r * 4 + c], norm(tile).transpose(2, 0, 1))
    assert views.min() >= -1 and views.max() <= 1
    assert stitched_size(grid, 27, 4) == (46, 84)


# -- (4) skills ---------------------------------------------------------------------------------------
def test_skills_return_structured_results_and_streaming_agrees(vlm):
    image = make_image(180, seed=2)
    cap = vlm.caption(image, length="short", max_new_tokens=10)
    assert isinstance(cap, str) and cap
    assert "".join(vlm.caption(image, length="short", max_new_tokens=10, stream=True)) == cap
    assert isinstance(vlm.caption(image, length="long", max_new_tokens=4), str)
    ans = vlm.query(image, "How many?", max_new_tokens=10)
    assert isinstance(ans, str) and "".join(vlm.query(image, "How many?", max_new_tokens=10, stream=True)) == ans
    gen = vlm.generate(image, "How many?", max_new_tokens=10)       # generate is a query
    assert gen.text == ans and gen.stats.image_tokens == N
    assert "".join(vlm.generate(image, "How many?", max_new_tokens=10, stream=True)) == ans
    boxes = vlm.detect(image, "cat", max_objects=4)
    points = vlm.point(image, "cat", max_objects=4)
    assert boxes and points and len(boxes) <= 4 and len(points) <= 4
    for b in boxes:
        assert set(b) == {"x_min", "y_min", "x_max", "y_max"}
        assert 0 <= b["x_min"] <= b["x_max"] <= 1 and 0 <= b["y_min"] <= b["y_max"] <= 1
    for p in points:
        assert set(p) == {"x", "y"} and 0 <= p["x"] < 1 and 0 <= p["y"] < 1
    assert vlm.parts().keys() == {"vision", "connector", "language_model", "region"}
    assert vlm.published_param_count() == sum(p.numel() for p in vlm.parameters()) - sum(
        p.numel() for p in vlm.region.parameters())


@pytest.mark.parametrize("revision", ["2025-01-09", "2025-04-14"])
def test_point_and_detect_follow_the_reference_region_loop(ckpt, revision):
    """Objects decoded by the reference protocol (notes §4d) with a full recompute per step from the raw
    tensors: coordinate bins read from the pre-final-LN hidden state, Fourier-encoded values fed back."""
    sd = _raw_state_dict()
    lin = lambda t, p: t @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    mlp = lambda t, p: lin(torch.nn.functional.gelu(lin(t, p + ".fc1"), approximate="tanh"), p + ".fc2")  # noqa: E731
    vlm = load_vlm("moondream2_tiny", weights=ckpt, revision=revision)
    image, tokens = make_image(180, seed=2), CFG["tokens"]
    text = " cat" if revision >= "2025-03-27" else "cat"       # 2025-01-09 encodes the bare object

    def enc(vals, kind):
        f = 2 * math.pi * torch.tensor([vals]) @ sd[f"model.region.{kind}_features"]
        return lin(torch.cat([f.cos(), f.sin()], -1), f"model.region.{kind}_encoder")[None]   # (1, 1, D)

    def step(seq):
        logits, hidden = _reference_text(sd, seq, 1 + N, hidden=True)
        return logits[0, -1], hidden[0, -1]

    def bin_of(logits):
        return int(logits.argmax()) / logits.shape[-1]

    for kind in ("point", "detect"):
        ids = tokens[kind]["prefix"] + vlm.tokenizer.encode(text) + tokens[kind]["suffix"]
        seq, _ = vlm.embed_prompt(image, ids)
        ref = []
        with torch.no_grad():
            logits, hidden = step(seq)
            while int(logits.argmax()) != tokens["eos_id"] and len(ref) < 3:
                x = bin_of(mlp(hidden, "model.region.coord_decoder"))
                seq = torch.cat([seq, enc([x], "coord")], 1)
                y = bin_of(mlp(step(seq)[1], "model.region.coord_decoder"))
                seq = torch.cat([seq, enc([y], "coord")], 1)
                if kind == "detect":   # log2 size bins from 2025-03-27: 2^(bin/(bins-1)*10 - 10); linear before
                    wh = mlp(step(seq)[1], "model.region.size_decoder").view(2, -1)
                    bins = wh.shape[-1]
                    w, h = (2.0 ** (int(b) / (bins - 1) * 10 - 10) if revision >= "2025-03-27" else int(b) / bins
                            for b in wh.argmax(-1))
                    seq = torch.cat([seq, enc([w, h], "size")], 1)
                    ref.append({"x_min": max(x - w / 2, 0), "y_min": max(y - h / 2, 0),
                                "x_max": min(x + w / 2, 1), "y_max": min(y + h / 2, 1)})
                else:
                    ref.append({"x": x, "y": y})
                logits, hidden = step(seq)
        ours = getattr(vlm, kind)(image, "cat", max_objects=3)
        assert len(ours) == len(ref) > 0, kind
        for a, b in zip(ours, ref):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a), (kind, a, b)


# -- revisions ----------------------------------------------------------------------------------------
def test_revisions_change_prompts_and_are_checked(ckpt, vlm):
    old = load_vlm("moondream2_tiny", weights=ckpt, revision="2025-01-09")
    assert load_vlm("moondream2_tiny", weights=ckpt).revision == "2025-04-14"       # newest by default
    q = CFG["tokens"]["query"]
    assert old.query_ids("cat") == q["prefix"] + old.tokenizer.encode("cat") + q["suffix"]
    assert vlm.query_ids("cat") == q["prefix"] + vlm.tokenizer.encode(" cat") + q["suffix"]
    with pytest.raises(ConfigError, match="caption length 'long' is not in revision 2025-01-09"):
        old.caption(make_image(), length="long")
    with pytest.raises(CheckpointError, match="2024-08-26.*not one edgevlm reads.*2025-01-09, 2025-03-27, 2025-04-14"):
        load_vlm("moondream2_tiny", weights=ckpt, revision="2024-08-26")
    recipe = get_vlm_recipe("moondream2_tiny")
    with pytest.raises(CheckpointError, match="2025-06-21 is not supported: .*starmie.*does not ship"):
        get_family("moondream2").load(recipe, ckpt, "2025-06-21")


def test_real_recipe_builds_on_meta_with_the_counted_parameters():
    from edgevlm.modeling.families import build_vlm

    m = build_vlm("moondream2", device="meta")
    parts = {k: sum(p.numel() for p in v.parameters()) for k, v in m.parts().items()}
    assert parts == {"vision": 412_987_248, "connector": 35_661_824, "language_model": 1_418_270_720,
                     "region": 60_317_312}                      # notes §5, from the reference's shapes
    assert sum(parts.values()) == get_vlm_recipe("moondream2").params
    assert m.published_param_count() == 1_866_919_792
    assert m.language_model.model.layers[0].self_attn.rotary_ndims == 32 and m.max_context == 2048


# -- (5) bad input ------------------------------------------------------------------------------------
def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_single_file_with_tokenizer_next_to_it_loads(ckpt, vlm, tmp_path):
    d = _copy(ckpt, tmp_path / "flat", skip=("config.json",))
    m = load_vlm("moondream2_tiny", weights=d / "model.safetensors")
    for a, b in zip(m.state_dict().values(), vlm.state_dict().values()):
        assert torch.equal(a, b)


def test_half_precision_file_loads_as_stored(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in _raw_state_dict().items()}   # the HF files are fp16/bf16
    m = load_vlm("moondream2_tiny", weights=_write(tmp_path / "bf16", sd))
    assert m.language_model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(m.language_model.model.embed_tokens.weight, sd["model.text.wte"].float())
    assert torch.equal(m.region.size_features, sd["model.region.size_features"].float())
    assert isinstance(m.point(make_image(), "dog", max_objects=2), list)


def test_missing_tokenizer_and_config(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json.*fix: copy tokenizer.json .*vikhyatk/moondream2"):
        load_vlm("moondream2_tiny", weights=_copy(ckpt, tmp_path / "a", skip=("tokenizer.json",)))
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_vlm("moondream2_tiny", weights=_copy(ckpt, tmp_path / "b", skip=("tokenizer.json",)) / "model.safetensors")
    with pytest.raises(CheckpointError, match="no config.json.*fix: pass the vikhyatk/moondream2 snapshot"):
        load_vlm("moondream2_tiny", weights=_copy(ckpt, tmp_path / "c", skip=("config.json",)))
    d = _copy(ckpt, tmp_path / "d")
    (d / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CheckpointError, match="model_type 'llava', not 'moondream1'"):
        load_vlm("moondream2_tiny", weights=d)
    e = tmp_path / "e"   # another model's tokenizer: its end-of-text id is not moondream's
    _write(e, tokenizer=False)
    write_tokenizer(e)
    with pytest.raises(CheckpointError, match="ends text with id 257, moondream2_tiny with 259"):
        load_vlm("moondream2_tiny", weights=e)


def test_mismatched_keys_are_listed(tmp_path):
    sd = _raw_state_dict()
    sd.pop("model.text.blocks.1.mlp.fc2.bias")
    sd["model.vision.pos_emb"] = torch.zeros(1, N + 1, V["dim"])
    sd["model.text.extra"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"1 missing: language_model.model.layers.1.mlp.fc2.bias; "
                                              r"1 unexpected: model.text.extra; 1 mis-shaped: vision.pos_emb"):
        load_vlm("moondream2_tiny", weights=_write(tmp_path / "bad", sd))
    old = {"vision_encoder.encoder.model.visual.pos_embed": torch.zeros(1), "text_model.lm_head.linear.bias": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="old HF remote-code layout"):
        load_vlm("moondream2_tiny", weights=_write(tmp_path / "old", old))


def test_pickles_are_refused(ckpt, tmp_path):
    d = _copy(ckpt, tmp_path / "pkl", skip=("model.safetensors",))
    torch.save({k: v for k, v in _raw_state_dict().items()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*found pytorch_model.bin.*published as safetensors"):
        load_vlm("moondream2_tiny", weights=d)
    with pytest.raises(CheckpointError, match="is not a safetensors file .*looks like a pickle.*does not unpickle"):
        load_vlm("moondream2_tiny", weights=d / "pytorch_model.bin")
    (d / "model.safetensors").write_bytes((d / "pytorch_model.bin").read_bytes())   # a pickle under the right name
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_vlm("moondream2_tiny", weights=d)


def test_checkpoint_without_region_heads_answers_but_cannot_detect(tmp_path):
    sd = {k: v for k, v in _raw_state_dict().items() if not k.startswith("model.region.")}
    m = load_vlm("moondream2_tiny", weights=_write(tmp_path / "noregion", sd))
    assert "region" not in m.parts()
    assert isinstance(m.query(make_image(), "What?", max_new_tokens=3), str)
    with pytest.raises(ConfigError, match="without region heads.*cannot detect"):
        m.detect(make_image(), "cat")
    with pytest.raises(ConfigError, match="cannot point"):
        m.point(make_image(), "cat")


def test_empty_prompts_and_objects(vlm):
    for call in (lambda: vlm.query(make_image(), "  "), lambda: vlm.generate(make_image(), ""),
                 lambda: vlm.detect(make_image(), ""), lambda: vlm.point(make_image(), "\n")):
        with pytest.raises(ConfigError, match="is empty"):
            call()
    with pytest.raises(ConfigError, match="caption length 'tiny'"):
        vlm.caption(make_image(), length="tiny")
