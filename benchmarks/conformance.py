"""LLaVA- and SmolVLM-format checkpoints answered as transformers answers them: the conformance matrix of issue 28.

One tiny checkpoint per configuration Hugging Face users meet, each saved by transformers itself with its own
LlavaProcessor (tokenizer, image processor, chat template): tokenizers that add BOS, add none, or have none at all
(Qwen2's); with and without a chat template; CLIP's crop and LlavaImageProcessor's pad on a non-square image; the
vision-feature options LLaVA configs use. Each is answered by transformers (the processor's prompt ids and pixels,
the model's logits and 32 greedy tokens from ``generate``) and by edgevlm three ways: eager PyTorch, and the FP32
bundle `edgevlm export` writes, through its ONNX decoder (ONNX Runtime) and its GGUF decoder (llama.cpp).

SmolVLM (Idefics3 format) rows: the tiny checkpoint tests/test_smolvlm.py writes (``hf_smolvlm_checkpoint``: an
``Idefics3ForConditionalGeneration`` saved by transformers with its Idefics3Processor and SmolVLM's chat template),
with image splitting (tiles + the global view, on a non-square image) and without it (one global view); transformers'
answer is that model's forward and ``generate`` on its processor's inputs (pixel values, pixel attention mask). The
image slots of a SmolVLM prompt are not one contiguous run, so edgevlm's prompt ids are read per engine as the model
lays them out: eager from ``prompt_ids`` (as tests/test_smolvlm.py checks them), the bundle runtime from the text runs
its ``prepare`` embeds, with each view's image slot (``<image>`` x tokens per view) between them.

Columns: the prompt ids equal the processor's; the largest |difference| of the last prompt position's logits (and
that over the largest |logit|: float32 rounding of a different summation order, as in ONNX Runtime's and
llama.cpp's matmuls, is about 1e-6 of it); how many of the 32 greedy tokens equal transformers'. Prints a table, writes JSON::

    python benchmarks/conformance.py [--cases NAME ...] [--engines eager onnx gguf] [--json PATH]

tests/test_llava.py runs the same cases through eager, and two of them through both bundle decoders;
tests/test_smolvlm.py the SmolVLM checkpoints through eager and the bundle.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):           # the repo's edgevlm and the tests' checkpoint writers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

NEW_TOKENS = 32
PROMPT = "What is in the picture?"
# case -> tests/vlm_utils.hf_llava_processor_checkpoint arguments (post_bos, template, and keywords)
CASES = {
    "chat template, tokenizer adds BOS": (True, "chat", {}),
    "chat template, tokenizer adds none": (False, "chat", {}),
    "chat template starting with BOS": (True, "bos+chat", {}),
    "no chat template, tokenizer adds BOS": (True, None, {}),
    "Llama tokenizer class, add_bos_token false": (True, "chat", {"tokenizer_class": "LlamaTokenizerFast",
                                                                   "add_bos_token": False}),
    "Qwen2-style tokenizer, no BOS token": (False, "qwen", {"tokenizer_class": "Qwen2TokenizerFast",
                                                            "bos_token": None}),
    "non-square image, crop (CLIPImageProcessor)": (True, "chat", {}),
    "non-square image, pad (LlavaImageProcessor)": (True, "chat", {"pad": True}),
    "vision_feature_layer [-3, -1], strategy full": (True, "chat", {"vision_feature_layer": [-3, -1],
                                                                     "vision_feature_select_strategy": "full"}),
}
# SmolVLM case -> tests/test_smolvlm.hf_smolvlm_checkpoint keywords (an Idefics3 checkpoint, SmolVLM's chat template)
SMOLVLM_CASES = {
    "SmolVLM, tiled non-square image": {"splitting": True},
    "SmolVLM, no image splitting": {"splitting": False},
}
ENGINES = ("eager", "onnx", "gguf")


def _image(case: str):
    import numpy as np

    shape = (50, 90) if "non-square" in case else (96, 109)
    return np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)


def checkpoint(case: str, folder: Path):
    """(checkpoint directory, its processor as transformers loads it)."""
    if case in SMOLVLM_CASES:
        from test_smolvlm import hf_smolvlm_checkpoint

        d = folder / "ckpt"
        _, proc = hf_smolvlm_checkpoint(d, **SMOLVLM_CASES[case])       # the model is reloaded from d as saved
        return d, proc
    from vlm_utils import CHAT, QWEN_CHAT, hf_llava_processor_checkpoint

    post_bos, template, kw = CASES[case]
    text = {"chat": CHAT, "bos+chat": "{{ bos_token }}" + CHAT, "qwen": QWEN_CHAT, None: None}[template]
    return hf_llava_processor_checkpoint(folder, "ckpt", post_bos, text, **kw)


def reference(d: Path, proc, image, prompt: str, template: str | None) -> dict:
    """transformers' answer: the processor's inputs, the last prompt position's logits, 32 greedy tokens."""
    import torch
    import transformers
    from PIL import Image

    if (d / "config.json").is_file() and _model_type(d) in ("idefics3", "smolvlm"):
        return _reference_smolvlm(d, proc, image, prompt)
    if template is not None:
        messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                                 {"type": "text", "text": prompt}]}]
        inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    else:                                   # the recipe's template, typed out as a user would
        from edgevlm.zoo import get_vlm_recipe

        text = get_vlm_recipe("llava_1_5_7b").prompt["template"].replace("{prompt}", prompt)
        inputs = proc(text=text, images=image, return_tensors="pt")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(d).eval()
    with torch.no_grad():
        logits = hf(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0, -1]
        tokens = hf.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, inputs["input_ids"].shape[1]:]
    return {"ids": inputs["input_ids"][0].tolist(), "logits": logits.numpy(), "tokens": tokens.tolist()}


