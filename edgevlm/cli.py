"""The `edgevlm` command. It parses, builds a config in one place, and calls the library.

Imports of torch, onnx and friends happen inside the commands, so `edgevlm --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

# runtime.vlm_ops.DECODERS, written out: the parser imports only the standard library (tests hold the two equal)
DECODERS = ("onnxruntime", "llama.cpp", "coreml")


def _cmd_list(args) -> int:
    from .report import table
    from .targets import list_targets
    from .zoo import DEFAULT_MODEL, list_models, list_vlms

    targets = list_targets()
    rows = []
    for r in list_models():
        rows.append({"model": r.name, "family": r.family,
                     "task": r.task, "params (M)": round(r.params / 1e6, 2), "input": r.input_size,
                     "reparam": "yes" if r.reparameterizable else "no",
                     "targets": {t.name: [p.value for p in t.precisions] for t in targets},
                     "shipped weights": sorted(r.weights), "hub tags": [f"{r.name}.{t}" for t in r.hub_tags]})
    vlms = [{"model": r.name + (" *" if r.name == DEFAULT_MODEL else ""), "family": r.family, "task": "vlm",
             "params (M)": round(r.params / 1e6, 1),
             "image": r.image["size"], "hub id": r.hub_id or "-", "revisions": list(r.revisions),
             "kind": "test-size" if r.tiny else "released"} for r in list_vlms()]
    if args.json:
        print(json.dumps(rows + vlms, indent=2))
        return 0
    cols = ["model", "family", "params (M)", "input", "reparam", "shipped weights", "hub tags"]
    shown = [{**row, "shipped weights": ", ".join(row["shipped weights"]) or "-",
              "hub tags": ", ".join(t.split(".", 1)[1] for t in row["hub tags"])} for row in rows]
    print(table(shown, cols, title="vision backbones (params with a 1000-class head)"))
    print("\n" + table([{**v, "revisions": ", ".join(v["revisions"]) or "-"} for v in vlms],
                        ["model", "family", "kind", "params (M)", "image", "hub id", "revisions"],
                        title="vision-language models (* = the default model; `edgevlm info --model NAME` for parts "
                              "and FLOPs)"))
    print("\n" + table([{"target": t.name, "runs on": t.description, "format": t.format,
                         "precisions": " ".join(p.value for p in t.precisions),
                         "default": t.default_precision.value} for t in targets], title="targets"))
    return 0


def _export_config(args):
    """The one place `edgevlm export` arguments become a typed config (:class:`ExportConfig` for a backbone,
    :class:`VLMExportConfig` for a VLM); unset options take the config's defaults and the target profile's."""
    from .config import ExportConfig, QuantConfig, VLMExportConfig
    from .zoo import DEFAULT_MODEL, is_vlm

    model = args.model or DEFAULT_MODEL
    given = {k: v for k, v in (("calib_size", args.calib_size),) if v is not None}
    if is_vlm(model):
        return VLMExportConfig(model=model, weights=args.weights, revision=args.revision, target=args.target,
                               precision=args.quant, decoder=args.decoder, out=args.out, context=args.context,
                               overwrite=args.overwrite, calib=args.calib, block_size=args.block_size,
                               opset=args.opset if args.opset is not None else ExportConfig.opset,
                               device=args.device, **given)
    quant = QuantConfig(precision=args.quant, calib=args.calib, calib_method=args.calib_method or "minmax",
                        block_size=args.block_size, **given)
    return ExportConfig(model=model, target=args.target, quant=quant, weights=args.weights,
                        num_classes=args.num_classes, img_size=args.img_size, out=args.out,
                        opset=args.opset if args.opset is not None else 20, seed=args.seed,
                        validate_accuracy=not args.no_accuracy, overwrite=args.overwrite)


def _print_vlm_export(out, m) -> None:
    from .bundle import listed_size
    from .report import table

    rows = [{"part": k, "file": v["path"], "precision": v["precision"],
             "size (MB)": round(listed_size(m["files"], v["path"]) / 1e6, 2)} for k, v in m["parts"].items()]
    print(table(rows, title=f"{out} ({m['model']['name']}, target {m['target']['name']})"))
    par = [{"decoder": r["backend"], "precision": r["precision"], "same greedy tokens": r["same_greedy_tokens"],
            "first divergence": r["first_divergence"], "top-1 (teacher forced)": r["teacher_forced_top1_agreement"],
            "KL mean": r["kl_mean"]} for r in m["parity"]["results"]]
    print("\n" + table(par, title=f"parity with eager PyTorch over {len(m['parity']['eager_tokens'])} greedy tokens"))
    if "device" in m:
        d, e, pr = m["device"], m["device"]["estimate"], m["device"]["predicted"]
        print(f"\nfits {d['name']}: {e['total_bytes'] / 2**30:.2f} GiB of {d['usable_memory_gib']} GiB usable at context "
              f"{e['context']}; decode <= {pr['decode_tokens_per_s_max']} tok/s, vision encoder >= "
              f"{pr['vision_encoder_ms_min']} ms (predicted bounds, docs/devices.md)")


# export flags that only one model kind reads, with their defaults: given to the other kind they are refused, never
# silently ignored
_BACKBONE_ONLY = {"num_classes": None, "img_size": None, "calib_method": None, "seed": 0, "no_accuracy": False}
_VLM_ONLY = {"revision": None, "decoder": None, "device": None, "context": None}


def _refuse_flags_of_the_other_kind(args, vlm: bool) -> None:
    from .errors import ConfigError

    other = _BACKBONE_ONLY if vlm else _VLM_ONLY
    given = [k for k, default in other.items() if getattr(args, k, default) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        kind = "a vision-language model" if vlm else "a vision backbone"
        raise ConfigError(f"{flags} {'does' if len(given) == 1 else 'do'} not apply to {args.model}, {kind}",
                          f"drop {flags} (see `edgevlm export --help`)")


def _as_zoo(model, weights=None, revision=None) -> tuple:
    """A VLM named as Hugging Face users name it (checkpoint directory, hub id[@revision]) -> (zoo recipe that reads
    it, its weights, revision); a zoo name or anything else comes back as given."""
    from .zoo import resolve_vlm

    ref = resolve_vlm(model, weights, revision) if model else None
    return (ref.name, ref.weights, ref.revision) if ref is not None else (model, weights, revision)


def _cmd_export(args) -> int:
    from .api import export_config
    from .report import table
    from .zoo import DEFAULT_MODEL, is_vlm

    if args.model is None and args.weights and (Path(args.weights) / "config.json").is_file():
        args.model, args.weights = args.weights, None      # `--weights CHECKPOINT_DIR` alone names the model
    args.model, args.weights, args.revision = _as_zoo(args.model or DEFAULT_MODEL, args.weights, args.revision)
    vlm = is_vlm(args.model)
    _refuse_flags_of_the_other_kind(args, vlm)
    out, m = export_config(_export_config(args), quiet=args.quiet)
    if vlm:
        _print_vlm_export(out, m)
        return 0
    art = m["artifacts"][0]
    par = art["parity"]
    size = sum(f["size"] for f in m["files"].values())
    row = {"bundle": str(out), "target": m["target"]["name"], "precision": m["precision"],
           "format": art["format"], "size (MB)": round(size / 1e6, 2)}
    if "max_abs_diff" in par:
        row.update({"max abs diff": par["max_abs_diff"], "top-1 agree": par.get("top1_agreement")})
    acc = m["accuracy"]
    if "bundle" in acc:
        row.update({"acc eager": acc["eager_fp32"], "acc bundle": acc["bundle"]})
    print(table([row]))
    return 0


def _check_generation_args(args) -> None:
    """The prompt and sampling options, checked before a model or bundle is loaded: a NaN temperature or a
    prompt of bytes that are not UTF-8 (argv hands them on as lone surrogates) is a one-line error, at once."""
    from .generation import GenerationConfig, check_prompt

    if args.prompt is not None:
        check_prompt(args.prompt, "--prompt")
    GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     seed=args.seed)


def _cmd_run_vlm(args, vlm) -> int:
    from .errors import ConfigError

    skill = getattr(args, "skill", None)
    if skill in ("detect", "point"):
        return _print_located(args, vlm, skill)
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "stream": True}
    if skill == "caption":
        pieces = vlm.caption(args.image, length=args.prompt or "normal", **sampling)
    elif not args.prompt:
        raise ConfigError(f"{args.bundle} is a vision-language bundle and needs a question",
                          "pass --prompt 'How many circles?'")
    elif skill == "query":
        pieces = vlm.query(args.image, args.prompt, **sampling)
    else:
        pieces = vlm.generate(args.image, args.prompt, **sampling)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    finally:
        print()
    st = vlm.last_stats
    print(f"[{st.new_tokens} tokens, first after {st.time_to_first_token_s * 1000:.0f} ms, "
          f"{st.decode_tokens_per_s:.1f} tok/s, {vlm.backend}, stopped by {st.stopped_by}]", file=sys.stderr)
    return 0


def _print_located(args, vlm, skill: str) -> int:
    """`edgevlm run --skill detect|point`: the boxes or points of --prompt's object, as a table or --json."""
    from .errors import ConfigError
    from .report import table

    if not args.prompt:
        raise ConfigError(f"--skill {skill} needs the object to find", "pass --prompt OBJECT, e.g. --prompt car")
    found = getattr(vlm, skill)(args.image, args.prompt, max_objects=args.max_objects)
    if args.json:
        print(json.dumps(found))
        return 0
    what = "boxes" if skill == "detect" else "points"
    print(table([{"#": i + 1, **{k: round(v, 4) for k, v in f.items()}} for i, f in enumerate(found)]
                or [{"#": "-", "found": "none"}],
                title=f"{args.image}: {len(found)} {what} of {args.prompt!r} ([0, 1] image coordinates, {vlm.backend})"))
    return 0


