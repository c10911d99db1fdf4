"""GGUF decoder: tiny random Llama / Phi written with the ``gguf`` package, run by llama.cpp on embeddings.

Reference: eager transformers, prefill with ``inputs_embeds`` then KV-cache decode (as
``VisionLanguageModel.decode_tokens``). F32 GGUF + F32 KV cache must give the same 32 greedy tokens
and logits within ``F32_ATOL`` (Llama) / ``PHI_ATOL`` (Phi: ggml's GELU reads an F16 table).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("gguf", reason="writing GGUF needs the gguf package (pip install 'edgevlm[gguf]')")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgevlm.errors import BundleError, ConfigError, ExportError  # noqa: E402
from edgevlm.exporters.gguf import gguf_tensor_types, quantize_gguf, tokenizer_metadata, write_gguf  # noqa: E402
from edgevlm.processor import TextTokenizer  # noqa: E402

N_NEW = 32
N_IMG = 9                 # random "image" rows spliced in after BOS
F32_ATOL = 1e-4           # max |logit difference| with F32 weights and F32 KV cache (logits std ~1)
PHI_ATOL = 5e-3           # Phi: ggml_gelu looks the tanh GELU up in an F16 table
BAD_WORDS = ("missing", "unknown pre-tokenizer", "generation quality", "bad special token", "out of vocab range",
             "control-looking", "not marked as eog", "empty token", "default")
CORPUS = ["the cat sat on the mat and looked at the image of a dog",
          "a small vision language model answers questions about pictures",
          "How many circles are in the picture? There are three red circles.",
          "edge devices run quantized models with llama.cpp and onnx runtime"] * 20


def needs_llama():
    return pytest.importorskip("llama_cpp", reason="running GGUF needs llama-cpp-python (pip install 'edgevlm[gguf]')")


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bpe_tokenizer() -> TextTokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenizer) trained here: 256 bytes + 3 specials + merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>", "<image>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return TextTokenizer(tok, tok.token_to_id("<s>"), (tok.token_to_id("</s>"),), "test-bpe")


def llama(vocab: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
               initializer_range=0.15)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def phi(vocab: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=256, partial_rotary_factor=0.5,
               hidden_act="gelu_new", layer_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.15)
    lm = transformers.PhiForCausalLM(transformers.PhiConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():       # Phi's LayerNorm and biases start at 1/0: give them values worth checking
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in lm.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return lm


def prompt_embeds(lm, tokenizer, seed: int = 0) -> tuple[np.ndarray, int]:
    """BOS, N_IMG random "image" rows, then a text prompt's token embeddings: (S, D), and the prefix length."""
    emb = lm.get_input_embeddings().weight.detach()
    ids_text = tokenizer.encode("How many circles are in the picture?")
    rng = np.random.default_rng(seed)
    img = rng.normal(0, float(emb.std()), (N_IMG, emb.shape[1])).astype(np.float32)
    rows = [emb[[tokenizer.bos_id]].numpy(), img, emb[ids_text].numpy()]
    return np.concatenate(rows).astype(np.float32), 1 + N_IMG


