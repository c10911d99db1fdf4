"""`edgevlm export` for vision-language models: named parts, each validated, then the whole bundle
run by the torch-free runtime against eager PyTorch before the bundle is written.

load -> reparameterize the tower (if it can) -> export parts (vision encoder, token embedding,
decoder with KV cache; GGUF decoder for llama.cpp) -> quantize -> end-to-end parity (greedy tokens
and logit divergence through the runtime itself) -> manifest -> atomic rename.
"""
from __future__ import annotations

import datetime as _dt
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .bundle import check_out, file_table, staging, write_manifest
from .config import Precision
from .errors import ConfigError, ExportError, ValidationError
from .manifest import GENERATION_VERSION
from .scratch import scratch as scratch_dir
from .progress import Stages
from .targets import get_target

DECODER_CHOICES = ("onnx", "gguf", "both")
GGUF_TYPES = {Precision.FP32: "f32", Precision.FP16: "f16", Precision.INT8: "q8_0", Precision.INT4: "q4_k_m"}
PARITY_TOKENS = 32


@dataclass
class VLMExportConfig:
    model: str
    weights: str | None = None
    revision: str | None = None
    target: str = "cpu"
    precision: str = "int8"
    decoder: str = "onnx"                 # onnx | gguf | both
    out: str | None = None
    overwrite: bool = False
    calib: str | None = None              # images for the vision encoder's INT8 calibration
    calib_size: int = 32
    block_size: int = 32
    parity_tokens: int = PARITY_TOKENS
    opset: int = 18

    def __post_init__(self) -> None:
        self.precision = Precision.parse(self.precision)
        if self.decoder not in DECODER_CHOICES:
            raise ConfigError(f"unknown decoder {self.decoder!r}", f"use one of: {', '.join(DECODER_CHOICES)}")


def default_out(cfg: VLMExportConfig) -> Path:
    suffix = "" if cfg.decoder == "onnx" else f"-{cfg.decoder}"
    return Path("bundles") / f"{cfg.model}-{cfg.target}-{cfg.precision.value}{suffix}"


