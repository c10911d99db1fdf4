"""`edgevlm distill`: a small model learns from a large one.

Three jobs, one loop (:mod:`edgevlm.train.loop`):

- :func:`distill_backbone` — a zoo classifier (e.g. FastViT-T8) from a trained teacher (e.g. TinyViT-5M)
  with soft or hard KD, or DeiT's distillation token; the teacher runs live, or once into a sparse
  :class:`~edgevlm.compress.distill.TeacherLogitStore` (TinyViT's fast distillation) that any student replays.
  ``kd=none`` is the same run without a teacher (the baseline).
- :func:`distill_vlm` — a teacher VLM into a student with fewer vision tokens or a smaller language model,
  KD on the answer tokens.
- :func:`attach_and_distill` — a deploy-time step: attach a token compressor (LLaVA-Mini's, with pre-fusion
  layers, on LLaVA-format models; a new query compressor on edgevlm's own VLM) and train only the new
  parts from the same model's uncompressed answers.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..compress.distill import KDConfig, KDKind, TeacherLogitStore, check_label_sets
from ..errors import ConfigError
from .data import SeededAffine, load_classification, sample_seed
from .loop import TrainConfig, TrainResult, fit, is_main_process, summary_table, wait_for_everyone


# -- backbones --------------------------------------------------------------------------------------------


@dataclass
class BackboneDistillConfig:
    student: str
    train: TrainConfig
    teacher: str | None = None               # zoo name; None with kd=none
    teacher_weights: str | None = None       # default: the teacher's shipped weights
    student_weights: str = "random"
    data: str = "digits"
    kd: KDConfig = field(default_factory=KDConfig)
    store: Path | None = None                # sparse teacher-logit store: written when absent, then replayed
    top_k: int = 10
    store_dtype: str = "float16"
    augment: bool = True
    img_size: int | None = None              # image folders: input side (default 64, as digits)

    def __post_init__(self) -> None:
        if self.kd.kind is not KDKind.NONE and not self.teacher and not self.store:
            raise ConfigError(f"KD kind {self.kd.kind.value} needs a teacher", "pass --teacher NAME (or --kd none)")
        if self.store is not None:
            self.store = Path(self.store)


def _teacher_backbone(cfg: BackboneDistillConfig):
    from ..modeling.vision import load_backbone

    bb = load_backbone(cfg.teacher, cfg.teacher_weights)
    for p in bb.model.parameters():
        p.requires_grad_(False)
    return bb


def _probs(teacher, x, temperature: float, batch: int = 128):
    with torch.no_grad():
        logits = torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)])
    return logits, torch.softmax(logits.float() / temperature, -1)


def write_teacher_store(teacher, name: str, data, path: Path, epochs: int, k: int, temperature: float,
                        seed: int, aug: SeededAffine | None, dtype: str = "float16", log=print) -> dict:
    """Run the teacher once over ``epochs`` augmented passes of the train split; store top-k per sample."""
    x, _ = data.split("train")
    n = len(x)
    store = TeacherLogitStore.create(path, teacher=name, k=k, num_classes=len(data.labels), temperature=temperature,
                                     data=data.describe(), augmentation=aug.spec() if aug else {"kind": "none"},
                                     value_dtype=dtype)
    teacher.eval()
    t0 = time.time()
    for e in range(epochs):
        seeds = np.array([sample_seed(seed, e, i) for i in range(n)], np.int64)
        logits = []
        for i in range(0, n, 128):
            xb = torch.from_numpy(x[i:i + 128])
            if aug is not None:
                xb = aug.batch(xb, seeds[i:i + 128])
            with torch.no_grad():
                logits.append(teacher(xb))
        store.write_epoch(e, np.arange(n), seeds, torch.cat(logits))
        log(f"  teacher store: epoch {e + 1}/{epochs} written ({time.time() - t0:.0f} s)")
    secs = time.time() - t0
    return {"path": str(path), "epochs": epochs, "k": k, "bytes": store.size_bytes(), "seconds": round(secs, 1),
            "seconds_per_epoch": round(secs / epochs, 2)}


class ClassifierTask:
    """A classifier student on a labelled split; targets from a live teacher, a logit store, or none."""
    metric = "val_accuracy"

    def __init__(self, name: str, student, data, kd: KDConfig, seed: int, aug: SeededAffine | None,
                 teacher=None, store: TeacherLogitStore | None = None, identity: dict | None = None):
        from torch import nn

        self.name, self.data, self.kd, self.seed, self.aug = name, data, kd, seed, aug
        self.teacher, self.store = teacher, store
        self.x, self.y = data.split("train")
        self.num_samples = len(self.y)
        self.identity = identity or {}
        kd_ = kd

        class Objective(nn.Module):
            def __init__(self, student):
                super().__init__()
                self.student = student

            def forward(self, batch):
                out = self.student(batch["x"])
                return {"loss": kd_.loss(out, batch["y"], batch.get("teacher"))}

        self.module = Objective(student).train()

    def batch(self, indices, epoch: int) -> dict:
        idx = np.asarray(indices)
        x = torch.from_numpy(self.x[idx])
        out = {"y": torch.from_numpy(self.y[idx])}
        if self.store is not None:
            seeds, out["teacher"] = self.store.lookup(epoch, idx, self.kd.temperature)
            seeds = seeds.numpy()
        else:
            seeds = np.array([sample_seed(self.seed, epoch, int(i)) for i in idx], np.int64)
        out["x"] = self.aug.batch(x, seeds) if self.aug is not None else x
        if self.teacher is not None and self.store is None and self.kd.kind is not KDKind.NONE:
            _, out["teacher"] = _probs(self.teacher, out["x"], self.kd.temperature)
        return out

    def evaluate(self, module) -> dict:
        return {"val_accuracy": accuracy(module.student, *self.data.split("val"))}


def accuracy(model, x, y, batch: int = 128) -> float:
    model.eval()
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() for i in range(0, len(x), batch)])
    return float((pred == y).mean())


def distill_backbone(cfg: BackboneDistillConfig, log=None) -> dict:
    """Train ``cfg.student`` on ``cfg.data`` (with or without a teacher); save timm-layout safetensors that
    `edgevlm export/eval --weights` read. Every check (data, labels, teacher, store, checkpoint) runs before
    the first step."""
    from safetensors.torch import save_file

    from ..compress.distill import DistilledStudent
    from ..modeling.vision import load_backbone
    from ..zoo import PreprocessSpec, get_recipe

    log = log or (lambda m: print(m, flush=True))
    torch.manual_seed(cfg.train.seed)
    recipe = get_recipe(cfg.student)
    pre = None
    if cfg.data != "digits":
        side = cfg.img_size or 64
        pre = PreprocessSpec(side, recipe.preprocess.interpolation, 1.0, recipe.preprocess.mean, recipe.preprocess.std)
    data = load_classification(cfg.data, pre, seed=cfg.train.seed)        # every image decoded here
    labels = data.labels
    teacher = None
    teacher_id = None
    if cfg.kd.kind is not KDKind.NONE and cfg.teacher:
        tb = _teacher_backbone(cfg)
        if tb.num_classes != len(labels) or (tb.dataset and tb.labels != labels):
            check_label_sets(tb.labels, labels, f"{cfg.teacher} ({tb.weights.get('source')})", data.name)
        if tb.preprocess.input_size != data.preprocess.input_size:
            raise ConfigError(f"teacher {cfg.teacher} expects {tb.preprocess.input_size} px, the data is "
                              f"{data.preprocess.input_size} px", "use a teacher trained at the data's size")
        teacher = tb.model.eval()
        teacher_id = {"model": cfg.teacher, "weights": tb.weights.get("source"), "sha256": tb.weights.get("sha256")}
    aug = SeededAffine() if cfg.augment else None
    store = None
    store_info = None
    if cfg.kd.kind is not KDKind.NONE and cfg.store is not None:
        if not (cfg.store / "store.json").is_file():
            if teacher is None:
                raise ConfigError(f"no teacher-logit store at {cfg.store} and no teacher to write one",
                                  "pass --teacher NAME (the store is written once, then reused)")
            if is_main_process():                         # one process writes; the others wait and read
                log(f"writing the teacher-logit store {cfg.store} (top-{cfg.top_k}, {cfg.train.epochs} epochs)")
                store_info = write_teacher_store(teacher, cfg.teacher, data, cfg.store, cfg.train.epochs, cfg.top_k,
                                                 cfg.kd.temperature, cfg.train.seed, aug, cfg.store_dtype, log)
            wait_for_everyone()
        store = TeacherLogitStore.open(cfg.store)
        store.check_compatible(data=data.describe(), num_classes=len(labels),
                               augmentation=aug.spec() if aug else {"kind": "none"}, epochs=cfg.train.epochs,
                               temperature=cfg.kd.temperature)
        store_info = store_info or {"path": str(cfg.store), "bytes": store.size_bytes(), "k": store.k}
        teacher_id = {"store": store.meta["teacher"], "k": store.k, "temperature": store.temperature}
        teacher = None                                   # the point of the store: the teacher does not run
    bb = load_backbone(cfg.student, cfg.student_weights, num_classes=len(labels) if cfg.student_weights == "random"
                       else None, seed=cfg.train.seed)
    if bb.num_classes != len(labels):
        raise ConfigError(f"student weights have a {bb.num_classes}-class head, the data {len(labels)} classes",
                          "start the student from random weights or from weights for this label set")
    student = bb.model
    if cfg.kd.kind is KDKind.DEIT:
        student = DistilledStudent(student)
    student.train()
    identity = {"student": cfg.student, "student_weights": cfg.student_weights, "data": data.describe(),
                "teacher": teacher_id, "kd": {"kind": cfg.kd.kind.value, "alpha": cfg.kd.alpha,
                                              "temperature": cfg.kd.temperature}, "augment": cfg.augment}
    label = "scratch" if cfg.kd.kind is KDKind.NONE else f"kd-{cfg.kd.kind.value}"
    task = ClassifierTask(f"{cfg.student}-{label}", student, data, cfg.kd, cfg.train.seed, aug, teacher, store, identity)
    res = fit(task, cfg.train, log=log)
    final = task.module.student
    val = accuracy(final, *data.split("val"))
    test = accuracy(final, *data.split("test")) if "test" in data.splits else None
    plain = final.backbone if isinstance(final, DistilledStudent) else final
    extra = {}
    if isinstance(final, DistilledStudent) and test is not None:
        extra["test_accuracy_class_head_only"] = accuracy(plain, *data.split("test"))
    meta = {"model": cfg.student, "num_classes": len(labels), "labels": labels,
            "dataset": "digits" if cfg.data == "digits" else data.name, "preprocess": data.preprocess.to_dict(),
            "val_accuracy": val, "epochs": cfg.train.epochs,
            "trained_with": f"edgevlm distill --student {cfg.student} --kd {cfg.kd.kind.value}"
                            + (f" --teacher {cfg.teacher}" if cfg.teacher else ""),
            "distilled_from": teacher_id}
    out = cfg.train.out / f"{cfg.student}.safetensors"
    if is_main_process():
        out.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in plain.state_dict().items()}
        save_file(sd, str(out.with_suffix(".tmp")), metadata={"edgevlm": json.dumps(meta)})
        out.with_suffix(".tmp").replace(out)
        if isinstance(final, DistilledStudent):
            save_file({k: v.contiguous() for k, v in final.dist_state().items()},
                      str(out.with_suffix(".dist.safetensors")))
    wait_for_everyone()
    summary = {"student": cfg.student, "teacher": teacher_id, "kd": identity["kd"], "val_accuracy": val,
               "test_accuracy": test, **extra, "weights": str(out), "store": store_info,
               "trainable_params": res.trainable_params, "train": _result_dict(res)}
    if not cfg.train.quiet and is_main_process():
        print(summary_table(res, f"edgevlm distill: {task.name} on {data.name} — val {val:.4f}"
                            + (f", test {test:.4f}" if test is not None else "")))
    return summary


def _result_dict(res: TrainResult) -> dict:
    return {"steps": res.steps, "epochs": res.epochs_run, "seconds": round(res.seconds, 1), "processes": res.processes,
            "history": res.history, "best": res.best, "resumed_from": res.resumed_from,
            "trainable_params": res.trainable_params, "total_params": res.total_params}



# -- VLMs ---------------------------------------------------------------------------------------------------


@dataclass
class VLMDistillConfig:
    teacher: str                              # zoo VLM name
    train: TrainConfig
    teacher_weights: str | None = None
    student: str | None = None                # zoo VLM name (default: the teacher's architecture)
    vision_tokens: int | None = None          # student: fewer vision tokens (edgevlm's own family)
    text_layers: int | None = None            # student: fewer language-model layers
    init_from_teacher: bool = False           # copy every teacher tensor whose name and shape fit
    init_weights: Path | None = None          # start from these weights (safetensors; tensors that fit)
    data: str = "scenes"
    limit: int | None = None
    val_limit: int = 50
    questions_per_image: int = 4
    alpha: float = 0.5
    temperature: float = 1.0
    kinds: tuple[str, ...] | None = None      # scenes: train and score only these question kinds

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"KD weight alpha={self.alpha} is out of range", "use a value in [0, 1]")


def student_recipe(cfg: VLMDistillConfig):
    """The student's recipe: the named one (or the teacher's) with the requested reductions applied."""
    import copy
    from dataclasses import replace

    from ..zoo import get_vlm_recipe

    recipe = get_vlm_recipe(cfg.student or cfg.teacher)
    conf = copy.deepcopy(recipe.config)
    changes = {}
    if cfg.vision_tokens is not None:
        if "vision_tokens" not in conf:
            raise ConfigError(f"{recipe.name} ({recipe.family}) has no vision_tokens setting",
                              "attach a compressor instead (`edgevlm distill --attach-compressor N`) or pick an "
                              "edgevlm_scenes student")
        conf["vision_tokens"] = changes["vision_tokens"] = int(cfg.vision_tokens)
    if cfg.text_layers is not None:
        text_key = "text" if "text" in conf else "text_config"
        if text_key not in conf:
            raise ConfigError(f"{recipe.name} has no language-model config to shrink", "pick another student")
        conf[text_key] = dict(conf[text_key], num_hidden_layers=int(cfg.text_layers))
        changes["text_layers"] = int(cfg.text_layers)
    name = recipe.name + "".join(f"-{k}{v}" for k, v in changes.items())
    return replace(recipe, name=name, config=conf), changes


def _copy_matching(src, dst) -> int:
    own = dst.state_dict()
    n = 0
    with torch.no_grad():
        for k, v in src.state_dict().items():
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v)
                n += 1
    return n


def build_student(cfg: VLMDistillConfig, teacher):
    """A fresh student with the teacher's tokenizer; vocabularies checked before any training."""
    from ..compress.distill import check_same_vocabulary
    from ..modeling.families import build_vlm

    recipe, changes = student_recipe(cfg)
    torch.manual_seed(cfg.train.seed)
    student = build_vlm(recipe, tokenizer=teacher.tokenizer)
    check_same_vocabulary(teacher, student)
    copied = _copy_matching(teacher, student) if cfg.init_from_teacher else 0
    if cfg.init_weights is not None:
        from ..modeling.checkpoint import load_state_dict

        own = student.state_dict()
        sd = {k: v for k, v in load_state_dict(Path(cfg.init_weights)).items() if k in own and own[k].shape == v.shape}
        if not sd:
            raise ConfigError(f"{cfg.init_weights} has no tensor that fits {recipe.name}",
                              "pass weights saved from the same student recipe")
        student.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
    student.facts = {"config_overrides": changes}
    return student, recipe, changes, copied