def eager_greedy(lm, embeds: np.ndarray, n: int, prefix: int = 0):
    """Greedy ids and each step's logits from transformers: prefill with inputs_embeds, then KV-cache decode."""
    x = torch.from_numpy(embeds)[None]
    kw = {}
    if prefix > 1:          # edgevlm.modeling.vlm.VisionLanguageModel.prefill_mask
        s = x.shape[1]
        allowed = torch.ones(s, s, dtype=torch.bool).tril()
        allowed[:prefix, :prefix] = True
        kw["attention_mask"] = torch.zeros(s, s).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    ids, logits = [], []
    with torch.no_grad():
        out = lm(inputs_embeds=x, use_cache=True, **kw)
        for _ in range(n):
            last = out.logits[0, -1].float()
            logits.append(last.numpy())
            ids.append(int(last.argmax()))
            out = lm(input_ids=torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return ids, np.stack(logits)


def gguf_greedy(dec, embeds: np.ndarray, n: int, prefix: int = 0):
    dec.reset()
    ids, logits = [], []
    last = dec.prefill(embeds, prefix=prefix)
    for i in range(n):
        logits.append(last)
        ids.append(int(np.argmax(last)))
        if i + 1 < n:
            last = dec.step(ids[-1])
    return ids, np.stack(logits)


def bad_warnings(lines) -> list[str]:
    return [t for t in lines if any(w in t.lower() for w in BAD_WORDS)]


def leading_agreement(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# -- writing (gguf only) ------------------------------------------------------------------------------
def test_write_gguf_metadata_and_names(tmp_path, bpe_tokenizer):
    import gguf

    lm = llama(bpe_tokenizer.vocab_size)
    info = write_gguf(lm, bpe_tokenizer, tmp_path / "d.gguf", name="tiny-llama", context_length=128)
    assert info["arch"] == "llama" and info["tensors"] == 2 + 1 + 9 * 2 and info["params"] == sum(
        p.numel() for p in lm.parameters())
    r = gguf.GGUFReader(str(tmp_path / "d.gguf"))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "llama" and f["general.name"] == "tiny-llama"
    assert f["llama.context_length"] == 128 and f["llama.embedding_length"] == 64
    assert f["llama.block_count"] == 2 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 16 and abs(f["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert len(f["tokenizer.ggml.tokens"]) == 320 and len(f["tokenizer.ggml.merges"]) > 0
    assert f["tokenizer.ggml.bos_token_id"] == bpe_tokenizer.bos_id
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.1.attn_q.weight",
            "blk.1.attn_k.weight", "blk.1.ffn_gate.weight", "blk.0.ffn_norm.weight"} <= names


def test_padded_vocab_and_byte_tokenizer_without_merges():
    tok = TextTokenizer.bytes_only(300)          # what edgevlm's tiny random models use: 259 tokens, no merges
    meta = tokenizer_metadata(tok, 300)
    assert meta["padded"] == 41 and meta["merges"] == [] and meta["pre"] == "gpt-2"
    assert meta["token_type"][256] == 3 and meta["token_type"][299] == 5      # <s> CONTROL, padding UNUSED
    with pytest.raises(ExportError, match="embeds 200"):
        tokenizer_metadata(tok, 200)


def spm_tokenizer() -> TextTokenizer:
    """A Llama-2-style tokenizer.json: BPE with byte_fallback, "▁" for spaces (normalizer), <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=160, show_progress=False))
    spec = __import__("json").loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return TextTokenizer(tok, 1, (2,), "test-spm")


def test_sentencepiece_style_tokenizer_round_trips_through_llama_cpp(tmp_path):
    llama_cpp = needs_llama()  # noqa: F841
    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    tok = spm_tokenizer()
    meta = tokenizer_metadata(tok, tok.vocab_size)
    assert meta["model"] == "llama" and meta["add_space_prefix"] and meta["token_type"][3 + 10] == 6   # <0x0A> BYTE
    write_gguf(llama(tok.vocab_size), tok, tmp_path / "spm.gguf")
    with LlamaCppDecoder(tmp_path / "spm.gguf", n_ctx=32, n_threads=2) as dec:
        assert dec.warnings == []
        for text in (CORPUS[0], CORPUS[2], "naïve snow ☃ models"):       # the last falls back to byte tokens
            assert dec.tokenize(text, parse_special=False) == tok.encode(text), text


def test_tinygpt_v_and_other_classes_are_refused(tmp_path, bpe_tokenizer):
    from edgevlm.modeling.tinygpt_v import build_phi

    text = dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                partial_rotary_factor=0.5, vocab_size=320, max_position_embeddings=256)
    for rms in (True, False):
        with pytest.raises(ExportError) as e:
            write_gguf(build_phi(text, attn_rmsnorm=rms), bpe_tokenizer, tmp_path / "t.gguf")
        msg = str(e.value)
        assert "qk_layernorm" in msg and "--decoder onnx" in msg and "no llama.cpp architecture" in msg
        assert ("RMSNorm" in msg) == rms
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=320))
    with pytest.raises(ExportError, match="GPT2LMHeadModel has no GGUF writer"):
        write_gguf(gpt2, bpe_tokenizer, tmp_path / "g.gguf")
    with pytest.raises(ExportError, match="quantize"):
        write_gguf(phi(320), bpe_tokenizer, tmp_path / "q.gguf", ftype="q8_0")
    assert not list(tmp_path.glob("*.gguf*"))


# -- running (llama.cpp) ------------------------------------------------------------------------------
LLAMA_VARIANTS = {
    "llama_gqa": {},
    # llama3 RoPE scaling (LLaVA-Mini's) -> rope_freqs tensor; q/k/v/o biases; tied head -> no output.weight
    "llama3rope_bias_tied": dict(rope_theta=500000.0, attention_bias=True, tie_word_embeddings=True,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("variant", list(LLAMA_VARIANTS))
def test_llama_f32_matches_eager_greedy(tmp_path, bpe_tokenizer, variant):
    needs_llama()
    from edgevlm.runtime.llamacpp import LOG, LlamaCppDecoder

    lm = llama(bpe_tokenizer.vocab_size, **LLAMA_VARIANTS[variant])
    if variant != "llama_gqa":
        with torch.no_grad():
            for n, p in lm.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0, 0.1)
    info = write_gguf(lm, bpe_tokenizer, tmp_path / "d.gguf", context_length=256)
    embeds, _ = prompt_embeds(lm, bpe_tokenizer)
    ref_ids, ref_logits = eager_greedy(lm, embeds, N_NEW)
    with LlamaCppDecoder(tmp_path / "d.gguf", n_ctx=128, n_threads=2, kv_cache="f32") as dec:
        assert dec.n_vocab == 320 and dec.n_embd == 64
        assert dec.warnings == [] and not bad_warnings(LOG.warnings(dec.load_log))
        ids, logits = gguf_greedy(dec, embeds, N_NEW)
        assert dec.n_past == len(embeds) + N_NEW - 1
        text = "the cat sat on the mat <image> How many?"
        assert dec.tokenize(text) == bpe_tokenizer.encode(text)       # llama.cpp's BPE == the source tokenizer
    diff = float(np.abs(logits - ref_logits).max())
    print(f"\n{variant}: {info['file_size']} B, tensors {info['tensors']}, max|dlogit| {diff:.2e}, "
          f"logit std {ref_logits.std():.2f}")
    assert ids == ref_ids
    assert diff < F32_ATOL
    if variant == "llama3rope_bias_tied":
        assert info["tensors"] == 2 + 1 + 9 * 2 + 4 * 2   # no output.weight, + rope_freqs, + 4 biases a layer


def test_phi_f32_matches_eager_greedy_and_bidirectional_prefix(tmp_path):
    needs_llama()
    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    tok = TextTokenizer.bytes_only(300)   # 259 tokens, no merges: padded to the 300 embedding rows
    lm = phi(300)
    write_gguf(lm, tok, tmp_path / "p.gguf", context_length=256)
    embeds, prefix = prompt_embeds(lm, tok, seed=1)
    with LlamaCppDecoder(tmp_path / "p.gguf", n_ctx=128, n_threads=2, kv_cache="f32") as dec:
        assert dec.warnings == [], dec.warnings
        for pre in (0, prefix):
            ref_ids, ref_logits = eager_greedy(lm, embeds, N_NEW, prefix=pre)
            ids, logits = gguf_greedy(dec, embeds, N_NEW, prefix=pre)
            diff = float(np.abs(logits - ref_logits).max())
            print(f"\nphi2 prefix={pre}: max|dlogit| {diff:.2e}, logit std {ref_logits.std():.2f}")
            assert ids == ref_ids
            assert diff < PHI_ATOL
            if pre:
                causal_ids, causal_logits = eager_greedy(lm, embeds, 1)
                assert np.abs(causal_logits[0] - ref_logits[0]).max() > 10 * PHI_ATOL   # the mask matters


def test_llama_bidirectional_prefix_matches_eager_4d_mask(tmp_path, bpe_tokenizer):
    needs_llama()
    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    lm = llama(bpe_tokenizer.vocab_size, seed=3)
    write_gguf(lm, bpe_tokenizer, tmp_path / "d.gguf")
    embeds, prefix = prompt_embeds(lm, bpe_tokenizer, seed=3)
    ref_ids, ref_logits = eager_greedy(lm, embeds, 8, prefix=prefix)
    with LlamaCppDecoder(tmp_path / "d.gguf", n_ctx=64, n_threads=2, kv_cache="f32") as dec:
        ids, logits = gguf_greedy(dec, embeds, 8, prefix=prefix)
        # the whole prompt as a bidirectional prefix (logits from the non-causal batch itself)
        full_ref, _ = eager_greedy(lm, embeds, 1, prefix=len(embeds))
        dec.reset()
        assert int(np.argmax(dec.prefill(embeds, prefix=len(embeds)))) == full_ref[0]
    assert ids == ref_ids and float(np.abs(logits - ref_logits).max()) < F32_ATOL
    with LlamaCppDecoder(tmp_path / "d.gguf", n_ctx=64, n_threads=2) as dec:    # defaults: F16 KV, flash attention
        ids16, logits16 = gguf_greedy(dec, embeds, 8, prefix=prefix)
    assert ids16[0] == ref_ids[0] and float(np.abs(logits16[0] - ref_logits[0]).max()) < 0.05


def test_moondream2_tiny_generates_the_eager_tokens_through_llama_cpp(tmp_path):
    """edgevlm's own Moondream2 family (Phi-1.5-shaped text model, bidirectional image prefix), end to end:
    the spliced embeddings of a real prompt + image through llama.cpp give ``decode_tokens``' greedy ids."""
    needs_llama()
    from edgevlm.modeling.families import load_vlm
    from edgevlm.modeling.vlm import GenerationConfig
    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    vlm = load_vlm("moondream2_tiny", weights="random")
    assert vlm.bidirectional_image_prefix
    info = write_gguf(vlm.language_model, vlm.tokenizer, tmp_path / "decoder.gguf", name="moondream2_tiny",
                      context_length=vlm.max_context)
    assert info["arch"] == "phi2"
    img = np.random.default_rng(0).integers(0, 256, (80, 70, 3), dtype=np.uint8)
    with torch.no_grad():
        embeds, pieces, n_img = vlm.prepare(img, "What is this?")
        prefix = len(pieces.before) + n_img
        ref = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=N_NEW, temperature=0.0, stop_ids=()),
                                     prefix=prefix))
    assert prefix > 32 and len(ref) == N_NEW
    with LlamaCppDecoder(tmp_path / "decoder.gguf", n_ctx=256, n_threads=2, kv_cache="f32") as dec:
        assert dec.warnings == []
        ids, _ = gguf_greedy(dec, embeds[0].numpy(), N_NEW, prefix=prefix)
    assert ids == ref


