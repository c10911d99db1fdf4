"""Tokenization in the graph: a bundle's ``tokenizer.json`` as two ONNX graphs of onnxruntime-extensions' custom ops
(``gen_processing_models``), so that an app needs ONNX Runtime and the extensions library, and no tokenizer port.

- ``tokenizer.onnx``: ``HfJsonTokenizer`` (schema v2: the tokenizer.json itself is an attribute of the op, read by
  the extensions' own loader), string ``(1,)`` -> int64 ids ``(1, n)``;
- ``detokenizer.onnx``: ``BpeDecoder``, int64 ids ``(1, n)`` -> string ``(1,)``, special tokens skipped as the
  Python runtime's ``TextTokenizer.decode`` skips them.

Both are checked against the ``tokenizers`` package on :data:`CORPUS` plus the family's own prompts; the first prompt
that differs fails the export (one-line :class:`ExportError`), so no bundle ships a graph that tokenizes otherwise.
Tokenizer models other than byte-level BPE are not expressed here: :func:`write_tokenizer_graphs` says why in the
manifest block instead of writing a graph.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from ..errors import ExportError

TOKENIZER, DETOKENIZER = "tokenizer.onnx", "detokenizer.onnx"

# ASCII, punctuation, digits, whitespace runs, accents, CJK, emoji; the family's prompt template and its special
# tokens are added by the caller (:func:`family_prompts`).
CORPUS = (
    "describe the image.",
    "How many circles are there?",
    "What colour is the square on the left, and is it bigger than the triangle?",
    "Punctuation: !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "digits 0 1 12 123 1234 3.14159 -42 1e-5 2026-12-06",
    "  two  spaces,\ttabs\tand\nnew lines\n\n",
    "Héllo, wörld! Ça va? naïve façade, Ångström, smörgåsbord, São Paulo, Dvořák",
    "你好，世界。这张图片里有什么？ 日本語のテキスト 한국어 문장",
    "emoji 🙂🚀🐱‍👤 👍🏽 ❤️ flags 🇫🇷🇯🇵",
    "mixed: café ☕ costs 3€ — 数字 42 🎉",
    "",
)


def family_prompts(model) -> list[str]:
    """The prompts the family itself sends: its parity and golden prompts, and those put through its template with
    the special tokens the tokenizer knows (``<image>``, BOS/EOS text)."""
    out = [model.parity_prompt, *getattr(model, "golden_prompts", ())]
    spec = model.runtime_spec().get("prompt", {})
    if spec.get("template"):
        out += [spec["template"].replace("{prompt}", p) for p in list(out)]
    specials = [t.content for t in model.require_tokenizer().tok.get_added_tokens_decoder().values()]
    if specials:
        out.append("".join(specials) + " " + model.parity_prompt + " " + specials[-1])
    return [p for p in dict.fromkeys(out)]


def extensions_version() -> str:
    import onnxruntime_extensions as oe

    return oe.__version__


def _unsupported(tokenizer_json: dict) -> str | None:
    """Why the extensions' graphs cannot express this tokenizer, or None."""
    mdl, pre = tokenizer_json.get("model", {}), tokenizer_json.get("pre_tokenizer") or {}
    if mdl.get("type") != "BPE":
        return f"a {mdl.get('type')} tokenizer model (only byte-level BPE is expressed as graphs here)"
    # ByteLevel, or a Sequence of Split regexes ending in ByteLevel (edgevlm_scenes' trained tokenizer): the extensions'
    # HfJsonTokenizer reads both; the corpus check below is what decides that it reads them right
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if (not steps or steps[-1].get("type") != "ByteLevel"
            or any(s.get("type") not in ("Split", "ByteLevel") for s in steps)
            or (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel"):
        return "a BPE tokenizer without byte-level pre-tokenizer and decoder (only byte-level BPE is expressed here)"
    if tokenizer_json.get("normalizer"):
        return f"a {tokenizer_json['normalizer'].get('type')} normalizer (not checked in the graphs)"
    return None


def build_graphs(tokenizer_file: Path, scratch: Path):
    """(tokenizer graph, detokenizer graph) as ONNX models from ``tokenizer_file`` (onnxruntime-extensions)."""
    import onnxruntime_extensions as oe
    from transformers import GPT2TokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    d = Path(scratch) / "hf_tokenizer"
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        # the tokens tokenizer.json marks special are the ones the detokenizer skips (and no GPT-2 defaults)
        specials = [t["content"] for t in json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
                    .get("added_tokens", []) if t.get("special")]
        GPT2TokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=None, eos_token=None, unk_token=None,
                          pad_token=None, additional_special_tokens=specials).save_pretrained(str(d))
        hf = GPT2TokenizerFast.from_pretrained(str(d))
        # schema v2: the extensions read tokenizer.json with their own loader (HfJsonTokenizer); the classic
        # GPT2Tokenizer op refuses a BPE without merges, as edgevlm's byte-level tiny tokenizers are
        pre, _ = oe.gen_processing_models(str(d), pre_kwargs={}, post_kwargs=None, schema_v2=True)
        # the fast tokenizer has no byte_decoder; without it the converter takes the model for SentencePiece
        hf.byte_decoder = {v: k for k, v in bytes_to_unicode().items()}
        _, post = oe.gen_processing_models(hf, pre_kwargs=None, post_kwargs={"skip_special_tokens": 1})
    return pre, post


class GraphTokenizer:
    """The two graphs in ONNX Runtime with the extensions' custom-op library: ``encode(text)``, ``decode(ids)``."""

    def __init__(self, tokenizer: Path, detokenizer: Path):
        import onnxruntime as ort
        import onnxruntime_extensions as oe

        so = ort.SessionOptions()
        so.register_custom_ops_library(oe.get_library_path())
        self.enc = ort.InferenceSession(str(tokenizer), so, providers=["CPUExecutionProvider"])
        self.dec = ort.InferenceSession(str(detokenizer), so, providers=["CPUExecutionProvider"])
        self.enc_in, self.enc_out = self.enc.get_inputs()[0].name, self.enc.get_outputs()[0].name
        self.dec_in, self.dec_out = self.dec.get_inputs()[0].name, self.dec.get_outputs()[0].name

    def encode(self, text: str) -> list[int]:
        (ids,) = self.enc.run([self.enc_out], {self.enc_in: np.array([text], dtype=object)})
        return [int(i) for i in np.asarray(ids).ravel()]

    def decode(self, ids) -> str:
        if len(ids) == 0:       # BpeDecoder (onnxruntime-extensions 0.15.2) dies of SIGFPE on a (1, 0) input
            return ""
        (text,) = self.dec.run([self.dec_out], {self.dec_in: np.asarray([list(ids)], dtype=np.int64).reshape(1, -1)})
        return str(np.asarray(text).ravel()[0])


def check_graphs(graphs: GraphTokenizer, tokenizer_file: Path, prompts) -> int:
    """The graphs against ``tokenizers`` on every prompt: the same ids, and the detokenizer gives tokenizers' own
    decoding of them (special tokens skipped) and the prompt back where it holds no special token. Returns the
    number of prompts checked; the first that differs raises a one-line :class:`ExportError`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    specials = [t.content for t in tok.get_added_tokens_decoder().values()]
    n = 0
    for p in prompts:
        ref = tok.encode(p).ids
        got = graphs.encode(p)
        if got != ref:
            at = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            raise ExportError(f"the tokenizer graph disagrees with tokenizer.json on the prompt {p!r} (first differing "
                              f"id at position {at}: {got[at:at + 1]} vs {ref[at:at + 1]})",
                              "report the tokenizer; export without tokenizer graphs is not offered for this target")
        text, want = graphs.decode(ref), tok.decode(ref, skip_special_tokens=True)
        if text != want or (not any(s in p for s in specials) and text != p):
            raise ExportError(f"the detokenizer graph does not give back the prompt {p!r} (it gives {text!r})",
                              "report the tokenizer; export without tokenizer graphs is not offered for this target")
        n += 1
    return n


def write_tokenizer_graphs(tokenizer_file: Path, work: Path, scratch: Path, prompts, log) -> dict:
    """``tokenizer.onnx`` and ``detokenizer.onnx`` in ``work``, checked on ``prompts``; the manifest's
    ``processing`` block (or, where the tokenizer cannot be expressed, a block that says why and names no graph)."""
    from ..compress.onnx_io import save_model

    why = _unsupported(json.loads(Path(tokenizer_file).read_text(encoding="utf-8")))
    if why is not None:
        log(f"  tokenizer graphs: not written ({why}); the app tokenizes with tokenizer.json")
        return {"tokenizer": None, "detokenizer": None, "checked_prompts": 0, "not_expressed": why}
    pre, post = build_graphs(tokenizer_file, scratch)
    tmp = Path(scratch) / "processing"
    tmp.mkdir(exist_ok=True)
    save_model(pre, tmp / TOKENIZER)
    save_model(post, tmp / DETOKENIZER)
    graphs = GraphTokenizer(tmp / TOKENIZER, tmp / DETOKENIZER)
    n = check_graphs(graphs, tokenizer_file, prompts)
    for name in (TOKENIZER, DETOKENIZER):
        (tmp / name).replace(Path(work) / name)
    version = extensions_version()
    log(f"  tokenizer graphs (onnxruntime-extensions {version}): equal to tokenizer.json on {n} prompts")
    return {"tokenizer": {"path": TOKENIZER, "input": graphs.enc_in, "output": graphs.enc_out,
                          "extensions": f"onnxruntime-extensions {version}"},
            "detokenizer": {"path": DETOKENIZER, "input": graphs.dec_in, "output": graphs.dec_out},
            "checked_prompts": n}
