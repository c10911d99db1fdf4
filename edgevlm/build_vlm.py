"""A vision-language model as a job of the one export pipeline (:mod:`edgevlm.pipeline`): named parts, each
validated, then the whole bundle run by the torch-free runtime against eager PyTorch before it is written.

load -> reparameterize the tower (if it can) -> the parts the family declares (``model.export_parts``: vision
encoder, or Moondream's tower + projector, LLaVA-Mini's pre-fusion, ...) -> token embedding -> decoder with KV
cache (+ the target's rewrites) -> quantize each part by the target profile's rules (``export/*.yaml``: ``int8``
for parts that read pixels, ``vlm.decoder_int8/int4`` for the decoder) -> GGUF decoder for llama.cpp (when the
profile's ``vlm.decoders`` allows it) -> end-to-end parity (greedy tokens and logit divergence through the
runtime itself) -> the VLM's manifest blocks.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .bundle import file_table
from .config import DecoderChoice, Precision, Rewrite, VLMExportConfig
from .errors import ConfigError, ExportError, ValidationError
from .manifest import GENERATION_VERSION
from .pipeline import ExportJob, header, run
from .targets import get_target

GGUF_TYPES = {Precision.FP32: "f32", Precision.FP16: "f16", Precision.INT8: "q8_0", Precision.INT4: "q4_k_m"}
PACKAGES = ("torch", "transformers", "timm", "onnx", "onnxruntime", "tokenizers", "gguf", "llama_cpp_python")


def default_out(cfg: VLMExportConfig, precision: Precision) -> Path:
    """bundles/NAME-TARGET-PRECISION[-DECODER]; NAME is the checkpoint's own (its directory's name, a hub id's repo
    name) when the weights are a user's checkpoint, not the recipe that reads it: two LLaVA-format checkpoints
    exported to one target must not share a default."""
    import re

    default = get_target(cfg.target).require_vlm().default_decoder
    suffix = "" if cfg.decoder in (None, default) else f"-{cfg.decoder.value}"
    name = cfg.model
    w = str(cfg.weights) if cfg.weights is not None else ""
    if w and w != "random" and (Path(w).is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", w)):
        name = re.sub(r"[^\w.-]", "_", Path(w).resolve().name if Path(w).is_dir() else w.split("/")[1]) or name
    return Path("bundles") / f"{name}-{cfg.target}-{precision.value}{suffix}"


def parity_inputs(model) -> tuple[object, str]:
    """An image and a prompt every family can take: a rendered validation scene and a question."""
    from .data import scenes

    img = scenes.render(scenes.make_scene("val", 0))
    return img, model.parity_prompt


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


def compare_traces(ref: dict, got: dict, precision: str, backend: str) -> dict:
    """Greedy-token agreement and logit divergence of a runtime against eager."""
    from .exporters.validate import logit_agreement

    a, b = ref["ids"], got["ids"]
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    same = first_diff is None and len(a) == len(b)
    agree = logit_agreement(ref["logits"], got["logits"])          # the one parity implementation
    rec = {"backend": backend, "precision": precision, "new_tokens": len(a), "same_greedy_tokens": bool(same),
           "first_divergence": first_diff, "prefix_agreement": (first_diff if first_diff is not None else len(a)) / max(1, len(a)),
           "teacher_forced_top1_agreement": agree["top1_agreement"], "kl_mean": agree["kl_mean"],
           "kl_max": agree["kl_max"], "logits_max_abs_diff": agree["logits_max_abs_diff"],
           "prompt_tokens": ref["prompt_len"]}
    if precision in ("fp32", "f32"):
        rec["criterion"] = "same greedy tokens as eager"
        rec["passed"] = bool(same and got["prompt_len"] == ref["prompt_len"])
    else:
        rec["criterion"] = "recorded (quantized: judged by task accuracy)"
        rec["passed"] = None
    return rec


def export_vlm_bundle(cfg: VLMExportConfig, quiet: bool = False, model=None) -> tuple[Path, dict]:
    """Build, validate and write one VLM bundle through the one pipeline; returns (bundle path, manifest).

    ``model``: an already loaded (e.g. fine-tuned) :class:`VisionLanguageModel` of ``cfg.model``'s recipe
    to export instead of loading ``cfg.weights``.
    """
    return run(vlm_job(cfg, model), quiet=quiet)


def vlm_job(cfg: VLMExportConfig, model=None) -> ExportJob:
    """A VLM as an :class:`~edgevlm.pipeline.ExportJob`: the parts its family declares (``model.export_parts``),
    the token embedding and the decoder, each exported, quantized by the target profile's rules and validated."""
    from .exporters import get_vlm_parts
    from .modeling.families import load_vlm
    from .zoo import get_vlm_recipe, resolve_vlm

    ref = resolve_vlm(cfg.model, cfg.weights, cfg.revision)   # a checkpoint named as the model: its recipe
    if ref is not None and ref.name != cfg.model:
        cfg = replace(cfg, model=ref.name, weights=ref.weights, revision=ref.revision)
    recipe = get_vlm_recipe(cfg.model)
    target = get_target(cfg.target)
    prof = target.require_vlm()
    p = cfg.precision or target.default_precision
    target.check_precision(p)
    prof.check_precision(p, target.name)
    decoder = cfg.decoder or prof.default_decoder
    prof.check_decoder(decoder, target.name)
    device = _device_fit(cfg, recipe.name, p, decoder, target) if cfg.device else None   # before any weights load
    # the decoder formats written; a profile's default GGUF gives way to its ONNX decoder where GGUF cannot be
    # written (no gguf package, or a family llama.cpp has no graph for), and the manifest says why
    # owned: the pipeline loaded the model itself, so it may drop the eager weights once every part that reads
    # them is exported (a caller's model is left whole)
    st: dict = {"model": model, "formats": decoder.formats(), "decoder_note": None, "owned": model is None}
    if "gguf" in st["formats"]:
        try:
            import gguf  # noqa: F401
        except ImportError:
            if cfg.decoder is not None or "onnx" not in prof.decoders:
                raise ExportError("a GGUF decoder needs the gguf package", "pip install 'edgevlm[gguf]'") from None
            _default_gives_way(st, "the gguf package is not installed (pip install 'edgevlm[gguf]')")

    def load(stages) -> None:
        log = stages.log
        with stages(f"load {recipe.name} ({cfg.weights or recipe.default_weights or recipe.hub_id or 'no weights'})"):
            m = st["model"] if st["model"] is not None else load_vlm(recipe.name, cfg.weights, cfg.revision)
            m = m.eval()
            m.require_tokenizer()
            if cfg.context is not None:      # --context: the KV cache, the GGUF and the engine plan hold this many
                if cfg.context > m.max_context:
                    raise ConfigError(f"--context {cfg.context} is longer than the {m.max_context} positions "
                                      f"{recipe.name} takes", f"use --context {m.max_context} or less")
                m.max_context = int(cfg.context)
            st["params"] = sum(t.numel() for t in m.parameters())
            st["reparam"] = _reparameterize(m, log)
            log(f"      {st['params'] / 1e6:.2f}M parameters, family {m.family}")
            st["image"], st["prompt"] = parity_inputs(m)
            st["ref"] = eager_trace(m, st["image"], st["prompt"], cfg.parity_tokens)
            st["golden"] = golden_references(m)        # eager's answers now: the weights may be gone by then
            st["model"] = m
            if cfg.decoder is None and "gguf" in st["formats"] and "onnx" in prof.decoders:
                from .exporters.gguf import check_supported

                try:
                    check_supported(m.language_model)
                except ExportError as e:
                    _default_gives_way(st, e.problem)
            if st["decoder_note"]:
                log(f"      decoder: {st['decoder_note']['why']}")

    def build(work: Path, scratch: Path, stages) -> dict:
        m, log, ref = st["model"], stages.log, st["ref"]
        formats = st["formats"]
        parts: dict = {}
        fx = get_vlm_parts(target.format)
        if hasattr(fx, "build_parts"):      # a format that converts from PyTorch itself (coreml): every part at once
            with stages(f"export {target.format} parts at {p.value} ({target.name} rules)"):
                built, facts = fx.build_parts(m, st["image"], p, cfg, target, work, scratch, log, formats)
                parts.update(built)
            with stages("write GGUF decoder" if "gguf" in formats else "GGUF decoder (not requested)"):
                if "gguf" in formats:
                    parts["decoder_gguf"] = _export_gguf(m, p, work, scratch, log)
        else:
            # every step that reads the eager weights first (FP32 graphs, their parity, eager references, the
            # GGUF), then the weights go (a real-size model and its quantizer do not fit in memory together),
            # then the profile's rewrites and precisions on the graphs alone
            with stages(f"export ONNX parts at fp32 ({target.name} rules)"):
                pending = _export_image_parts(m, st["image"], p, cfg, target, scratch, log, release=st["owned"])
                dec_fp32 = _export_text_parts(m, cfg, target, work, scratch, log, parts)
            with stages("write GGUF decoder" if "gguf" in formats else "GGUF decoder (not requested)"):
                if "gguf" in formats:
                    parts["decoder_gguf"] = _export_gguf(m, p, work, scratch, log)
            rotary = _rotary(m)
            if st["owned"]:
                release_weights(m, log)
            with stages(f"quantize and check parts at {p.value} ({target.name} rules)"):
                parts.update(_finish_image_parts(pending, p, target, work, scratch, log))
                facts = _finish_decoder(dec_fp32, rotary, p, cfg, target, work, scratch, log, parts,
                                        onnx_decoder="onnx" in formats)
        m.tokenizer.tok.save(str(work / "tokenizer.json"))
        # a format whose parts leave the ONNX files (ort): converted once every part is final, before parity
        finish = getattr(fx, "finish_parts", None)
        extra = finish(m, work, scratch, parts, target, log) if finish else {}
        blocks = {
            "model": {"name": recipe.name, "family": m.family, "params": int(st["params"]),
                      "vision_tokens": ref["image_tokens"]},
            "weights": {"source": str(cfg.weights or getattr(m, "weights_source", None) or recipe.default_weights
                                      or recipe.hub_id),
                        "revision": cfg.revision, "dataset": getattr(m, "facts", {}).get("dataset"),
                        "trained_with": getattr(m, "facts", {}).get("trained_with")},
            "target": {**target.to_dict(), "vlm": target.vlm_dict(),
                       **({"decoder_note": st["decoder_note"]} if st["decoder_note"] else {})},
            "precision": p.value,
            "reparameterization": st["reparam"],
            "generation": dict(m.runtime_spec(), version=GENERATION_VERSION, tokenizer="tokenizer.json", **facts),
            "parts": parts,
            "artifacts": [{"path": v["path"], "format": v["format"], "precision": v["precision"], "part": k}
                          for k, v in parts.items()],
        }
        blocks.update(extra)            # the format's own blocks (ort: processing, ops_config)
        if device is not None:          # --device: the module, the memory estimate and the speed bounds
            from .devices import device_block

            blocks["device"] = device_block(device[1], device[0])
        if target.tensorrt:             # engines are built on the device, from this plan (exporters.tensorrt)
            from .exporters.tensorrt import ENGINES_DIR, write_engine_plan

            blocks["engines"] = write_engine_plan(work, parts, target, int(blocks["generation"]["context_length"]),
                                                  int(ref["image_tokens"]), log)
            blocks["device_files"] = [f"{ENGINES_DIR}/", "trt_cache/"]   # engines built on the device
        with stages(f"end-to-end parity through the runtime ({len(ref['ids'])} greedy tokens)"):
            blocks["parity"] = _end_to_end(work, {**header("vlm"), **blocks}, st["image"], st["prompt"], ref, log)
        with stages("task accuracy"):
            blocks["accuracy"] = {"status": "not measured",
                                  "reason": "run `edgevlm eval BUNDLE` (the scenes task) for edgevlm's own model"}
        return blocks

    def golden(work: Path, blocks: dict, stages) -> dict:
        return write_golden(st["golden"], work, {**header("vlm"), **blocks}, stages.log)

    out = Path(cfg.out) if cfg.out else default_out(cfg, p)
    n_stages = 5 if hasattr(get_vlm_parts(target.format), "build_parts") else 6    # + quantize and check
    return ExportJob("vlm", out, cfg.overwrite, n_stages, load, build, PACKAGES, golden)


