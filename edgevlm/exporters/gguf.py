"""A VLM's language model as GGUF, the file llama.cpp runs (``decoder.gguf`` of a VLM bundle).

Written with the ``gguf`` package (llama.cpp's own writer, tensor-name maps and constants); quantized
with llama.cpp's own quantizer through llama-cpp-python. Only the language model goes into the file:
the runtime feeds it the spliced ``inputs_embeds`` (image + text) as an embedding batch, then token ids.

Architectures (transformers class -> llama.cpp architecture):

- ``LlamaForCausalLM`` -> ``llama``. q_proj/k_proj rows are reordered per head: transformers rotates
  the pairs (i, i + d/2) of a head (rotate_half), llama.cpp's ``llama`` graph the pairs (2i, 2i + 1).
  RoPE that only rescales frequencies (``linear``, ``llama3``) is written as a ``rope_freqs`` tensor.
- ``PhiForCausalLM`` -> ``phi2`` (Phi-1.5/Phi-2, Moondream2's text model: hidden 2048, 24 layers,
  32 heads, partial rotary 0.5, vocab 51200): parallel attention + MLP from one LayerNorm, biases
  everywhere, NeoX-style partial RoPE (same pairing as transformers, no reordering), untied head with bias.
- TinyGPT-V's Phi (per-head q/k LayerNorm, RMSNorm on the attention output): no llama.cpp graph has
  both (``phi2`` has neither; ``stablelm`` has q/k norms but a gated SiLU MLP and no biases), so
  :func:`write_gguf` refuses it with :class:`~edgevlm.errors.ExportError`; use ``--decoder onnx``.

Tokenizers (``edgevlm.processor.TextTokenizer``): byte-level BPE (GPT-2, Phi, Moondream, Llama 3,
edgevlm's own) -> ``tokenizer.ggml.model = gpt2`` with merges and an explicit pre-tokenizer name;
SentencePiece-style BPE (``byte_fallback``, ``▁`` for spaces: Llama 2, Vicuna) -> ``llama`` with scores
taken from the merge ranks. Token ids equal the tokenizer's; the list is padded with unused tokens up to
the embedding rows.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, ExportError

GGUF_FIX = "pip install 'edgevlm[gguf]'"
FTYPES = ("f32", "f16")
QTYPES = ("f16", "q8_0", "q4_k_m")
# llama.cpp's llama_ftype numbers (include/llama.h); gguf.LlamaFileType has the same values.
_LLAMA_FTYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}
# tanh-approximated GELU is what llama.cpp's phi2 graph computes (ggml_gelu)
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# The split regex of byte-level tokenizers -> llama.cpp's pre-tokenizer name (src/llama-vocab.cpp).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise BackendUnavailableError("the gguf package is not installed (needed to write llama.cpp files)",
                                      GGUF_FIX) from None
    return gguf


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise BackendUnavailableError("llama-cpp-python is not installed (llama.cpp's quantizer and runtime)",
                                      GGUF_FIX) from None
    return llama_cpp


def _writer_class():
    gguf = _gguf()

    class Writer(gguf.GGUFWriter):
        """GGUFWriter that can write an empty string array (a byte-level BPE without merges needs
        ``tokenizer.ggml.merges`` present; gguf-py refuses empty arrays, the format and llama.cpp do not)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


