"""Train edgevlm's default VLM on the synthetic scenes task and save it as shipped weights.

``edgevlm train --model edgevlm_scenes`` reproduces models/weights/edgevlm_scenes.safetensors: a
byte-level BPE tokenizer is trained on the train split's text, then tower, compressor, projector and
decoder train together on (image, question, answer) triples with the loss on the answer tokens.
Seeded; the validation split picks the best epoch; the test split is never looked at.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import scenes

CAPTION_PROMPT = "describe the image."
SPECIAL = ["<s>", "</s>", "<pad>", "<image>"]
MARKUP = ["<box>", "</box>", "<point>", "</point>"]
# Units the tokenizer keeps whole: a 2-decimal coordinate, a word, digits, punctuation, whitespace.
PRE_TOKEN = r" ?[01]\.\d\d| ?[a-z]+| ?\d+| ?[^\sa-z\d]+|\s+"


def qa_pairs(split: str, index: int) -> tuple[scenes.Scene, list[tuple[str, str, str]]]:
    """Every (kind, question, answer) of a scene, the caption included (kind "caption")."""
    scene = scenes.make_scene(split, index)
    rng = np.random.default_rng([scenes.SPLIT_SEED[split], index, 7])
    return scene, scenes.questions(scene, rng) + [("caption", CAPTION_PROMPT, scenes.caption(scene))]


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE (`tokenizers`) whose pre-tokenizer keeps coordinates like 0.37 in one piece."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKEN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(MARKUP)
    return tok


def _pixels(img: Image.Image, spec) -> np.ndarray:
    """uint8 (H, W, 3) after the processor's resize (normalization happens in the training step)."""
    return np.asarray(img.resize((spec.size, spec.size), Image.BICUBIC), dtype=np.uint8)


def build_split(split: str, n: int, spec, log=print):
    """Images (n, H, W, 3) uint8 and, per image, its (kind, question, answer) list."""
    imgs = np.empty((n, spec.size, spec.size, 3), np.uint8)
    qas = []
    t0 = time.time()
    for i in range(n):
        scene, qa = qa_pairs(split, i)
        imgs[i] = _pixels(scenes.render(scene), spec)
        qas.append(qa)
        if (i + 1) % 5000 == 0:
            log(f"  rendered {i + 1}/{n} {split} scenes ({time.time() - t0:.0f} s)")
    return imgs, qas