def _cmd_run(args) -> int:
    from . import runtime
    from .report import table

    _check_generation_args(args)
    clf = runtime.load(args.bundle, backend=args.backend, decoder=args.decoder_backend, gpu_layers=args.gpu_layers)
    if clf.manifest.get("task") == "vlm":
        return _cmd_run_vlm(args, clf)
    if args.skill:
        from .errors import ConfigError

        raise ConfigError(f"{args.bundle} is a classifier and has no {args.skill} skill", "drop --skill")
    if args.image is None:
        from .errors import ConfigError

        raise ConfigError(f"{args.bundle} is a classifier and needs an image", "pass --image IMG")
    preds = clf.classify(args.image, top_k=args.top_k)
    if args.json:
        print(json.dumps([p.__dict__ for p in preds]))
    else:
        print(table([{"rank": i + 1, "label": p.label, "score": round(p.score, 4)} for i, p in enumerate(preds)],
                    title=f"{args.image} — {clf.manifest['model']['name']} {clf.manifest['precision']} "
                          f"on {clf.backend}"))
    return 0


def _cmd_bench(args) -> int:
    from .bundle import read_manifest
    from .runtime.bench import bench_bundle

    if read_manifest(args.bundle).get("task") == "vlm":
        from .runtime.bench import bench_vlm_bundle

        bench_vlm_bundle(args.bundle, runs=min(args.runs, 10), new_tokens=args.new_tokens, json_out=args.json,
                         decoder=args.decoder_backend, threads=args.threads, gpu_layers=args.gpu_layers)
        return 0

    bench_bundle(args.bundle, runs=args.runs, warmup=args.warmup, batch=args.batch, json_out=args.json,
                 backend=args.backend, threads=args.threads)
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate

    model, weights = args.model_or_bundle, args.weights
    if not (Path(model) / "manifest.json").is_file():        # a bundle, else a model as export names it
        model, weights, _ = _as_zoo(model, weights)
    evaluate(model, split=args.split, limit=args.limit, weights=weights, json_out=args.json,
             decoder=args.decoder_backend)
    return 0


