"""Distillation, measured: does the teacher help, and what does a stored teacher cost?

Digits (scikit-learn's real handwritten digits, held-out test split): a FastViT-T8 student trained from
scratch, with a live teacher (soft KD), and from a TinyViT-style sparse logit store written once by the
same teacher — test accuracy of each, time per epoch, the store's size.

    python benchmarks/distill_report.py --epochs 10                      # digits
    python benchmarks/distill_report.py --skip-digits --vlm --steps 300 --limit 2000   # the scenes task

``--vlm``: on the scenes task (edgevlm's default VLM's task), a many-token teacher is trained, then a
1-token student is trained from scratch and distilled from it (same init, same steps); and a 1-token
compressor is attached to the trained teacher and trained alone by distillation. Reduced sizes
(``--steps``, ``--limit``) run in minutes on a CPU; the report says which sizes were run.

Writes benchmarks/results/distill_report.json (sections merged, so parts can run separately) and prints
tables.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgevlm.report import table, write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "distill_report.json"


def digits_section(args) -> dict:
    import torch

    from edgevlm.compress.distill import KDConfig
    from edgevlm.modeling.vision import load_backbone
    from edgevlm.train.data import load_classification
    from edgevlm.train.distill import BackboneDistillConfig, accuracy, distill_backbone
    from edgevlm.train.loop import TrainConfig

    work = Path(args.work)
    data = load_classification("digits")
    tb = load_backbone(args.teacher, args.teacher_weights)
    teacher_test = accuracy(tb.model, *data.split("test"))
    n_t = sum(p.numel() for p in tb.model.parameters())
    print(f"teacher {args.teacher} ({tb.weights['source']}, {n_t / 1e6:.2f}M params): test accuracy {teacher_test:.4f}",
          flush=True)

    def run(name, kd, store=None, teacher=args.teacher):
        tc = TrainConfig(work / name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         warmup_steps=args.warmup, overwrite=True, quiet=args.quiet)
        t0 = time.time()
        r = distill_backbone(BackboneDistillConfig(args.student, tc, teacher=teacher, teacher_weights=args.teacher_weights,
                                                   kd=kd, store=store, top_k=args.k))
        r["wall_seconds"] = round(time.time() - t0, 1)
        return r

    kd = KDConfig("soft", alpha=args.alpha, temperature=args.temperature)
    runs = {}
    runs["scratch"] = run("scratch", KDConfig("none"), teacher=None)
    runs["live teacher (soft KD)"] = run("live", kd)
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    runs["stored teacher (soft KD)"] = run("stored", kd, store=store)
    if args.deit:
        runs["stored teacher (DeiT token)"] = run("deit", KDConfig("deit", alpha=0.5, temperature=args.temperature),
                                                  store=store)
    rows = []
    for name, r in runs.items():
        hist = [h for h in r["train"]["history"] if h.get("full_epoch")]
        rows.append({"run": name, "teacher": "-" if r["teacher"] is None else
                     (f"store top-{r['teacher']['k']}" if "store" in r["teacher"] else r["teacher"]["model"]),
                     "val acc": round(100 * r["val_accuracy"], 2), "test acc": round(100 * r["test_accuracy"], 2),
                     "s / epoch": round(sum(h["seconds"] for h in hist) / max(len(hist), 1), 1),
                     "store MB": round(r["store"]["bytes"] / 1e6, 3) if r.get("store") else None})
    st = runs["stored teacher (soft KD)"]["store"]
    n_train = len(data.split("train")[1])
    dense_bytes = n_train * args.epochs * len(data.labels) * 4
    res = {"student": args.student, "teacher": {"model": args.teacher, "weights": tb.weights["source"],
                                                "params": n_t, "test_accuracy": teacher_test},
           "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "kd": {"alpha": args.alpha, "temperature": args.temperature, "top_k": args.k},
           "threads": torch.get_num_threads(), "train_images": n_train,
           "store": {**st, "dense_fp32_bytes": dense_bytes}, "rows": rows,
           "runs": {k: {kk: v for kk, v in r.items() if kk != "train"} | {"history": r["train"]["history"]}
                    for k, r in runs.items()}}
    print(table(rows, title=f"{args.student} on digits, {args.epochs} epochs, held-out test split (360 images); "
                f"teacher {args.teacher} test {100 * teacher_test:.2f}%"))
    print(f"store: {st['bytes'] / 1e3:.1f} kB for {args.epochs} epochs x {n_train} images, top-{args.k} "
          f"(dense FP32 logits would be {dense_bytes / 1e3:.1f} kB); written once in {st['seconds']} s "
          f"({st['seconds_per_epoch']} s per epoch)")
    return res


def targets_section(args) -> dict:
    """Seconds to produce one epoch of KD targets (augmented views + teacher distributions) from the live teacher
    and from the store, measured back to back (alternating, twice) so the shared CPU's load hits both alike."""
    from edgevlm.compress.distill import KDConfig, TeacherLogitStore
    from edgevlm.modeling.vision import load_backbone
    from edgevlm.train.data import SeededAffine, load_classification
    from edgevlm.train.distill import ClassifierTask

    import shutil

    from edgevlm.train.distill import write_teacher_store

    data = load_classification("digits")
    teacher = load_backbone(args.teacher, args.teacher_weights).model.eval()
    path = Path(args.work) / "store_timing"
    shutil.rmtree(path, ignore_errors=True)
    written = write_teacher_store(teacher, args.teacher, data, path, args.store_epochs, args.k, args.temperature,
                                  args.seed, SeededAffine(), log=lambda m: None)
    store = TeacherLogitStore.open(path)
    kd = KDConfig("soft", alpha=args.alpha, temperature=args.temperature)
    n = len(data.split("train")[1])
    times = {"live teacher": [], "stored teacher": []}
    for _ in range(2):
        for name in times:
            task = ClassifierTask("t", torch_nn_identity(), data, kd, args.seed, SeededAffine(),
                                  teacher=teacher if name == "live teacher" else None,
                                  store=store if name == "stored teacher" else None)
            t0 = time.time()
            for i in range(0, n - args.batch_size + 1, args.batch_size):
                task.batch(list(range(i, i + args.batch_size)), 0)
            times[name].append(time.time() - t0)
    res = {k: round(min(v), 2) for k, v in times.items()}
    per_sample = store.size_bytes() / (n * args.store_epochs)
    print(table([{"targets from": k, "s / epoch": v} for k, v in res.items()],
                title=f"one epoch of KD targets for {n} training digits (best of 2, alternating)"))
    print(f"store: {store.size_bytes() / 1e3:.1f} kB for {args.store_epochs} epoch(s) x {n} images, top-{args.k} "
          f"({per_sample:.1f} B per sample and epoch; dense FP32 logits: {4 * len(data.labels)} B), written in "
          f"{written['seconds_per_epoch']} s per epoch")
    return {"seconds_per_epoch": res, "runs": times, "store_bytes": store.size_bytes(), "store_epochs": args.store_epochs,
            "bytes_per_sample_epoch": round(per_sample, 1), "dense_fp32_bytes_per_sample": 4 * len(data.labels),
            "top_k": store.k, "write_seconds_per_epoch": written["seconds_per_epoch"]}