def _model_type(d: Path) -> str | None:
    import json

    return json.loads((d / "config.json").read_text()).get("model_type")


def _reference_smolvlm(d: Path, proc, image, prompt: str) -> dict:
    """transformers' Idefics3 (or SmolVLM) model on its processor's chat-template inputs, as tests/test_smolvlm.py
    runs it."""
    import torch
    import transformers
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": prompt}]}]
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    cls = {"idefics3": transformers.Idefics3ForConditionalGeneration,
           "smolvlm": transformers.SmolVLMForConditionalGeneration}[_model_type(d)]
    hf = cls.from_pretrained(d).eval()
    kw = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask") if k in inputs}
    with torch.no_grad():
        logits = hf(input_ids=inputs["input_ids"], **kw).logits[0, -1]
        tokens = hf.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kw,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, inputs["input_ids"].shape[1]:]
    return {"ids": inputs["input_ids"][0].tolist(), "logits": logits.numpy(), "tokens": tokens.tolist()}


def _eager(d: Path, image, prompt: str) -> dict:
    import torch

    from edgevlm.generation import GenerationConfig
    from edgevlm.modeling.families import load_vlm

    vlm = load_vlm(str(d))
    embeds, pieces, n_img = vlm.prepare(image, prompt)
    if hasattr(vlm, "prompt_ids"):          # SmolVLM: image slots between text runs, the model's own layout
        ids = vlm.prompt_ids(image, prompt)
        if embeds.shape[1] != len(ids):     # the ids do not describe what the model embedded
            ids = []
    else:
        ids = pieces.before + [vlm.tokenizer.token_id("<image>")] * n_img + pieces.after
    with torch.no_grad():
        logits = vlm(embeds)[0, -1].numpy()
        tokens = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=NEW_TOKENS)))
    return {"ids": ids, "logits": logits, "tokens": tokens}


def _bundle(out: Path, decoder: str, image, prompt: str) -> dict:
    from edgevlm import runtime
    from edgevlm.generation import GenerationConfig, GenerationStats

    vlm = runtime.load(out, decoder=decoder)
    try:
        if vlm.image_spec.mode == "idefics3_tiles":
            embeds, pieces, n_img, prefix, ids = _prepare_tiles(vlm, image, prompt)
        else:
            embeds, pieces, n_img, prefix = vlm.prepare(image, prompt)
            ids = pieces.before + [vlm.tokenizer.token_id("<image>")] * n_img + pieces.after
        vlm.decoder.reset()
        logits = vlm.decoder.prefill(embeds[0], prefix)
        tokens = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=NEW_TOKENS), GenerationStats(),
                                        prefix))
    finally:
        vlm.close()
    return {"ids": ids, "logits": logits, "tokens": tokens}