def _cmd_generate(args) -> int:
    from .errors import ConfigError
    from .modeling.families import load_vlm

    _check_generation_args(args)
    vlm = load_vlm(args.model, weights=args.weights, revision=args.revision)
    if args.skill:
        if not hasattr(vlm, args.skill):
            raise ConfigError(f"{args.model} has no {args.skill} skill", "drop --skill (a plain prompt works for "
                              "every model); caption, detect and point are Moondream2's")
        if args.skill in ("detect", "point"):
            print(json.dumps(getattr(vlm, args.skill)(args.image, args.prompt)))
            return 0
        pieces = vlm.caption(args.image, length=args.prompt, stream=True)
    else:
        pieces = vlm.generate(args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return 0


def _cmd_info(args) -> int:
    from .modeling.info import describe
    from .report import table, write_json

    from .zoo import checkpoint_config_dir, resolve_vlm

    ref = resolve_vlm(args.model)
    d = describe(ref.name if ref else args.model, text_tokens=args.text_tokens,
                 checkpoint=checkpoint_config_dir(ref) if ref else None)
    print(table([{"part": n, "module": d["parts"][n], "params (M)": round(d["params"][n] / 1e6, 2)}
                 for n in d["parts"]] + [{"part": "total", "module": "", "params (M)": round(d["params_total"] / 1e6, 2)}],
                title=f"{d['model']} ({d['family']})"))
    rows = []
    for p in d["paths"]:
        row = {"path": p["label"], "vision tokens": p["vision_tokens"], "LLM input tokens": p["llm_input_tokens"]}
        row.update({f"{k} GFLOPs": round(v / 1e9, 2) for k, v in p["flops"].items()})
        row["total GFLOPs"] = round(p["flops_total"] / 1e9, 2)
        rows.append(row)
    if len(d["paths"]) == 2:
        a, b = d["paths"]
        rows.append({"path": "compressed / uncompressed", "vision tokens": f"{a['vision_tokens']}/{b['vision_tokens']}",
                     "total GFLOPs": f"{100 * (1 - a['flops_total'] / b['flops_total']):.1f}% fewer"})
    views = f" ({d['views']} views of {d['image_size']}px)" if d["views"] > 1 else f" at {d['image_size']}px"
    print("\n" + table(rows, title=f"prefill cost of one image{views} + {d['text_tokens']} prompt tokens "
                        "(counted with torch FlopCounterMode; multiply-add = 2 FLOPs)"))
    if args.json:
        write_json(args.json, d)
    return 0


def _cmd_plan(args) -> int:
    from .devices import facts_from_recipe, get_device, plan
    from .report import table
    from .zoo import get_vlm_recipe

    get_vlm_recipe(args.model)                  # an unknown or non-VLM name fails here, before torch loads
    device = get_device(args.device)
    facts = facts_from_recipe(args.model)
    rows = plan(facts, device, runtime=args.runtime)
    if args.json:
        print(json.dumps({"model": facts.name, "device": device.to_dict(), "runtime": args.runtime,
                          "rows": [r["estimate"] for r in rows]}, indent=2))
        return 0
    cols = ["precision", "vision tokens", "path", "context", "fits", "memory (GiB)", "decode tok/s <=", "vision ms >="]
    if len(facts.paths) == 1:
        cols.remove("path")
    print(table(rows, cols, title=f"{facts.name} on {device.name} ({device.usable_memory_gib} GiB usable, "
                                  f"{device.memory_bandwidth_gbs:g} GB/s, {device.gpu_fp16_tflops:g} FP16 TFLOPS; "
                                  f"{args.runtime})"))
    print("memory: weights + KV cache at the context + activations + runtime overhead (an estimate); decode tok/s: "
          "an upper bound (bandwidth / bytes per token); vision ms: a lower bound (FLOPs / peak). docs/devices.md")
    return 0


def _cmd_train(args) -> int:
    from .zoo import is_vlm

    if is_vlm(args.model):
        from .train.scenes_vlm import train_scenes_vlm
        from .zoo import get_vlm_recipe

        # The recipe's `training:` block is how the shipped weights were made; --epochs overrides it.
        kw = dict(get_vlm_recipe(args.model).training)
        if args.epochs:
            kw["epochs"] = args.epochs
        train_scenes_vlm(args.model, args.out, seed=args.seed, **kw)
        return 0
    from .train.classifier import train_digits

    out = args.out or Path("models/weights") / f"{args.model}.digits.safetensors"
    train_digits(args.model, out, epochs=args.epochs or 30, seed=args.seed)
    return 0


def _demo_app():
    """The demo module: ``edgevlm._demo.app`` (apps/gradio, shipped in the wheel), or the checkout's
    apps/gradio/app.py when the installed package predates it (an older editable install)."""
    from .errors import BackendUnavailableError, ConfigError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise BackendUnavailableError("the demo needs gradio, which is not installed",
                                      "pip install 'edgevlm[demo]'") from None
    try:
        from ._demo import app
        return app
    except ModuleNotFoundError as e:
        if e.name not in ("edgevlm._demo", "edgevlm._demo.app"):
            raise
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "apps" / "gradio" / "app.py"
    if not path.is_file():
        raise ConfigError("this installation of edgevlm has no demo app", "reinstall it: pip install 'edgevlm[demo]'")
    spec = importlib.util.spec_from_file_location("edgevlm_demo_app", path)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def _cmd_demo(args) -> int:
    from .bundle import read_manifest

    for b in args.bundles:          # a bad path fails here, before gradio is imported
        read_manifest(b)
    app = _demo_app()
    app.launch(args.bundles or None, port=args.port, decoder=args.decoder_backend, max_upload_mb=args.max_upload_mb,
               concurrency=args.concurrency, queue_size=args.queue_size, open_browser=args.open)
    return 0


def _train_config(args, default_epochs: int):
    """The one place CLI arguments become a TrainConfig (shared by distill and finetune)."""
    from .train.loop import TrainConfig

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return TrainConfig(out=args.out, epochs=args.epochs or default_epochs, max_steps=args.steps,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
                       seed=args.seed, save_every=args.save_every, resume=args.resume, overwrite=args.overwrite,
                       quiet=args.quiet)


def _finish(args, summary: dict) -> int:
    from .report import write_json
    from .train.loop import is_main_process

    if is_main_process():                # under `accelerate launch` every process runs the command
        write_json(Path(args.out) / "summary.json", summary)
    return 0


def _cmd_distill(args) -> int:
    from .compress.distill import KDConfig
    from .errors import ConfigError
    from .zoo import is_vlm

    args.teacher, args.teacher_weights, _ = _as_zoo(args.teacher, args.teacher_weights)

    if args.attach_compressor:
        from .train.distill import AttachConfig, attach_and_distill

        if not args.teacher:
            raise ConfigError("--attach-compressor needs the model to attach to", "pass --teacher NAME (and --teacher-weights)")
        cfg = AttachConfig(model=args.teacher, train=_train_config(args, 1), weights=args.teacher_weights,
                           n_tokens=args.attach_compressor, prefusion_layers=args.prefusion_layers, data=args.data or "scenes",
                           limit=args.limit, val_limit=args.val_limit, questions_per_image=args.questions_per_image,
                           alpha=1.0 if args.alpha is None else args.alpha, temperature=args.temperature or 1.0)
        return _finish(args, attach_and_distill(cfg))
    if not args.student:
        raise ConfigError("distill needs a student", "pass --student NAME (see `edgevlm list`)")
    if is_vlm(args.student) or (args.teacher and is_vlm(args.teacher)):
        from .train.distill import VLMDistillConfig, distill_vlm

        if not args.teacher:
            raise ConfigError("VLM distillation needs a teacher", "pass --teacher NAME --teacher-weights FILE")
        cfg = VLMDistillConfig(teacher=args.teacher, train=_train_config(args, 1), teacher_weights=args.teacher_weights,
                               student=args.student, vision_tokens=args.vision_tokens, text_layers=args.text_layers,
                               init_from_teacher=args.init_from_teacher, data=args.data or "scenes", limit=args.limit,
                               val_limit=args.val_limit, questions_per_image=args.questions_per_image,
                               alpha=0.5 if args.alpha is None else args.alpha, temperature=args.temperature or 1.0)
        return _finish(args, distill_vlm(cfg))
    from .train.distill import BackboneDistillConfig, distill_backbone

    kd = KDConfig(args.kd, alpha=0.5 if args.alpha is None else args.alpha, temperature=args.temperature or 2.0)
    cfg = BackboneDistillConfig(student=args.student, train=_train_config(args, 10), teacher=args.teacher,
                                teacher_weights=args.teacher_weights, student_weights=args.student_weights,
                                data=args.data or "digits", kd=kd, store=args.store, top_k=args.top_k,
                                store_dtype=args.store_dtype, augment=not args.no_augment, img_size=args.img_size)
    return _finish(args, distill_backbone(cfg))


def _cmd_finetune(args) -> int:
    from .compress.lora import LoraSpec
    from .train.finetune import FinetuneConfig, finetune

    lora = LoraSpec(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=tuple(args.lora_targets or ()),
                    quantize="nf4" if args.qlora else None)
    args.model, args.weights, _ = _as_zoo(args.model, args.weights)
    cfg = FinetuneConfig(model=args.model, mode=args.mode, train=_train_config(args, 1), weights=args.weights,
                         data=args.data, limit=args.limit, val_limit=args.val_limit,
                         questions_per_image=args.questions_per_image, lora=lora)
    return _finish(args, finetune(cfg))


def _add_training_args(s) -> None:
    g = s.add_argument_group("training (the same under `accelerate launch -m edgevlm ...` on many GPUs/machines)")
    g.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, weights, summary.json")
    g.add_argument("--epochs", type=int, help="default: 10 for backbones, 1 for VLMs")
    g.add_argument("--steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=64, help="global batch (over processes and accumulation; "
                   "VLMs: images)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step in each process")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=0, help="warmup steps")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: each epoch end)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--overwrite", action="store_true", help="discard --out's checkpoints and start over")
    g.add_argument("--limit", type=int, help="VLMs: training images (scenes: the first N)")
    g.add_argument("--val-limit", type=int, default=50, help="VLMs: validation scenes scored per epoch")
    g.add_argument("--questions-per-image", type=int, default=4)
    g.add_argument("--threads", type=int, help="torch intra-op threads")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_sampling_args(s) -> None:
    """The decoding flags `edgevlm run` (bundles) and `edgevlm generate` (eager) share."""
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int)


