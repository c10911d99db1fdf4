"""VLM parts as ONNX (exporters.vlm_onnx): decoder with KV cache, embeddings, vision graphs, quantized decoders;
the shared-KV attention rewrite (compress.attention) on them.

Each tiny family (and a tiny LLaVA saved by transformers) is exported once per session (cached by name;
the ``exported`` fixture is parametrized over them); the tests compare ONNX Runtime against eager PyTorch
on a real spliced prompt with an image.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
import torch  # noqa: E402

from edgevlm.compress import attention, onnx_io  # noqa: E402
from edgevlm.exporters import vlm_onnx  # noqa: E402
from edgevlm.modeling.families import load_vlm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from vlm_utils import hf_llava_checkpoint, make_image  # noqa: E402

MODELS = ["edgevlm_scenes_tiny", "llava_tiny", "moondream2_tiny", "tinygpt_v_tiny", "llava_mini_tiny", "hf_llava"]
N_NEW = 32
SHARPEN = 4.0      # random init is so flat that greedy tokens tie; scaled weights make them distinct


def _session(path):
    from edgevlm.exporters.validate import ort_session     # the exporters' own session, as the parity checks open it

    return ort_session(path)


def _load(name: str, tmp: Path):
    if name == "hf_llava":
        hf_llava_checkpoint(tmp / "hf", sharpen=SHARPEN)
        return load_vlm("llava_tiny", weights=tmp / "hf")
    vlm = load_vlm(name, weights="random")
    with torch.no_grad():
        for p in vlm.language_model.parameters():
            p.mul_(SHARPEN)
    return vlm


_EXPORTS: dict[str, SimpleNamespace] = {}


def _exported(name: str, tmp_path_factory) -> SimpleNamespace:
    """Export ``name`` once per session (the family-specific tests reuse the parametrized exports)."""
    if name in _EXPORTS:
        return _EXPORTS[name]
    out = tmp_path_factory.mktemp(name)
    vlm = _load(name, out).eval()
    img = make_image(96)
    with torch.inference_mode():
        embeds, pieces, n_img = vlm.prepare(img, "What is this?")
    prefix = len(pieces.before) + n_img if vlm.bidirectional_image_prefix and n_img else 0
    if vlm.family == "moondream2":
        pixels, grid = vlm.image_views(img)
    else:
        pixels, grid = vlm.pixel_values(img), None
    ns = SimpleNamespace(name=name, vlm=vlm, dir=out, embeds=embeds, pieces=pieces, n_img=n_img, prefix=prefix,
                         pixels=pixels, grid=grid)
    ns.decoder = vlm_onnx.export_decoder(vlm.language_model, out / "decoder.onnx")
    ns.embed = vlm_onnx.export_embed_tokens(vlm.language_model, out / "embed_tokens.onnx")
    ns.specs = vlm.export_parts(img)              # the family's parts, as data
    ns.vision = {spec.file: vlm_onnx.export_part(spec, out) for spec in ns.specs}
    ns.reference = vlm_onnx.eager_reference(vlm.language_model, embeds, N_NEW, prefix)
    _EXPORTS[name] = ns
    return ns


@pytest.fixture(params=MODELS)
def exported(request, tmp_path_factory):
    return _exported(request.param, tmp_path_factory)


def test_decoder_fp32_gives_eagers_greedy_tokens(exported):
    e = exported
    f = e.decoder
    cfg = e.vlm.language_model.config
    assert (f["num_layers"], f["hidden_size"], f["vocab_size"]) == (cfg.num_hidden_layers, cfg.hidden_size,
                                                                     e.vlm.language_model.lm_head.out_features)
    assert f["checker"].startswith("onnx.checker") and f["external_data"] is False and f["ops"]["MatMul"] > 0
    sess = _session(e.dir / "decoder.onnx")
    ins, outs = vlm_onnx.decoder_io_names(f["num_layers"])
    assert [i.name for i in sess.get_inputs()] == ins and [o.name for o in sess.get_outputs()] == outs
    assert sess.get_inputs()[3].shape[1:] == [f["num_kv_heads"], sess.get_inputs()[3].shape[2], f["head_dim"]]
    # the reference is the model's own decode loop (including Moondream's bidirectional prefill)
    from edgevlm.modeling.vlm import GenerationConfig

    own = list(e.vlm.decode_tokens(e.embeds, GenerationConfig(max_new_tokens=8), prefix=e.prefix))
    assert own == e.reference["tokens"][:8] and len(set(e.reference["tokens"])) > 4, e.reference["tokens"]
    par = vlm_onnx.decoder_parity(e.vlm.language_model, e.dir / "decoder.onnx", e.embeds, N_NEW, e.prefix,
                                  embed_path=e.dir / "embed_tokens.onnx", reference=e.reference)
    print(f"\n{e.name} fp32 decoder: max |logit diff| {par['max_logit_abs_diff']:.2e}, KL {par['mean_kl']:.1e}")
    assert par["first_divergence"] is None and par["token_agreement"] == 1.0
    assert par["onnx_tokens"] == e.reference["tokens"] and len(par["onnx_tokens"]) == N_NEW
    assert par["max_logit_abs_diff"] <= 1e-4 and par["mean_kl"] < 1e-8


def _image_embeds_onnx(e) -> np.ndarray:
    """image_embeds through the ONNX graphs as the runtime chains them (Moondream: tower -> merge -> projector)."""
    x = e.pixels.float().numpy()
    if "vision_tower.onnx" in e.vision:
        feats = _session(e.dir / "vision_tower.onnx").run(None, {"pixel_values": x})[0]
        merged = vlm_onnx.merge_crops_numpy(feats, e.grid, e.vlm.connector.side, e.vlm.connector.margin)
        return _session(e.dir / "vision_projector.onnx").run(None, {"merged_features": merged})[0]
    return _session(e.dir / "vision_encoder.onnx").run(None, {"pixel_values": x})[0]


def test_vision_encoder_parity(exported):
    e = exported
    for spec in e.specs:                        # each declared part against its own eager module
        rec = vlm_onnx.part_parity(spec, e.dir / spec.file)
        assert rec["passed"] and rec["max_abs_diff"] <= 1e-4 * max(1.0, rec["output_scale"]), (spec.name, rec)
        assert e.vision[spec.file]["inputs"] == list(spec.inputs) and e.vision[spec.file]["role"] == spec.role.value
    # and the chain of parts against the eager model's encode_image (Moondream: with the image's real grid)
    with torch.inference_mode():
        ref = (e.vlm.encode_image(e.pixels, e.grid) if e.grid else e.vlm.encode_image(e.pixels)).float().numpy()
    from edgevlm.exporters.validate import compare

    rec = compare(ref, _image_embeds_onnx(e), "fp32", "image_embeds")
    print(f"\n{e.name} vision: max |diff| {rec['max_abs_diff']:.2e} (scale {rec['output_scale']:.2f})")
    # LLaVA-Mini's encoder gives M projected + N compressed tokens; the LLM reads the N (after pre-fusion)
    n_img = e.vision["vision_encoder.onnx"]["image_tokens"] if e.vlm.family == "llava_mini" else e.n_img
    # 1e-4 absolute, relative above scale 1 (validate.compare's FP32 rule: hf_llava's sharpened CLIP reaches ~3)
    assert rec["passed"] and rec["max_abs_diff"] <= 1e-4 * max(1.0, rec["output_scale"])
    assert rec["shape"] == [1, n_img, e.vlm.hidden_size]
    names = set(e.vision)
    if e.vlm.family == "moondream2":
        assert names == {"vision_tower.onnx", "vision_projector.onnx"} | ({"region.onnx"} if e.vlm.region else set())
        tower = _session(e.dir / "vision_tower.onnx")       # dynamic views: one view and the full set
        for v in (1, e.pixels.shape[0]):
            got = tower.run(None, {"pixel_values": e.pixels[:v].numpy()})[0]
            with torch.inference_mode():
                ref = e.vlm.vision(e.pixels[:v]).numpy()
            assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
    elif e.vlm.family == "llava_mini":
        assert names == {"vision_encoder.onnx", "prefusion.onnx"}
    else:
        assert names == {"vision_encoder.onnx"}


def test_embed_tokens_exact(exported):
    e = exported
    ids = np.array([e.pieces.before + e.pieces.after], dtype=np.int64)
    got = _session(e.dir / "embed_tokens.onnx").run(None, {"input_ids": ids})[0]
    with torch.inference_mode():
        ref = e.vlm.embed_tokens(torch.from_numpy(ids)).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, ref)
    assert e.embed["vocab_size"] == e.vlm.language_model.get_input_embeddings().num_embeddings


def test_quantized_decoders_run_close_to_eager(exported):
    e = exported
    res = {}
    for prec in ("int8", "int4", "fp16"):
        dst = e.dir / f"decoder.{prec}.onnx"
        q = vlm_onnx.quantize_decoder(e.dir / "decoder.onnx", dst, prec)
        assert q["file_bytes"] < q["fp32_file_bytes"] and q["weight_coverage"] > 0.9, q
        res[prec] = vlm_onnx.decoder_parity(e.vlm.language_model, dst, e.embeds, N_NEW, e.prefix,
                                            reference=e.reference)
        res[prec]["ops"] = q["ops"]
    base = res["int8"]["kl_uniform_baseline"]
    print(f"\n{e.name}: " + ", ".join(f"{p} agreement {r['token_agreement']:.2f} KL {r['mean_kl']:.1e}"
                                      for p, r in res.items()) + f" (uniform KL {base:.2f})")
    assert "MatMulInteger" in res["int8"]["ops"] and "MatMulNBits" in res["int4"]["ops"]
    import onnx

    g = onnx.load(str(e.dir / "decoder.int4.onnx")).graph
    weights = {i.name for i in g.initializer if len(i.dims) == 2}
    assert not [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in weights]   # every weight MatMul
    assert base > 1.0                                            # eager is far from uniform: a real yardstick
    assert res["int8"]["mean_kl"] < 0.1 * base and res["int8"]["token_agreement"] >= 0.5
    assert res["int4"]["mean_kl"] < base and res["int8"]["mean_kl"] < res["int4"]["mean_kl"]
    assert res["fp16"]["mean_kl"] < 0.01 * base and res["fp16"]["token_agreement"] >= 0.9


def test_fused_attention_with_shared_kv_buffer_keeps_eagers_tokens(exported, monkeypatch):
    """CPU bundles' decoder: one GroupQueryAttention per layer appending to a KV buffer bound to past and present,
    applying the model's RoPE itself where ONNX Runtime can (a multiple of 16 rotated dimensions per head: 16
    here; checked against the model's RoPE ops; the 16-wide tiny Phi heads rotate 8, and keep theirs). Same
    greedy tokens and logits as eager (Moondream: with its bidirectional prefix), growing the buffer on the way;
    INT4 fused gives the plain INT4 graph's logits."""
    import onnx

    from edgevlm.runtime.vlm import OrtDecoder

    e = exported
    lm = e.vlm.language_model
    cfg = lm.config
    f = e.decoder
    fused = e.dir / "decoder.fused.onnx"
    tables = attention.rotary_tables(lm, e.vlm.max_context)
    rotary_dim = int(f["head_dim"] * getattr(cfg, "partial_rotary_factor", 1.0))
    assert tables is not None and tables[0].shape == (e.vlm.max_context, rotary_dim // 2)
    res = attention.fuse_attention(e.dir / "decoder.onnx", cfg.num_attention_heads, f["num_kv_heads"], f["head_dim"],
                                   dst=fused, rotary=tables)
    assert res["kv_cache"].startswith("shared buffer") and res["fused_layers"] == f["num_layers"], res
    ops = res["ops"]
    assert ops["GroupQueryAttention"] == f["num_layers"] and "Softmax" not in ops, ops
    g = onnx.load(str(fused), load_external_data=False).graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    rotates = {a.name: a.i for a in gqa[0].attribute}["do_rotary"]
    if rotary_dim >= 16:
        assert res["rope"].startswith("in GroupQueryAttention") and rotates == 1, res
        assert res["packed_qkv_layers"] == f["num_layers"] and list(gqa[0].input)[1:3] == ["", ""], res
        assert "Sin" not in ops and "Cos" not in ops and "Neg" not in ops, ops        # the model's RoPE is gone
        assert list(gqa[0].input)[7:10] == ["gqa_cos_cache", "gqa_sin_cache", "position_ids"]
    else:
        assert res["rope"] == "the model's own ops" and "multiple of 16" in res["rope_why"] and rotates == 0, res
    assert [i.name for i in g.input][-2:] == ["seqlens_k", "total_sequence_length"]
    monkeypatch.setattr(OrtDecoder, "FIRST_BUFFER", 8)            # the prompt and new tokens outgrow it
    par = vlm_onnx.decoder_parity(lm, fused, e.embeds, N_NEW, e.prefix,
                                  embed_path=e.dir / "embed_tokens.onnx", reference=e.reference)
    assert par["onnx_tokens"] == e.reference["tokens"] and par["first_divergence"] is None
    assert par["max_logit_abs_diff"] <= 1e-4 and par["mean_kl"] < 1e-8, par
    # a RoPE the op would get wrong is caught by the check and left to the model: positions shifted by one
    wrong = (np.roll(tables[0], 1, axis=0), np.roll(tables[1], 1, axis=0))
    if rotary_dim >= 16:
        off = attention.fuse_attention(e.dir / "decoder.onnx", cfg.num_attention_heads, f["num_kv_heads"],
                                       f["head_dim"], dst=e.dir / "decoder.off.onnx", rotary=wrong)
        assert off["rope"] == "the model's own ops" and off["rope_why"].startswith("logits differ"), off
    plain4, fused4, rot4 = (e.dir / f"decoder.q4{x}.onnx" for x in ("", ".fused", ".rot"))
    vlm_onnx.quantize_decoder(e.dir / "decoder.onnx", plain4, "int4")
    late = attention.fuse_attention(plain4, cfg.num_attention_heads, f["num_kv_heads"], f["head_dim"], dst=fused4,
                                    rotary=tables)
    assert late["rope"] == "the model's own ops" and "already quantized" in late["rope_why"], late
    a = vlm_onnx.decoder_parity(lm, plain4, e.embeds, 8, e.prefix, reference=e.reference)
    b = vlm_onnx.decoder_parity(lm, fused4, e.embeds, 8, e.prefix, reference=e.reference)
    assert b["onnx_tokens"] == a["onnx_tokens"] and abs(a["mean_kl"] - b["mean_kl"]) <= 1e-6 + 1e-3 * a["mean_kl"]
    # as bundles are made: the fused FP32 graph, quantized (INT4's rounding of activations sees RoPE's own
    # rounding, so not bit-equal to the plain INT4 graph: as far from eager)
    vlm_onnx.quantize_decoder(fused, rot4, "int4")
    c = vlm_onnx.decoder_parity(lm, rot4, e.embeds, 8, e.prefix, reference=e.reference)
    assert abs(c["mean_kl"] - a["mean_kl"]) <= 0.05 * a["mean_kl"] + 1e-6, (a, c)
    assert c["token_agreement"] >= a["token_agreement"] - 0.125, (a, c)
    # a graph without that attention is left as it is, and says why
    other = attention.fuse_attention(e.dir / "embed_tokens.onnx", cfg.num_attention_heads, f["num_kv_heads"],
                                     f["head_dim"], dst=e.dir / "nothing.onnx")
    assert other == {"kv_cache": "concat", "why": "no KV-cache inputs"} and not (e.dir / "nothing.onnx").exists()
    again = attention.fuse_attention(fused, cfg.num_attention_heads, f["num_kv_heads"], f["head_dim"],
                                     dst=e.dir / "nothing.onnx")
    assert again["kv_cache"] == "concat" and again["why"].startswith("layer 0:"), again


def test_phi_rope_and_biased_projections_move_into_the_attention_op(tmp_path):
    """Phi's partial RoPE (32 of 64 dims per head here, as Moondream2's and Phi-2's 32 of 64 / 80) and its biased
    q/k/v projections: fused into one GroupQueryAttention with do_rotary and one packed projection, same greedy
    tokens as eager; then INT4 from that graph as bundles are made."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.PhiConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, partial_rotary_factor=0.5, max_position_embeddings=64)
    lm = transformers.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(SHARPEN)
    f = vlm_onnx.export_decoder(lm, tmp_path / "decoder.onnx")
    tables = attention.rotary_tables(lm, 64)
    assert tables[0].shape == (64, 16)
    res = attention.fuse_attention(tmp_path / "decoder.onnx", 2, f["num_kv_heads"], f["head_dim"],
                                   dst=tmp_path / "fused.onnx", rotary=tables)
    assert res["rope"].startswith("in GroupQueryAttention (do_rotary, rotary dim 32") and res["packed_qkv_layers"] == 2
    ops = res["ops"]
    assert ops["MatMul"] == 2 * 4 + 1 and "Sin" not in ops and "Cos" not in ops, ops   # qkv, dense, fc1, fc2; lm_head
    embeds = torch.randn(1, 6, 128)
    ref = vlm_onnx.eager_reference(lm, embeds, 12)
    par = vlm_onnx.decoder_parity(lm, tmp_path / "fused.onnx", embeds, 12, reference=ref)
    assert par["first_divergence"] is None and par["max_logit_abs_diff"] <= 1e-4, par
    plain4, rot4 = tmp_path / "plain4.onnx", tmp_path / "rot4.onnx"
    vlm_onnx.quantize_decoder(tmp_path / "decoder.onnx", plain4, "int4")
    q = vlm_onnx.quantize_decoder(tmp_path / "fused.onnx", rot4, "int4")
    assert q["ops"]["MatMulNBits"] == 9 and q["ops"]["GroupQueryAttention"] == 2, q["ops"]
    a = vlm_onnx.decoder_parity(lm, plain4, embeds, 12, reference=ref)
    b = vlm_onnx.decoder_parity(lm, rot4, embeds, 12, reference=ref)
    assert abs(a["mean_kl"] - b["mean_kl"]) <= 0.05 * a["mean_kl"] + 1e-6, (a, b)


def test_qk_layernorm_keeps_rope_in_the_model(tmp_path):
    """Phi with qk_layernorm (TinyGPT-V's Phi-2: q and k normalized per head before RoPE): the op's RoPE would
    rotate them unnormalized, so RoPE stays the model's ops, said up front (at Phi-2's real size the logit check
    caught it: 0.30 apart); the attention is still fused and gives eager's tokens."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.PhiConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, partial_rotary_factor=0.5, max_position_embeddings=64,
                                 qk_layernorm=True)
    lm = transformers.PhiForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.mul_(SHARPEN)
    f = vlm_onnx.export_decoder(lm, tmp_path / "decoder.onnx")
    res = attention.fuse_attention(tmp_path / "decoder.onnx", 2, f["num_kv_heads"], f["head_dim"],
                                   dst=tmp_path / "fused.onnx", rotary=attention.rotary_tables(lm, 64))
    assert res["kv_cache"].startswith("shared buffer") and res["rope"] == "the model's own ops", res
    assert "normalized per head before RoPE" in res["rope_why"], res
    embeds = torch.randn(1, 6, 128)
    par = vlm_onnx.decoder_parity(lm, tmp_path / "fused.onnx", embeds, 12,
                                  reference=vlm_onnx.eager_reference(lm, embeds, 12))
    assert par["first_divergence"] is None and par["max_logit_abs_diff"] <= 1e-4, par