def _prepare_tiles(vlm, image, prompt: str):
    """The runtime's ``prepare`` of a SmolVLM prompt, and the ids it stands for: the text runs it embeds (recorded
    from its ``embed_ids`` calls, in order) with each view's image slot, ``<image>`` x tokens per view, between them.
    [] when the runs and slots do not add up to the embeddings' length."""
    runs, embed_ids = [], vlm.embed_ids

    def record(ids):
        runs.append([int(i) for i in ids])
        return embed_ids(ids)

    vlm.embed_ids = record
    try:
        embeds, pieces, n_img, prefix = vlm.prepare(image, prompt)
    finally:
        del vlm.embed_ids
    ids = list(runs[0]) if runs else []
    if n_img and len(runs) > 1:
        per = n_img // (len(runs) - 1)
        for run in runs[1:]:
            ids += [vlm.tokenizer.token_id("<image>")] * per + run
    if embeds.shape[1] != len(ids):
        ids = []
    return embeds, pieces, n_img, prefix, ids


def export_bundle(d: Path, out: Path, engines) -> Path:
    """The checkpoint's FP32 cpu bundle, with the decoders ``engines`` asks for (ONNX, GGUF or both)."""
    from edgevlm.build_vlm import export_vlm_bundle
    from edgevlm.config import VLMExportConfig

    decoder = "both" if {"onnx", "gguf"} <= set(engines) else ("gguf" if "gguf" in engines else "onnx")
    export_vlm_bundle(VLMExportConfig(model=str(d), precision="fp32", decoder=decoder, out=out), quiet=True)
    return out


def compare(ref: dict, got: dict) -> dict:
    import numpy as np

    agree = sum(a == b for a, b in zip(ref["tokens"], got["tokens"]))
    diff = float(np.abs(np.asarray(got["logits"], np.float32) - ref["logits"]).max())
    return {"prompt_ids_equal": got["ids"] == ref["ids"], "max_logit_diff": diff,
            "max_logit_diff_rel": diff / float(np.abs(ref["logits"]).max()),
            "greedy_tokens_equal": int(agree) if len(got["tokens"]) == len(ref["tokens"]) else 0,
            "greedy_tokens": len(ref["tokens"])}


def run_case(case: str, folder: Path, engines=ENGINES) -> list[dict]:
    """One configuration through transformers and each engine: a row per engine."""
    d, proc = checkpoint(case, folder)
    image = _image(case)
    template = "chat" if case in SMOLVLM_CASES else CASES[case][1]
    ref = reference(d, proc, image, PROMPT, template)
    rows = []
    bundle = export_bundle(d, folder / "bundle", engines) if set(engines) & {"onnx", "gguf"} else None
    for engine in engines:
        got = (_eager(d, image, PROMPT) if engine == "eager"
               else _bundle(bundle, "onnxruntime" if engine == "onnx" else "llama.cpp", image, PROMPT))
        rows.append({"case": case, "engine": engine, **compare(ref, got)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=[*CASES, *SMOLVLM_CASES], default=[*CASES, *SMOLVLM_CASES])
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "conformance.json")
    args = ap.parse_args(argv)

    from edgevlm.progress import Stages
    from edgevlm.report import table, write_json

    rows = []
    stages = Stages(len(args.cases))
    with tempfile.TemporaryDirectory(prefix="edgevlm-conformance-") as tmp:
        for i, case in enumerate(args.cases):
            with stages(case):
                rows += run_case(case, Path(tmp) / f"case{i}", args.engines)
    shown = [{"configuration": r["case"], "engine": {"eager": "eager", "onnx": "ONNX (onnxruntime)",
                                                     "gguf": "GGUF (llama.cpp)"}[r["engine"]],
              "same prompt ids": "yes" if r["prompt_ids_equal"] else "NO",
              "max |logit diff|": f"{r['max_logit_diff']:.1e}",
              "relative to max |logit|": f"{r['max_logit_diff_rel']:.1e}",
              "greedy tokens equal": f"{r['greedy_tokens_equal']}/{r['greedy_tokens']}"} for r in rows]
    formats = "- and ".join(f for f, cases in (("LLaVA", CASES), ("SmolVLM", SMOLVLM_CASES))
                           if any(c in cases for c in args.cases))
    print(table(shown, title=f"{formats}-format checkpoints saved by transformers: edgevlm against transformers "
                             "(FP32; logits of the last prompt position)"))
    import platform

    import transformers

    write_json(args.json, {"transformers": transformers.__version__, "machine": platform.processor() or
                           platform.machine(), "new_tokens": NEW_TOKENS, "rows": rows})
    return 0 if all(r["prompt_ids_equal"] and r["greedy_tokens_equal"] == r["greedy_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