def _alts(values) -> str:
    """A flag's choices for --help, from the enum or profiles that define them. The values themselves are checked
    by the typed configs (one-line errors with the fix), not by argparse."""
    return "|".join(str(v) for v in values)


def _add_list(sub) -> None:
    """`edgevlm list`: the model zoo and targets."""
    s = sub.add_parser("list", help="show the model zoo and targets")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_cmd_list)


def _add_export(sub) -> None:
    """`edgevlm export`: a model to a validated bundle for a target device."""
    from .config import CalibMethod, DecoderChoice, ExportConfig, Precision, QuantConfig, VLMExportConfig
    from .devices import list_devices
    from .targets import list_targets

    s = sub.add_parser("export", help="export a model to a validated bundle for a target device")
    s.add_argument("--model", help="zoo name (default: the shipped default model; see `edgevlm list`), or a VLM "
                   "checkpoint: a Hugging Face directory or hub id[@revision]")
    s.add_argument("--target", default="cpu", metavar=_alts(t.name for t in list_targets()),
                   help="the device profile, export/TARGET.yaml (default cpu)")
    s.add_argument("--quant", metavar=_alts(Precision), help="default: the target profile's")
    s.add_argument("--weights", help="PATH (safetensors/.pth), HUB_ID (e.g. fastvit_t8.apple_in1k), a shipped "
                   "tag (digits), or random (default: the model's shipped weights)")
    s.add_argument("--num-classes", type=int, help="backbones: head size (read from the checkpoint when omitted)")
    s.add_argument("--img-size", type=int, help="backbones: input side in pixels, a multiple of 32 (default: the "
                   "weights')")
    s.add_argument("--calib", help="INT8 calibration images: a folder, builtin:digits or builtin:photos")
    s.add_argument("--calib-method", metavar=_alts(CalibMethod), help="backbones (default minmax)")
    s.add_argument("--calib-size", type=int, help=f"calibration images (default {QuantConfig.calib_size}; VLMs: "
                   f"{VLMExportConfig.calib_size}, at most 64 views spread over them)")
    s.add_argument("--block-size", type=int, default=32, help="INT4 block size (default 32)")
    s.add_argument("--opset", type=int, help=f"ONNX opset, at least 17 (default {ExportConfig.opset})")
    s.add_argument("--revision", help="VLM checkpoint revision (e.g. 2025-01-09 for moondream2)")
    s.add_argument("--decoder", metavar=_alts(DecoderChoice),
                   help="VLMs: the language model as ONNX (ONNX Runtime/TensorRT), GGUF (llama.cpp) or both, as the "
                        "target's profile allows (default: the profile's, "
                        + ", ".join(f"{t.name} {t.vlm.default_decoder.value}" for t in list_targets() if t.vlm) + ")")
    s.add_argument("--device", metavar=_alts(d.name for d in list_devices()),
                   help="VLMs, --target jetson: the Jetson module the bundle must fit (export/devices/DEVICE.yaml); "
                        "checked before the weights load, recorded with the predicted speed (`edgevlm plan`)")
    s.add_argument("--context", type=int, metavar="N",
                   help="VLMs: positions the bundle's KV cache holds, prompt + image + answer (default: the model's "
                        "maximum); a shorter one takes less memory on the device (`edgevlm plan`)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, help="bundle directory (default bundles/MODEL-TARGET-PRECISION)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    s.add_argument("--no-accuracy", action="store_true", help="skip the test-split accuracy measurement")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=_cmd_export)


