"""`edgevlm finetune`: train only the part of a VLM that needs it.

| mode | trains | for |
|---|---|---|
| ``vision`` | the vision tower | a large domain shift (medical, remote sensing) |
| ``decoder`` | the language model (embeddings and head included) | the style of the answers |
| ``connector`` | the connector (projector / Q-Former / compressor) and LLaVA-Mini's pre-fusion layers | VQA-type fusion |
| ``lora`` | LoRA updates on the language model's projections (peft; ``--qlora``: NF4 base) | cheap adaptation; merged back before saving |

Everything else is frozen; each run prints its trainable parameters per part. Data: ``scenes`` or a folder
with ``qa.jsonl`` (:mod:`edgevlm.train.data`). The run is the shared Accelerate loop (checkpoints,
``--resume``, ``accelerate launch``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..compress.lora import LoraSpec
from ..config import _Choice
from ..errors import CheckpointError, ConfigError
from .loop import TrainConfig, count_parameters, fit, is_main_process, summary_table, wait_for_everyone


class Mode(_Choice):
    VISION = "vision"
    DECODER = "decoder"
    CONNECTOR = "connector"
    LORA = "lora"


# The parts each mode trains (names from VisionLanguageModel.parts()).
MODE_PARTS = {Mode.VISION: ("vision",), Mode.DECODER: ("language_model",), Mode.CONNECTOR: ("connector", "fusion"),
              Mode.LORA: ()}


@dataclass
class FinetuneConfig:
    model: str
    mode: Mode
    train: TrainConfig
    weights: str | None = None
    data: str = "scenes"
    limit: int | None = None                 # training images (scenes: the first N of the split)
    val_data: str | None = None              # default: scenes' validation split, or none for folders
    val_limit: int = 50
    questions_per_image: int = 4
    lora: LoraSpec = field(default_factory=LoraSpec)

    def __post_init__(self) -> None:
        self.mode = Mode.parse(self.mode)
        if self.lora.quantize and self.mode is not Mode.LORA:
            raise ConfigError("--qlora quantizes the base of a LoRA run", "pass --mode lora with --qlora")


def set_trainable(vlm, mode: Mode) -> list[dict]:
    """Freeze everything but the mode's parts; rows of (part, parameters, trainable) for the summary."""
    mode = Mode.parse(mode)
    parts = vlm.parts()
    for p in vlm.parameters():
        p.requires_grad_(False)
    for name in MODE_PARTS[mode]:
        if name in parts:
            for p in parts[name].parameters():
                p.requires_grad_(True)
    return part_rows(vlm)


def part_rows(vlm) -> list[dict]:
    rows = []
    for name, m in vlm.parts().items():
        t, n = count_parameters(m)
        rows.append({"part": name, "parameters": n, "trainable": t})
    t, n = count_parameters(vlm)
    rows.append({"part": "total", "parameters": n, "trainable": t})
    return rows


def save_parts(vlm, path: Path, parts: list[str], meta: dict) -> Path:
    """The named parts' weights (edgevlm module names) in one safetensors file; load with :func:`load_parts`."""
    from safetensors.torch import save_file

    sd = {}
    for name in parts:
        for k, v in vlm.parts()[name].state_dict().items():
            sd[f"{name}.{k}"] = v.detach().clone().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path.with_suffix(".tmp")), metadata={"edgevlm": json.dumps(meta)})
    path.with_suffix(".tmp").replace(path)
    return path


def load_parts(vlm, path: Path) -> dict:
    """Overlay parts written by :func:`save_parts` on a VLM of the same architecture; returns the metadata."""
    from ..modeling.checkpoint import load_state_dict, read_metadata

    meta = read_metadata(Path(path))
    sd = load_state_dict(Path(path))
    parts = vlm.parts()
    for name in {k.split(".", 1)[0] for k in sd}:
        if name not in parts:
            raise CheckpointError(f"{path} holds part {name!r}, which {vlm.name} does not have",
                                  "load it onto the model it was fine-tuned from")
        sub = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith(name + ".")}
        from ..modeling.checkpoint import fit_state_dict

        fit_state_dict(parts[name], sub, str(path), fix=f"load it onto {meta.get('base', 'the model it came from')}")
    return meta