def _default_gives_way(st: dict, why: str) -> None:
    st["formats"] = ("onnx",)
    st["decoder_note"] = {"default": "gguf", "written": "onnx",
                          "why": f"the profile's default GGUF decoder cannot be written ({why}); the ONNX decoder "
                                 "instead (--decoder onnx)"}


def _device_fit(cfg: VLMExportConfig, name: str, p: Precision, decoder: DecoderChoice, target):
    """``--device``: the bundle-to-be must fit the Jetson module's usable memory, judged from the recipe (parameters
    and FLOPs counted without weights, :func:`edgevlm.devices.facts_from_recipe`); a one-line ConfigError names
    what would fit instead. Returns (device profile, fit)."""
    from .devices import PRECISIONS, check_fit, facts_from_recipe, get_device

    dev = get_device(cfg.device)
    runtime = "llama.cpp" if decoder.formats() == ("gguf",) else "tensorrt"
    allowed = tuple(x.value for x in target.precisions if x.value in PRECISIONS)
    facts = facts_from_recipe(name)
    if cfg.context is not None and cfg.context > facts.max_context:
        raise ConfigError(f"--context {cfg.context} is longer than the {facts.max_context} positions {name} takes",
                          f"use --context {facts.max_context} or less")
    return dev, check_fit(facts, p.value, dev, runtime, allowed=allowed, block_size=cfg.block_size,
                          context=cfg.context)