def test_quantized_files_load_and_agree(tmp_path, bpe_tokenizer):
    needs_llama()
    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    lm = llama(bpe_tokenizer.vocab_size, seed=5)
    src = write_gguf(lm, bpe_tokenizer, tmp_path / "f32.gguf")
    embeds, _ = prompt_embeds(lm, bpe_tokenizer, seed=5)
    runs, report = {}, {}
    for q in ("f32", "f16", "q8_0", "q4_k_m"):
        path = tmp_path / f"{q}.gguf"
        if q != "f32":
            info = quantize_gguf(tmp_path / "f32.gguf", path, q, threads=2)
            report[q] = (info["file_size"], info["tensor_types"], len(info["fallbacks"]))
            if q == "q4_k_m":
                assert {f["used"] for f in info["fallbacks"]} <= {"q5_0", "q8_0"}
        with LlamaCppDecoder(path, n_ctx=96, n_threads=2) as dec:    # default F16 KV cache
            assert not bad_warnings(dec.warnings), dec.warnings
            runs[q] = gguf_greedy(dec, embeds, N_NEW)
    ref_ids, ref_logits = runs["f32"]
    for q, (ids, logits) in runs.items():
        agree = leading_agreement(ids, ref_ids)
        print(f"\n{q}: {report.get(q, (src['file_size'], src['tensor_types'], 0))}, leading tokens equal to F32: "
              f"{agree}/{N_NEW}, prefill max|dlogit| {np.abs(logits[0] - ref_logits[0]).max():.3f}")
        assert np.isfinite(logits).all()
        assert ids[0] == ref_ids[0]                     # every precision keeps the prefill's top-1
        if q in ("f16", "q8_0"):
            assert agree >= 8
    assert report["q8_0"][1].get("Q8_0", 0) >= 14
    # 64-wide rows are not a multiple of 256: llama.cpp falls back (e.g. to q5_0/q8_0) and says so
    assert report["q4_k_m"][2] > 0 and "Q4_K" not in report["q4_k_m"][1]
    assert gguf_tensor_types(tmp_path / "f16.gguf") == {"F32": 5, "F16": 16}       # norms stay F32


