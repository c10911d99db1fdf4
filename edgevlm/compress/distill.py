"""Knowledge distillation: losses, a DeiT distillation token, and a sparse store of teacher logits.

- Soft-label KD (Hinton et al., https://arxiv.org/abs/1503.02531): ``T² · KL(p_T(teacher) ‖ p_T(student))``.
- Hard-label KD (DeiT, https://arxiv.org/abs/2012.12877): cross-entropy against the teacher's argmax.
- :class:`DistilledStudent`: a DeiT-style distillation token and head for any timm classifier; the two
  heads are averaged at inference.
- :class:`TeacherLogitStore`: TinyViT's fast distillation (https://arxiv.org/abs/2207.10666) — the
  teacher runs once; per epoch and sample its top-k logits, their indices, the probability mass outside
  them and the augmentation seed are stored in safetensors files, so any student later replays the
  same augmented view against the same targets without running the teacher.
- :func:`answer_kd_loss`: KD on a VLM's answer tokens only, for teacher and student sequences whose
  prompts differ in length (e.g. 16 vision tokens against 1).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _Choice
from ..errors import CheckpointError, ConfigError

# -- losses ---------------------------------------------------------------------------------------------


class KDKind(_Choice):
    NONE = "none"      # no teacher: plain cross-entropy on the labels (the baseline)
    SOFT = "soft"      # temperature-softened KL against the teacher's distribution
    HARD = "hard"      # cross-entropy against the teacher's top-1 class
    DEIT = "deit"      # a distillation token and head learn from the teacher (hard), the class head from labels


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, *,
                 teacher_probs: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(p ‖ softmax(s / T))`` averaged over rows; p = softmax(teacher / T) or given ``teacher_probs``.

    (B, C) logits. The T² keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    ``teacher_probs`` are targets already at temperature T (what :meth:`TeacherLogitStore.targets` gives).
    """
    if (teacher_logits is None) == (teacher_probs is None):
        raise ValueError("pass exactly one of teacher_logits and teacher_probs")
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)                      # (B, C)
    if teacher_probs is None:
        log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
        p = log_p.exp()
    else:
        p = teacher_probs.float()
        log_p = torch.log(p.clamp_min(1e-30))
    kl = (p * (log_p - log_q)).sum(-1)                                             # (B,)
    return kl.mean() * t * t


def hard_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, *,
                 teacher_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against the teacher's top-1 class (DeiT's hard distillation)."""
    if teacher_labels is None:
        teacher_labels = teacher_logits.argmax(-1)
    return F.cross_entropy(student_logits.float(), teacher_labels)


@dataclass(frozen=True)
class KDConfig:
    """How a student learns: ``loss = (1 - alpha) · CE(labels) + alpha · KD``; with ``kind=none`` only CE."""

    kind: KDKind = KDKind.SOFT
    alpha: float = 0.5
    temperature: float = 2.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", KDKind.parse(self.kind))
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"KD weight alpha={self.alpha} is out of range", "use a value in [0, 1]")
        if self.temperature <= 0:
            raise ConfigError(f"temperature {self.temperature} must be positive", "use e.g. 1 to 4")

    def loss(self, student_out, labels: torch.Tensor, teacher_probs: torch.Tensor | None) -> torch.Tensor:
        """``student_out``: (B, C) logits, or (class logits, distillation logits) from :class:`DistilledStudent`.
        ``teacher_probs``: (B, C) teacher distribution at ``temperature`` (None for ``kind=none``)."""
        cls_logits, dist_logits = student_out if isinstance(student_out, tuple) else (student_out, student_out)
        ce = F.cross_entropy(cls_logits.float(), labels, label_smoothing=self.label_smoothing)
        if self.kind is KDKind.NONE:
            return ce
        if teacher_probs is None:
            raise ConfigError(f"KD kind {self.kind.value} needs teacher targets", "pass a teacher or a logit store")
        if self.kind is KDKind.SOFT:
            kd = soft_kd_loss(dist_logits, teacher_probs=teacher_probs, temperature=self.temperature)
        else:  # hard, and DeiT's hard-label distillation token
            kd = hard_kd_loss(dist_logits, teacher_labels=teacher_probs.argmax(-1))
        return (1 - self.alpha) * ce + self.alpha * kd


# -- DeiT distillation token ------------------------------------------------------------------------------


class DistilledStudent(nn.Module):
    """A timm classifier with a DeiT distillation token: training returns (class logits, distillation logits),
    inference their average (DeiT, https://arxiv.org/abs/2012.12877).

    DeiT's token joins a ViT's sequence at the input. FastViT and TinyViT are hybrids whose early stages are
    convolutions with no token sequence, so here the learnable token attends over the student's final
    feature tokens (one attention-pooling step, as CaiT's class-attention reads its patches; no projections,
    so it adds C + 2C + C·K parameters) and feeds its own linear head; the backbone and its class head are
    the timm model's, unchanged. :meth:`backbone_state` is the plain timm
    checkpoint (class head only), which every exporter takes.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        dim = int(backbone.num_features)
        self.dist_token = nn.Parameter(torch.zeros(1, dim).normal_(0, 0.02))           # the token (its query)
        self.dist_norm = nn.LayerNorm(dim)
        self.dist_head = nn.Linear(dim, backbone.num_classes)

    def forward(self, x: torch.Tensor):
        feats = self.backbone.forward_features(x)                                   # (B, C, H, W) or (B, N, C)
        cls_logits = self.backbone.forward_head(feats)                              # (B, K)
        tokens = self.dist_norm(feats.flatten(2).transpose(1, 2) if feats.dim() == 4 else feats)   # (B, N, C)
        attn = torch.softmax(tokens @ self.dist_token[0] / tokens.shape[-1] ** 0.5, dim=1)        # (B, N)
        d = (attn.unsqueeze(-1) * tokens).sum(1) + self.dist_token                  # (B, C)
        dist_logits = self.dist_head(d)                                             # (B, K)
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2

    def backbone_state(self) -> dict:
        return self.backbone.state_dict()

    def dist_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}