def test_decoder_with_external_weights_keeps_them_when_placed_in_a_bundle(tmp_path):
    """A decoder over 2 GiB is saved with its weights in ``<file>.data``, which the graph names: moving it into
    the bundle under another name (onnx_io.move_model, as build_vlm places it) saves it again, so the bundle's
    decoder.onnx loads."""
    from edgevlm.compress.onnx_io import move_model

    lm = load_vlm("llava_tiny", weights="random").language_model.eval()
    src = tmp_path / "scratch" / "decoder.fp32.onnx"
    src.parent.mkdir()
    vlm_onnx.export_decoder(lm, src, external_data=True)
    assert src.with_name("decoder.fp32.onnx.data").is_file()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    move_model(src, bundle / "decoder.onnx")
    assert sorted(p.name for p in bundle.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    src.with_name("decoder.fp32.onnx.data").unlink(missing_ok=True)    # the scratch directory goes away
    sess = _session(bundle / "decoder.onnx")
    assert sess.get_inputs()[0].name == "inputs_embeds"


# -- family specifics ----------------------------------------------------------------------------------
def test_moondream_prefix_path(tmp_path_factory):
    e = _exported("moondream2_tiny", tmp_path_factory)
    assert e.prefix == 1 + e.n_img > 1
    # the bidirectional prefix matters: the same prompt under a plain causal mask gives other logits
    sess = _session(e.dir / "decoder.onnx")
    s = int(e.embeds.shape[1])
    kv = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[3:]}
    feed = {"inputs_embeds": e.embeds.numpy(), "position_ids": np.arange(s)[None], **kv}
    causal = sess.run(None, {**feed, "attention_mask": vlm_onnx.attention_mask(s)})[0][0]
    bidir = sess.run(None, {**feed, "attention_mask": vlm_onnx.attention_mask(s, 0, e.prefix)})[0][0]
    assert np.abs(bidir - e.reference["logits"][0]).max() <= 1e-4
    assert np.abs(causal - bidir).max() > 1e-3
    # end to end from the image: tower -> numpy merge -> projector -> decoder = the model's prompt
    feats = _session(e.dir / "vision_tower.onnx").run(None, {"pixel_values": e.pixels.numpy()})[0]
    merged = vlm_onnx.merge_crops_numpy(feats, e.grid, e.vlm.connector.side, e.vlm.connector.margin)
    img = _session(e.dir / "vision_projector.onnx").run(None, {"merged_features": merged})[0]
    emb = _session(e.dir / "embed_tokens.onnx")
    ids = [np.array([p], np.int64) for p in (e.pieces.before, e.pieces.after)]
    prompt = np.concatenate([emb.run(None, {"input_ids": ids[0]})[0], img, emb.run(None, {"input_ids": ids[1]})[0]], 1)
    assert np.abs(prompt - e.embeds.numpy()).max() <= 1e-4