def _versions() -> dict:
    import importlib.metadata as md

    out = {"edgevlm": __version__, "python": platform.python_version()}
    for n in ("torch", "transformers", "timm", "onnx", "onnxruntime", "tokenizers", "gguf", "llama_cpp_python"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


def parity_inputs(model) -> tuple[object, str]:
    """An image and a prompt every family can take: a rendered validation scene and a question."""
    from .data import scenes

    img = scenes.render(scenes.make_scene("val", 0))
    prompt = "describe the image." if model.family == "edgevlm" else "What is in this image?"
    return img, prompt


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, from logits (float64)."""
    from .exporters.vlm_onnx import _log_softmax

    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def eager_trace(model, image, prompt: str, n_tokens: int) -> dict:
    """Eager greedy tokens (no early stop) and the logits along that path, (n, V)."""
    import torch

    from .generation import GenerationConfig

    with torch.inference_mode():
        embeds, pieces, n_img = model.prepare(image, prompt)
        prefix = len(pieces.before) + n_img if model.bidirectional_image_prefix and n_img else 0
        budget = min(n_tokens, model.max_context - embeds.shape[1])
        ids = list(model.decode_tokens(embeds, GenerationConfig(max_new_tokens=budget, stop_ids=()), prefix=prefix))
        seq = torch.cat([embeds, model.embed_tokens(torch.tensor([ids[:-1]]))], 1) if len(ids) > 1 else embeds
        mask = model.prefill_mask(seq.shape[1], prefix, seq.dtype)
        kw = {"attention_mask": mask} if mask is not None else {}
        logits = model.language_model(inputs_embeds=seq, use_cache=False, **kw).logits[0]
    n = embeds.shape[1]
    return {"ids": ids, "logits": logits[n - 1:n - 1 + len(ids)].float().numpy(), "prompt_len": int(n),
            "image_tokens": int(n_img)}


def runtime_trace(pipe, image, prompt: str, ref_ids: list[int]) -> dict:
    """The runtime's own greedy tokens (no early stop), and its logits teacher-forced on ``ref_ids``."""
    from .generation import GenerationConfig, GenerationStats

    embeds, _, _, prefix = pipe.prepare(image, prompt)
    cfg = GenerationConfig(max_new_tokens=len(ref_ids), stop_ids=())
    ids = list(pipe.decode_tokens(embeds, cfg, GenerationStats(), prefix))
    pipe.decoder.reset()
    logits = [pipe.decoder.prefill(embeds[0], prefix)]
    for t in ref_ids[:-1]:
        logits.append(pipe.decoder.step(int(t)))
    pipe.decoder.reset()
    return {"ids": ids, "logits": np.stack(logits), "prompt_len": int(embeds.shape[1])}


def compare_traces(ref: dict, got: dict, precision: str, backend: str) -> dict:
    """Greedy-token agreement and logit divergence of a runtime against eager."""
    a, b = ref["ids"], got["ids"]
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    same = first_diff is None and len(a) == len(b)
    kl = _kl(ref["logits"], got["logits"])
    diff = np.abs(ref["logits"].astype(np.float64) - got["logits"].astype(np.float64))
    rec = {"backend": backend, "precision": precision, "new_tokens": len(a), "same_greedy_tokens": bool(same),
           "first_divergence": first_diff, "prefix_agreement": (first_diff if first_diff is not None else len(a)) / max(1, len(a)),
           "teacher_forced_top1_agreement": float((ref["logits"].argmax(-1) == got["logits"].argmax(-1)).mean()),
           "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "logits_max_abs_diff": float(diff.max()),
           "prompt_tokens": ref["prompt_len"]}
    if precision in ("fp32", "f32"):
        rec["criterion"] = "same greedy tokens as eager"
        rec["passed"] = bool(same and got["prompt_len"] == ref["prompt_len"])
    else:
        rec["criterion"] = "recorded (quantized: judged by task accuracy)"
        rec["passed"] = None
    return rec


def export_vlm_bundle(cfg: VLMExportConfig, quiet: bool = False, model=None) -> tuple[Path, dict]:
    """Build, validate and write one VLM bundle; returns (bundle path, manifest).

    ``model``: an already loaded (e.g. fine-tuned) :class:`VisionLanguageModel` of ``cfg.model``'s recipe
    to export instead of loading ``cfg.weights``.
    """
    from .modeling.families import load_vlm
    from .zoo import get_vlm_recipe

    recipe = get_vlm_recipe(cfg.model)
    target = get_target(cfg.target)
    if target.format != "onnx":
        raise ConfigError(f"VLM bundles are built for the cpu and jetson ONNX targets so far, not {target.name}",
                          "export with --target cpu")
    target.check_precision(cfg.precision)
    want_gguf = cfg.decoder in ("gguf", "both")
    if want_gguf:
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise ExportError("a GGUF decoder needs the gguf package", "pip install 'edgevlm[gguf]'") from None
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    check_out(out, cfg.overwrite)
    stages = Stages(6, quiet=quiet)
    log = stages.log
    p = cfg.precision

    with stages(f"load {recipe.name} ({cfg.weights or recipe.default_weights or recipe.hub_id or 'no weights'})"):
        if model is None:
            model = load_vlm(recipe.name, cfg.weights, cfg.revision)
        model = model.eval()
        model.require_tokenizer()
        n_params = sum(t.numel() for t in model.parameters())
        reparam = _reparameterize(model, log)
        log(f"      {n_params / 1e6:.2f}M parameters, family {model.family}")
        image, prompt = parity_inputs(model)
        ref = eager_trace(model, image, prompt, cfg.parity_tokens)

    with staging(out, overwrite=cfg.overwrite) as work, scratch_dir("vlm") as tmp:
        scratch = Path(tmp)
        parts: dict = {}
        with stages(f"export ONNX parts at {p.value}"):
            parts.update(_export_onnx(model, image, p, cfg, work, scratch, log, want_onnx_decoder=cfg.decoder != "gguf"))
        with stages("write GGUF decoder" if want_gguf else "GGUF decoder (not requested)"):
            if want_gguf:
                parts["decoder_gguf"] = _export_gguf(model, p, work, scratch, log)
        model.tokenizer.tok.save(str(work / "tokenizer.json"))
        generation = dict(model.runtime_spec(), version=GENERATION_VERSION, tokenizer="tokenizer.json",
                          **parts.pop("_decoder_facts", {}))
        manifest = {
            "edgevlm_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "task": "vlm",
            "model": {"name": recipe.name, "family": model.family, "params": int(n_params),
                      "vision_tokens": ref["image_tokens"]},
            "weights": {"source": str(cfg.weights or getattr(model, "weights_source", None) or recipe.default_weights
                                      or recipe.hub_id),
                        "revision": cfg.revision, "dataset": getattr(model, "facts", {}).get("dataset"),
                        "trained_with": getattr(model, "facts", {}).get("trained_with")},
            "target": target.to_dict(),
            "precision": p.value,
            "reparameterization": reparam,
            "generation": generation,
            "parts": parts,
            "artifacts": [{"path": v["path"], "format": v["format"], "precision": v["precision"], "part": k}
                          for k, v in parts.items()],
        }
        with stages(f"end-to-end parity through the runtime ({len(ref['ids'])} greedy tokens)"):
            manifest["parity"] = _end_to_end(work, manifest, image, prompt, ref, log)
        with stages("task accuracy"):
            manifest["accuracy"] = {"status": "not measured",
                                    "reason": "run `edgevlm eval BUNDLE` (the scenes task) for edgevlm's own model"}
        with stages(f"write bundle {out}"):
            manifest["versions"] = _versions()
            manifest = write_manifest(work, manifest)
    return out, manifest


def _reparameterize(model, log) -> dict:
    """Fold the vision tower's train-time branches (FastViT RepMixer) in place, checked on one image."""
    from .compress.reparam import reparameterize_checked

    tower = model.vision
    if not any(hasattr(m, "reparameterize") for m in tower.modules()):
        return {"applied": False, "reason": f"{model.family}'s vision tower has no reparameterizable blocks"}
    x = model.pixel_values(parity_inputs(model)[0]).float().numpy()
    folded, rec = reparameterize_checked(tower, x)
    model.vision = folded
    log(f"      reparameterized the tower: {rec['blocks_folded']} blocks, max rel diff {rec['max_rel_diff']:.1e}")
    return rec


def _calibration_pixels(model, cfg: VLMExportConfig) -> np.ndarray:
    from .data import calibration as calib

    dataset = "scenes" if model.family == "edgevlm" else None
    imgs = calib.calibration_images(cfg.calib, dataset, cfg.calib_size, seed=0)
    views = np.concatenate([model.pixel_values(im).numpy() for im in imgs]).astype(np.float32)
    if len(views) > MAX_CALIB_VIEWS:       # families with crops give several views per image: keep an even spread
        views = views[np.linspace(0, len(views) - 1, MAX_CALIB_VIEWS).round().astype(int)]
    return views


# At most this many views calibrate a VLM's vision tower: Moondream2's overlapping crops make 32 images about 336
# views of 378 px, each a full pass of a 413M tower; 64 views spread over all images keep the ranges' coverage.
MAX_CALIB_VIEWS = 64


def _calibration_progress(log):
    def report(done: int, total: int) -> None:
        if done % max(1, total // 8) == 0 or done == total - 1:
            log(f"      calibration view {done + 1}/{total}")
    return report


def _place_onnx(src: Path, dst: Path) -> None:
    """Move an ONNX file into the bundle; one with external weights names its ``.data`` file, so it is
    saved again under the new name."""
    from .exporters import vlm_onnx

    if src.with_name(src.name + ".data").exists():
        import onnx

        vlm_onnx.save_model(onnx.load(str(src)), dst, external_data=True)
    else:
        shutil.move(str(src), dst)


def _export_onnx(model, image, p: Precision, cfg: VLMExportConfig, work: Path, scratch: Path, log,
                 want_onnx_decoder: bool) -> dict:
    from .exporters import vlm_onnx

    lm = model.language_model
    parts: dict = {}
    pixels = model.pixel_values(image)
    vis_prec = {Precision.FP32: "fp32", Precision.FP16: "fp16"}.get(p, "int8")
    parts.update(_export_vision(model, pixels, vis_prec, cfg, work, scratch, log))
    log("  token embedding (fp32)")
    facts = vlm_onnx.export_embed_tokens(lm, work / "embed_tokens.onnx", opset=cfg.opset)
    parts["embed_tokens"] = {"path": "embed_tokens.onnx", "format": "onnx", "precision": "fp32", "details": facts}
    dec_fp32 = scratch / "decoder.fp32.onnx"
    log("  decoder with KV cache (fp32 export)")
    dfacts = vlm_onnx.export_decoder(lm, dec_fp32, opset=cfg.opset)
    parts["_decoder_facts"] = {k: dfacts[k] for k in ("num_layers", "num_kv_heads", "head_dim")}
    if want_onnx_decoder:
        rec = {"path": "decoder.onnx", "format": "onnx", "precision": p.value, "details": {"export": dfacts}}
        heads = getattr(lm.config, "num_attention_heads", None)
        src = dec_fp32
        if cfg.target == "cpu" and p != Precision.FP16 and heads:
            # ONNX Runtime's CPU attention op with a KV buffer appended in place (no per-step cache copy) and
            # the model's RoPE inside it; fused on the FP32 graph, where the check against the model's own
            # RoPE ops is exact, then quantized. FP16 keeps float32 KV I/O around fp16 compute, and other
            # providers run the plain graph.
            fused = scratch / "decoder.fused.onnx"
            att = vlm_onnx.fuse_attention(dec_fp32, int(heads), dfacts["num_kv_heads"], dfacts["head_dim"],
                                          dst=fused, rotary=vlm_onnx.rotary_tables(lm, model.max_context))
            if att["kv_cache"] != "concat":
                src = fused
            rec["details"]["attention"] = att
            log(f"  attention: {att['kv_cache']}" + (f" ({att['why']})" if "why" in att else "")
                + (f"; RoPE: {att['rope']}" if "rope" in att else "")
                + (f" ({att['rope_why']})" if "rope_why" in att else ""))
        if p == Precision.FP32:
            _place_onnx(src, work / "decoder.onnx")
        else:
            log(f"  quantizing the decoder to {p.value}")
            rec["details"]["quantization"] = vlm_onnx.quantize_decoder(src, work / "decoder.onnx", p.value,
                                                                       block_size=cfg.block_size)
        parts["decoder"] = rec
    return parts


VISION_PARTS = {"vision_encoder.onnx": "vision_encoder", "vision_tower.onnx": "vision_tower",
                "vision_projector.onnx": "vision_projector", "prefusion.onnx": "prefusion"}


def _export_vision(model, pixels, precision: str, cfg: VLMExportConfig, work: Path, scratch: Path, log) -> dict:
    """Vision graphs (and LLaVA-Mini's pre-fusion): FP32 export, parity, then FP16 or INT8 static on images.

    INT8 covers the graph that reads pixels (encoder, or Moondream's tower), calibrated on ``--calib``
    images (default: the scenes for edgevlm's model, photos otherwise); projector and pre-fusion stay FP32.
    """
    from .compress import quantize
    from .exporters import vlm_onnx

    grid = None
    if model.family == "moondream2":
        pixels, grid = model.image_views(parity_inputs(model)[0])
    log(f"  vision graphs (fp32 export, then {precision})")
    files = vlm_onnx.export_vision_encoder(model, pixels, scratch / "vision_encoder.onnx", opset=cfg.opset)
    first = "vision_tower.onnx" if "vision_tower.onnx" in files else "vision_encoder.onnx"
    parity32 = vlm_onnx.vision_parity(model, scratch / first, pixels, "fp32", grid)
    log(f"    parity fp32: max abs {parity32['max_abs_diff']:.2e} [ok]")
    parts = {}
    for name, facts in files.items():
        part = VISION_PARTS[name]
        src = scratch / name
        rec = {"path": name, "format": "onnx", "precision": "fp32", "details": {"export": facts}}
        if name == first:
            rec["parity"] = parity32
            if precision != "fp32":
                q = scratch / f"{part}.{precision}.onnx"
                if precision == "fp16":
                    rec["details"]["quantization"] = quantize.to_fp16(src, q)
                else:
                    data = _calibration_pixels(model, cfg)
                    log(f"    calibrating INT8 on {len(data)} views ({cfg.calib or 'built-in images'})")
                    rec["details"]["quantization"] = quantize.to_int8(
                        src, q, data, exclude_depthwise=True, exclude_activation_matmuls=True,
                        op_types=["Conv", "MatMul", "Gemm"], batch=1, progress=_calibration_progress(log))
                src.unlink()
                q.replace(src)
                rec["precision"] = precision
                rec["parity"] = vlm_onnx.vision_parity(model, scratch / first, pixels, precision, grid)
                rec["parity_fp32"] = parity32
                log(f"    parity {precision}: max rel {rec['parity']['max_rel_diff']:.2e} [recorded]")
        shutil.move(str(src), work / name)
        parts[part] = rec
    return parts


def _export_gguf(model, p: Precision, work: Path, scratch: Path, log) -> dict:
    from .exporters import gguf as gg

    qtype = GGUF_TYPES[p]
    base = "f32" if p == Precision.FP32 else "f16"
    src = (work if qtype == base else scratch) / f"decoder.{base}.gguf"
    log(f"  writing GGUF ({base})")
    facts = gg.write_gguf(model.language_model, model.require_tokenizer(), src, ftype=base, name=model.name,
                          context_length=model.max_context)
    rec = {"format": "gguf", "precision": p.value, "gguf_type": qtype, "details": {"write": facts}}
    if qtype == base:
        rec["path"] = src.name
    else:
        log(f"  quantizing with llama.cpp's quantizer ({qtype})")
        dst = work / f"decoder.{qtype}.gguf"
        rec["details"]["quantization"] = gg.quantize_gguf(src, dst, qtype)
        rec["path"] = dst.name
    return rec


def _end_to_end(work: Path, manifest: dict, image, prompt: str, ref: dict, log) -> dict:
    """Run the bundle-to-be through the torch-free runtime on every decoder it carries."""
    from .runtime.vlm import VLMPipeline

    out = {"image": "scenes val 0", "prompt": prompt, "eager_tokens": ref["ids"], "results": []}
    backends = [b for b, k in (("onnxruntime", "decoder"), ("llama.cpp", "decoder_gguf")) if k in manifest["parts"]]
    for backend in backends:
        pipe = VLMPipeline(work, {**manifest, "files": file_table(work)}, decoder=backend)   # as the device will
        try:
            got = runtime_trace(pipe, image, prompt, ref["ids"])
        finally:
            pipe.close()
        prec = manifest["parts"]["decoder" if backend == "onnxruntime" else "decoder_gguf"]["precision"]
        rec = compare_traces(ref, got, prec, backend)
        rec.update(getattr(pipe.decoder, "kernel", {}))     # whose kernel ran the decode steps measured here
        out["results"].append(rec)
        ok = {True: "ok", False: "FAIL", None: "recorded"}[rec["passed"]]
        log(f"      {backend} {prec}: same greedy tokens {rec['same_greedy_tokens']} "
            f"(first divergence {rec['first_divergence']}), teacher-forced top-1 "
            f"{rec['teacher_forced_top1_agreement']:.3f}, KL mean {rec['kl_mean']:.2e} [{ok}]")
        if rec["passed"] is False:
            raise ValidationError(
                f"the {backend} fp32 bundle does not reproduce eager greedy decoding (first divergence at token "
                f"{rec['first_divergence']}, max logit diff {rec['logits_max_abs_diff']:.2e})",
                "report the model as an exporter bug")
    return out
