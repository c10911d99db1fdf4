"""Checking an artifact against eager PyTorch: names, shapes, then numbers.

FP32 and FP16 artifacts must match eager within tolerance or the export fails. Quantized
artifacts are judged by task metrics (top-1 agreement here, accuracy in the export report);
their tensor differences are recorded, not gated.
"""
from __future__ import annotations

import numpy as np

from ..errors import ValidationError

# Field tolerances: FP32 absolute for outputs of scale <= 1, relative to the scale above (float32 keeps
# ~7 digits: embeddings of scale 100 differ by ~1e-5 relative after a different summation order);
# FP16 relative to the output's scale (max |eager|).
FP32_ATOL = 1e-4
FP16_RTOL = 1e-2


def compare(reference: np.ndarray, candidate: np.ndarray, precision: str, name: str = "logits") -> dict:
    """Per-output parity record; raises ValidationError for shape or FP32/FP16 tolerance failures."""
    if reference.shape != candidate.shape:
        raise ValidationError(f"output {name!r} has shape {candidate.shape}, eager gives {reference.shape}",
                              "report this model as an exporter bug")
    if not np.isfinite(candidate).all():
        raise ValidationError(f"output {name!r} holds NaN or Inf at {precision}",
                              "use a higher precision (fp32) for this model")
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    scale = float(np.abs(reference).max()) or 1.0
    rec = {
        "output": name, "shape": list(reference.shape), "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()), "output_scale": scale, "max_rel_diff": float(diff.max() / scale),
    }
    if reference.ndim == 2 and reference.shape[1] > 1:
        rec["top1_agreement"] = float((reference.argmax(1) == candidate.argmax(1)).mean())
    if precision == "fp32":
        tol = FP32_ATOL * max(1.0, scale)
        rec.update(criterion=f"max_abs_diff <= {tol:.3g}", tolerance="1e-4 x max(1, output scale)",
                   passed=rec["max_abs_diff"] <= tol)
    elif precision == "fp16":
        rec.update(criterion=f"max_rel_diff <= {FP16_RTOL}", passed=rec["max_rel_diff"] <= FP16_RTOL)
    else:
        rec.update(criterion="task metrics (top-1 agreement, accuracy)", passed=None)
    if rec["passed"] is False:
        raise ValidationError(
            f"{precision} artifact differs from eager PyTorch on {name!r}: {rec['criterion'].split(' <=')[0]} "
            f"= {rec[rec['criterion'].split(' ')[0]]:.3g}, over {rec['criterion'].split('<= ')[1]}",
            "export at fp32, or report the model and target as an exporter bug",
        )
    return rec


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logit_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How a decoder's (steps, V) logits follow eager's under the same context at every step (teacher forced): the
    one implementation behind every decoder parity record (exporters.vlm_onnx.decoder_parity, the bundle's
    end-to-end parity in build_vlm). KL(eager || candidate) per step; ``kl_uniform_baseline`` is KL(eager ||
    uniform), what a decoder that knows nothing scores."""
    e, o = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if e.shape != o.shape:
        raise ValidationError(f"decoder logits have shape {o.shape}, eager's {e.shape}", "report the model")
    agree = e.argmax(-1) == o.argmax(-1)
    le, lo = log_softmax(e), log_softmax(o)
    pe = np.exp(le)
    kl = (pe * (le - lo)).sum(-1)
    kl_uniform = (pe * (le + np.log(e.shape[-1]))).sum(-1)
    return {"top1_agreement": float(agree.mean()),
            "first_argmax_divergence": next((i for i, a in enumerate(agree) if not a), None),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "kl_uniform_baseline": float(kl_uniform.mean()),
            "logits_max_abs_diff": float(np.abs(e - o).max())}


def ort_session(path, providers=("CPUExecutionProvider",)):
    """The one exporter-side ONNX Runtime session (quiet, this process's usable CPUs): every parity check opens
    its graph here."""
    import onnxruntime as ort

    from ..runtime.backends import usable_cpus

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = usable_cpus()
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def run_onnx(path, x: np.ndarray, providers=("CPUExecutionProvider",)) -> np.ndarray:
    sess = ort_session(path, providers)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def validate_onnx(ctx, path, precision: str, reference: np.ndarray | None = None) -> dict:
    """Run ``path`` in ONNX Runtime on the context's example images and compare with eager."""
    ref = ctx.eager(ctx.example) if reference is None else reference
    rec = compare(ref, run_onnx(path, ctx.example), precision)
    rec["runtime"] = "onnxruntime CPUExecutionProvider"
    rec["inputs"] = int(ctx.example.shape[0])
    ok = {True: "ok", False: "FAIL", None: "recorded"}[rec["passed"]]
    ctx.log(f"    parity {precision}: max abs {rec['max_abs_diff']:.2e}, rel {rec['max_rel_diff']:.2e}, "
            f"top-1 agreement {rec.get('top1_agreement', float('nan')):.3f} [{ok}]")
    return rec
