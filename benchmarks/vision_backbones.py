"""Vision backbones on this CPU, in one run: timm eager FP32, a plain ONNX Runtime export, edgevlm bundles.

    python benchmarks/vision_backbones.py [--runs 30] [--models fastvit_t8 tiny_vit_5m_224]

Latency: batch 1 at each model's real resolution (fastvit_t8 256 px, tiny_vit_5m_224 224 px),
median over --runs timed calls after warm-up. Each variant is timed in its own fresh process
(thread pools that keep spinning after a call would otherwise slow the next variant), in
--rounds rounds that alternate the order, so machine noise hits all variants alike. Accuracy: top-1 on the held-out digits test split, from the
same precision's bundle at the weights' training resolution (64 px), as recorded in its
manifest. Prints a table with ratios, writes benchmarks/results/vision_backbones.json and,
when matplotlib is installed, a latency-vs-accuracy plot next to it.
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import os
import platform
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np

RESOLUTION = {"fastvit_t8": 256, "tiny_vit_5m_224": 224}
PRECISIONS = ["fp32", "fp16", "int8", "int4"]


def plain_onnx(model, size: int, path: Path) -> Path:
    """What a user gets by hand: torch.onnx.export of the timm model as is, no reparameterization."""
    import torch

    with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (torch.randn(1, 3, size, size),), dynamo=True, opset_version=18)
    prog.save(str(path))
    return path


def measure(kind: str, path: str, size: int, runs: int, warmup: int) -> list[float]:
    """Milliseconds per batch-1 call of one variant, in this (fresh) process."""
    from edgevlm.runtime.bench import time_calls

    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    if kind == "eager":
        import torch

        from edgevlm.modeling.vision import load_backbone
        from edgevlm.runtime.backends import usable_cpus

        torch.set_num_threads(usable_cpus())
        model, xt = load_backbone(path, "digits").model.eval(), torch.from_numpy(x)

        def fn():
            with torch.no_grad():
                model(xt)
    elif kind == "plain":
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # default options, as by hand
        name = sess.get_inputs()[0].name

        def fn():
            sess.run(None, {name: x})
    else:
        from edgevlm.runtime import load

        clf = load(path)

        def fn():
            clf.logits(x)
    return (time_calls(fn, runs, warmup) * 1000).tolist()


def _measure_in_subprocess(kind, path, size, runs, warmup) -> list[float]:
    cmd = [sys.executable, __file__, "--measure", kind, str(path), "--size", str(size), "--runs", str(runs),
           "--warmup", str(warmup)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"measuring {kind} {path} failed: {r.stderr[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(RESOLUTION))
    ap.add_argument("--runs", type=int, default=30, help="timed calls per variant, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vision_backbones.json"))
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.size, args.runs, args.warmup)))
        return 0

    import onnxruntime as ort
    import torch

    from edgevlm.build import export_bundle
    from edgevlm.config import ExportConfig, QuantConfig
    from edgevlm.modeling.vision import load_backbone
    from edgevlm.report import table, write_json

    rows, work = [], Path(tempfile.mkdtemp(prefix="edgevlm-bench-"))
    for name in args.models:
        size = RESOLUTION.get(name, 224)
        print(f"== {name} at {size} px: building variants", file=sys.stderr)
        eager = load_backbone(name, "digits").model.eval()
        variants = {"timm eager FP32": {"kind": "eager", "path": name, "size_mb": sum(
            p.numel() * p.element_size() for p in eager.parameters()) / 1e6}}
        plain = plain_onnx(eager, size, work / f"{name}-plain.onnx")
        variants["plain ORT export FP32"] = {"kind": "plain", "path": plain, "size_mb": sum(
            f.stat().st_size for f in work.glob(f"{name}-plain.onnx*")) / 1e6}
        for prec in PRECISIONS:
            # Speed at the real resolution...
            out, m = export_bundle(ExportConfig(model=name, quant=QuantConfig(precision=prec), weights="digits",
                                                img_size=size, out=work / f"{name}-{prec}-{size}",
                                                validate_accuracy=False), quiet=True)
            # ...accuracy at the resolution the weights were trained at.
            _, m64 = export_bundle(ExportConfig(model=name, quant=QuantConfig(precision=prec), weights="digits",
                                                out=work / f"{name}-{prec}-64"), quiet=True)
            variants[f"edgevlm bundle {prec.upper()}"] = {
                "kind": "bundle", "path": out, "size_mb": m["files"]["model.onnx"]["size"] / 1e6,
                "accuracy": m64["accuracy"]["bundle"], "eager_accuracy": m64["accuracy"]["eager_fp32"]}
        print(f"== {name}: timing {len(variants)} variants x {args.runs} runs in {args.rounds} rounds, "
              f"one process each", file=sys.stderr)
        times = {k: [] for k in variants}
        per = max(1, args.runs // args.rounds)
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for k in order:
                v = variants[k]
                times[k].extend(_measure_in_subprocess(v["kind"], v["path"], size, per, args.warmup))
        med = {k: float(np.median(t)) for k, t in times.items()}
        e, p = med["timm eager FP32"], med["plain ORT export FP32"]
        eager_acc = next(v["eager_accuracy"] for v in variants.values() if "eager_accuracy" in v)
        for k, v in variants.items():
            rows.append({"model": name, "px": size, "variant": k, "latency_ms": med[k],
                         "p90_ms": float(np.percentile(times[k], 90)), "x_vs_eager": e / med[k],
                         "x_vs_plain": p / med[k], "size_mb": v["size_mb"],
                         "top1_digits": v.get("accuracy", eager_acc),
                         "delta_points": 100 * (v.get("accuracy", eager_acc) - eager_acc),
                         "runs": len(times[k])})
    cols = ["model", "px", "variant", "latency_ms", "p90_ms", "x_vs_eager", "x_vs_plain", "size_mb",
            "top1_digits", "delta_points"]
    print(table(rows, cols, title=f"vision backbones, batch 1, {platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} CPUs (top-1: digits test split at 64 px)"))
    best = {}
    for r in rows:
        ok = r["variant"].startswith("edgevlm") and (
            ("INT8" in r["variant"] and r["delta_points"] >= -1) or ("INT4" in r["variant"] and r["delta_points"] >= -3)
            or r["variant"].endswith(("FP32", "FP16")))
        if ok and (r["model"] not in best or r["latency_ms"] < best[r["model"]]["latency_ms"]):
            best[r["model"]] = r
    for name, r in best.items():
        print(f"best bundle within accuracy bounds for {name}: {r['variant']} — {r['x_vs_eager']:.2f}x eager "
              f"(target >= 3), {r['x_vs_plain']:.2f}x plain export (target >= 1.3)")
    write_json(args.out, {"rows": rows, "best": best, "machine": platform.platform(), "runs": args.runs,
                          "rounds": args.rounds,
                          "onnxruntime": ort.__version__, "torch": torch.__version__,
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {args.out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name in args.models:
            rs = [r for r in rows if r["model"] == name]
            ax.scatter([r["latency_ms"] for r in rs], [r["top1_digits"] or 0 for r in rs], label=name)
            for r in rs:
                ax.annotate(r["variant"].replace("edgevlm bundle ", ""), (r["latency_ms"], r["top1_digits"] or 0),
                            fontsize=7)
        ax.set_xlabel("latency, batch 1 (ms)")
        ax.set_ylabel("top-1 on digits test split")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
        print(f"wrote {args.out.with_suffix('.png')}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