def distill_vlm(cfg: VLMDistillConfig, log=None, teacher=None) -> dict:
    """A student VLM learns the teacher's answers (answer-token KD, ``alpha``) beside the ground truth."""
    from ..modeling.families import load_vlm
    from .data import load_vqa
    from .vqa import VQATask, exact_match

    log = log or (lambda m: print(m, flush=True))
    data = load_vqa(cfg.data, "train", cfg.limit, cfg.kinds)
    val = load_vqa("scenes", "val", cfg.val_limit, cfg.kinds) if cfg.data == "scenes" and cfg.val_limit else None
    teacher = teacher or load_vlm(cfg.teacher, weights=cfg.teacher_weights)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    student, recipe, changes, copied = build_student(cfg, teacher)
    student.train()
    identity = {"teacher": cfg.teacher, "teacher_weights": str(cfg.teacher_weights), "student": recipe.name,
                "changes": changes, "init_from_teacher": cfg.init_from_teacher, "data": data.describe(),
                "alpha": cfg.alpha, "temperature": cfg.temperature}
    task = VQATask(f"{recipe.name}-kd" if cfg.alpha else f"{recipe.name}-scratch", student, data, identity,
                   seed=cfg.train.seed, questions_per_image=cfg.questions_per_image,
                   teacher=teacher if cfg.alpha > 0 else None, alpha=cfg.alpha, temperature=cfg.temperature, val=val)
    res = fit(task, cfg.train, log=log)
    student = task.module.vlm
    ev = exact_match(student, val) if val is not None else None
    out = cfg.train.out / "student.safetensors"
    facts = {"model": recipe.name, "base_recipe": cfg.student or cfg.teacher, "config_overrides": changes,
             "dataset": "scenes" if cfg.data == "scenes" else data.name, "distilled_from":
             {"model": cfg.teacher, "weights": str(cfg.teacher_weights), "alpha": cfg.alpha,
              "temperature": cfg.temperature}, "val": ev}
    if is_main_process():
        if student.family == "edgevlm":
            from ..modeling.scenes_vlm import save

            save(student, out, facts)
        else:
            from .finetune import save_parts

            save_parts(student, out, list(student.parts()), facts)
    wait_for_everyone()
    summary = {"student": recipe.name, "teacher": cfg.teacher, "changes": changes, "copied_from_teacher": copied,
               "alpha": cfg.alpha, "val": ev, "weights": str(out), "trainable_params": res.trainable_params,
               "steps": res.steps, "seconds": round(res.seconds, 1), "history": res.history}
    if not cfg.train.quiet and is_main_process():
        print(summary_table(res, f"edgevlm distill: {recipe.name} from {cfg.teacher}"
                            + (f" — validation exact match {ev['exact_match']:.3f}" if ev else "")))
    return summary