def golden_inputs(model) -> list[tuple[object, str]]:
    """The golden cases' inputs: rendered validation scenes, one per prompt of the family's ``golden_prompts``."""
    from .data import scenes

    return [(scenes.render(scenes.make_scene("val", i)), prompt) for i, prompt in enumerate(model.golden_prompts)]


def golden_references(model, new_tokens: int | None = None) -> list[dict]:
    """Eager's greedy tokens and teacher-forced top-5 on each golden input, taken while the weights are loaded:
    [{"id", "png" (the image's bytes as the bundle stores them), "prompt", "eager"}]."""
    from .data.images import load_image
    from .exporters import golden as gw
    from .runtime import golden as g

    n_new = new_tokens or g.NEW_TOKENS
    cases = []
    for i, (img, prompt) in enumerate(golden_inputs(model)):
        png = gw.png_bytes(img)
        ref = eager_trace(model, load_image(png), prompt, n_new)       # eager decodes the PNG the device decodes
        cases.append({"id": f"case{i}", "png": png, "prompt": prompt,
                      "eager": {"tokens": ref["ids"], "top5": g.top_k_record(ref["logits"])}})
    return cases


def write_golden(references: list[dict], work: Path, manifest: dict, log) -> dict:
    """The golden cases (:func:`golden_references`) with the figures of every decoder of the bundle-to-be on them
    (the runtime, as a device runs it), and each case's criteria from those figures."""
    from .exporters import golden as gw
    from .runtime import golden as g

    cases = [{"id": r["id"], "image": gw.save_image(r["png"], work, r["id"]).name, "prompt": r["prompt"],
              "eager": r["eager"]} for r in references]
    precision = manifest["precision"]
    measured: dict = {}
    for backend, pipe in _staged_pipelines(work, manifest):
        figs = []
        for case in cases:
            got = g.vlm_trace(pipe, work / g.GOLDEN_DIR / case["image"], case["prompt"], case["eager"]["tokens"])
            figs.append(g.vlm_figures(case, got["ids"], got["logits"]))
        measured[backend] = figs
        log(f"      {backend}: " + "; ".join(
            f"{c['id']} prefix {f['prefix_tokens']}/{f['new_tokens']}, top-1 {f['teacher_forced_top1_agreement']:.3f}, "
            f"KL {f['kl_mean']:.2e}" for c, f in zip(cases, figs)))
    for i, case in enumerate(cases):
        case["criteria"] = g.vlm_criteria(precision, [figs[i] for figs in measured.values()],
                                          g.first_near_tie(case["eager"]["top5"]))
        for backend, figs in measured.items():          # the bundle meets its own criteria here, or is not written
            bad = [r for r in g.judge(case["id"], backend, figs[i], case["criteria"]) if not r.passed]
            if bad:
                raise ValidationError(f"golden {case['id']} on {backend}: {bad[0].criterion} fails (measured "
                                      f"{bad[0].measured})", "report the model as an exporter bug")
    return gw.write(work, "vlm", cases, {"precision": precision, "figures": measured})