def test_gpu_layers_follow_the_build_and_a_request_a_cpu_build_cannot_honour_is_refused(tmp_path, bpe_tokenizer,
                                                                                         monkeypatch):
    """Default: every layer where llama-cpp-python can offload (a Jetson built with CUDA), none elsewhere; asking
    a CPU-only build for GPU layers is a one-line error naming the CUDA build, not a silent CPU run."""
    from edgevlm.runtime.llamacpp import CUDA_BUILD, GPU_LAYERS_ENV, gpu_layers_choice

    monkeypatch.delenv(GPU_LAYERS_ENV, raising=False)
    assert gpu_layers_choice(None, True)[0] == -1 and gpu_layers_choice(None, False)[0] == 0
    assert gpu_layers_choice(7, True)[0] == 7 and gpu_layers_choice(0, False)[0] == 0
    with pytest.raises(ConfigError, match="built without a GPU backend") as e:
        gpu_layers_choice(-1, False)
    assert CUDA_BUILD in e.value.fix
    for bad in (-2, True, 1.5):
        with pytest.raises(ConfigError, match="GPU layers must be"):
            gpu_layers_choice(bad, True)
    monkeypatch.setenv(GPU_LAYERS_ENV, "12")
    assert gpu_layers_choice(None, True) == (12, f"12 layers on the GPU ({GPU_LAYERS_ENV})")
    assert gpu_layers_choice(0, True)[0] == 0                   # the caller's choice wins over the environment
    monkeypatch.setenv(GPU_LAYERS_ENV, "all")
    with pytest.raises(ConfigError, match=f"{GPU_LAYERS_ENV}='all' is not an integer"):
        gpu_layers_choice(None, True)
    monkeypatch.delenv(GPU_LAYERS_ENV)

    needs_llama()
    import llama_cpp

    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    path = tmp_path / "f32.gguf"
    write_gguf(llama(bpe_tokenizer.vocab_size, seed=5), bpe_tokenizer, path)
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    with LlamaCppDecoder(path, n_ctx=32, n_threads=2) as dec:
        assert dec.gpu_layers == (-1 if gpu else 0)
        if gpu:      # llama.cpp's own count: every block plus the output layer
            assert dec.offloaded and dec.offloaded[0] == dec.offloaded[1]
    if not gpu:
        with pytest.raises(ConfigError, match="built without a GPU backend"):
            LlamaCppDecoder(path, n_ctx=32, n_threads=2, gpu_layers=4)