def load_distilled_vlm(path: Path):
    """A student written by :func:`distill_vlm` for edgevlm's own family: its base recipe and reductions
    are in the file (``load_vlm(base, weights=path)`` applies the reductions too)."""
    from dataclasses import replace

    from ..modeling.checkpoint import read_metadata
    from ..modeling.scenes_vlm import load
    from ..zoo import get_vlm_recipe

    facts = read_metadata(Path(path))
    recipe = get_vlm_recipe(facts.get("base_recipe", "edgevlm_scenes"))
    return load(replace(recipe, name=facts.get("model", recipe.name)), Path(path))


# -- attaching a token compressor (deploy-time) ----------------------------------------------------------------


def attach_scenes_compressor(model, n_tokens: int, heads: int | None = None):
    """edgevlm's own VLM with a new ``n_tokens`` query compressor; tower, projector and LM are shared."""
    from ..modeling.connectors import CompressedProjector
    from ..modeling.scenes_vlm import ScenesVLM

    old = model.connector
    dim = old.projector.linear_1.in_features
    heads = heads or (old.compressor.attn.num_heads if hasattr(old, "compressor") else 4)
    conn = CompressedProjector(dim, model.hidden_size, n_tokens, heads)
    conn.projector = old.projector                       # shared, frozen: only the compressor is new
    mini = ScenesVLM(model.vision, conn, model.language_model, image_spec=model.image_spec,
                     prompt_spec=model.prompt_spec, tokenizer=model.tokenizer, name=f"{model.name}+compressor{n_tokens}",
                     max_context=model.max_context)
    return mini


