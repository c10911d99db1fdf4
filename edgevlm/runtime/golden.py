"""Golden cases: what eager PyTorch answered on a few inputs, kept inside the bundle (``golden/``), and the check
that any machine running the bundle makes against them (``edgevlm verify``, ``runtime.load(b).verify()``).

The exporter writes the cases with :func:`top_k_record` and derives each case's criteria with
:func:`vlm_criteria` / :func:`classifier_criteria` from what the bundle-to-be measured on the export machine,
through the same figure functions a device then runs (:func:`vlm_figures`, :func:`classifier_figures`): the
figures are computed by one implementation wherever they are computed. Torch-free, numpy only.

Format (docs/golden.md): ``golden/golden.json`` plus one PNG per case; the image is the file the runtime reads.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import resolve
from ..errors import BundleError, ConfigError
from ..manifest import GOLDEN_FILE_SCHEMA, check_block

GOLDEN_DIR = "golden"
GOLDEN_JSON = f"{GOLDEN_DIR}/golden.json"
VERSION = 1
TOP_K = 5
NEW_TOKENS = 32                      # greedy tokens per VLM case
MAX_GOLDEN_BYTES = 200 * 1024        # or 1% of the bundle, whichever is larger

# Margins for a run on another backend than the export machine's (TensorRT's kernels, Core ML's, a GPU's
# reductions, llama.cpp against ONNX Runtime): quantized criteria are the export's measured figure widened by these.
TOP1_MARGIN = 0.10                   # teacher-forced top-1 agreement may drop by 0.10 (3 of 32 steps)
PREFIX_FRACTION = 0.5                # greedy tokens must agree with eager's for at least half the measured prefix ...
TIE_GAP = 0.25                       # ... and up to eager's first near-tie (top-2 logits within 0.25 nats), no further:
                                     # another backend's rounding may flip a near-tie, and from there greedy text forks
KL_FACTOR, KL_SLACK = 2.0, 0.02      # mean KL (nats) may grow to 2x the measured + 0.02 ...
KL_SLACK_INT4 = 0.05                 # ... + 0.05 at INT4: backends quantize 4-bit weights differently (llama.cpp's
                                     # Q4_K_M super-blocks, ONNX block-32), so the weights differ, not only the kernels
FP32_LOGIT_RTOL = 1e-3               # fp32 classifiers: |logit - eager| <= 1e-3 * (1 + max |eager logit|) ...
FP32_LOGIT_FACTOR = 10.0             # ... or 10x what the export machine measured, whichever is larger
MARGINS = {"teacher_forced_top1_agreement": f"measured - {TOP1_MARGIN}",
           "prefix_tokens": f"{PREFIX_FRACTION} x measured (rounded down), and no more than the steps before eager's "
                            f"first near-tie (top-2 logits within {TIE_GAP} nats)",
           "kl_mean": f"{KL_FACTOR} x measured + {KL_SLACK} nats ({KL_SLACK_INT4} at int4)",
           "fp32": "the same greedy tokens (VLM) / the same top-1 (classifier) as eager"}


# -- what eager answered -----------------------------------------------------------------------------------
def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def top_k_record(logits: np.ndarray, k: int = TOP_K) -> dict:
    """Per row of ``logits`` (n, V): the top-k ids, their logits and the row's logsumexp (which gives their exact
    probabilities without storing the whole row)."""
    x = np.atleast_2d(np.asarray(logits, np.float64))
    ids = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    m = x.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return {"ids": ids.tolist(), "logits": np.take_along_axis(x, ids, -1).round(6).tolist(),
            "logsumexp": lse.round(6).tolist()}


def coarse_kl(ref: dict, logits: np.ndarray) -> np.ndarray:
    """KL(eager || device) per row over eager's top-k tokens and one bin for all the others: a lower bound of the
    full KL (grouping never increases it), computable from the k logits the golden file keeps."""
    ids = np.asarray(ref["ids"], np.int64)
    _check_ids(ids, np.atleast_2d(logits).shape[-1])
    p = np.exp(np.asarray(ref["logits"], np.float64) - np.asarray(ref["logsumexp"], np.float64)[:, None])
    q = np.exp(np.take_along_axis(log_softmax(np.atleast_2d(logits)), ids, -1))
    p_rest, q_rest = np.clip(1 - p.sum(-1), 0, 1), np.clip(1 - q.sum(-1), 0, 1)
    eps = 1e-12

    def term(a, b):
        return np.where(a > eps, a * (np.log(np.maximum(a, eps)) - np.log(np.maximum(b, eps))), 0.0)

    return np.maximum(term(p, q).sum(-1) + term(p_rest, q_rest), 0.0)


# -- figures (the same code at export and on the device) ---------------------------------------------------
def vlm_figures(case: dict, ids: list[int], forced_logits: np.ndarray) -> dict:
    """A device's greedy ``ids`` and its logits teacher-forced on eager's tokens, against the case."""
    ref_ids = [int(t) for t in case["eager"]["tokens"]]
    top = case["eager"]["top5"]
    n = len(ref_ids)
    forced = np.atleast_2d(np.asarray(forced_logits, np.float64))[:n]
    if forced.shape[0] != n:
        raise ConfigError(f"the device gave {forced.shape[0]} teacher-forced steps for {n} golden tokens",
                          "report this as a bug")
    first = next((i for i, (a, b) in enumerate(zip(ref_ids, ids)) if a != b), None)
    prefix = first if first is not None else min(len(ids), n)
    eager_top1 = np.asarray(top["ids"], np.int64)[:, 0]
    return {"same_greedy_tokens": bool(first is None and len(ids) >= n), "prefix_tokens": int(prefix),
            "teacher_forced_top1_agreement": float((forced.argmax(-1) == eager_top1).mean()),
            "kl_mean": float(coarse_kl(top, forced).mean()), "new_tokens": n}


def classifier_figures(case: dict, logits: np.ndarray) -> dict:
    top = case["eager"]["top5"]
    x = np.asarray(logits, np.float64).reshape(1, -1)
    ids = np.asarray(top["ids"], np.int64)
    _check_ids(ids, x.shape[-1])
    diff = np.abs(np.take_along_axis(x, ids, -1) - np.asarray(top["logits"], np.float64)).max()
    return {"same_top1": bool(int(x.argmax()) == int(ids[0, 0])),
            "top1_in_eager_top5": bool(int(x.argmax()) in ids[0].tolist()),
            "logit_max_abs_diff": float(diff), "kl": float(coarse_kl(top, x)[0])}


# -- criteria from what the export machine measured ----------------------------------------------------------
def first_near_tie(top: dict) -> int | None:
    """The first step at which eager's two best logits lie within TIE_GAP nats (``top``: a case's eager top-k)."""
    for i, row in enumerate(top["logits"]):
        if len(row) > 1 and row[0] - row[1] < TIE_GAP:
            return i
    return None


def vlm_criteria(precision: str, measured: list[dict], near_tie: int | None = None) -> dict:
    """One case's criteria from its figures on every decoder the bundle carries (the loosest of them); ``near_tie``
    (first_near_tie of the case) caps the prefix bound, since a backend not measured here may fork there."""
    if precision == "fp32":
        return {"same_greedy_tokens": True, "teacher_forced_top1_agreement_min": 1.0}
    if not measured:
        return {"teacher_forced_top1_agreement_min": 0.5, "kl_mean_max": 0.5, "basis": "defaults (not measured)"}
    top1 = min(m["teacher_forced_top1_agreement"] for m in measured)
    prefix = min(m["prefix_tokens"] for m in measured)
    kl = max(m["kl_mean"] for m in measured)
    prefix_min = int(math.floor(PREFIX_FRACTION * prefix))
    if near_tie is not None:
        prefix_min = min(prefix_min, int(near_tie))
    slack = KL_SLACK_INT4 if precision == "int4" else KL_SLACK
    return {"teacher_forced_top1_agreement_min": round(max(0.0, top1 - TOP1_MARGIN), 4),
            "prefix_tokens_min": prefix_min, "kl_mean_max": round(KL_FACTOR * kl + slack, 6)}


def classifier_criteria(precision: str, measured: dict | None, eager_logits: list[float]) -> dict:
    scale = 1.0 + max(abs(v) for v in eager_logits)
    if precision == "fp32":
        bound = max(FP32_LOGIT_RTOL * scale, FP32_LOGIT_FACTOR * (measured or {}).get("logit_max_abs_diff", 0.0))
        return {"same_top1": True, "logit_max_abs_diff_max": round(bound, 6)}
    if measured is None:
        return {"same_top1": True, "kl_max": 0.05, "basis": "defaults (not measured)"}
    out = {"same_top1": True} if measured["same_top1"] else {"top1_in_eager_top5": True}
    out["kl_max"] = round(KL_FACTOR * measured["kl"] + KL_SLACK, 6)
    return out


VLM_CRITERIA = ("same_greedy_tokens", "teacher_forced_top1_agreement_min", "prefix_tokens_min", "kl_mean_max")


def _check_ids(ids: np.ndarray, width: int) -> None:
    if ids.size and int(ids.max()) >= width:
        raise BundleError(f"a golden case names id {int(ids.max())} but the model gives {width} logits",
                          "export the bundle again")


# -- judging ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    case: str
    backend: str
    criterion: str
    measured: object
    bound: object
    passed: bool

    def to_dict(self) -> dict:
        return {"case": self.case, "backend": self.backend, "criterion": self.criterion,
                "measured": self.measured, "bound": self.bound, "passed": self.passed}


_BOUNDS = {"_min": (">=", lambda got, b: got >= b), "_max": ("<=", lambda got, b: got <= b)}


def judge(case_id: str, backend: str, figures: dict, criteria: dict) -> list[Row]:
    """One row per criterion: ``X_min`` / ``X_max`` bound figure X, any other name must equal its figure."""
    rows = []
    for key, bound in criteria.items():
        if key == "basis":
            continue
        sign, ok = _BOUNDS.get(key[-4:], ("==", lambda got, b: got == b))
        name = key[:-4] if key[-4:] in _BOUNDS else key
        got = figures[name]
        rows.append(Row(case_id, backend, f"{name} {sign} {bound}", _show(got), bound, bool(ok(got, bound))))
    return rows


def _show(v):
    return round(v, 6) if isinstance(v, float) else v


@dataclass
class Report:
    bundle: str
    backend: str
    golden: bool
    rows: list[Row] = field(default_factory=list)
    note: str = ""
    placement: str = ""         # where the decoder ran: ONNX Runtime's providers, llama.cpp's GPU layers

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "backend": self.backend, "golden": self.golden, "passed": self.passed,
                "note": self.note, "placement": self.placement, "rows": [r.to_dict() for r in self.rows]}


def format_reports(reports: list[Report]) -> str:
    lines = []
    head = ("case", "backend", "criterion", "measured", "result")
    rows = [(r.case, r.backend, r.criterion, str(r.measured), "pass" if r.passed else "FAIL")
            for rep in reports for r in rep.rows]
    if rows:
        w = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
        lines.append("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
        lines.append("  ".join("-" * n for n in w))
        lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(x)) for x in rows]
    for rep in reports:
        if rep.note:
            lines.append(f"{rep.backend}: {rep.note}")
        lines.append(f"{rep.bundle} on {rep.backend}" + (f" ({rep.placement})" if rep.placement else "")
                     + f": {'PASS' if rep.passed else 'FAIL'}"
                     + ("" if rep.golden else " (no golden cases: see the note)"))
    return "\n".join(lines)


# -- reading and running ------------------------------------------------------------------------------------
def read_golden(path: Path, manifest: dict) -> dict | None:
    """The bundle's golden cases (checked against the schema), or None for a bundle exported without them."""
    rec = manifest.get("golden")
    if not isinstance(rec, dict):
        return None
    file = resolve(path, manifest, rec.get("path", GOLDEN_JSON), "golden cases")
    where = str(file)
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{where} is not readable JSON ({str(e)[:120]})", "export the bundle again") from None
    check_block(GOLDEN_FILE_SCHEMA, data, where)
    if data["kind"] != manifest.get("task"):
        raise BundleError(f"{where} holds {data['kind']} cases but the bundle is a {manifest.get('task')} bundle",
                          "export the bundle again")
    for i, case in enumerate(data["cases"]):
        why = _case_problem(case, data["kind"])
        if why:
            raise BundleError(f"{where}: cases[{i}] {why}", "export the bundle again")
    return data