# -- sparse teacher logits (TinyViT's fast distillation) -------------------------------------------------------


def sparse_topk(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C) logits -> top-k logits (B, k), their indices (B, k), and the probability mass at ``temperature``
    outside the top k, (B,)."""
    values, indices = torch.topk(logits.float(), k, dim=-1)
    lse_all = torch.logsumexp(logits.float() / temperature, dim=-1)
    lse_top = torch.logsumexp(values / temperature, dim=-1)
    rest = (-torch.expm1(lse_top - lse_all)).clamp_min(0.0)                            # 1 - Σ top-k p
    return values, indices, rest


def dense_targets(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int,
                  temperature: float) -> torch.Tensor:
    """The full (B, C) teacher distribution at ``temperature`` from its top-k: exact on the top k (their
    softmax scaled by 1 - rest), the remaining mass spread evenly over the other classes (TinyViT's
    reconstruction). With k = C it is softmax(logits / T) itself."""
    values, rest = values.float(), rest.float()
    k = values.shape[-1]
    top = torch.softmax(values / temperature, dim=-1) * (1 - rest)[:, None]            # (B, k)
    fill = (rest / max(num_classes - k, 1))[:, None] if num_classes > k else torch.zeros_like(rest)[:, None]
    out = fill.expand(-1, num_classes).clone()                                        # (B, C)
    return out.scatter(1, indices.long(), top)


STORE_FORMAT = 1


class TeacherLogitStore:
    """A directory of ``epoch_NNNN.safetensors`` files (``ids``, ``seeds``, ``values``, ``indices``, ``rest``)
    plus ``store.json``: the teacher, k, temperature, class count, data fingerprint and augmentation.

    Write: ``store = TeacherLogitStore.create(dir, meta)``; ``store.write_epoch(e, ids, seeds, logits)``.
    Read: ``store = TeacherLogitStore.open(dir)``; ``store.lookup(e, ids)`` -> seeds, targets (B, C).
    """

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), meta
        self._cache: dict[int, dict] = {}

    # -- facts
    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def epochs(self) -> int:
        return len(self.epoch_files())

    def epoch_file(self, epoch: int) -> Path:
        return self.path / f"epoch_{epoch:04d}.safetensors"

    def epoch_files(self) -> list[Path]:
        return sorted(self.path.glob("epoch_*.safetensors"))

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    # -- writing
    @classmethod
    def create(cls, path: Path, *, teacher: str, k: int, num_classes: int, temperature: float, data: dict,
               augmentation: dict, value_dtype: str = "float16") -> "TeacherLogitStore":
        if not 1 <= k <= num_classes:
            raise ConfigError(f"top-k {k} is out of range for {num_classes} classes", f"use 1..{num_classes}")
        if value_dtype not in ("float16", "float32"):
            raise ConfigError(f"store dtype {value_dtype!r}", "use float16 (TinyViT's) or float32")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": STORE_FORMAT, "teacher": teacher, "k": int(k), "num_classes": int(num_classes),
                "temperature": float(temperature), "data": data, "augmentation": augmentation,
                "value_dtype": value_dtype}
        (path / "store.json").write_text(json.dumps(meta, indent=2) + "\n")
        return cls(path, meta)

    def write_epoch(self, epoch: int, ids, seeds, logits: torch.Tensor) -> Path:
        """One epoch's targets: ``ids`` (N,) sample indices, ``seeds`` (N,) augmentation seeds, (N, C) logits."""
        from safetensors.torch import save_file

        if logits.shape[-1] != self.num_classes:
            raise ConfigError(f"teacher gives {logits.shape[-1]} classes, the store expects {self.num_classes}",
                              "use one teacher per store")
        values, indices, rest = sparse_topk(logits, self.k, self.temperature)
        index_dtype = torch.int16 if self.num_classes < 2 ** 15 else torch.int32
        vdtype = getattr(torch, self.meta["value_dtype"])
        # per sample: id (4 B), seed (8 B), k values and k indices (2 B each in FP16 / int16), rest mass (2 B)
        tensors = {"ids": torch.as_tensor(ids, dtype=torch.int32), "seeds": torch.as_tensor(seeds, dtype=torch.int64),
                   "values": values.to(vdtype), "indices": indices.to(index_dtype), "rest": rest.to(vdtype)}
        f = self.epoch_file(epoch)
        tmp = f.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"epoch": str(epoch), "k": str(self.k)})
        tmp.replace(f)
        self._cache.pop(epoch, None)
        return f

    # -- reading
    @classmethod
    def open(cls, path: Path) -> "TeacherLogitStore":
        path = Path(path)
        f = path / "store.json"
        if not f.is_file():
            raise CheckpointError(f"{path} is not a teacher-logit store (no store.json)",
                                  "write one with `edgevlm distill ... --store DIR` (the teacher runs once)")
        try:
            meta = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is not valid JSON ({e})", "write the store again") from None
        if meta.get("format") != STORE_FORMAT:
            raise CheckpointError(f"{path} has store format {meta.get('format')}, edgevlm reads {STORE_FORMAT}",
                                  "write the store again with this edgevlm")
        return cls(path, meta)

    def check_compatible(self, *, data: dict, num_classes: int, augmentation: dict, epochs: int,
                         temperature: float | None = None) -> None:
        """Before training: the store must hold this data set, label set, augmentation and enough epochs."""
        problems = []
        if self.meta["data"] != data:
            problems.append(f"it was written for data {self.meta['data']}, not {data}")
        if self.num_classes != num_classes:
            problems.append(f"its teacher has {self.num_classes} classes, the student {num_classes}")
        if self.meta["augmentation"] != augmentation:
            problems.append(f"its augmentation is {self.meta['augmentation']}, not {augmentation}")
        if temperature is not None and abs(self.temperature - temperature) > 1e-9 and self.k < self.num_classes:
            problems.append(f"its targets are at temperature {self.temperature}, not {temperature} "
                            "(top-k stores fix the temperature; k = number of classes does not)")
        missing = [e for e in range(epochs) if not self.epoch_file(e).is_file()]
        if missing:
            problems.append(f"it holds {self.epochs} epoch(s), the run needs {epochs} (missing epoch {missing[0]})")
        if problems:
            raise CheckpointError(f"teacher-logit store {self.path} does not fit this run: " + "; ".join(problems),
                                  "write a new store for this run (pass a fresh --store DIR), or match the run to it")

    def _epoch(self, epoch: int) -> dict:
        if epoch not in self._cache:
            from safetensors.torch import load_file

            f = self.epoch_file(epoch)
            if not f.is_file():
                raise CheckpointError(f"{self.path} has no epoch {epoch}", "write the store for as many epochs as the run")
            t = load_file(str(f))
            ids = t["ids"].long()
            order = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64)
            order[ids] = torch.arange(len(ids))
            self._cache = {epoch: {**t, "row": order}}      # one epoch in memory at a time
        return self._cache[epoch]

    def lookup(self, epoch: int, ids, temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(seeds (B,), teacher distribution (B, C)) for samples ``ids`` of ``epoch``.

        ``temperature`` other than the stored one is exact only when k = C (the full logits are stored)."""
        t = self._epoch(epoch)
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if int(ids.max()) >= len(t["row"]) or bool((t["row"][ids] < 0).any()):
            raise CheckpointError(f"{self.path} epoch {epoch} lacks some requested samples",
                                  "the store was written for another data set: write it again")
        rows = t["row"][ids]
        temp = self.temperature if temperature is None else float(temperature)
        values, indices = t["values"][rows], t["indices"][rows]
        if temp != self.temperature:
            if self.k < self.num_classes:
                raise ConfigError(f"the store's top-{self.k} targets are at temperature {self.temperature}",
                                  f"distill at --temperature {self.temperature} or write a new store")
            rest = torch.zeros(len(rows))
        else:
            rest = t["rest"][rows]
        return t["seeds"][rows], dense_targets(values, indices, rest, self.num_classes, temp)


def fingerprint(*arrays) -> str:
    """A short hash of arrays (a data set's identity in a store or checkpoint)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


# -- VLM answer-token KD ---------------------------------------------------------------------------------------


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(S, L) next-token labels (-100 outside answers) -> (S, L-1) bool: positions whose logits predict an
    answer token (logit at t predicts label at t + 1)."""
    return labels[:, 1:] != -100


def answer_kd_loss(student_logits: torch.Tensor, student_labels: torch.Tensor, teacher_logits: torch.Tensor,
                   teacher_labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft KD on answer tokens only: (S, L_s, V) and (S, L_t, V) logits whose prompts may differ in length;
    each row's answer positions are taken in order from both, so row lengths must agree per row.
    Each answer weighs the same (mean over its tokens, then over rows)."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ConfigError(f"student vocabulary {student_logits.shape[-1]} != teacher {teacher_logits.shape[-1]}",
                          "distill between models that share one tokenizer")
    ms, mt = answer_positions(student_labels), answer_positions(teacher_labels)
    if not torch.equal(ms.sum(1), mt.sum(1)):
        raise ValueError("teacher and student rows have different answer lengths")
    s = student_logits[:, :-1][ms]                                             # (A, V)
    t = teacher_logits[:, :-1][mt]                                             # (A, V)
    temp = float(temperature)
    kl = (F.softmax(t.float() / temp, -1) * (F.log_softmax(t.float() / temp, -1)
                                            - F.log_softmax(s.float() / temp, -1))).sum(-1)   # (A,)
    row = torch.repeat_interleave(torch.arange(ms.shape[0], device=kl.device), ms.sum(1))
    per_row = torch.zeros(ms.shape[0], device=kl.device).index_add(0, row, kl) / ms.sum(1).clamp(min=1)
    return per_row.mean() * temp * temp


def check_same_vocabulary(teacher, student) -> None:
    """Teacher and student VLMs must read and write the same token ids: same tokenizer, same logit width."""
    tv = teacher.language_model.get_output_embeddings().weight.shape[0]
    sv = student.language_model.get_output_embeddings().weight.shape[0]
    problems = []
    if tv != sv:
        problems.append(f"the teacher's language model has {tv} output tokens, the student's {sv}")
    tt, st = getattr(teacher, "tokenizer", None), getattr(student, "tokenizer", None)
    if tt is not None and st is not None and tt.tok.get_vocab(with_added_tokens=True) != \
            st.tok.get_vocab(with_added_tokens=True):
        problems.append("their tokenizers map text to different ids")
    if problems:
        raise ConfigError(f"teacher {teacher.name} and student {student.name} do not share a vocabulary: "
                          + "; ".join(problems),
                          "give the student the teacher's tokenizer and vocabulary size (answer-token KD compares "
                          "distributions over the same ids)")


def check_label_sets(teacher_labels: list[str], student_labels: list[str], teacher: str, data: str) -> None:
    """A classifier teacher must score the data's classes, in the data's order."""
    if list(teacher_labels) != list(student_labels):
        n_t, n_s = len(teacher_labels), len(student_labels)
        detail = (f"{n_t} classes against {n_s}" if n_t != n_s else
                  f"labels {teacher_labels[:5]}... against {student_labels[:5]}...")
        raise ConfigError(f"teacher {teacher} does not fit data {data}: {detail}",
                          "use a teacher trained on the same label set (e.g. `edgevlm train --model NAME` on digits)")
