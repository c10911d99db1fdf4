"""What each target and precision costs in accuracy: the shipped digits backbones exported
to every target at every precision, accuracy read from each bundle's manifest.

    python benchmarks/accuracy_report.py [--models fastvit_t8 tiny_vit_5m_224] [--targets cpu jetson android ios]

Top-1 on the held-out digits test split (360 real handwritten digits), run as the runtime runs
each bundle (ONNX Runtime on this CPU for cpu/jetson/android). Core ML cannot predict on Linux:
for ios the bundle's accuracy is that of the package's own (dequantized) weights run in PyTorch.
Prints a table, writes benchmarks/results/accuracy_report.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

PRECISIONS = ["fp32", "fp16", "int8", "int4"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fastvit_t8", "tiny_vit_5m_224"])
    ap.add_argument("--targets", nargs="+", default=["cpu", "jetson", "android", "ios"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy_report.json"))
    args = ap.parse_args(argv)

    from edgevlm.build import export_bundle
    from edgevlm.config import ExportConfig, QuantConfig
    from edgevlm.errors import EdgeVLMError
    from edgevlm.report import table, write_json

    work = Path(tempfile.mkdtemp(prefix="edgevlm-acc-"))
    rows = []
    for model in args.models:
        for target in args.targets:
            for prec in PRECISIONS:
                t0 = time.time()
                print(f"== {model} {target} {prec}", file=sys.stderr, flush=True)
                try:
                    _, m = export_bundle(ExportConfig(model=model, target=target, weights="digits",
                                                      quant=QuantConfig(precision=prec),
                                                      out=work / f"{model}-{target}-{prec}"), quiet=True)
                except EdgeVLMError as e:
                    rows.append({"model": model, "target": target, "precision": prec, "note": str(e)[:80]})
                    continue
                art, acc = m["artifacts"][0], m["accuracy"]
                par = art["parity"]
                q = art.get("quantization") or art.get("onnx", {}).get("quantization") or {}
                row = {"model": model, "target": target, "precision": prec, "format": art["format"],
                       "eager_fp32": acc["eager_fp32"], "bundle": acc.get("bundle"),
                       "delta_points": acc.get("delta_points"),
                       "top1_agree": par.get("top1_agreement"), "size_mb": sum(
                           f["size"] for f in m["files"].values()) / 1e6,
                       "int4_coverage": q.get("weight_coverage"), "export_s": round(time.time() - t0, 1)}
                if art["format"] == "coreml":
                    row["top1_agree"] = par.get("weight_roundtrip", {}).get("top1_agreement")
                    row["note"] = "package weights run in PyTorch (no macOS)" if "bundle" in acc else acc["status"]
                rows.append(row)
    cols = ["model", "target", "precision", "format", "eager_fp32", "bundle", "delta_points", "top1_agree",
            "size_mb", "int4_coverage", "note"]
    print(table(rows, cols, title="accuracy per target and precision (top-1, digits test split, 360 images)"))
    write_json(args.out, {"rows": rows, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