def torch_nn_identity():
    import torch

    return torch.nn.Identity()


def tower_stage(vlm, args, steps: int | None = None) -> int:
    """edgevlm_scenes' own first stage (edgevlm/train/scenes_vlm.py): the tower alone learns what sits in each
    cell of its feature grid (shape, colour, box), ``--tower-batch`` images a step (default: the recipe's
    ``tower_batch``; the shapes are learned per update, so small batches and many steps learn them sooner).
    Returns the batch it used."""
    import numpy as np

    from edgevlm.modeling.scenes_vlm import grid_side
    from edgevlm.processor import ImageSpec
    from edgevlm.train.scenes_vlm import build_split, cell_head, pixel_normalizer, train_tower
    from edgevlm.zoo import get_vlm_recipe

    recipe = get_vlm_recipe("edgevlm_scenes")
    spec = ImageSpec(**recipe.image)
    grid = grid_side(recipe)
    imgs, _, cells = build_split("train", args.limit, spec, log=lambda m: None, grid=grid)
    vimgs, _, vcells = build_split("val", 100, spec, log=lambda m: None, grid=grid)
    t0 = time.time()
    steps = steps or args.tower_steps
    batch = args.tower_batch or recipe.training.get("tower_batch", 64)
    acc = train_tower(vlm.vision, cell_head(vlm.vision), imgs, cells, vimgs, vcells, pixel_normalizer(spec),
                      steps, args.vlm_lr, np.random.default_rng(args.seed), log=lambda m: None, batch=batch)
    print(f"tower stage: {steps} steps of {batch} images in {time.time() - t0:.0f} s; validation cells {acc}",
          flush=True)
    return batch