def _case_problem(case: dict, kind: str) -> str | None:
    """What the schema cannot say: the top-k rows agree in shape with each other and with the tokens, and each
    criterion has the type its name implies."""
    top = case["eager"]["top5"]
    rows = len(top["ids"])
    if len(top["logits"]) != rows or len(top["logsumexp"]) != rows:
        return "eager.top5 has ids, logits and logsumexp of different lengths"
    k = len(top["ids"][0])
    if any(len(r) != k for r in top["ids"]) or any(len(r) != k for r in top["logits"]):
        return "eager.top5 rows differ in length"
    if kind == "vlm" and ("tokens" not in case["eager"] or len(case["eager"]["tokens"]) != rows
                          or not isinstance(case.get("prompt"), str)):
        return "needs a prompt and one top-k row per eager token"
    if kind == "classification" and rows != 1:
        return "of a classifier needs one top-k row"
    for key, v in case["criteria"].items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if (key.endswith(("_min", "_max")) and not number) or (key == "basis" and not isinstance(v, str)) \
                or (not key.endswith(("_min", "_max")) and key != "basis" and not isinstance(v, bool)):
            return f"criterion {key} has a value of the wrong type ({str(v)[:40]})"
    if (kind == "vlm") != any(k in case["criteria"] for k in VLM_CRITERIA):
        return "has criteria of the other model kind"
    return None