@pytest.mark.parametrize("grid", [(2, 2), (1, 3)])
def test_merge_crops_numpy_equals_connector(grid):
    from edgevlm.modeling.moondream2 import MoondreamConnector

    conn = MoondreamConnector(enc_dim=8, inner=16, out_dim=16, side=8, overlap_margin=2)
    feats = torch.randn(1 + grid[0] * grid[1], 64, 8, generator=torch.Generator().manual_seed(0))
    ref = conn.merge(feats, grid).numpy()
    got = vlm_onnx.merge_crops_numpy(feats.numpy(), grid, 8, 2)
    assert got.shape == ref.shape == (64, 16) and np.abs(got - ref).max() <= 1e-5
    with pytest.raises(ValueError, match="grid"):
        vlm_onnx.merge_crops_numpy(feats.numpy(), (2, 3), 8, 2)


def test_runtime_helpers_import_without_torch():
    code = ("import sys, numpy as np; from edgevlm.exporters.vlm_onnx import merge_crops_numpy, attention_mask; "
            "m = attention_mask(3, 2, 0); assert m.shape == (1, 1, 3, 5) and m[0, 0, 0, 3] < -1e38; "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_llava_mini_prefusion_and_splice(tmp_path_factory):
    e = _exported("llava_mini_tiny", tmp_path_factory)
    from edgevlm.processor import PromptPieces

    vlm = e.vlm
    # token 0 is one the reference drops from pre-fusion: the keep mask path, end to end
    pieces = PromptPieces(e.pieces.before + [0], e.pieces.after, True)
    img = _session(e.dir / "vision_encoder.onnx").run(None, {"pixel_values": e.pixels.numpy()})[0]
    ids = pieces.before + pieces.after
    text = _session(e.dir / "embed_tokens.onnx").run(None, {"input_ids": np.array([ids], np.int64)})[0]
    keep = np.ones(img.shape[1] + len(ids), bool)
    keep[img.shape[1] + np.flatnonzero(np.isin(ids, vlm.prefusion_skip_ids))] = False
    x = np.concatenate([img, text], 1)
    fused = _session(e.dir / "prefusion.onnx").run(None, {"inputs_embeds": x, "keep": keep})[0]
    got = vlm_onnx.splice_llava_mini(fused, img.shape[1], vlm.n_tokens, len(pieces.before))
    with torch.inference_mode():
        ref = vlm.splice(pieces, vlm.encode_image(e.pixels)).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4
    # and the prompt the decoder test used is this pipeline without the dropped token
    assert e.embeds.shape[1] == len(e.pieces.before) + len(e.pieces.after) + vlm.n_tokens


def test_decoder_chunked_prefill_and_external_data(tmp_path_factory, tmp_path):
    """Dynamic S and P: prefill in two chunks (P = 0 then P = k) = one prefill; the graph saved with
    external data (as > 2 GB decoders are) runs the same and quantizes."""
    e = _exported("llava_tiny", tmp_path_factory)
    import onnx

    sess = _session(e.dir / "decoder.onnx")
    x, s, k = e.embeds.numpy(), int(e.embeds.shape[1]), 7
    zero = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[3:]}
    whole = sess.run(None, {"inputs_embeds": x, "attention_mask": vlm_onnx.attention_mask(s),
                            "position_ids": np.arange(s)[None], **zero})
    first = sess.run(None, {"inputs_embeds": x[:, :k], "attention_mask": vlm_onnx.attention_mask(k),
                            "position_ids": np.arange(k)[None], **zero})
    past = {n.name.replace("present.", "past_key_values."): r for n, r in zip(sess.get_outputs()[1:], first[1:])}
    second = sess.run(None, {"inputs_embeds": x[:, k:], "attention_mask": vlm_onnx.attention_mask(s - k, k),
                             "position_ids": np.arange(k, s)[None], **past})
    assert np.abs(second[0] - whole[0]).max() <= 1e-4
    assert all(np.abs(a - b).max() <= 1e-4 for a, b in zip(second[1:], whole[1:]))

    big = tmp_path / "decoder.onnx"
    assert onnx_io.save_model(onnx.load(str(e.dir / "decoder.onnx")), big, external_data=True)
    assert (tmp_path / "decoder.onnx.data").stat().st_size > big.stat().st_size
    again = _session(big).run(None, {"inputs_embeds": x, "attention_mask": vlm_onnx.attention_mask(s),
                                     "position_ids": np.arange(s)[None], **zero})
    assert np.array_equal(again[0], whole[0])
    q = vlm_onnx.quantize_decoder(big, tmp_path / "decoder.int4.onnx", "int4")
    assert q["matmulnbits"] > 0 and not q["external_data"]
    from edgevlm.errors import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        vlm_onnx.quantize_decoder(big, tmp_path / "x.onnx", "int3")