def attach(model, n_tokens: int, prefusion_layers: int = 4):
    """A compressed model on ``model``'s weights and the names of its new (trainable) parts."""
    from ..modeling.llava import LlavaModel
    from ..modeling.llava_mini import attach_compressor
    from ..modeling.scenes_vlm import ScenesVLM

    if isinstance(model, LlavaModel):
        return attach_compressor(model, n_tokens, prefusion_layers), ["connector.compressor", "fusion"]
    if isinstance(model, ScenesVLM):
        if prefusion_layers:
            raise ConfigError("edgevlm's own VLM has no pre-fusion layers to attach", "pass --prefusion-layers 0")
        return attach_scenes_compressor(model, n_tokens), ["connector.compressor"]
    raise ConfigError(f"attaching a token compressor to {type(model).__name__} ({model.name}) is not supported",
                      "use a LLaVA-format model (llava family) or edgevlm_scenes")


@dataclass
class AttachConfig:
    model: str
    train: TrainConfig
    weights: str | None = None
    n_tokens: int = 1
    prefusion_layers: int = 4
    data: str = "scenes"
    limit: int | None = None
    val_limit: int = 50
    questions_per_image: int = 4
    alpha: float = 1.0                        # 1: pure distillation from the uncompressed model
    temperature: float = 1.0
    kinds: tuple[str, ...] | None = None      # scenes: train and score only these question kinds


