"""Teacher-forced (image, question, answer) training for any :class:`~edgevlm.modeling.vlm.VisionLanguageModel`.

A batch is built exactly as generation builds its prompt (the family's own ``splice``: LLaVA-Mini's
pre-fusion included), followed by the answer's tokens and EOS; the loss is on the answer tokens only,
each answer weighing the same. With a teacher VLM, :func:`~edgevlm.compress.distill.answer_kd_loss`
compares the two models' next-token distributions on those answer tokens — the teacher's prompt may
hold many more vision tokens than the student's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..compress.distill import answer_kd_loss
from ..processor import PromptPieces, tokenize_prompt


def answer_end_id(vlm) -> int:
    tok = vlm.require_tokenizer()
    return int(tok.eos_ids[0]) if tok.eos_ids else int(vlm.stop_ids()[0])


def encode_rows(vlm, rows: list[tuple[int, str, str]]) -> list[tuple[int, list[int], list[int], list[int]]]:
    """(image row, question, answer) -> (image row, ids before the image, ids after it, answer ids + EOS)."""
    tok, end = vlm.require_tokenizer(), answer_end_id(vlm)
    out = []
    for row, q, a in rows:
        p = tokenize_prompt(tok, vlm.prompt_spec, q)
        out.append((row, p.before, p.after, tok.encode(" " + a) + [end]))
    return out


def image_embeds(vlm, pixels: torch.Tensor) -> list[torch.Tensor]:
    """(B, V, 3, H, W) -> per image its (1, T_img, D) embeddings (batched through the tower when V = 1)."""
    dtype = next(vlm.vision.parameters()).dtype
    pixels = pixels.to(dtype)
    if pixels.shape[1] == 1 and type(vlm).encode_image in _BATCHABLE:
        emb = vlm.connector(vlm.vision(pixels[:, 0]))                               # (B, N', D)
        return [emb[i:i + 1] for i in range(emb.shape[0])]
    return [vlm.encode_image(pixels[i]) for i in range(pixels.shape[0])]


def _batchable():
    from ..modeling.llava_mini import LlavaMiniModel
    from ..modeling.vlm import VisionLanguageModel

    return {VisionLanguageModel.encode_image, LlavaMiniModel.encode_image}


_BATCHABLE = _batchable()


def answer_logits(vlm, pixels: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (S, L, V) and next-token labels (S, L) (-100 outside the answers) for encoded ``rows``."""
    imgs = image_embeds(vlm, pixels)
    seqs, labels = [], []
    emb = vlm.language_model.get_input_embeddings()
    dev = emb.weight.device
    for row, before, after, ans in rows:
        prompt = vlm.splice(PromptPieces(before, after, True), imgs[row])[0]            # (T, D)
        x = torch.cat([prompt, emb(torch.tensor(ans, device=dev))], 0)                 # (T + A, D)
        seqs.append(x)
        labels.append([-100] * prompt.shape[0] + ans)                                   # label[t] = token at t
    L = max(s.shape[0] for s in seqs)
    x = torch.stack([F.pad(s, (0, 0, 0, L - s.shape[0])) for s in seqs])                # (S, L, D)
    mask = torch.stack([(torch.arange(L) < s.shape[0]).long() for s in seqs]).to(dev)   # (S, L)
    lab = torch.tensor([lb + [-100] * (L - len(lb)) for lb in labels], device=dev)      # (S, L)
    logits = vlm.language_model(inputs_embeds=x, attention_mask=mask, use_cache=False).logits
    return logits, lab


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answers of the mean next-token cross-entropy on each answer's tokens."""
    tgt = labels[:, 1:]
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100,
                          reduction="none").view(tgt.shape)
    n = (tgt != -100).sum(1).clamp(min=1)
    return (tok.sum(1) / n).mean()