def _add_run(sub) -> None:
    """`edgevlm run`: classify an image or answer a question with a bundle."""
    s = sub.add_parser("run", help="classify an image, or answer a question about it (VLM bundles; streams)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--image", type=Path, help="image file (required for classifiers; optional for VLMs)")
    s.add_argument("--prompt", help="VLM bundles: the question; with --skill detect/point the object, with --skill "
                   "caption the length (short, normal, long; default normal)")
    s.add_argument("--skill", choices=["caption", "query", "detect", "point"], help="Moondream2 bundles' skills "
                   "(detect/point print a table of boxes/points in [0, 1] image coordinates, JSON with --json; they "
                   "need the ONNX decoder)")
    s.add_argument("--max-objects", type=int, default=50, help="--skill detect/point: at most this many (default 50)")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--backend", help="onnxruntime | coreml (default: by the bundle's format)")
    s.add_argument("--decoder-backend", choices=list(DECODERS),
                   help="VLM bundles carrying both decoders: which runs (default: the ONNX one)")
    _add_gpu_layers(s)
    _add_sampling_args(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_run)


def _add_gpu_layers(s) -> None:
    s.add_argument("--gpu-layers", type=int, metavar="N",
                   help="llama.cpp decoders: layers on the GPU, -1 all, 0 none (default: all where llama-cpp-python "
                        "was built with CUDA, as on a Jetson; else none; or $EDGEVLM_GPU_LAYERS)")


def _add_verify(sub) -> None:
    """`edgevlm verify`: the bundle's golden cases on this machine."""
    s = sub.add_parser("verify", help="check on this machine that a bundle still answers like eager PyTorch did "
                       "at export (its golden cases and criteria; no torch needed)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--decoder-backend", action="append", choices=list(DECODERS),
                   help="VLM bundles: the decoder(s) to check (repeat for several; default: every one it carries)")
    s.add_argument("--providers", help="ONNX Runtime execution providers to try, comma-separated (e.g. "
                   "TensorrtExecutionProvider,CUDAExecutionProvider; default: the target profile's)")
    s.add_argument("--backend", help="classifier bundles: onnxruntime | coreml (default: by the bundle's format)")
    s.add_argument("--threads", type=int)
    _add_gpu_layers(s)
    s.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    s.set_defaults(func=_cmd_verify)


def _add_bench(sub) -> None:
    """`edgevlm bench`: latency, throughput and peak memory of a bundle."""
    s = sub.add_parser("bench", help="latency, throughput and peak memory of a bundle")
    s.add_argument("bundle", type=Path)
    s.add_argument("--runs", type=int, default=50)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--batch", type=int, default=8, help="batch size for the throughput run")
    s.add_argument("--threads", type=int, help="intra-op threads (default: the backend's)")
    s.add_argument("--backend")
    s.add_argument("--decoder-backend", choices=list(DECODERS), help="VLM bundles: which decoder")
    s.add_argument("--new-tokens", type=int, default=64, help="VLM bundles: tokens decoded per run (default 64)")
    _add_gpu_layers(s)
    s.add_argument("--json", type=Path, help="write results here (default benchmarks/results/bench-NAME.json)")
    s.set_defaults(func=_cmd_bench)


def _add_eval(sub) -> None:
    """`edgevlm eval`: accuracy of a bundle or an eager zoo model."""
    s = sub.add_parser("eval", help="accuracy of a bundle or an eager zoo model: digits for backbones, the scenes "
                       "task for edgevlm_scenes")
    s.add_argument("model_or_bundle", help="a bundle directory, a zoo name, or a checkpoint: a Hugging Face directory or hub id[@revision]")
    s.add_argument("--weights", help="for an eager zoo model: its weights (default: shipped)")
    s.add_argument("--split", default="test", choices=["train", "val", "test", "drawn"],
                   help="the generator's splits, or drawn: scenes a person would draw (edgevlm/data/drawn.py)")
    s.add_argument("--limit", type=int)
    s.add_argument("--decoder-backend", choices=list(DECODERS), help="VLM bundles: which decoder")
    s.add_argument("--json", type=Path)
    s.set_defaults(func=_cmd_eval)


def _add_generate(sub) -> None:
    """`edgevlm generate`: answer a prompt with an eager VLM."""
    s = sub.add_parser("generate", help="answer a prompt about an image with an eager VLM (PyTorch)")
    s.add_argument("--model", required=True, help="zoo VLM name (see `edgevlm list`), or a checkpoint: a Hugging "
                   "Face directory or hub id[@revision]")
    s.add_argument("--weights", help="checkpoint directory or file in the family's released layout, a hub id, "
                   "or random (default: the model's hub id)")
    s.add_argument("--revision", help="checkpoint revision (e.g. 2025-01-09 for moondream2, stage4 for tinygpt_v)")
    s.add_argument("--image", type=Path, help="image file (omit for a text-only prompt)")
    s.add_argument("--prompt", required=True, help="the question; with --skill detect/point the object, "
                   "with --skill caption the length (short, normal, long)")
    s.add_argument("--skill", choices=["caption", "detect", "point"], help="Moondream2's structured skills "
                   "(detect/point print JSON boxes/points in [0, 1] image coordinates)")
    _add_sampling_args(s)
    s.set_defaults(func=_cmd_generate)


def _add_kernels(sub) -> None:
    """`edgevlm kernels`: build or show edgevlm's CPU kernels."""
    s = sub.add_parser("kernels", help="build edgevlm's CPU kernels on this machine (4-bit decode steps and prompts), or show "
                                       "their state")
    s.add_argument("action", choices=["build", "status"])
    s.add_argument("--force", action="store_true", help="build again even if built")
    s.set_defaults(func=_cmd_kernels)


def _add_build_engines(sub) -> None:
    """`edgevlm build-engines BUNDLE`: TensorRT engines on the device, from the bundle's engine plan."""
    s = sub.add_parser("build-engines", help="build a jetson bundle's TensorRT engines on this device (the tensorrt "
                       "Python API; build_engines.sh does the same with trtexec)")
    s.add_argument("bundle")
    s.add_argument("--part", action="append", help="only this part (repeatable; default: every planned graph)")
    s.set_defaults(func=_cmd_build_engines)


def _add_doctor(sub) -> None:
    """`edgevlm doctor`: what this machine can run (and a bundle, given one), and what to do about what is missing."""
    s = sub.add_parser("doctor", help="what this machine can run and why: CPU features, memory, ONNX Runtime, "
                       "llama.cpp, TensorRT, Core ML, edgevlm's kernels; with a bundle, whether it runs and fits here",
                       description="One line per fact (ok / missing / off / warn) with the fix for what is missing. "
                       "Exit 0; 1 when BUNDLE cannot run here (no backend for a part, or too little memory); 2 when "
                       "BUNDLE is no readable bundle.")
    s.add_argument("bundle", nargs="?", type=Path, help="a bundle directory to check against this machine")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    s.set_defaults(func=_cmd_doctor)


def _add_info(sub) -> None:
    """`edgevlm info`: parts, parameters, vision tokens and prefill FLOPs of a VLM."""
    s = sub.add_parser("info", help="parts, parameters, vision tokens and prefill FLOPs of a VLM")
    s.add_argument("--model", required=True, help="zoo VLM name (see `edgevlm list`), or a checkpoint: a Hugging Face directory or hub id[@revision]")
    s.add_argument("--text-tokens", type=int, default=64, help="prompt length for the FLOP count (default 64)")
    s.add_argument("--json", type=Path, help="also write the figures as JSON here")
    s.set_defaults(func=_cmd_info)


def _add_plan(sub) -> None:
    """`edgevlm plan`: what fits a Jetson module, and how fast it can be at best."""
    from .devices import RUNTIMES, list_devices

    s = sub.add_parser("plan", help="precisions x vision tokens x context of a VLM on a Jetson module: fit, memory, "
                       "predicted decode tok/s and vision-encoder ms (no weights loaded)")
    s.add_argument("--model", required=True, help="zoo VLM name (see `edgevlm list`)")
    s.add_argument("--device", required=True, metavar=_alts(d.name for d in list_devices()),
                   help="the Jetson module (export/devices/DEVICE.yaml)")
    s.add_argument("--runtime", default="tensorrt", choices=[r for r in RUNTIMES if r != "onnxruntime-cpu"],
                   help="what runs the decoder on the device (default tensorrt)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_cmd_plan)


def _add_demo(sub) -> None:
    """`edgevlm demo`: bundles in a local Gradio app."""
    s = sub.add_parser("demo", help="try bundles in a local web app (Gradio on 127.0.0.1): chat with a VLM bundle, "
                       "classify with a backbone, compare bundles; each answer shows its cost",
                       description="Serve bundles in a local Gradio app, run by edgevlm.runtime (what the device "
                       "runs). It listens on 127.0.0.1 only and is never shared; uploads are size-limited, must be "
                       "images, and decompression bombs are refused.")
    s.add_argument("bundles", nargs="*", type=Path, metavar="BUNDLE",
                   help="bundle directories (default: the default model's cpu INT8 bundle, exported on first use "
                   "into $EDGEVLM_CACHE or ~/.cache/edgevlm)")
    s.add_argument("--port", type=int, help="port on 127.0.0.1 (default: the first free one from 7860)")
    s.add_argument("--decoder-backend", choices=list(DECODERS),
                   help="VLM bundles carrying both decoders: which one answers first (switchable in the app)")
    s.add_argument("--max-upload-mb", type=float, default=10, help="largest image upload in MiB (default 10)")
    s.add_argument("--concurrency", type=int, default=1, help="model calls running at once (default 1)")
    s.add_argument("--queue-size", type=int, default=16, help="requests waiting at most; more are refused (default 16)")
    s.add_argument("--open", action="store_true", help="open the app in a browser")
    s.set_defaults(func=_cmd_demo)


def _add_train(sub) -> None:
    """`edgevlm train`: reproduce shipped weights."""
    s = sub.add_parser("train", help="reproduce shipped weights: a backbone on scikit-learn's digits, or "
                       "edgevlm_scenes on the scenes task (the settings of its recipe's `training:` block)")
    s.add_argument("--model", default="fastvit_t8")
    s.add_argument("--epochs", type=int, help="default: 30 for digits backbones; a VLM's recipe sets its own")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path)
    s.set_defaults(func=_cmd_train)


def _add_distill(sub) -> None:
    """`edgevlm distill`: train a small model from a large one, or attach a token compressor."""
    s = sub.add_parser("distill", help="train a small model from a large one: backbones (soft/hard KD, DeiT token, "
                       "stored sparse teacher logits), VLMs (answer-token KD), or attach a token compressor")
    s.add_argument("--teacher", help="zoo name of the teacher (VLMs: also the model --attach-compressor works on; "
                   "or a checkpoint: a Hugging Face directory or hub id[@revision])")
    s.add_argument("--teacher-weights", help="default: the teacher's shipped weights")
    s.add_argument("--student", help="zoo name of the student (a backbone or a VLM)")
    s.add_argument("--student-weights", default="random", help="backbones: initial weights (default random)")
    s.add_argument("--data", help="digits | scenes | DIR (class subfolders, or qa.jsonl for VLMs)")
    s.add_argument("--kd", default="soft", help="backbones: none | soft | hard | deit (default soft)")
    s.add_argument("--alpha", type=float, help="weight of the KD term (default 0.5; 1.0 with --attach-compressor)")
    s.add_argument("--temperature", type=float, help="KD temperature (default 2 for backbones, 1 for VLMs)")
    s.add_argument("--store", type=Path, help="backbones: sparse teacher-logit store (written once if absent, "
                   "then replayed without the teacher)")
    s.add_argument("--top-k", type=int, default=10, help="logits kept per sample in the store (default 10)")
    s.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    s.add_argument("--no-augment", action="store_true", help="backbones: no seeded affine augmentation")
    s.add_argument("--img-size", type=int, help="image folders: input side in pixels (default 64)")
    s.add_argument("--vision-tokens", type=int, help="VLM student: this many vision tokens")
    s.add_argument("--text-layers", type=int, help="VLM student: this many language-model layers")
    s.add_argument("--init-from-teacher", action="store_true", help="VLM student: copy the teacher's tensors that fit")
    s.add_argument("--attach-compressor", type=int, metavar="N", help="attach an N-token compressor to --teacher "
                   "and train only it (and pre-fusion layers) from the uncompressed model")
    s.add_argument("--prefusion-layers", type=int, default=4, help="with --attach-compressor on LLaVA models (default 4)")
    _add_training_args(s)
    s.set_defaults(func=_cmd_distill)


def _add_finetune(sub) -> None:
    """`edgevlm finetune`: fine-tune one part of a VLM."""
    s = sub.add_parser("finetune", help="fine-tune one part of a VLM: vision | decoder | connector | lora")
    s.add_argument("--model", required=True, help="zoo VLM name, or a checkpoint: a Hugging Face directory or hub id[@revision]")
    s.add_argument("--weights", help="its weights (default: shipped or hub)")
    s.add_argument("--mode", required=True, choices=["vision", "decoder", "connector", "lora"])
    s.add_argument("--data", default="scenes", help="scenes | DIR with qa.jsonl")
    s.add_argument("--lora-r", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=16.0)
    s.add_argument("--lora-dropout", type=float, default=0.0)
    s.add_argument("--lora-targets", nargs="+", help="module names (default: the attention and MLP projections)")
    s.add_argument("--qlora", action="store_true", help="LoRA over a 4-bit NF4 base (bitsandbytes)")
    _add_training_args(s)
    s.set_defaults(func=_cmd_finetune)


def build_parser() -> argparse.ArgumentParser:
    """The `edgevlm` parser: one subcommand per `_add_*` function, in the order `--help` lists them."""
    p = argparse.ArgumentParser(prog="edgevlm", description="Take small vision and vision-language models onto "
                                "edge devices: export, quantize, validate, run.")
    p.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_list(sub)
    _add_export(sub)
    _add_run(sub)
    _add_verify(sub)
    _add_bench(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_kernels(sub)
    _add_build_engines(sub)
    _add_doctor(sub)
    _add_info(sub)
    _add_plan(sub)
    _add_demo(sub)
    _add_train(sub)
    _add_distill(sub)
    _add_finetune(sub)
    return p


def _cmd_verify(args) -> int:
    from .runtime.golden import format_reports, verify_bundle

    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    reports = verify_bundle(args.bundle, args.decoder_backend, providers, args.threads, args.backend,
                            gpu_layers=args.gpu_layers)
    ok = all(r.passed for r in reports)
    if args.json:
        print(json.dumps({"bundle": str(args.bundle), "passed": ok, "reports": [r.to_dict() for r in reports]},
                         indent=2))
    else:
        print(format_reports(reports))
    return 0 if ok else 1


def _cmd_kernels(args) -> int:
    from . import kernels

    if args.action == "build":
        kernels.build(force=args.force)
    path, why = kernels.status()
    print(f"MatMulQ4 (4-bit decode steps and prompts) and DecodeAttention (their decode steps' attention): "
          f"{f'ready ({kernels.isa()}), {path}' if path else 'not used: ' + why}")
    return 0


def _cmd_build_engines(args) -> int:
    from .runtime.tensorrt import build_engines

    built = build_engines(args.bundle, args.part)
    print(f"built {len(built)} engine(s); check them with: edgevlm verify {args.bundle}")
    return 0


def _cmd_doctor(args) -> int:
    from .runtime.doctor import format_report, report

    rep = report(args.bundle)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return rep["exit_code"]


def main(argv: list[str] | None = None) -> int:
    from .errors import EdgeVLMError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args)
    except EdgeVLMError as e:
        print(f"edgevlm: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgevlm: interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``edgevlm`` command: once restarted with weights in huge pages where that helps (runtime.memory), then main."""
    from .runtime.memory import reexec_with_huge_pages

    reexec_with_huge_pages(sys.argv[1:])
    sys.exit(main())


if __name__ == "__main__":
    entry()
