"""Train a zoo backbone on scikit-learn's digits and save it as shipped weights.

``edgevlm train --model fastvit_t8`` reproduces models/weights/fastvit_t8.digits.safetensors
(seeded; the best validation epoch is kept; the test split is not looked at).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..data import digits
from ..zoo import get_recipe


def _accuracy(model, x, y, batch: int = 128) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train_digits(model_name: str, out: Path, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3,
                 seed: int = 0, log=print) -> dict:
    """Train ``model_name`` from scratch on the digits train split; returns a summary."""
    import torch
    from safetensors.torch import save_file
    from torchvision.transforms import v2

    from ..modeling.vision import build_backbone, count_params

    torch.manual_seed(seed)
    np.random.seed(seed)
    recipe = get_recipe(model_name)
    model = build_backbone(recipe, num_classes=10)
    xtr, ytr = digits.arrays("train")
    xva, yva = digits.arrays("val")
    # Small shifts, rotations and scale changes; the paper is white, which normalizes to +1.
    aug = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total = epochs * steps_per_epoch
    warm = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(seed)
    best, best_sd, history = -1.0, None, []
    log(f"training {model_name} ({count_params(model) / 1e6:.2f}M params) on digits: "
        f"{len(xtr)} train / {len(xva)} val images at {digits.PREPROCESS.input_size} px, {epochs} epochs")
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g).numpy()
        losses = []
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            xb = torch.stack([aug(torch.from_numpy(xtr[j])) for j in idx])
            yb = torch.from_numpy(ytr[idx])
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        acc = _accuracy(model, xva, yva)
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_accuracy": acc})
        if acc > best:
            best = acc
            best_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log(f"  epoch {epoch + 1:3d}/{epochs}  loss {np.mean(losses):.4f}  val acc {acc:.4f}  "
            f"best {best:.4f}  {time.time() - t0:6.0f}s")
    model.load_state_dict(best_sd)
    meta = {
        "model": model_name, "num_classes": 10, "labels": digits.LABELS, "dataset": digits.NAME,
        "preprocess": digits.PREPROCESS.to_dict(), "val_accuracy": best, "epochs": epochs,
        "trained_with": f"edgevlm train --model {model_name} --epochs {epochs} --seed {seed}",
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    # Stored as FP16 to halve the shipped size; this rounded model is the one we evaluate and ship.
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp), metadata={"edgevlm": json.dumps(meta)})
    tmp.replace(out)
    log(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB), best val accuracy {best:.4f}, {time.time() - t0:.0f}s")
    return {**meta, "history": history, "seconds": time.time() - t0, "path": str(out)}