def test_weight_buffer_choice_keeps_the_crashing_amx_buffers_off(monkeypatch):
    """llama.cpp's AMX weight buffers crash (issue 20824); repacking stays on wherever they are not in play."""
    needs_llama()
    import platform

    from edgevlm.runtime import llamacpp as lc

    names = lc.cpu_extra_buffer_types()
    assert names is not None and all(isinstance(n, str) and n for n in names), names
    if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        assert "CPU_REPACK" in names, names             # llama-cpp-python builds ggml's repack buffers by default
    if "AMX" in names and sys.platform == "linux":
        assert lc._cpu_has_amx()                         # ggml offers AMX only where the CPU has it
    monkeypatch.delenv(lc.REPACK_ENV, raising=False)
    on, why = lc.extra_buffers_choice()
    assert on == ("AMX" not in names), why
    assert ("20824" in why) == (not on), why
    for value in ("0", "1"):
        monkeypatch.setenv(lc.REPACK_ENV, value)
        assert lc.extra_buffers_choice() == (value == "1", f"{lc.REPACK_ENV}={value}")
    monkeypatch.setenv(lc.REPACK_ENV, "yes")
    with pytest.raises(ConfigError, match="0 or 1"):
        lc.extra_buffers_choice()


def test_repacked_weights_decode_like_plain_buffers(tmp_path, bpe_tokenizer, monkeypatch):
    """Q4_K weights in llama.cpp's repacked CPU buffers give the plain buffers' greedy tokens."""
    needs_llama()
    from edgevlm.runtime.llamacpp import REPACK_ENV, LlamaCppDecoder, extra_buffers_choice

    monkeypatch.delenv(REPACK_ENV, raising=False)
    on, why = extra_buffers_choice()
    if not on:
        pytest.skip(f"llama.cpp's repacked weight buffers are off on this machine: {why}")
    # 256-wide rows: Q4_K_M keeps Q4_K (the type llama.cpp repacks on x86 and ARM) instead of falling back
    lm = llama(bpe_tokenizer.vocab_size, seed=9, hidden_size=256, intermediate_size=512)
    write_gguf(lm, bpe_tokenizer, tmp_path / "f32.gguf")
    info = quantize_gguf(tmp_path / "f32.gguf", tmp_path / "q4_k_m.gguf", "q4_k_m", threads=2)
    assert info["tensor_types"].get("Q4_K", 0) >= 8, info["tensor_types"]
    embeds, _ = prompt_embeds(lm, bpe_tokenizer, seed=9)
    runs, buffers = {}, {}
    for mode in ("0", None):
        if mode is None:
            monkeypatch.delenv(REPACK_ENV)
        else:
            monkeypatch.setenv(REPACK_ENV, mode)
        with LlamaCppDecoder(tmp_path / "q4_k_m.gguf", n_ctx=96, n_threads=2) as dec:
            buffers[mode], runs[mode] = dec.weight_buffers, gguf_greedy(dec, embeds, N_NEW)
    print(f"\nweight buffers: plain {buffers['0']}, default {buffers[None]}")
    assert "CPU_REPACK" not in buffers["0"]
    assert buffers[None].get("CPU_REPACK", 0) > 0, buffers[None]
    (ids_plain, lg_plain), (ids_rep, lg_rep) = runs["0"], runs[None]
    assert leading_agreement(ids_rep, ids_plain) >= 16, (ids_rep, ids_plain)
    assert np.abs(lg_rep[0] - lg_plain[0]).max() < 0.05 * np.abs(lg_plain[0]).max()


