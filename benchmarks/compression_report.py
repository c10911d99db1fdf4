"""What each compression step costs the default VLM, in one table and one plot.

The scenes model (edgevlm_scenes) as eager FP32, then as bundles at FP32 / INT8 / INT4 on every decoder
backend installed here (ONNX Runtime; llama.cpp when llama-cpp-python is present), and any other
compressed-token variants passed with --variant: accuracy on the scenes task (exact match over the QA
kinds, and per kind; detect IoU, point hits, caption F1), bundle size, time to first token and decode
speed, each bundle run by the torch-free runtime.

    python benchmarks/compression_report.py --split test --limit 200
    python benchmarks/compression_report.py --split drawn --limit 200    # scenes drawn by independent code
    python benchmarks/compression_report.py --targets ios --precisions fp16 int8 int4   # Core ML bundles, run by
        # edgevlm's reference ML-program interpreter (numpy: slow, ~7 s a scene on 2 cores; no speed columns)
    python benchmarks/compression_report.py --variant edgevlm_scenes=models/weights/edgevlm_scenes.safetensors \
        --variant edgevlm_scenes=runs/s16/student.safetensors      # a student from `edgevlm distill --vision-tokens 16`

Targets (from the project's issue): INT8 within 1 point of FP32, INT4 within 3 points.
Writes benchmarks/results/compression_report.{json,png} (compression_report-ios.{json,png} with --targets ios;
a split other than test adds its name: compression_report-drawn.{json,png}).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "int8", "int4")
# target -> the decoder backends its bundles are scored on ((export decoder, runtime backend), ...); cpu adds
# llama.cpp where it is installed
TARGET_BACKENDS = {"cpu": [("onnx", "onnxruntime")], "ios": [("coreml", "coreml")]}




def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def have_llama() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except ImportError:
        return False


def summary(res: dict) -> dict:
    k = res["kinds"]
    out = {"qa_exact_match": round(100 * res["qa_exact_match"], 2)}
    for kind in ("color", "shape", "count", "exists", "position"):
        if kind in k:
            out[kind] = round(100 * k[kind]["value"], 1)
    for kind, name in (("detect", "detect_iou"), ("point", "point_hits"), ("caption", "caption_f1")):
        if kind in k:
            out[name] = round(100 * k[kind]["value"], 1)
    return out


def variant_label(recipe: str, weights: str | None) -> str:
    """The row label: the recipe's name, plus ``-Ntok`` for a distilled student whose weights carry fewer
    vision tokens (``edgevlm distill --vision-tokens N`` stores it; the student loads under the base name)."""
    if not weights:
        return recipe
    from edgevlm.modeling.checkpoint import read_metadata

    n = ((read_metadata(Path(weights)) or {}).get("config_overrides") or {}).get("vision_tokens")
    return f"{recipe}-{n}tok" if n else recipe


def weights_fingerprint(recipe: str, weights: str | None) -> str:
    """sha256 of the weights a variant exports (its file, or the recipe's shipped file; "none" for a recipe without
    shipped weights): a cached bundle is reused only when it was exported from the same bytes."""
    import hashlib

    from edgevlm.zoo import get_vlm_recipe

    if weights:
        path = Path(weights)
    else:
        r = get_vlm_recipe(recipe)
        path = r.shipped_weights(r.default_weights) if r.default_weights else None
    if path is None or not path.is_file():
        return "none"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=WEIGHTS: a scenes recipe and its weights (default: edgevlm_scenes with its shipped "
                         "weights); repeat for other compressed-token counts")
    ap.add_argument("--split", default="test", choices=["val", "test", "drawn"],
                    help="the generator's val/test, or drawn: scenes drawn by independent code (edgevlm/data/drawn.py)")
    ap.add_argument("--limit", type=int, default=200, help="scenes (every question of each)")
    ap.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    ap.add_argument("--no-eager", action="store_true",
                    help="skip eager PyTorch (its greedy generation is the slow part: ~20 s a scene on 2 cores); rows "
                         "then give no delta")
    ap.add_argument("--targets", nargs="*", default=["cpu"], choices=list(TARGET_BACKENDS),
                    help="bundle targets (default cpu; ios: Core ML packages through the reference interpreter)")
    ap.add_argument("--bench-runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "bundles" / "compression_report")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from edgevlm import runtime
    from edgevlm.bundle import listed_size
    from edgevlm.build_vlm import VLMExportConfig, export_vlm_bundle
    from edgevlm.evaluate import evaluate_vlm, evaluate_vlm_bundle
    from edgevlm.report import table, write_json
    from edgevlm.runtime.bench import bench_vlm_bundle
    from edgevlm.runtime.vlm_ops import DECODER_PARTS

    variants = [v.split("=", 1) for v in args.variant] or [["edgevlm_scenes", None]]
    labels = [variant_label(name, weights) for name, weights in variants]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"variants {labels} repeat: pass each compressed-token count once")
    if "cpu" in args.targets and not have_llama():
        log("llama-cpp-python is not installed: llama.cpp rows skipped (pip install 'edgevlm[gguf]')")
    rows = []
    for (recipe, weights), name in zip(variants, labels):
        tokens, base = None, None
        fingerprint = weights_fingerprint(recipe, weights)
        if not args.no_eager:
            log(f"{name}: eager FP32 on {args.limit} {args.split} scenes")
            res = evaluate_vlm(recipe, args.split, args.limit, weights, json_out=args.out / f"eval-{name}-eager.json",
                               quiet=True)
            rows.append({"variant": name, "engine": "eager PyTorch", "precision": "fp32", **summary(res)})
            base = rows[-1]["qa_exact_match"]
        for target, prec in ((t, p) for t in args.targets for p in args.precisions):
            backends = TARGET_BACKENDS[target] + ([("gguf", "llama.cpp")] if target == "cpu" and have_llama() else [])
            decoder = "both" if len(backends) > 1 else backends[0][0]
            out = args.cache / f"{name}-{target}-{prec}-{decoder}"
            stamp = out.with_name(out.name + ".weights-sha256")     # beside the bundle, not in it
            if not ((out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == fingerprint):
                log(f"{name}: exporting the {target} {prec} bundle ({decoder} decoder)")
                export_vlm_bundle(VLMExportConfig(model=recipe, weights=weights, target=target, precision=prec,
                                                  decoder=decoder, out=str(out), overwrite=True), quiet=True)
                stamp.write_text(fingerprint)
            for _, backend in backends:
                vlm = runtime.load(out, decoder=backend)
                m = vlm.manifest
                tokens = m["model"]["vision_tokens"]
                parts = m["parts"]
                other = [DECODER_PARTS[b] for b in DECODER_PARTS if b != backend]
                size_mb = sum(listed_size(m["files"], parts[k]["path"]) for k in parts if k not in other) / 1e6
                engine = backend if target == "cpu" else f"{vlm.backend} ({target})"
                log(f"{name}: {target} {prec} on {vlm.backend}: accuracy")
                r = evaluate_vlm_bundle(vlm, args.split, args.limit, json_out=args.out /
                                        f"eval-{name}-{target}-{prec}-{backend.replace('.', '')}.json", quiet=True)
                vlm.close()
                s = summary(r)
                row = {"variant": name, "engine": engine, "precision": prec, **s,
                       "delta_points": None if base is None else round(s["qa_exact_match"] - base, 2),
                       "vision_tokens": tokens,
                       "size_mb": round(size_mb, 2)}
                if backend != "coreml":       # the reference interpreter's speed says nothing of Core ML's
                    log(f"{name}: {prec} on {backend}: speed")
                    b = bench_vlm_bundle(out, runs=args.bench_runs, new_tokens=32, decoder=backend, quiet=True,
                                         json_out=args.out / f"bench-{name}-{prec}-{backend.replace('.', '')}.json")
                    row.update(ttft_ms=round(b["ttft_ms_median"], 1), decode_tok_s=round(b["decode_tok_s_median"], 1))
                rows.append(row)
        if base is not None:
            rows[[r["variant"] for r in rows].index(name)]["vision_tokens"] = tokens

    cols = ["variant", "engine", "precision", "vision_tokens", "qa_exact_match", "delta_points", "color", "shape",
            "count", "exists", "position", "detect_iou", "point_hits", "caption_f1", "size_mb", "ttft_ms",
            "decode_tok_s"]
    print(table(rows, cols, title=f"compression report: scenes {args.split} split, {args.limit} scenes, every question "
                                  "(scores in %; delta = points against eager FP32)"))
    checks = []
    for r in rows:
        if r["precision"] in ("int8", "int4") and r.get("delta_points") is not None:
            limit = 1.0 if r["precision"] == "int8" else 3.0
            ok = r["delta_points"] >= -limit
            checks.append({"variant": r["variant"], "engine": r["engine"], "precision": r["precision"],
                           "target": f"within {limit:g} point(s) of FP32", "delta_points": r["delta_points"],
                           "met": ok})
            print(f"  target {r['variant']} {r['engine']} {r['precision']}: within {limit:g} of FP32 -> "
                  f"{r['delta_points']:+.2f} points {'met' if ok else 'NOT met'}")
    data = {"split": args.split, "scenes": args.limit, "rows": rows, "targets": checks}
    stem = ("compression_report" + ("" if args.targets == ["cpu"] else "-" + "-".join(args.targets))
            + ("" if args.split == "test" else f"-{args.split}"))
    path = write_json(args.out / f"{stem}.json", {**data, "targets_exported": args.targets})
    log(f"wrote {path}")
    plot(rows, args.out / f"{stem}.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    marks = {"onnxruntime": "o", "llama.cpp": "s"}
    for r in rows:
        if "size_mb" not in r:
            continue
        label = f"{r['variant'].replace('edgevlm_scenes', 'scenes')} {r['precision']} {r['engine']}"
        for ax, x in zip(axes, (r.get("ttft_ms"), r["size_mb"])):
            if x is None:                 # no speed for bundles the reference interpreter runs
                continue
            ax.scatter(x, r["qa_exact_match"], marker=marks.get(r["engine"], "o"), s=50)
            ax.annotate(label, (x, r["qa_exact_match"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for r in rows:
        if r["engine"] == "eager PyTorch":
            for ax in axes:
                ax.axhline(r["qa_exact_match"], ls="--", lw=0.8, color="gray")
    axes[0].set_xlabel("time to first token (ms, image encoding + prefill)")
    axes[1].set_xlabel("bundle size (MB)")
    for ax in axes:
        ax.set_ylabel("exact match, QA kinds (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("edgevlm_scenes: accuracy against latency and size (dashed: eager FP32)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
