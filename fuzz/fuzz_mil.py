"""Fuzz the reference ML-program interpreter (``edgevlm.runtime.mil``): a Core ML package read as the runtime reads an
ios bundle's parts (``load_package``: the Model protobuf, its MIL program, the weight blob), then run once
(``predict`` on zero inputs of the declared shapes, with a fresh state for stateful programs).

Inputs: the first byte picks a seed package and the file to edit (``model.mlmodel`` or ``weights/weight.bin``); the
rest drives byte edits of that file (``_common.mutate_bytes``: flips, interesting integers, insertions, cuts).
Seeds are converted with coremltools at start-up (cached): a small FP16 program (conv, linear, layer norm, softmax),
an INT4 block-wise compressed one (iOS 18), and a stateful one (a state written in place and read back).
Expected: outputs, or a BundleError (any EdgeVLMError); any other exception is a finding.

    python fuzz/fuzz_mil.py --seconds 600
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

SEEDS = ("fp16", "int4", "stateful")
FILES = ("Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin")
VERSION = 1


def _convert(kind: str, dst: Path) -> None:
    """One seed package (coremltools imports torch: only here, at start-up)."""
    import numpy as np
    import torch

    from edgevlm.exporters.coreml import _coremltools, _quiet, quantize

    ct = _coremltools()
    torch.manual_seed(0)
    if kind == "stateful":
        class Acc(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 8)
                self.register_buffer("acc", torch.zeros(1, 4, 8, dtype=torch.float16))

            def forward(self, x):
                self.acc[:, 1:3] = self.lin(x).half()
                return self.acc.float().sum(1) * 2

        module, shape = Acc().eval(), (1, 2, 8)
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=(1, 4, 8), dtype=np.float16), name="acc")]
    else:
        module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(1),
                                     torch.nn.LayerNorm(8 * 6 * 6), torch.nn.Linear(8 * 6 * 6, 64),
                                     torch.nn.Softmax(-1)).eval()
        shape, states = (1, 3, 6, 6), None
    with torch.no_grad():
        traced = torch.jit.trace(module, (torch.randn(*shape),), check_trace=False)
    target = ct.target.iOS18 if kind != "fp16" else ct.target.iOS16
    with _quiet():
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=shape, dtype=np.float32)], states=states,
                        convert_to="mlprogram", minimum_deployment_target=target,
                        compute_precision=ct.precision.FLOAT16)
        if kind == "int4":
            from edgevlm.config import Precision

            ml = quantize(ml, Precision.INT4, 32)
        ml.save(str(dst))


def _seed_packages() -> dict[str, Path]:
    root = _common.cache_dir() / f"mil-seeds-v{VERSION}"
    if not all((root / f"{k}.mlpackage").is_dir() for k in SEEDS):
        tmp = root.with_suffix(".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k in SEEDS:
            _convert(k, tmp / f"{k}.mlpackage")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return {k: root / f"{k}.mlpackage" for k in SEEDS}


def load():
    from edgevlm.errors import EdgeVLMError
    from edgevlm.runtime import mil

    seeds = _seed_packages()
    return {"mil": mil, "Edge": EdgeVLMError, "seeds": seeds,
            "bytes": {(k, f): (p / f).read_bytes() for k, p in seeds.items() for f in FILES},
            "work": _common.work_dir() / "pkg.mlpackage"}


def one_input(ctx, data: bytes, rec) -> None:
    import numpy as np

    if not data:
        return
    kind, file = SEEDS[data[0] % len(SEEDS)], FILES[(data[0] // len(SEEDS)) % len(FILES)]
    work = ctx["work"]
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(ctx["seeds"][kind], work)
    (work / file).write_bytes(_common.mutate_bytes(ctx["bytes"][(kind, file)], _common.Source(data[1:]), max_ops=4))
    try:
        prog = ctx["mil"].load_package(work)
    except ctx["Edge"]:
        rec.count("refused at load")
        return
    rec.count("loaded")
    feeds = {}
    for name, t in prog.inputs.items():
        shape = tuple(1 if d is None else int(d) for d in t.shape or ())
        if np.prod(shape, dtype=np.int64) > 1 << 22:
            rec.count("inputs too large to feed")
            return
        feeds[name] = np.zeros(shape, np.float32)
    try:
        state = prog.new_state() if prog.states else None
        prog.predict(feeds, state)
        rec.count("ran")
    except ctx["Edge"]:
        rec.count("refused at predict")


def seeds(ctx, folder: Path) -> None:
    for i in range(len(SEEDS) * len(FILES)):
        (folder / f"seed{i}").write_bytes(bytes([i]) + bytes(range(64)))


TARGET = _common.Target("mil", load, one_input, seeds, max_len=1 << 12, rss_limit_mb=6144)

if __name__ == "__main__":
    sys.exit(_common.main(TARGET))
