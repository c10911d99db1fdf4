"""A tiny distillation run for the multi-process test: ``python dist_worker.py OUT [grad_accum]`` (or under
``accelerate launch``). Writes OUT/final.safetensors with the student's weights."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

torch.set_num_threads(1)


def tiny_cnn(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, 10))


def digits16(n_train: int = 96):
    from edgevlm.data import digits
    from edgevlm.train.data import ClassificationData
    from edgevlm.zoo import PreprocessSpec

    pre = PreprocessSpec(16, "bilinear", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    xtr, ytr = digits.arrays("train", pre)
    xva, yva = digits.arrays("val", pre)
    return ClassificationData("digits16", list(digits.LABELS),
                              {"train": (xtr[:n_train], ytr[:n_train]), "val": (xva[:32], yva[:32])}, pre, "d16")


def run(out: Path, grad_accum: int = 1, steps: int = 4, callbacks=(), resume: bool = False):
    from edgevlm.compress.distill import KDConfig
    from edgevlm.train.data import SeededAffine
    from edgevlm.train.distill import ClassifierTask
    from edgevlm.train.loop import TrainConfig, fit

    data = digits16()
    teacher = tiny_cnn(1, 16).eval()
    student = tiny_cnn(0)
    kd = KDConfig("soft", alpha=0.5, temperature=2.0)
    task = ClassifierTask("tiny", student, data, kd, seed=0, aug=SeededAffine(), teacher=teacher,
                          identity={"test": "dist"})
    cfg = TrainConfig(out, epochs=2, max_steps=steps, batch_size=32, grad_accum=grad_accum, lr=1e-2, quiet=True,
                      save_every=1, resume=resume, overwrite=not resume, select_best=False)
    res = fit(task, cfg, callbacks=callbacks)
    return task.module.student, res


if __name__ == "__main__":
    from accelerate import PartialState
    from safetensors.torch import save_file

    out = Path(sys.argv[1])
    model, res = run(out, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    if PartialState().is_main_process:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"),
                  metadata={"processes": str(res.processes)})