def vlm_section(args) -> dict:
    """Scenes task, short-answer questions (colour, shape, count, exists, position), reduced size."""
    import torch

    from edgevlm.modeling.families import build_vlm, load_vlm
    from edgevlm.processor import TextTokenizer
    from edgevlm.train.data import SHORT_KINDS, load_vqa
    from edgevlm.train.distill import (AttachConfig, VLMDistillConfig, attach_and_distill, build_student, distill_vlm,
                                       student_recipe)
    from edgevlm.train.loop import TrainConfig, fit
    from edgevlm.train.scenes_vlm import MARKUP, train_tokenizer
    from edgevlm.train.vqa import VQATask, exact_match

    work = Path(args.work) / "vlm"
    kinds = SHORT_KINDS
    data = load_vqa("scenes", "train", args.limit, kinds)
    val = load_vqa("scenes", "val", args.eval_limit, kinds)
    test = load_vqa("scenes", "test", args.eval_limit, kinds)

    def tc(name, steps):
        return TrainConfig(work / name, epochs=max(1, -(-steps * args.vlm_batch_size // len(data))), max_steps=steps,
                           batch_size=args.vlm_batch_size, lr=args.vlm_lr, warmup_steps=min(50, steps // 10),
                           seed=args.seed, overwrite=True, quiet=args.quiet)

    t0 = time.time()
    if args.teacher_vlm_weights:
        teacher = load_vlm("edgevlm_scenes", weights=args.teacher_vlm_weights)
        teacher_how = f"loaded {args.teacher_vlm_weights}"
    else:
        texts = [f"{q} {a}" for qa in load_vqa("scenes", "train", args.limit).qa for _, q, a in qa]
        hf_tok = train_tokenizer(texts, 640 - len(MARKUP))
        tok = TextTokenizer(hf_tok, hf_tok.token_to_id("<s>"), (hf_tok.token_to_id("</s>"),), "trained")
        recipe, _ = student_recipe(VLMDistillConfig("edgevlm_scenes", tc("teacher", 1),
                                                    vision_tokens=args.teacher_tokens))
        torch.manual_seed(args.seed)
        teacher = build_vlm(recipe, tokenizer=tok).train()
        if args.tower_steps:
            tower_stage(teacher, args)
        task = VQATask("teacher", teacher, data, {"teacher": args.teacher_tokens}, seed=args.seed, val=val)
        fit(task, tc("teacher", args.teacher_steps or 2 * args.steps))
        teacher = task.module.vlm.eval()
        teacher_how = (f"trained here: {args.tower_steps} tower steps (dense cells) + "
                       f"{args.teacher_steps or 2 * args.steps} steps")
    teacher_s = round(time.time() - t0, 1)
    for p in teacher.parameters():
        p.requires_grad_(False)

    rows, runs = [], {}

    def score(name, vlm, n_tokens, trainable, seconds, how):
        vlm.eval()
        v, t = exact_match(vlm, val), exact_match(vlm, test)
        runs[name] = {"vision_tokens": n_tokens, "trainable_params": trainable, "seconds": seconds, "how": how,
                      "val": v, "test": t}
        rows.append({"model": name, "vision tokens": n_tokens, "trained": how, "val EM %": round(100 * v["exact_match"], 1),
                     "test EM %": round(100 * t["exact_match"], 1),
                     **{f"{k} %": round(100 * x, 1) for k, x in t["per_kind"].items()}, "train s": seconds})

    score("teacher", teacher, teacher.connector.n_tokens, sum(p.numel() for p in teacher.parameters()), teacher_s,
          teacher_how)
    init, init_how = None, ""
    if args.student_tower_steps:
        # Both students start from one label-only stage 1 (the recipe's dense tower stage): from random
        # weights, no teacher; only stage 2 differs (answers alone, or answers + the teacher's).
        scfg = VLMDistillConfig("edgevlm_scenes", tc("student-init", 1), vision_tokens=1)
        student, _, _, _ = build_student(scfg, teacher)
        t1 = time.time()
        batch = tower_stage(student, args, steps=args.student_tower_steps)
        init = work / "student-init.safetensors"
        init.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({k: v.detach().clone().contiguous() for k, v in student.state_dict().items()}, str(init))
        init_how = f"{args.student_tower_steps} label-only tower steps of {batch} images ({time.time() - t1:.0f} s), then "
    for name, alpha in (("1-token student, scratch", 0.0), ("1-token student, distilled", args.vlm_alpha)):
        cfg = VLMDistillConfig("edgevlm_scenes", tc(name.split(", ")[1], args.steps), vision_tokens=1, alpha=alpha,
                               temperature=args.vlm_temperature, limit=args.limit, val_limit=args.eval_limit,
                               kinds=kinds, init_weights=init)
        r = distill_vlm(cfg, teacher=teacher, log=print if not args.quiet else (lambda m: None))
        from edgevlm.train.distill import load_distilled_vlm

        score(name, load_distilled_vlm(r["weights"]), 1, r["trainable_params"], r["seconds"],
              init_how + f"{r['steps']} steps, all parameters" + (f", KD alpha {alpha}" if alpha else ", no teacher"))
    cfg = AttachConfig("edgevlm_scenes", tc("attach", args.steps), n_tokens=1, prefusion_layers=0, limit=args.limit,
                       val_limit=args.eval_limit, alpha=1.0, temperature=args.vlm_temperature, kinds=kinds)
    r = attach_and_distill(cfg, base=teacher, log=print if not args.quiet else (lambda m: None))
    from edgevlm.train.distill import load_attached

    score("teacher + attached 1-token compressor", load_attached(teacher, r["weights"]), 1, r["trainable_params"],
          r["seconds"], f"{r['steps']} steps, compressor only, KD from the teacher")
    print(table(rows, title=f"scenes task (short answers), {len(data)} training scenes, {args.steps} steps per "
                f"student, batch {args.vlm_batch_size} images x 4 questions; exact match on {len(test)} test scenes"))
    return {"kinds": list(kinds), "train_scenes": len(data), "eval_scenes": args.eval_limit, "steps": args.steps,
            "tower_steps": 0 if args.teacher_vlm_weights else args.tower_steps,
            "student_tower_steps": args.student_tower_steps,
            "teacher_steps": args.teacher_steps or 2 * args.steps, "batch_images": args.vlm_batch_size,
            "lr": args.vlm_lr, "alpha": args.vlm_alpha, "temperature": args.vlm_temperature, "rows": rows, "runs": runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="fastvit_t8")
    p.add_argument("--teacher", default="tiny_vit_5m_224")
    p.add_argument("--teacher-weights", default=None, help="default: the teacher's shipped digits weights")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=19)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--k", type=int, default=3, help="top-k logits kept per sample in the store")
    p.add_argument("--deit", action="store_true", help="also train the DeiT distillation-token student")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--store-epochs", type=int, default=2, help="--targets: epochs in the timed store")
    p.add_argument("--targets", action="store_true", help="time one epoch of KD targets: live teacher vs a freshly "
                   "written store")
    p.add_argument("--vlm", action="store_true", help="the scenes-task part (1-token student, attached compressor)")
    p.add_argument("--steps", type=int, default=300, help="VLM: optimizer steps per run")
    p.add_argument("--limit", type=int, default=2000, help="VLM: training scenes")
    p.add_argument("--eval-limit", type=int, default=100, help="VLM: validation scenes scored")
    p.add_argument("--teacher-tokens", type=int, default=16)
    p.add_argument("--teacher-vlm-weights", help="VLM: a trained edgevlm_scenes file as the teacher (else trained here)")
    p.add_argument("--vlm-batch-size", type=int, default=8)
    p.add_argument("--vlm-lr", type=float, default=2e-3)
    p.add_argument("--vlm-alpha", type=float, default=0.5)
    p.add_argument("--vlm-temperature", type=float, default=1.0)
    p.add_argument("--teacher-steps", type=int, help="VLM: teacher training steps (default 2 x --steps)")
    p.add_argument("--tower-steps", type=int, default=600, help="VLM: the teacher's dense tower stage first (0: none)")
    p.add_argument("--tower-batch", type=int, help="VLM: images per tower-stage step (default: the recipe's)")
    p.add_argument("--student-tower-steps", type=int, default=600, help="VLM: the students' shared label-only dense "
                   "tower stage before their answer training (0: none, students start from random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="/tmp/edgevlm-distill-report")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", type=Path, default=OUT)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cmd = "python benchmarks/distill_report.py " + " ".join(argv or sys.argv[1:])

    def save(section: str, value: dict) -> None:
        # re-read before writing: parts may run separately (even at the same time) into one file
        res = json.loads(args.json.read_text()) if args.json.is_file() else {}
        res[section] = {**value, "command": cmd, "threads": args.threads,
                        "machine": "2-vCPU VM shared with other jobs; times are indicative"}
        write_json(args.json, res)

    if not args.skip_digits:
        save("digits", digits_section(args))
    if args.targets:
        save("targets", targets_section(args))
    if args.vlm:
        save("scenes", vlm_section(args))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