def _staged_pipelines(work: Path, manifest: dict):
    """(backend, pipeline) for every decoder of the bundle being staged, opened by the runtime as a device opens
    it (its files table made from what is staged); each pipeline is closed once the caller moves on."""
    from .runtime.vlm import VLMPipeline
    from .runtime.vlm_ops import decoder_backends

    for backend in decoder_backends(manifest["parts"]):
        pipe = VLMPipeline(work, {**manifest, "files": file_table(work)}, decoder=backend)
        try:
            yield backend, pipe
        finally:
            pipe.close()


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


def _calibration_pixels(model, cfg: VLMExportConfig, spec) -> tuple[np.ndarray, dict]:
    """The views a pixel part is calibrated on (at most :func:`calibration_view_cap` of them) and the rule's facts
    for the manifest."""
    from .data import calibration as calib

    imgs = calib.calibration_images(cfg.calib, model.calibration_dataset, cfg.calib_size, seed=0)
    views = np.concatenate([model.pixel_values(im).numpy() for im in imgs]).astype(np.float32)
    flops = view_flops(spec)
    cap = calibration_view_cap(flops)
    if len(views) > cap:       # families with crops give several views per image: keep an even spread
        views = views[np.linspace(0, len(views) - 1, cap).round().astype(int)]
    return views, {"view_gflops": round(flops / 1e9, 3), "views_at_most": cap,
                   "rule": f"min({MAX_CALIB_VIEWS}, max({MIN_CALIB_VIEWS}, {CALIB_FLOP_BUDGET / 1e12:g} TFLOP / "
                           "view FLOPs)) views, spread evenly over every image's views"}