def _no_golden(model, backend: str) -> Report:
    made = model.manifest.get("edgevlm_version", "an older edgevlm")
    return Report(str(model.path), backend, False, note=(
        f"no golden cases (exported by edgevlm {made}, before bundles carried them): verified by what it has, "
        "the checksums of every file; export it again for a device check"))


def placement(model) -> str:
    """Where a loaded model's decoder (VLMs) or session (classifiers) runs, in words."""
    dec = getattr(model, "decoder", None)
    if dec is not None and getattr(dec, "gpu_layers_why", None):
        got = getattr(dec, "offloaded", None)
        return dec.gpu_layers_why + (f"; llama.cpp offloaded {got[0]}/{got[1]} layers" if got else "")
    providers = getattr(dec if dec is not None else getattr(model, "session", None), "providers", None)
    return f"providers: {', '.join(providers)}" if providers else ""


def verify(model) -> Report:
    """Run the bundle's golden cases through a loaded runtime model (:class:`~edgevlm.runtime.vlm.VLMPipeline`
    or :class:`~edgevlm.runtime.pipeline.Classifier`) and judge them by the stored criteria."""
    backend = model.backend
    golden = read_golden(model.path, model.manifest)
    if golden is None:
        return _no_golden(model, backend)
    rep = Report(str(model.path), backend, True, placement=placement(model))
    for case in golden["cases"]:
        image = resolve(model.path, model.manifest, f"{GOLDEN_DIR}/{case['image']}", f"golden case {case['id']}")
        if golden["kind"] == "vlm":
            got = vlm_trace(model, image, case["prompt"], case["eager"]["tokens"])
            fig = vlm_figures(case, got["ids"], got["logits"])
        else:
            fig = classifier_figures(case, model.logits(model.preprocess(image))[0])
        rep.rows += judge(case["id"], backend, fig, case["criteria"])
    return rep