def attach_and_distill(cfg: AttachConfig, log=None, base=None) -> dict:
    """Attach a compressor (and pre-fusion layers) to a trained VLM; train only them from its uncompressed
    answers. Saves the new parts (``compressor.safetensors``) for :func:`load_attached`."""
    from ..modeling.families import load_vlm
    from .data import load_vqa
    from .vqa import VQATask, exact_match

    log = log or (lambda m: print(m, flush=True))
    data = load_vqa(cfg.data, "train", cfg.limit, cfg.kinds)
    val = load_vqa("scenes", "val", cfg.val_limit, cfg.kinds) if cfg.data == "scenes" and cfg.val_limit else None
    base = base or load_vlm(cfg.model, weights=cfg.weights)

    torch.manual_seed(cfg.train.seed)
    student, new_parts = attach(base, cfg.n_tokens, cfg.prefusion_layers)
    for p in student.parameters():
        p.requires_grad_(False)
    for name in new_parts:
        for p in student.get_submodule(name).parameters():
            p.requires_grad_(True)
    if hasattr(student.connector, "compressor"):
        student.connector.compressor.pos_embed.requires_grad_(False)        # a fixed sin-cos table
    teacher = base.eval()
    identity = {"model": cfg.model, "weights": str(cfg.weights), "n_tokens": cfg.n_tokens,
                "prefusion_layers": cfg.prefusion_layers, "data": data.describe(), "alpha": cfg.alpha}
    task = VQATask(f"{cfg.model}+compressor{cfg.n_tokens}", student, data, identity, seed=cfg.train.seed,
                   questions_per_image=cfg.questions_per_image, teacher=teacher, alpha=cfg.alpha,
                   temperature=cfg.temperature, val=val)
    task.module.train()
    teacher.eval()
    res = fit(task, cfg.train, log=log)
    student = task.module.vlm
    ev = exact_match(student, val) if val is not None else None
    ev_teacher = exact_match(teacher, val) if val is not None else None
    out = cfg.train.out / "compressor.safetensors"
    meta = {"base": cfg.model, "base_weights": str(cfg.weights), "n_tokens": cfg.n_tokens,
            "prefusion_layers": cfg.prefusion_layers, "val": ev}
    if is_main_process():
        _save_modules(student, new_parts, out, meta)
    wait_for_everyone()
    summary = {"model": cfg.model, "n_tokens": cfg.n_tokens, "prefusion_layers": cfg.prefusion_layers,
               "trained_parts": new_parts, "trainable_params": res.trainable_params, "total_params": res.total_params,
               "val": ev, "val_uncompressed": ev_teacher, "weights": str(out), "steps": res.steps,
               "seconds": round(res.seconds, 1), "history": res.history}
    if not cfg.train.quiet and is_main_process():
        print(summary_table(res, f"edgevlm distill --attach-compressor {cfg.n_tokens}: {cfg.model}"
                            + (f" — validation exact match {ev['exact_match']:.3f} (uncompressed "
                               f"{ev_teacher['exact_match']:.3f})" if ev else "")))
    return summary


def _save_modules(model, names: list[str], path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    sd = {f"{n}.{k}": v.detach().clone().contiguous() for n in names
          for k, v in model.get_submodule(n).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path.with_suffix(".tmp")), metadata={"edgevlm": json.dumps({**meta, "parts": names})})
    path.with_suffix(".tmp").replace(path)


def load_attached(base, path: Path):
    """Re-attach a compressor trained by :func:`attach_and_distill` to the model it was trained on."""
    from ..modeling.checkpoint import fit_state_dict, load_state_dict, read_metadata

    meta = read_metadata(Path(path))
    model, names = attach(base, int(meta["n_tokens"]), int(meta["prefusion_layers"]))
    sd = load_state_dict(Path(path))
    for n in names:
        sub = {k[len(n) + 1:]: v for k, v in sd.items() if k.startswith(n + ".")}
        fit_state_dict(model.get_submodule(n), sub, str(path), fix=f"attach it to {meta.get('base')}")
    return model.eval()