# How many views calibrate a VLM's vision tower, each a full pass of it. Moondream2's overlapping crops make 32
# images about 336 views of a 413M tower (0.6 TFLOP each); 64 views spread over all images keep the ranges'
# coverage and took 9:50 on a 2-vCPU AMD EPYC (AVX2). A bigger tower gets the same compute, not the same count:
# TinyGPT-V's 1B EVA tower at 448 px (2.1 TFLOP a view) gets 19 views, not 64 (over half an hour there
# otherwise); never fewer than MIN_CALIB_VIEWS.
MAX_CALIB_VIEWS = 64
MIN_CALIB_VIEWS = 16
CALIB_FLOP_BUDGET = 40e12


def view_flops(spec) -> int:
    """FLOPs of one view through a pixel part, counted on shapes only (FakeTensorMode: no compute, no memory)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        example = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in spec.example)
        with FlopCounterMode(display=False) as counter:
            spec.module(*example)
    return int(counter.get_total_flops()) // max(1, int(spec.example[0].shape[0]))


def calibration_view_cap(flops_per_view: int) -> int:
    """The most views a tower of ``flops_per_view`` is calibrated on (see CALIB_FLOP_BUDGET)."""
    fit = int(CALIB_FLOP_BUDGET // max(1, flops_per_view))
    return max(MIN_CALIB_VIEWS, min(MAX_CALIB_VIEWS, fit))


def _calibration_progress(log):
    def report(done: int, total: int) -> None:
        if done % max(1, total // 8) == 0 or done == total - 1:
            log(f"      calibration view {done + 1}/{total}")
    return report


def _export_image_parts(model, image, p: Precision, cfg: VLMExportConfig, target, scratch: Path, log,
                        release: bool = False) -> list[dict]:
    """Every part the family declares (``model.export_parts``), exported at FP32 and checked against eager; each
    comes back with what its precision step needs once the eager weights are gone: its eager outputs, and for a
    part that reads pixels below FP16, the calibration views. ``release``: the parts' own weights (none the
    language model holds) go once every part is exported, before ONNX Runtime loads the graphs to check them."""
    from .exporters import get_vlm_parts
    from .parts import PartRole

    fx = get_vlm_parts(target.format)             # the target format's part exporter
    pixel_prec = {Precision.FP32: "fp32", Precision.FP16: "fp16"}.get(p, "int8")
    pending = []
    for spec in model.export_parts(image):
        log(f"  {spec.name} ({spec.what or spec.name}): fp32 export")
        facts = fx.export_part(spec, scratch, cfg.opset)
        prec = pixel_prec if spec.role is PartRole.PIXELS else "fp32"
        calib, calib_rule = _calibration_pixels(model, cfg, spec) if prec == "int8" else (None, None)
        pending.append({"spec": replace(spec, module=None), "facts": facts, "precision": prec,
                        "reference": fx.part_reference(spec), "calib": calib, "calib_rule": calib_rule,
                        "calib_source": cfg.calib or "built-in images"})
    if release and pending:
        release_weights(model, log, keep=model.language_model, what="the image parts' eager weights")
    for item in pending:
        spec = item["spec"]
        parity32 = fx.part_parity(spec, scratch / spec.file, "fp32", reference=item["reference"])
        log(f"  {spec.name}: parity fp32: max abs {parity32['max_abs_diff']:.2e} [ok]")
        item["rec"] = {"path": spec.file, "format": "onnx", "precision": "fp32",
                       "details": {"export": item.pop("facts")}, "parity": parity32}
    return pending


def _finish_image_parts(pending: list[dict], p: Precision, target, work: Path, scratch: Path, log) -> dict:
    """Each exported part at its precision by its role: a part that reads pixels goes to FP16, or to INT8 static
    with the target profile's int8 rules, calibrated on ``--calib`` images (default: the family's calibration
    set); parts that read features stay FP32. Quantized parts are checked against the eager outputs kept."""
    from .compress import quantize
    from .compress.onnx_io import move_model
    from .exporters import get_vlm_parts

    fx = get_vlm_parts(target.format)
    parts = {}
    for item in pending:
        spec, rec, prec = item["spec"], item["rec"], item["precision"]
        src = scratch / spec.file
        if prec != "fp32":
            q = scratch / f"{spec.name}.{prec}.onnx"
            if prec == "fp16":
                rec["details"]["quantization"] = quantize.to_fp16(src, q)
            else:
                data = item["calib"]
                log(f"  {spec.name}: calibrating INT8 on {len(data)} views ({item['calib_source']}, "
                    f"{target.name} rules)")
                rec["details"]["quantization"] = quantize.to_int8(src, q, data, batch=1,
                                                                  progress=_calibration_progress(log),
                                                                  **target.int8_options())
                rec["details"]["quantization"]["calibration_views"] = item["calib_rule"]
            for f in (src, src.with_name(src.name + ".data")):
                f.unlink(missing_ok=True)
            move_model(q, src)                       # (with its <file>.data, when over protobuf's 2 GB)
            parity32 = rec["parity"]
            rec.update(precision=prec, parity=fx.part_parity(spec, src, prec, reference=item["reference"]),
                       parity_fp32=parity32)
            log(f"    parity {prec}: max rel {rec['parity']['max_rel_diff']:.2e} [recorded]")
        move_model(src, work / spec.file)
        parts[spec.name] = rec
    return parts


def _export_text_parts(model, cfg: VLMExportConfig, target, work: Path, scratch: Path, log, parts: dict) -> dict:
    """The token embedding (FP32, into the bundle) and the decoder's FP32 graph (into ``scratch``); returns the
    decoder export's facts with its path."""
    from .exporters import get_vlm_parts

    vlm_onnx = get_vlm_parts(target.format)
    lm = model.language_model
    log("  token embedding (fp32)")
    facts = vlm_onnx.export_embed_tokens(lm, work / "embed_tokens.onnx", opset=cfg.opset)
    parts["embed_tokens"] = {"path": "embed_tokens.onnx", "format": "onnx", "precision": "fp32", "details": facts}
    dec_fp32 = scratch / "decoder.fp32.onnx"
    log("  decoder with KV cache (fp32 export)")
    dfacts = vlm_onnx.export_decoder(lm, dec_fp32, opset=cfg.opset, outputs=model.decoder_outputs)
    return {"path": dec_fp32, "facts": dfacts, "heads": getattr(lm.config, "num_attention_heads", None)}