def test_broken_files_and_context_limits_give_clear_errors(tmp_path, bpe_tokenizer):
    needs_llama()
    from edgevlm.runtime.llamacpp import LlamaCppDecoder

    lm = llama(bpe_tokenizer.vocab_size)
    good = tmp_path / "d.gguf"
    write_gguf(lm, bpe_tokenizer, good)
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
    (tmp_path / "header.gguf").write_bytes(data[:4] + b"\xff" * 60 + data[64:])
    for bad in ("trunc", "magic", "header", "absent"):
        with pytest.raises(BundleError) as e:
            LlamaCppDecoder(tmp_path / f"{bad}.gguf", n_ctx=32)
        assert "fix:" in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(ExportError, match="could not quantize"):
        quantize_gguf(tmp_path / "trunc.gguf", tmp_path / "q.gguf", "q8_0")
    embeds, prefix = prompt_embeds(lm, bpe_tokenizer)
    with LlamaCppDecoder(good, n_ctx=len(embeds) + 2, n_threads=2) as dec:
        dec.prefill(embeds)
        dec.step(5)
        dec.step(6)
        with pytest.raises(ConfigError, match="context holds"):
            dec.step(7)
        with pytest.raises(ConfigError, match="outside the vocabulary"):
            dec.step(10_000)
        dec.reset()
        with pytest.raises(ConfigError, match="shape"):
            dec.prefill(embeds[:, :10])
    with LlamaCppDecoder(good, n_ctx=64, n_threads=2, n_batch=4) as dec:
        with pytest.raises(ConfigError, match="n_batch >= 10"):
            dec.prefill(embeds, prefix=prefix)
        dec.reset()
        assert np.isfinite(dec.prefill(embeds)).all()          # a causal prompt longer than n_batch is chunked
    dec.close()
    with pytest.raises(ConfigError, match="closed"):
        dec.step(1)


def test_context_longer_than_exported_or_than_memory_is_refused_before_llama_cpp_allocates(tmp_path):
    """A bundle's manifest is untrusted: its context_length reaches llama.cpp as n_ctx. A context longer than the
    GGUF's, or a KV cache larger than the free memory, is refused with one line before llama.cpp reserves anything
    (fuzz/fuzz_bundle.py found 2**31 positions making llama.cpp take 8 GB before failing). The KV size computed
    from the header is the one llama.cpp then reports."""
    needs_llama()
    import re

    from edgevlm.runtime.llamacpp import LlamaCppDecoder, check_context, kv_cache_bytes

    tok = TextTokenizer.bytes_only(300)
    write_gguf(llama(300), tok, tmp_path / "d.gguf", context_length=256)
    for kv in ("f32", "f16"):
        with LlamaCppDecoder(tmp_path / "d.gguf", n_ctx=256, n_threads=1, kv_cache=kv) as dec:
            reported = [float(m.group(1)) for _, t in dec.load_log
                        for m in [re.search(r"KV buffer size\s*=\s*([0-9.]+) MiB", t)] if m]
            assert len(reported) == 1
            assert abs(kv_cache_bytes(dec.header, 256, kv) / 2**20 - reported[0]) < 0.01, (kv, reported)
            header = dec.header
    with pytest.raises(ConfigError, match=r"a context of 2,147,483,904 positions is longer than the 256") as e:
        LlamaCppDecoder(tmp_path / "d.gguf", n_ctx=2**31 + 256, n_threads=1)
    assert "fix:" in str(e.value)
    with pytest.raises(ConfigError, match=r"needs 0\.06 MiB, more than the 0\.06 MiB of memory free"):
        check_context(header, 256, "f16", "d.gguf", available=kv_cache_bytes(header, 256, "f16") - 1)
    check_context(header, 256, "f16", "d.gguf", available=kv_cache_bytes(header, 256, "f16"))    # exactly fits