def vlm_trace(pipe, image, prompt: str, ref_ids: list[int]) -> dict:
    """A VLM runtime's own greedy tokens (no early stop, as many as ``ref_ids``), its logits teacher-forced on
    ``ref_ids`` (row i: the logits after the prompt and ``ref_ids[:i]``) and the prompt's length in positions."""
    from ..generation import GenerationConfig, GenerationStats

    embeds, _, _, prefix = pipe.prepare(image, prompt)
    cfg = GenerationConfig(max_new_tokens=len(ref_ids), stop_ids=())
    ids = list(pipe.decode_tokens(embeds, cfg, GenerationStats(), prefix))
    pipe.decoder.reset()
    logits = [pipe.decoder.prefill(embeds[0], prefix)]
    for t in ref_ids[:-1]:
        logits.append(pipe.decoder.step(int(t)))
    pipe.decoder.reset()
    return {"ids": ids, "logits": np.stack(logits), "prompt_len": int(embeds.shape[1])}


def verify_bundle(bundle, decoders: list[str] | None = None, providers: list[str] | None = None,
                  threads: int | None = None, backend: str | None = None,
                  gpu_layers: int | None = None) -> list[Report]:
    """Load ``bundle`` (checksums verified) once per decoder backend (VLMs: ``decoders``, default every decoder
    the bundle carries) and run its golden cases on each; one :class:`Report` per backend."""
    from . import load
    from ..bundle import read_manifest

    manifest = read_manifest(Path(bundle))
    if manifest.get("task") != "vlm":
        model = load(bundle, backend=backend, threads=threads, providers=providers)
        return [verify(model)]
    from .vlm_ops import decoder_backends

    reports = []
    for name in decoders or decoder_backends(manifest.get("parts") or {}):
        model = load(bundle, threads=threads, decoder=name, providers=providers, gpu_layers=gpu_layers)
        try:
            reports.append(verify(model))
        finally:
            model.close()
    return reports