def _finish_decoder(dec: dict, rotary, p: Precision, cfg: VLMExportConfig, target, work: Path, scratch: Path,
                    log, parts: dict, onnx_decoder: bool) -> dict:
    """When an ONNX decoder is wanted: the FP32 graph, the target profile's rewrites (``vlm.rewrites``), then its
    quantization method for ``p`` (``vlm.decoder_int8/int4``). Returns the decoder's sizes for the ``generation``
    block."""
    from .exporters import get_vlm_parts

    vlm_onnx, prof = get_vlm_parts(target.format), target.require_vlm()
    dfacts = dec["facts"]
    if onnx_decoder:
        rec = {"path": "decoder.onnx", "format": "onnx", "precision": p.value, "details": {"export": dfacts}}
        src = dec["path"]
        for rewrite in prof.rewrites:
            key, fn = REWRITES[rewrite]
            src, rec["details"][key] = fn(dec, rotary, src, p, scratch, log)
        if p == Precision.FP32:
            from .compress.onnx_io import move_model

            move_model(src, work / "decoder.onnx")
        else:
            method = {Precision.INT8: prof.decoder_int8.value, Precision.INT4: prof.decoder_int4.value}.get(p)
            log(f"  quantizing the decoder to {p.value}" + (f" ({method})" if method else ""))
            rec["details"]["quantization"] = vlm_onnx.quantize_decoder(src, work / "decoder.onnx", p.value,
                                                                       block_size=cfg.block_size, method=method)
        parts["decoder"] = rec
    return {k: dfacts[k] for k in ("num_layers", "num_kv_heads", "head_dim")}