def finetune(cfg: FinetuneConfig, log=None) -> dict:
    """Fine-tune one part of a zoo VLM on (image, question, answer) data; saves the result in ``train.out``."""
    import torch

    from ..compress.lora import apply_lora, merge_lora, resolve_targets
    from ..modeling.families import load_vlm
    from ..zoo import is_vlm
    from .data import load_vqa
    from .vqa import VQATask, exact_match

    log = log or (lambda m: print(m, flush=True))
    if not is_vlm(cfg.model):
        raise ConfigError(f"finetune takes a vision-language model; {cfg.model} is a backbone",
                          "train backbones with `edgevlm train` or `edgevlm distill --kd none`")
    data = load_vqa(cfg.data, "train", cfg.limit)                         # every image decoded here
    val = None
    if (cfg.val_data or cfg.data == "scenes") and cfg.val_limit:
        val = load_vqa(cfg.val_data or "scenes", "val", cfg.val_limit)
    torch.manual_seed(cfg.train.seed)
    vlm = load_vlm(cfg.model, weights=cfg.weights)
    targets = None
    if cfg.mode is Mode.LORA:
        resolve_targets(vlm.language_model, cfg.lora)                      # a missing target fails here
    before = exact_match(vlm, val)["exact_match"] if val is not None else None
    if cfg.mode is Mode.LORA:
        targets = apply_lora(vlm, cfg.lora)
        rows = part_rows(vlm)
    else:
        rows = set_trainable(vlm, cfg.mode)
    from ..report import table

    if not cfg.train.quiet and is_main_process():
        print(table(rows, title=f"{cfg.model}: fine-tuning mode {cfg.mode.value}"
                    + (f" (LoRA r={cfg.lora.r} on {', '.join(targets)}"
                       + (", NF4 base)" if cfg.lora.quantize else ")") if targets else "")))
    identity = {"model": cfg.model, "weights": str(cfg.weights), "mode": cfg.mode.value, "data": data.describe(),
                "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "targets": targets, "quantize": cfg.lora.quantize}
                if targets else None, "questions_per_image": cfg.questions_per_image}
    task = VQATask(f"{cfg.model}-{cfg.mode.value}", vlm, data, identity, seed=cfg.train.seed,
                   questions_per_image=cfg.questions_per_image, val=val)
    res = fit(task, cfg.train, log=log)
    vlm = task.module.vlm
    merged = merge_lora(vlm) if cfg.mode is Mode.LORA else 0
    after = exact_match(vlm, val)["exact_match"] if val is not None else None
    parts = ["language_model"] if cfg.mode is Mode.LORA else [p for p in MODE_PARTS[cfg.mode] if p in vlm.parts()]
    meta = {"base": cfg.model, "base_weights": str(cfg.weights), "mode": cfg.mode.value, "parts": parts,
            "data": data.name, "val_exact_match_before": before, "val_exact_match_after": after,
            "merged_lora_layers": merged}
    out = cfg.train.out / "finetuned.safetensors"
    full = cfg.train.out / "model.safetensors" if vlm.family == "edgevlm" and vlm.tokenizer is not None else None
    if is_main_process():
        save_parts(vlm, out, parts, meta)
        if full is not None:
            from ..modeling.scenes_vlm import save

            save(vlm, full, {"model": cfg.model, "dataset": "scenes" if cfg.data == "scenes" else data.name,
                             "trained_with": {"command": f"edgevlm finetune --model {cfg.model} --mode {cfg.mode.value}"},
                             **meta})
    wait_for_everyone()
    summary = {"model": cfg.model, "mode": cfg.mode.value, "parts": rows, "lora_targets": targets,
               "trainable_params": res.trainable_params, "total_params": res.total_params,
               "val_exact_match_before": before, "val_exact_match_after": after, "weights": str(out),
               "model_weights": str(full) if full else None, "steps": res.steps, "seconds": round(res.seconds, 1),
               "history": res.history}
    if not cfg.train.quiet and is_main_process():
        print(summary_table(res, f"edgevlm finetune {cfg.model} --mode {cfg.mode.value}"
                            + (f": validation exact match {before:.3f} -> {after:.3f}" if val is not None else "")))
    return summary