# -- architectures ----------------------------------------------------------------------------------
def _cfg(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def check_supported(language_model) -> str:
    """The llama.cpp architecture name for a transformers causal LM, or ExportError saying why not."""
    cls = type(language_model).__name__
    cfg = language_model.config
    bases = {c.__name__ for c in type(language_model).__mro__}
    if "PhiForCausalLM" in bases:
        extra = []
        if getattr(cfg, "qk_layernorm", False):
            extra.append("a LayerNorm on each head's queries and keys (qk_layernorm)")
        layers = getattr(getattr(language_model, "model", None), "layers", [])
        if getattr(cfg, "attn_rmsnorm", False) or any(hasattr(m, "post_layernorm") for m in layers):
            extra.append("an RMSNorm on the attention output")
        if not extra and cls != "PhiForCausalLM":
            extra.append(f"a forward pass of its own ({cls} subclasses PhiForCausalLM)")
        if extra:
            who = f"{cls} (TinyGPT-V's Phi-2)" if "TinyGPTV" in cls else cls
            raise ExportError(
                f"{who} has {' and '.join(extra)}; no llama.cpp architecture computes that "
                "(phi2 has neither, stablelm has q/k norms but a gated SiLU MLP and no biases), so a GGUF "
                "would answer differently from the model",
                "export the decoder as ONNX instead: --decoder onnx")
        act = getattr(cfg, "hidden_act", "gelu_new")
        if act not in _TANH_GELU:
            raise ExportError(f"{cls} uses hidden_act={act!r}; llama.cpp's phi2 graph computes the tanh GELU",
                              "use --decoder onnx for this model")
        return "phi2"
    if cls == "LlamaForCausalLM":
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ExportError(f"LlamaForCausalLM with hidden_act={act!r}: llama.cpp's llama graph uses SiLU",
                              "use --decoder onnx for this model")
        return "llama"
    raise ExportError(f"{cls} has no GGUF writer in edgevlm (supported: LlamaForCausalLM -> llama, "
                      "PhiForCausalLM -> phi2)", "export the decoder as ONNX instead: --decoder onnx")


def _interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Per head, rows [0..d/2) and [d/2..d) (transformers' rotate_half pairs i and i + d/2) become
    interleaved rows 0, d/2, 1, d/2 + 1, ... (llama.cpp's normal RoPE pairs 2i and 2i + 1)."""
    hd = w.shape[0] // n_heads
    order = np.arange(hd).reshape(2, hd // 2).T.reshape(-1)
    return np.ascontiguousarray(w.reshape(n_heads, hd, *w.shape[1:])[:, order].reshape(w.shape))


def _rope_factors(language_model, head_dim: int, n_rot: int, theta: float) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` (it divides each frequency by its factor) from the frequencies transformers
    actually uses; None when they are the plain ``theta ** (-2i/d)``. Refuses position-dependent scalings."""
    rot = getattr(getattr(language_model, "model", None), "rotary_emb", None)
    if rot is None or not hasattr(rot, "inv_freq"):
        return None
    rope_type = getattr(rot, "rope_type", "default")
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    if rope_type not in ("default", "linear", "llama3") or abs(scaling - 1.0) > 1e-6:
        raise ExportError(f"RoPE scaling {rope_type!r} (attention scaling {scaling}) is not written to GGUF by edgevlm",
                          "use --decoder onnx for this model")
    used = rot.inv_freq.detach().double().cpu().numpy()
    plain = 1.0 / theta ** (np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if used.shape != plain.shape:
        raise ExportError(f"the rotary embedding has {used.shape[0]} frequencies, expected {plain.shape[0]}",
                          "use --decoder onnx for this model")
    factors = plain / used
    return None if np.allclose(factors, 1.0, rtol=1e-6) else factors.astype(np.float32)


def _hparams(arch: str, lm, context_length: int) -> dict:
    cfg = lm.config
    d, n_head = int(cfg.hidden_size), int(cfg.num_attention_heads)
    n_kv = int(_cfg(cfg, "num_key_value_heads", default=n_head))
    head_dim = int(_cfg(cfg, "head_dim", default=d // n_head))
    theta = float(_cfg(cfg, "rope_theta", default=10000.0))
    if arch == "phi2":
        n_rot = int(head_dim * float(_cfg(cfg, "partial_rotary_factor", default=1.0)))
        if getattr(cfg, "rope_scaling", None):
            raise ExportError(f"Phi with rope_scaling {cfg.rope_scaling} is not written to GGUF by edgevlm",
                              "use --decoder onnx for this model")
        eps = float(cfg.layer_norm_eps)
    else:
        n_rot = head_dim
        eps = float(cfg.rms_norm_eps)
    return dict(context_length=int(context_length), embedding_length=d, block_count=int(cfg.num_hidden_layers),
                feed_forward_length=int(cfg.intermediate_size), head_count=n_head, head_count_kv=n_kv,
                head_dim=head_dim, rope_dimension_count=n_rot, rope_freq_base=theta, norm_eps=eps,
                vocab_size=int(lm.get_input_embeddings().weight.shape[0]),
                tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)))


def _tensors(arch: str, lm, hp: dict):
    """(gguf name, torch tensor in transformers' (out, in) order, heads to reorder rows for or None)."""
    gguf = _gguf()
    march = {"llama": gguf.MODEL_ARCH.LLAMA, "phi2": gguf.MODEL_ARCH.PHI2}[arch]
    names = gguf.get_tensor_name_map(march, hp["block_count"])
    sd = lm.state_dict()
    emb_ptr = lm.get_input_embeddings().weight.data_ptr()
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb_ptr
    for key, t in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key == "lm_head.weight" and tied and arch == "llama":
            continue                 # llama.cpp reuses token_embd when output.weight is absent
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"{type(lm).__name__} has a tensor {key!r} that llama.cpp's {arch} graph has no "
                              "place for", "use --decoder onnx for this model")
        heads = None
        if arch == "llama" and (".self_attn.q_proj." in key or ".self_attn.k_proj." in key):
            heads = hp["head_count"] if ".q_proj." in key else hp["head_count_kv"]
        yield new, t, heads


# -- tokenizer --------------------------------------------------------------------------------------
def _merges(model: dict) -> list[str]:
    out = []
    for m in model.get("merges") or []:
        a, b = (m.split(" ", 1) if isinstance(m, str) else m)
        if " " in a or " " in b:
            raise ExportError(f"the tokenizer has a merge with a space in it ({a!r}, {b!r}); GGUF stores merges as "
                              "'left right'", "use --decoder onnx for this model")
        out.append(f"{a} {b}")
    return out


def _is_byte_level(pre) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        return True
    return pre.get("type") == "Sequence" and any(p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))


def _byte_level_pre(pre: dict) -> str:
    """The name llama.cpp knows for this byte-level pre-tokenizer (its regexes, src/llama-vocab.cpp)."""
    if pre["type"] == "ByteLevel":
        if pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
            return "gpt-2"                       # GPT-2, Phi-1.5/2, Moondream2, edgevlm's byte tokenizers
    else:
        parts = pre.get("pretokenizers", [])
        kinds = [p.get("type") for p in parts]
        if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            if regex in _SPLIT_PRE:
                return _SPLIT_PRE[regex]
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
            return "smollm"
    # A pre-tokenizer llama.cpp has no name for (edgevlm's scenes tokenizer keeps "0.37" whole with its own
    # regex): llama.cpp's "default" split. edgevlm's runtime never lets llama.cpp tokenize (it feeds
    # embeddings and token ids from tokenizer.json), so generation is unaffected; llama.cpp's own
    # tokenization of raw text could split differently, which write_gguf records.
    return "default"


def _space_prefix(spec: dict) -> bool:
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    for p in [pre, *pre.get("pretokenizers", [])]:
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
    for n in [norm, *norm.get("normalizers", [])]:
        if n.get("type") == "Prepend":
            return True
    return False


def tokenizer_metadata(tokenizer, n_vocab: int, add_bos: bool | None = None) -> dict:
    """The ``tokenizer.ggml.*`` fields of a ``TextTokenizer``, its token list padded to ``n_vocab`` rows."""
    gguf = _gguf()
    TT = gguf.TokenType
    tok = tokenizer.tok
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"the tokenizer is a {model.get('type')} model; edgevlm writes BPE tokenizers to GGUF",
                          "use --decoder onnx for this model")
    vocab = tok.get_vocab(with_added_tokens=True)
    n_tok = max(vocab.values()) + 1
    if n_tok > n_vocab:
        raise ExportError(f"the tokenizer has {n_tok} tokens but the language model embeds {n_vocab}",
                          "use the tokenizer files that came with these weights")
    texts: list[str | None] = [None] * n_vocab
    for text, i in vocab.items():
        texts[i] = text
    types = [TT.NORMAL] * n_vocab
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    merges = _merges(model)
    byte_level = _is_byte_level(spec.get("pre_tokenizer"))
    if byte_level:
        kind, pre, scores = "gpt2", _byte_level_pre(spec["pre_tokenizer"]), None
    elif model.get("byte_fallback"):
        kind, pre = "llama", None
        # SentencePiece BPE merges the adjacent pair whose result scores highest; HF BPE the lowest-ranked
        # merge: score = -rank of the merge that makes the token gives the same order.
        scores = [0.0] * n_vocab
        seen = set()
        for rank, m in enumerate(merges):
            i = vocab.get(m.replace(" ", "", 1))
            if i is not None and i not in seen:
                scores[i] = -float(rank + 1)
                seen.add(i)
        for i, t in enumerate(texts):
            if t is not None and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
                types[i] = TT.BYTE
        unk = model.get("unk_token")
        if unk is not None and unk in vocab:
            types[vocab[unk]] = TT.UNKNOWN
    else:
        raise ExportError("the tokenizer is neither byte-level BPE nor SentencePiece-style BPE (byte_fallback)",
                          "use --decoder onnx for this model")
    for i, a in added.items():
        if i < n_vocab and types[i] != TT.UNKNOWN:
            types[i] = TT.CONTROL if a.get("special") else TT.USER_DEFINED
    n_pad = 0
    for i in range(n_vocab):
        if texts[i] is None:
            texts[i], types[i], n_pad = f"[PAD{i}]", TT.UNUSED, n_pad + 1
    fields = {"model": kind, "pre": pre, "tokens": texts, "token_type": [int(t) for t in types],
              "merges": merges, "scores": scores, "bos_id": tokenizer.bos_id,
              "eos_id": tokenizer.eos_ids[0] if tokenizer.eos_ids else None,
              "add_bos": bool(tokenizer.bos_id is not None if add_bos is None else add_bos),
              "add_space_prefix": _space_prefix(spec) if kind == "llama" else None,
              "padded": n_pad}
    if kind == "llama" and model.get("unk_token") in vocab:
        fields["unk_id"] = vocab[model["unk_token"]]
    return fields


def _write_tokenizer(w, t: dict) -> None:
    gguf = _gguf()
    w.add_tokenizer_model(t["model"])
    if t["pre"] is not None:
        w.add_tokenizer_pre(t["pre"])
    w.add_token_list(t["tokens"])
    w.add_token_types(t["token_type"])
    if t["scores"] is not None:
        w.add_token_scores(t["scores"])
    if t["model"] == "gpt2" or t["merges"]:
        # add_token_merges skips an empty list; llama.cpp refuses a gpt2 vocab without the key
        w.add_key_value(gguf.Keys.Tokenizer.MERGES, list(t["merges"]), gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.STRING)
    if t["bos_id"] is not None:
        w.add_bos_token_id(int(t["bos_id"]))
    if t["eos_id"] is not None:
        w.add_eos_token_id(int(t["eos_id"]))
    if t.get("unk_id") is not None:
        w.add_unk_token_id(int(t["unk_id"]))
    w.add_add_bos_token(t["add_bos"])
    w.add_add_eos_token(False)
    if t["add_space_prefix"] is not None:
        w.add_add_space_prefix(bool(t["add_space_prefix"]))


# -- public -----------------------------------------------------------------------------------------
def write_gguf(language_model, tokenizer, path, ftype: str = "f32", name: str | None = None,
               context_length: int | None = None, add_bos: bool | None = None) -> dict:
    """Write a transformers causal LM and its tokenizer as a GGUF file llama.cpp loads without warnings.

    ``ftype``: ``f32`` or ``f16`` (matrices in F16; norms, biases and ``rope_freqs`` stay F32, as llama.cpp
    expects). ``context_length`` defaults to ``max_position_embeddings``. Returns manifest facts.
    """
    import torch

    if ftype not in FTYPES:
        raise ExportError(f"GGUF file type {ftype!r} is not written directly",
                          f"write one of {', '.join(FTYPES)} and quantize it with quantize_gguf")
    gguf = _gguf()
    arch = check_supported(language_model)
    cfg = language_model.config
    context_length = int(context_length or _cfg(cfg, "max_position_embeddings", default=2048))
    hp = _hparams(arch, language_model, context_length)
    if hp["head_dim"] % 2 or hp["rope_dimension_count"] % 2:
        raise ExportError(f"head_dim {hp['head_dim']} / rotary dims {hp['rope_dimension_count']} must be even",
                          "use --decoder onnx for this model")
    tok = tokenizer_metadata(tokenizer, hp["vocab_size"], add_bos)
    factors = _rope_factors(language_model, hp["head_dim"], hp["rope_dimension_count"],
                            hp["rope_freq_base"]) if arch == "llama" else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")

    w = _writer_class()(str(tmp), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or type(language_model).__name__)
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    if hp["head_dim"] * hp["head_count"] != hp["embedding_length"] or arch == "llama":
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_rope_dimension_count(hp["rope_dimension_count"])
    w.add_rope_freq_base(hp["rope_freq_base"])
    if arch == "phi2":
        w.add_layer_norm_eps(hp["norm_eps"])
    else:
        w.add_layer_norm_rms_eps(hp["norm_eps"])
    w.add_vocab_size(hp["vocab_size"])
    w.add_file_type(_LLAMA_FTYPE[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_tokenizer(w, tok)

    n_params, n_tensors, types = 0, 0, {}
    try:
        with torch.no_grad():
            for tname, t, heads in _tensors(arch, language_model, hp):
                # straight to the file's dtype (no float32 copy of a bf16/fp16 model); a float32 CPU tensor
                # is shared with numpy, not copied
                dtype = torch.float16 if ftype == "f16" and t.ndim >= 2 else torch.float32
                a = t.detach().to(device="cpu", dtype=dtype).numpy()
                if heads is not None:
                    a = _interleave_rope_rows(a, heads)
                w.add_tensor(tname, a)
                kind = "F16" if a.dtype == np.float16 else "F32"
                types[kind] = types.get(kind, 0) + 1
                n_tensors, n_params = n_tensors + 1, n_params + int(a.size)
            if factors is not None:        # not a parameter: llama.cpp's per-frequency divisors (F32)
                w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
                types["F32"] = types.get("F32", 0) + 1
                n_tensors += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return {"path": str(path), "format": "gguf", "arch": arch, "ftype": ftype.upper(), "tensors": n_tensors,
            "tensor_types": types, "params": n_params, "file_size": path.stat().st_size,
            "context_length": hp["context_length"], "vocab_size": hp["vocab_size"],
            "hparams": {k: v for k, v in hp.items() if k not in ("context_length", "vocab_size")},
            "tokenizer": {"model": tok["model"], "pre": tok["pre"], "merges": len(tok["merges"]),
                          "padded_tokens": tok["padded"], "bos_id": tok["bos_id"], "eos_id": tok["eos_id"],
                          **({"note": "custom pre-tokenizer written as llama.cpp's 'default': edgevlm tokenizes with "
                              "tokenizer.json and feeds llama.cpp embeddings and ids, so generation is unaffected; "
                              "llama.cpp's own tokenization of raw text may split differently"}
                             if tok["pre"] == "default" else {})}}


def gguf_tensor_types(path) -> dict[str, int]:
    """How many tensors of each type (F32, Q8_0, ...) a GGUF file holds."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ExportError(f"{path} is not a readable GGUF file ({str(e)[:120]})", "write it again") from None
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def quantize_gguf(src, dst, qtype: str = "q8_0", threads: int | None = None) -> dict:
    """Quantize an F32/F16 GGUF with llama.cpp's own quantizer (``llama_model_quantize``).

    Tensors whose rows are not a multiple of the type's block (256 for the k-quants: small test models)
    get llama.cpp's fallback type; what it did is in ``tensor_types`` and ``fallbacks``.
    """
    if qtype not in QTYPES:
        raise ExportError(f"GGUF quantization {qtype!r} is not supported", f"use one of: {', '.join(QTYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"{src} does not exist", "write the F32/F16 GGUF first (write_gguf)")
    with open(src, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise ExportError(f"{src} is not a GGUF file (magic {head!r})", "write it again with write_gguf")
    llama_cpp = _llama_cpp()
    from ..runtime.llamacpp import LOG

    dst.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _LLAMA_FTYPE[qtype]
    params.nthread = int(threads or 0)
    with LOG.capture() as lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        err = LOG.last_error(lines) or f"llama_model_quantize returned {rc}"
        raise ExportError(f"llama.cpp could not quantize {src.name} to {qtype}: {err}",
                          "check that the source is an F32/F16 GGUF written by edgevlm")
    return {"path": str(dst), "format": "gguf", "qtype": qtype.upper(), "file_size": dst.stat().st_size,
            "source_size": src.stat().st_size, "tensor_types": gguf_tensor_types(dst),
            "fallbacks": _fallbacks(t for _, t in lines)}


_NOT_DIVISIBLE = re.compile(r"(\S+)\s+-\s+ncols\s+(\d+)\s+not divisible by\s+(\d+)\s+\(required for type\s+(\S+)\)")


def _fallbacks(lines) -> list[dict]:
    """llama.cpp's quantizer log -> [{tensor, ncols, block, wanted, used}] for tensors it could not give the
    wanted type ("warning: blk.0.ffn_up.weight - ncols 64 not divisible by 256 (required for type q4_K)",
    then "-> falling back to q5_0")."""
    out: list[dict] = []
    for line in lines:
        if m := _NOT_DIVISIBLE.search(line):
            out.append({"tensor": m[1], "ncols": int(m[2]), "block": int(m[3]), "wanted": m[4], "used": None})
        elif (m := re.search(r"falling back to\s+(\S+)", line)) and out and out[-1]["used"] is None:
            out[-1]["used"] = m[1]
    return out