def _rotary(model):
    """The language model's RoPE tables for the attention rewrite (:func:`edgevlm.compress.attention.rotary_tables`),
    or None; read from buffers, so they are taken while the model is whole."""
    from .compress.attention import rotary_tables

    return rotary_tables(model.language_model, model.max_context)


def release_weights(model, log, keep=None, what: str = "the eager weights") -> int:
    """Drop an eager model's parameters once every part that reads them is exported: each becomes a meta tensor of
    its shape (the model keeps its config, tokenizer, processing and buffers; it can no longer run). ``keep``: a
    submodule whose parameters stay. Returns the bytes freed."""
    import ctypes
    import gc

    import torch

    kept = {id(t) for t in keep.parameters()} if keep is not None else set()
    freed, seen = 0, set()
    for mod in model.modules():
        for name, prm in list(mod._parameters.items()):
            if prm is None or prm.device.type == "meta" or id(prm) in kept:
                continue
            if id(prm) not in seen:
                seen.add(id(prm))
                freed += prm.numel() * prm.element_size()
            mod._parameters[name] = torch.nn.Parameter(prm.detach().to("meta"), requires_grad=False)
    gc.collect()
    try:                                   # hand the freed heap back to the system (glibc keeps it otherwise)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    log(f"      released {what} ({freed / 2**30:.2f} GiB): every part that reads them is exported")
    return freed


def _attention_fusion(dec: dict, rotary, src: Path, p: Precision, scratch: Path, log) -> tuple[Path, dict]:
    """ONNX Runtime's CPU attention op with a KV buffer appended in place (no per-step cache copy) and the model's
    RoPE inside it; fused on the FP32 graph, where the check against the model's own RoPE ops is exact, then
    quantized. FP16 keeps float32 KV I/O around fp16 compute and runs the plain graph."""
    from .compress.attention import fuse_attention

    dfacts, heads = dec["facts"], dec["heads"]
    if p == Precision.FP16 or not heads:
        why = "fp16 decoders keep float32 KV I/O around fp16 compute" if heads else "the config names no head count"
        log(f"  attention: concat ({why})")
        return src, {"kv_cache": "concat", "why": why}
    fused = scratch / "decoder.fused.onnx"
    att = fuse_attention(src, int(heads), dfacts["num_kv_heads"], dfacts["head_dim"], dst=fused,
                         rotary=rotary)
    log(f"  attention: {att['kv_cache']}" + (f" ({att['why']})" if "why" in att else "")
        + (f"; RoPE: {att['rope']}" if "rope" in att else "") + (f" ({att['rope_why']})" if "rope_why" in att else ""))
    return (src if att["kv_cache"] == "concat" else fused), att


# The graph rewrites a target profile may name (``vlm.rewrites``): the details key they record under, and the
# function (decoder export facts, RoPE tables, FP32 graph, precision, scratch, log) -> (graph to go on with, record).
REWRITES = {Rewrite.ATTENTION_FUSION: ("attention", _attention_fusion)}


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
    from .runtime.golden import vlm_trace
    from .runtime.vlm_ops import DECODER_PARTS

    out = {"image": "scenes val 0", "prompt": prompt, "eager_tokens": ref["ids"], "results": []}
    for backend, pipe in _staged_pipelines(work, manifest):
        got = vlm_trace(pipe, image, prompt, ref["ids"])
        prec = manifest["parts"][DECODER_PARTS[backend]]["precision"]
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