def train_scenes_vlm(model_name: str = "edgevlm_scenes", out: Path | None = None, epochs: int = 4,
                     images_per_step: int = 32, questions_per_image: int = 0, lr: float = 2e-3,
                     train_images: int | None = None, val_images: int = 300, seed: int = 0, log=None) -> dict:
    import torch
    import torch.nn.functional as F

    from ..modeling.families import build_vlm
    from ..modeling.scenes_vlm import save
    from ..modeling.vlm import GenerationConfig
    from ..processor import ImageSpec, PromptPieces, TextTokenizer, tokenize_prompt
    from ..zoo import get_vlm_recipe

    log = log or (lambda msg: print(msg, flush=True))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    recipe = get_vlm_recipe(model_name)
    spec_img = recipe.image
    n_train = train_images or scenes.SPLIT_SIZES["train"]
    n_val = min(val_images, scenes.SPLIT_SIZES["val"])
    ispec = ImageSpec(**spec_img)
    log(f"rendering {n_train} train and {n_val} validation scenes at {ispec.size} px")
    tr_imgs, tr_qa = build_split("train", n_train, ispec, log)
    va_imgs, va_qa = build_split("val", n_val, ispec, log)

    texts = [f"{q} {a}" for qa in tr_qa for _, q, a in qa]
    hf_tok = train_tokenizer(texts, recipe.config["text"]["vocab_size"] - len(MARKUP))
    tokenizer = TextTokenizer(hf_tok, hf_tok.token_to_id("<s>"), (hf_tok.token_to_id("</s>"),), "trained")
    model = build_vlm(recipe, tokenizer=tokenizer).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tokenizer: {tokenizer.vocab_size} tokens; model: {n_params / 1e6:.2f}M parameters, "
        f"{model.connector.n_tokens} vision tokens")
    eos, pad = tokenizer.eos_ids[0], hf_tok.token_to_id("<pad>")
    pspec = model.prompt_spec

    def prompt_ids(question: str):
        p = tokenize_prompt(tokenizer, pspec, question)
        return p.before, p.after

    mean = torch.tensor(ispec.mean).view(1, 3, 1, 1)
    std = torch.tensor(ispec.std).view(1, 3, 1, 1)

    def pixels(batch_u8):
        x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).contiguous().float() / 255.0
        return (x - mean) / std

    emb = model.language_model.get_input_embeddings()

    def step_loss(img_u8, picks):
        """Mean next-token loss on the answers of ``picks`` [(image row, (kind, q, a))]."""
        vis = model.connector(model.vision(pixels(img_u8)))                         # (B, N, D)
        seqs, labels = [], []
        for row, (_, q, a) in picks:
            before, after = prompt_ids(q)
            ans = tokenizer.encode(" " + a) + [eos]
            seqs.append((row, before, after, ans))
        L = max(len(b) + vis.shape[1] + len(af) + len(an) for _, b, af, an in seqs)
        rows = []
        for row, before, after, ans in seqs:
            ids_b = torch.tensor(before)
            ids_a = torch.tensor(after + ans + [pad] * (L - len(before) - vis.shape[1] - len(after) - len(ans)))
            rows.append(torch.cat([emb(ids_b), vis[row], emb(ids_a)], 0))
            lab = [-100] * (len(before) + vis.shape[1] + len(after)) + ans
            labels.append(lab + [-100] * (L - len(lab)))
        x = torch.stack(rows)                                                          # (S, L, D)
        lab = torch.tensor(labels)
        mask = (lab != -100) | (torch.arange(L)[None] < torch.tensor(
            [len(b) + vis.shape[1] + len(af) for _, b, af, _ in seqs])[:, None])
        logits = model.language_model(inputs_embeds=x, attention_mask=mask.long(), use_cache=False).logits
        tgt = lab[:, 1:]
        tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                              reduction="none").view(tgt.shape)                           # (S, L-1)
        # Each answer weighs the same: a per-token mean would let 40-token box lists drown one-word answers.
        n = (tgt != -100).sum(1).clamp(min=1)
        return (tok.sum(1) / n).mean()

    @torch.no_grad()
    def val_exact_match() -> float:
        model.eval()
        hits = total = 0
        for i in range(n_val):
            for kind, q, a in va_qa[i]:
                if kind in ("detect", "point", "caption"):
                    continue
                pv = pixels(va_imgs[i:i + 1])
                before, after = prompt_ids(q)
                embeds = model.splice(PromptPieces(before, after, True), model.encode_image(pv))
                ids = list(model.decode_tokens(embeds, GenerationConfig(max_new_tokens=8, stop_ids=(eos,))))
                hits += tokenizer.decode(ids).strip() == a
                total += 1
        model.train()
        return hits / max(total, 1)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(n_train / images_per_step)
    total_steps, warm = epochs * steps_per_epoch, min(300, steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total_steps - warm))))
    best, best_sd, history = -1.0, None, []
    t0 = time.time()
    for epoch in range(epochs):
        order = rng.permutation(n_train)
        run_loss, t_ep = 0.0, time.time()
        for s in range(steps_per_epoch):
            idx = np.sort(order[s * images_per_step:(s + 1) * images_per_step])
            picks = []
            for row, i in enumerate(idx):
                qa = tr_qa[i]
                k = len(qa) if questions_per_image <= 0 else min(questions_per_image, len(qa))
                for j in rng.choice(len(qa), size=k, replace=False):
                    picks.append((row, qa[j]))
            loss = step_loss(tr_imgs[idx], picks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            run_loss += float(loss.detach())
            if (s + 1) % 50 == 0:
                log(f"  epoch {epoch + 1}/{epochs} step {s + 1}/{steps_per_epoch} loss {run_loss / (s + 1):.4f} "
                    f"({time.time() - t_ep:.0f} s)")
        em = val_exact_match()
        history.append({"epoch": epoch + 1, "loss": run_loss / steps_per_epoch, "val_exact_match": em,
                        "seconds": round(time.time() - t_ep, 1)})
        log(f"epoch {epoch + 1}: loss {run_loss / steps_per_epoch:.4f}, validation exact match {em:.3f} "
            f"({time.time() - t_ep:.0f} s)")
        if em > best:
            best = em
            best_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_sd)
    model.eval()
    facts = {"model": model_name, "dataset": "scenes", "trained_with": {
        "command": f"edgevlm train --model {model_name} --epochs {epochs}", "seed": seed, "epochs": epochs,
        "train_images": n_train, "images_per_step": images_per_step, "questions_per_image": questions_per_image,
        "lr": lr, "best_val_exact_match": best, "minutes": round((time.time() - t0) / 60, 1)},
        "history": history}
    out = Path(out or Path("models/weights") / f"{model_name}.safetensors")
    save(model, out, facts)
    log(f"saved {out} ({out.stat().st_size / 1e6:.1f} MB); best validation exact match {best:.3f}")
    return facts