def test_decoder_rewrites_stream_external_weights(tmp_path_factory, tmp_path, monkeypatch):
    """What a 10 GB decoder goes through, on a tiny one stored as external data: the attention rewrite and INT4 read
    the graph without its weights and one weight at a time (onnx_io.load_graph/read_initializer/save_streamed,
    quantize.matmulnbits_streamed), and moving a graph renames its data file. Results equal the in-memory tools':
    the same packed INT4 bytes and logits as ONNX Runtime's MatMulNBitsQuantizer, the same logits as the fusion of
    the inline graph; the written data file holds the live weights only (no bytes of the dropped q/k/v parts)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgevlm.compress import quantize

    e = _exported("llava_tiny", tmp_path_factory)
    lm, f = e.vlm.language_model, e.decoder
    src = tmp_path / "decoder.onnx"
    assert onnx_io.save_model(onnx.load(str(e.dir / "decoder.onnx")), src, external_data=True)
    x = np.random.default_rng(0).standard_normal((1, 6, f["hidden_size"])).astype(np.float32)

    def logits(path):
        dec = attention.runtime_decoder(path)
        try:
            return np.stack([dec.prefill(x[:, :5]), dec.step_embeds(x[:, 5])])
        finally:
            dec.close()

    def live_bytes(path):
        g = onnx.load(str(path), load_external_data=False)
        spans = [dict((k.key, k.value) for k in t.external_data) for t in g.graph.initializer if t.external_data]
        assert spans and all(s["location"] == path.name + ".data" for s in spans)
        return sum(int(s["length"]) for s in spans), len(spans)

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)         # keep the tiny results as external data too
    # INT4: byte-for-byte ONNX Runtime's quantizer
    n = quantize.matmulnbits_streamed(src, tmp_path / "s4.onnx", 32)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True, accuracy_level=4)
    q.process()
    onnx_io.save_model(q.model.model, tmp_path / "r4.onnx", external_data=False)
    ref = {t.name: t for t in q.model.model.graph.initializer if t.name.endswith(("_Q4", "_scales"))}
    mine = onnx.load(str(tmp_path / "s4.onnx")).graph
    got = {t.name: t for t in mine.initializer if t.name.endswith(("_Q4", "_scales"))}
    assert n == sum(o.op_type == "MatMulNBits" for o in mine.node) == len(ref) // 2 > 0
    assert sorted(got) == sorted(ref) and all(
        onnx.numpy_helper.to_array(got[k]).tobytes() == onnx.numpy_helper.to_array(ref[k]).tobytes() for k in ref)
    assert not [o for o in mine.node if o.op_type == "MatMul" and o.input[1] in {t.name for t in mine.initializer}]
    assert np.array_equal(logits(tmp_path / "s4.onnx"), logits(tmp_path / "r4.onnx"))
    used, count = live_bytes(tmp_path / "s4.onnx")
    assert used <= (tmp_path / "s4.onnx.data").stat().st_size < used + 4096 * count

    # the attention rewrite from disk equals the rewrite of the inline graph
    heads, tables = lm.config.num_attention_heads, attention.rotary_tables(lm, e.vlm.max_context)
    a = attention.fuse_attention(src, heads, f["num_kv_heads"], f["head_dim"], dst=tmp_path / "fused.onnx",
                                 rotary=tables)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 1 << 40)
    (tmp_path / "inline").mkdir()
    b = attention.fuse_attention(e.dir / "decoder.onnx", heads, f["num_kv_heads"], f["head_dim"],
                                 dst=tmp_path / "inline" / "fused.onnx", rotary=tables)
    assert a["ops"] == b["ops"] and a.get("rope") == b.get("rope") and a["kv_cache"].startswith("shared"), (a, b)
    assert not (tmp_path / "inline" / "fused.onnx.data").exists()
    assert np.array_equal(logits(tmp_path / "fused.onnx"), logits(tmp_path / "inline" / "fused.onnx"))
    used, count = live_bytes(tmp_path / "fused.onnx")
    assert used <= (tmp_path / "fused.onnx.data").stat().st_size < used + 4096 * count
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fuse-")]       # its staging folder is gone

    # moving renames the data file and rewrites the references; nothing is read back
    before = logits(tmp_path / "fused.onnx")
    (tmp_path / "fused.onnx.data").chmod(0o600)                    # as ONNX Runtime's quantizer leaves its output
    onnx_io.move_model(tmp_path / "fused.onnx", tmp_path / "moved.onnx")
    assert not (tmp_path / "fused.onnx").exists() and not (tmp_path / "fused.onnx.data").exists()
    live_bytes(tmp_path / "moved.onnx")
    mode = (tmp_path / "moved.onnx").stat().st_mode
    assert (tmp_path / "moved.onnx.data").stat().st_mode == mode and mode & 0o044   # readable as the graph is
    assert np.array_equal(logits(tmp_path / "moved.onnx"), before)

    # a weight that points outside its folder is refused
    g = onnx.load(str(tmp_path / "moved.onnx"), load_external_data=False)
    t = next(t for t in g.graph.initializer if t.external_data)
    next(k for k in t.external_data if k.key == "location").value = "../elsewhere.data"
    with pytest.raises(ValueError, match="outside its folder"):
        onnx_io.read_initializer(t, tmp_path)