class VQAObjective(nn.Module):
    """``forward(batch)``: answer cross-entropy, plus ``alpha``·KD when the batch carries teacher logits."""

    def __init__(self, vlm, alpha: float = 0.0, temperature: float = 1.0):
        super().__init__()
        self.vlm, self.alpha, self.temperature = vlm, float(alpha), float(temperature)

    def forward(self, batch: dict) -> dict:
        logits, labels = answer_logits(self.vlm, batch["pixels"], batch["rows"])
        ce = answer_ce(logits, labels)
        if "teacher_logits" not in batch or self.alpha == 0:
            return {"loss": ce}
        kd = answer_kd_loss(logits, labels, batch["teacher_logits"], batch["teacher_labels"], self.temperature)
        return {"loss": (1 - self.alpha) * ce + self.alpha * kd}


class VQATask:
    """Questions of a :class:`~edgevlm.train.data.VQAData`, ``questions_per_image`` a sample (seeded picks).

    A sample is one image with its questions; the loop's global batch counts images.
    """

    metric = "val_exact_match"

    def __init__(self, name: str, vlm, data, identity: dict, seed: int = 0, questions_per_image: int = 4,
                 teacher=None, alpha: float = 0.0, temperature: float = 1.0, val=None, val_kinds=None,
                 objective: nn.Module | None = None):
        self.name, self.data, self.identity, self.seed = name, data, identity, seed
        self.qpi, self.teacher, self.val = questions_per_image, teacher, val
        self.val_kinds = val_kinds
        self.num_samples = len(data)
        self.module = objective or VQAObjective(vlm, alpha if teacher is not None else 0.0, temperature)
        self.module.train()
        self._student_pixels = data.pixels(vlm.image_spec)
        self._teacher_pixels = data.pixels(teacher.image_spec) if teacher is not None else None
        if val is None:
            self.metric = None

    @property
    def vlm(self):
        return self.module.vlm

    def picks(self, index: int, epoch: int) -> list[tuple[str, str, str]]:
        qa = self.data.qa[index]
        if self.qpi <= 0 or self.qpi >= len(qa):
            return list(qa)
        rng = np.random.default_rng([self.seed, epoch, int(index), 11])
        return [qa[j] for j in sorted(rng.choice(len(qa), self.qpi, replace=False))]

    def batch(self, indices, epoch: int) -> dict:
        idx = np.asarray(indices)
        raw = [(r, q, a) for r, i in enumerate(idx) for _, q, a in self.picks(int(i), epoch)]
        out = {"pixels": self._student_pixels[idx].float(), "rows": encode_rows(self.vlm, raw)}
        if self.teacher is not None:
            with torch.no_grad():
                t_logits, t_labels = answer_logits(self.teacher, self._teacher_pixels[idx].float(),
                                                   encode_rows(self.teacher, raw))
            out["teacher_logits"], out["teacher_labels"] = t_logits, t_labels
        return out

    def evaluate(self, module) -> dict:
        if self.val is None:
            return {}
        return {"val_exact_match": exact_match(module.vlm, self.val, kinds=self.val_kinds)["exact_match"]}


@torch.no_grad()
def exact_match(vlm, data, kinds=None, max_new_tokens: int = 12) -> dict:
    """Greedy answers scored by exact match, overall and per question kind (short-answer kinds by default)."""
    from ..modeling.vlm import GenerationConfig

    kinds = kinds or ("color", "shape", "count", "exists", "position", "qa")
    pix = data.pixels(vlm.image_spec)
    tok, end = vlm.require_tokenizer(), answer_end_id(vlm)
    per: dict[str, list[int]] = {}
    vlm.eval()
    for i in range(len(data)):
        emb = None
        for kind, q, a in data.qa[i]:
            if kind not in kinds:
                continue
            if emb is None:
                emb = vlm.encode_image(pix[i].float())
            p = tokenize_prompt(tok, vlm.prompt_spec, q)
            embeds = vlm.splice(PromptPieces(p.before, p.after, True), emb)
            ids = list(vlm.decode_tokens(embeds, GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=(end,))))
            per.setdefault(kind, []).append(int(tok.decode(ids).strip() == a))
    allv = [v for vs in per.values() for v in vs]
    return {"exact_match": float(np.mean(allv)) if allv else 0.0, "questions": len(allv),
            "per_kind": {k: float(np.mean(v)) for k, v in sorted(per.items())}}
