"""A vision backbone (classifier) as a job of the one export pipeline (:mod:`edgevlm.pipeline`).

load weights -> parity and calibration images -> reparameterize (checked) -> export and quantize for the
target (each artifact validated against eager) -> task accuracy -> the classifier's manifest blocks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import file_table
from .config import ExportConfig, Precision
from .data import calibration as calib
from .errors import ValidationError
from .pipeline import ExportJob, run
from .targets import get_target
from .zoo import PreprocessSpec, get_recipe

PARITY_IMAGES = 8


def default_out(cfg: ExportConfig, precision: Precision) -> Path:
    return Path("bundles") / f"{cfg.model}-{cfg.target}-{precision.value}"


def _check_calibration_early(cfg: ExportConfig) -> None:
    """Fail on a bad calibration folder before any model is built."""
    src = cfg.quant.calib
    if src and not src.startswith("builtin:"):
        calib.folder_files(Path(src).expanduser())


def _logits_torch(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)])


def _check_toolchain(target) -> None:
    """Fail before any work when the target's converter is not installed."""
    import importlib.util

    from .errors import BackendUnavailableError

    needs = {"coreml": ("coremltools", "coreml"), "onnx": ("onnx", "onnx"), "ort": ("onnxruntime", "onnx")}
    module, extra = needs.get(target.format, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise BackendUnavailableError(f"exporting for {target.name} needs {module}, which is not installed",
                                      f"pip install 'edgevlm[{extra}]'")


def _staged_session(work: Path, art: dict):
    """The artifact being staged, opened by the runtime on the CPU (its files table made from what is staged)."""
    from .runtime.backends import open_session

    return open_session(work, {"target": {"name": "export", "providers": ["CPUExecutionProvider"]},
                               "files": file_table(work)}, art)


def accuracy_report(backbone, artifact, workdir: Path, pre: PreprocessSpec, eager_model) -> dict:
    """Top-1 of eager FP32 and of the artifact (as the runtime runs it) on the held-out test split."""
    if backbone.dataset != "digits":
        return {"status": "not measured", "reason": "these weights carry no labelled evaluation set "
                "(train on digits or evaluate with your own data via `edgevlm eval`)"}
    from .data import digits

    x, y = digits.arrays("test", pre)
    eager = _logits_torch(eager_model, x)
    rec = {"dataset": "digits (scikit-learn, real handwritten)", "split": "test", "images": int(len(y)),
           "metric": "top-1", "eager_fp32": float((eager.argmax(1) == y).mean())}
    art = artifact.to_dict()
    if art["format"] == "coreml":
        if artifact.stand_in is None:
            return {**rec, "status": "not measured on Linux: Core ML predictions need macOS"}
        got = _logits_torch(artifact.stand_in, x)
        rec.update(status="measured", runtime="eager PyTorch with the Core ML package's own weights "
                   "(Core ML predictions need macOS)")
    else:
        sess = _staged_session(workdir, art)
        step = sess.fixed_batch or 64
        got = np.concatenate([sess.run(x[i:i + step]) for i in range(0, len(x), step)])
        rec.update(status="measured", runtime="onnxruntime CPUExecutionProvider")
    b_acc = float((got.argmax(1) == y).mean())
    rec.update(bundle=b_acc, delta_points=round(100 * (b_acc - rec["eager_fp32"]), 2),
               top1_agreement_with_eager=float((got.argmax(1) == eager.argmax(1)).mean()))
    return rec


def export_bundle(cfg: ExportConfig, quiet: bool = False) -> tuple[Path, dict]:
    """Build, validate and write one classifier bundle through the one pipeline; returns (path, manifest)."""
    return run(classifier_job(cfg), quiet=quiet)


def classifier_job(cfg: ExportConfig) -> ExportJob:
    """A vision backbone as an :class:`~edgevlm.pipeline.ExportJob`: one part, the classifier graph, in the
    target's format."""
    from .compress.reparam import reparameterize_checked
    from .exporters import get_exporter
    from .exporters.base import ExportContext
    from .modeling.vision import count_params, load_backbone

    recipe = get_recipe(cfg.model)
    target = get_target(cfg.target)
    precision = cfg.quant.precision or target.default_precision
    target.check_precision(precision)
    cfg.quant.precision = precision
    _check_calibration_early(cfg)
    _check_toolchain(target)
    st: dict = {}

    def load(stages) -> None:
        log = stages.log
        with stages(f"load {recipe.name} weights ({cfg.weights or recipe.default_weights or 'none'})"):
            bb = load_backbone(recipe.name, cfg.weights, cfg.num_classes, seed=cfg.seed)
            pre = bb.preprocess
            if cfg.img_size and cfg.img_size != pre.input_size:
                pre = PreprocessSpec(cfg.img_size, pre.interpolation, pre.crop_pct, pre.mean, pre.std)
            log(f"      {count_params(bb.model) / 1e6:.2f}M params, {bb.num_classes} classes, "
                f"{pre.input_size} px, weights: {bb.weights['kind']}")

        with stages("prepare parity and calibration images"):
            parity_src = "builtin:digits" if bb.dataset == "digits" else "builtin:photos"
            example = calib.as_batch(calib.calibration_images(parity_src, bb.dataset, PARITY_IMAGES, seed=1,
                                                              split="val"), pre)
            calib_src = cfg.quant.calib or calib.default_source(bb.dataset)
            cache: dict = {}

            def calibration() -> np.ndarray:
                if "x" not in cache:
                    cache["x"] = calib.as_batch(
                        calib.calibration_images(calib_src, bb.dataset, cfg.quant.calib_size, seed=cfg.seed), pre)
                return cache["x"]

            if precision == Precision.INT8:
                log(f"      {len(calibration())} calibration images from {calib_src}")

        with stages("reparameterize" if recipe.reparameterizable else "reparameterize (nothing to fold)"):
            if recipe.reparameterizable:
                model, reparam = reparameterize_checked(bb.model, example)
                log(f"      folded {reparam['blocks_folded']} blocks, params {reparam['params_before']:,} -> "
                    f"{reparam['params_after']:,}, max rel diff {reparam['max_rel_diff']:.1e}")
            else:
                model, reparam = bb.model, {"applied": False,
                                            "reason": f"{recipe.family} has no reparameterizable blocks"}
        st.update(bb=bb, pre=pre, example=example, calibration=calibration, calib_src=calib_src, model=model,
                  reparam=reparam)

    def build(work: Path, scratch: Path, stages) -> dict:
        bb, pre, model, log = st["bb"], st["pre"], st["model"], stages.log
        with stages(f"export {target.format} for {target.name} at {precision.value}"):
            ctx = ExportContext(model=model, target=target, quant=cfg.quant, workdir=work, example=st["example"],
                                calibration=st["calibration"], opset=cfg.opset, log=log)
            artifacts = get_exporter(target.format)(ctx)
        with stages("measure task accuracy"):
            if cfg.validate_accuracy:
                acc = accuracy_report(bb, artifacts[0], work, pre, model)
            else:
                acc = {"status": "not measured", "reason": "--no-accuracy"}
            if "bundle" in acc:
                log(f"      top-1 on {acc['images']} test digits: eager FP32 {acc['eager_fp32']:.4f}, "
                    f"bundle {acc['bundle']:.4f} ({acc['delta_points']:+.2f} points)")
            else:
                log(f"      {acc['status']}: {acc.get('reason', '')}")
        blocks = {
            "model": {"name": recipe.name, "family": recipe.family, "params": count_params(model),
                      "params_before_reparameterization": count_params(bb.model),
                      "num_classes": bb.num_classes, "input_size": pre.input_size},
            "weights": bb.weights,
            "target": target.to_dict(),
            "precision": precision.value,
            "reparameterization": st["reparam"],
            "preprocessing": pre.to_dict(),
            "labels": bb.labels,
            "artifacts": [a.to_dict() for a in artifacts],
            "accuracy": acc,
            "device_files": ["model.plan", "trt_cache/"] if target.tensorrt else [],
        }
        if precision == Precision.INT8:
            blocks["calibration"] = {"source": st["calib_src"], "images": int(len(st["calibration"]())),
                                     "method": cfg.quant.calib_method.value}
        return blocks

    def golden(work: Path, blocks: dict, stages) -> dict:
        return write_golden(st["model"], st["bb"].dataset, st["pre"], work, blocks, stages.log)

    out = Path(cfg.out) if cfg.out else default_out(cfg, precision)
    packages = ("torch", "timm", "onnx", "onnxruntime", "onnxscript") + FORMAT_PACKAGES.get(target.format, ())
    return ExportJob("classification", out, cfg.overwrite, 5, load, build, packages, golden)


GOLDEN_CASES = 4
GOLDEN_SIDE = 128           # golden images are stored at most this large (the runtime resizes them anyway)


def write_golden(model, dataset: str | None, pre: PreprocessSpec, work: Path, blocks: dict, log) -> dict:
    """Eager's top-5 on a few held-out images stored as PNG, the artifact's figures on them as the runtime runs it
    here (ONNX Runtime; a Core ML package off Apple OSes: edgevlm's reference ML-program interpreter), and each
    case's criteria."""
    from .data.images import preprocess
    from .exporters import golden as gw
    from .runtime import golden as g

    src = "builtin:digits" if dataset == "digits" else "builtin:photos"
    paths = []
    for i, img in enumerate(calib.calibration_images(src, dataset, GOLDEN_CASES, seed=7, split="val")):
        img = img.copy()
        img.thumbnail((GOLDEN_SIDE, GOLDEN_SIDE))
        paths.append(gw.save_image(img, work, f"case{i}"))
    x = np.stack([preprocess(p, pre) for p in paths])                  # as the runtime reads the files
    eager = _logits_torch(model, x)
    art = blocks["artifacts"][0]
    got, runner = None, None
    if art["format"] in ("onnx", "ort", "coreml"):
        sess = _staged_session(work, art)
        got = np.concatenate([sess.run(x[i:i + 1]) for i in range(len(x))])
        runner = sess.name.split(" ")[0]      # onnxruntime, coreml (macOS) or coreml-reference (the interpreter)
    cases, figs = [], []
    for i, path in enumerate(paths):
        case = {"id": f"case{i}", "image": path.name, "eager": {"top5": g.top_k_record(eager[i])}}
        fig = g.classifier_figures(case, got[i]) if got is not None else None
        case["criteria"] = g.classifier_criteria(blocks["precision"], fig, case["eager"]["top5"]["logits"][0])
        if fig is not None and not all(r.passed for r in g.judge(case["id"], "export", fig, case["criteria"])):
            raise ValidationError(f"golden {case['id']}: the {art['precision']} artifact fails its own criteria "
                                  f"({fig})", "report the model as an exporter bug")
        cases.append(case)
        figs.append(fig)
    if got is not None:
        log(f"      {len(cases)} cases: top-1 same as eager {sum(f['same_top1'] for f in figs)}/{len(figs)}, "
            f"max |logit diff| {max(f['logit_max_abs_diff'] for f in figs):.2e}")
    else:
        log(f"      {len(cases)} cases; criteria from edgevlm's defaults ({art['format']} does not run here)")
    measured = {"precision": blocks["precision"],
                "figures": {runner: figs} if got is not None else {},
                "note": None if got is not None else f"{art['format']} does not run on the export machine"}
    return gw.write(work, "classification", cases, measured)


# Converters whose versions a bundle of a format records besides the common ones.
FORMAT_PACKAGES = {"coreml": ("coremltools",)}
