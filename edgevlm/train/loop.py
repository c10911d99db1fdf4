"""One training loop for distillation and fine-tuning, on Hugging Face Accelerate.

The same code runs on a laptop (one process) and under ``accelerate launch`` on several GPUs or machines
(torch.distributed underneath; gloo on CPUs). What it guarantees:

- **Same global batch, same result.** Every process derives the epoch's order from the seed, takes its
  slice of each global batch and splits it into ``grad_accum`` micro-batches; DDP averages gradients, so
  one process and N processes (or gradient accumulation) take the same steps, up to float summation order.
  Augmentation is seeded per (epoch, sample), not per process. (BatchNorm statistics are per process, as
  in any DDP run; models with BatchNorm match within a looser tolerance.)
- **Resumable.** A checkpoint every ``save_every`` steps and at each epoch end: trainable weights and
  buffers, optimizer tensors (safetensors) and everything else as JSON — nothing is ever unpickled. A
  resumed run continues at the next global batch and reaches the weights of an uninterrupted run; a
  checkpoint from another model, data set or schedule is refused before any step is taken.
- **Seeded.** The learning rate is a function of the step (warmup + cosine), the data order a function
  of (seed, epoch): no hidden state to lose.

A :class:`Task` provides the module (its ``forward(batch)`` returns a dict with ``loss``), how to make a
batch from sample indices, and optionally an evaluation; teachers live in the task, outside the module,
so DDP never wraps or broadcasts them.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from ..errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """The schedule of one run. ``batch_size`` is the global batch: summed over processes and accumulation."""

    out: Path
    epochs: int = 1
    max_steps: int | None = None          # stop earlier than ``epochs`` (a step budget)
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    save_every: int = 0                   # steps between checkpoints (0: at each epoch end only)
    keep_checkpoints: int = 2
    resume: bool = False                  # continue from the newest checkpoint in out/checkpoints
    overwrite: bool = False               # delete existing checkpoints and start over
    select_best: bool = True              # keep the weights of the best evaluation (task.metric)
    eval_every_epoch: bool = True
    quiet: bool = False
    cpu: bool | None = None               # None: CPU when no accelerator is visible

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for name in ("epochs", "batch_size", "grad_accum"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1", f"pass a positive --{name.replace('_', '-')}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps={self.max_steps} must be at least 1", "pass a positive --steps")
        if self.lr <= 0:
            raise ConfigError(f"learning rate {self.lr} must be positive", "pass e.g. --lr 1e-3")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other", "pass one of them")

    def schedule(self) -> dict:
        """The fields a resumed run must share with the checkpoint."""
        return {k: getattr(self, k) for k in ("epochs", "max_steps", "batch_size", "lr", "weight_decay",
                                              "warmup_steps", "max_grad_norm", "seed")}


class Task(Protocol):
    name: str
    module: "torch.nn.Module"           # noqa: F821  forward(batch) -> {"loss": tensor, ...}
    num_samples: int
    metric: str | None                  # the evaluate() key to select on (higher is better), or None
    identity: dict                      # what the module and data are (checked on resume)

    def batch(self, indices: np.ndarray, epoch: int) -> dict: ...

    def evaluate(self, module) -> dict: ...


@dataclass
class TrainResult:
    steps: int
    epochs_run: int
    trainable_params: int
    total_params: int
    history: list = field(default_factory=list)        # per epoch: loss, metrics, seconds
    best: dict = field(default_factory=dict)
    seconds: float = 0.0
    processes: int = 1
    resumed_from: int | None = None
    checkpoint: str | None = None

    def summary_rows(self) -> list[dict]:
        last = self.history[-1] if self.history else {}
        rows = [{"item": "trainable parameters", "value": self.trainable_params},
                {"item": "total parameters", "value": self.total_params},
                {"item": "trainable share", "value": f"{100 * self.trainable_params / max(self.total_params, 1):.2f}%"},
                {"item": "steps", "value": self.steps}, {"item": "epochs", "value": self.epochs_run},
                {"item": "processes", "value": self.processes}]
        if self.resumed_from is not None:
            rows.append({"item": "resumed from step", "value": self.resumed_from})
        if "loss" in last:
            rows.append({"item": "last epoch loss", "value": round(last["loss"], 4)})
        secs = [h["seconds"] for h in self.history if h.get("full_epoch")]
        if secs:
            rows.append({"item": "seconds per epoch", "value": round(float(np.mean(secs)), 1)})
        for k, v in self.best.items():
            rows.append({"item": f"best {k}", "value": v})
        rows.append({"item": "wall time (s)", "value": round(self.seconds, 1)})
        if self.checkpoint:
            rows.append({"item": "checkpoint", "value": self.checkpoint})
        return rows


def count_parameters(module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to zero; a pure function of the step (nothing to checkpoint)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))


def is_main_process() -> bool:
    """True in the one process that writes files and prints tables (every process under `accelerate launch`
    runs the same command)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def train_mode(module) -> None:
    """``module.train()``, except that frozen BatchNorm layers keep their statistics (a frozen part stays as
    it was: fine-tuning the decoder must not drift the vision tower's running means)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    module.train()
    for m in module.modules():
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch), 7]).permutation(n)


# -- checkpoints (safetensors + JSON; never pickle) ---------------------------------------------------------


def trainable_state(module) -> dict:
    """Trainable parameters and floating buffers (e.g. BatchNorm statistics): what training changes."""
    out = {n: p for n, p in module.named_parameters() if p.requires_grad}
    out.update({n: b for n, b in module.named_buffers() if b.is_floating_point()})
    return {k: v.detach().clone().contiguous().cpu() for k, v in out.items()}


def _optimizer_tensors(opt) -> tuple[dict, dict]:
    import torch

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().clone().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _load_optimizer(opt, tensors: dict, info: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in info["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def list_checkpoints(out: Path) -> list[Path]:
    d = Path(out) / "checkpoints"
    return sorted(p for p in d.glob("step_*") if (p / "state.json").is_file()) if d.is_dir() else []


def save_checkpoint(out: Path, step: int, module, opt, state: dict, keep: int = 2) -> Path:
    """Write step_NNNNNNN/ atomically (a temporary directory renamed into place); keep the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
    tensors, info = _optimizer_tensors(opt)
    tensors["__rng__.torch"] = torch.get_rng_state().clone()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(info) + "\n")
    (tmp / "state.json").write_text(json.dumps({**state, "format": CHECKPOINT_FORMAT, "step": step}, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _check_resumable(ckpt: Path, state: dict, expect: dict) -> None:
    problems = []
    if state.get("format") != CHECKPOINT_FORMAT:
        problems.append(f"format {state.get('format')} (this edgevlm writes {CHECKPOINT_FORMAT})")
    for key in ("task", "identity", "schedule"):
        if state.get(key) != expect[key]:
            if isinstance(expect[key], dict) and isinstance(state.get(key), dict):
                diff = sorted(k for k in set(expect[key]) | set(state[key]) if expect[key].get(k) != state[key].get(k))
                problems.append(f"{key} differs in {', '.join(diff[:6])} "
                                f"(checkpoint {[state[key].get(k) for k in diff[:3]]}, "
                                f"this run {[expect[key].get(k) for k in diff[:3]]})")
            else:
                problems.append(f"{key} {state.get(key)!r} vs {expect[key]!r}")
    if state.get("trainable") != expect["trainable"]:
        a, b = state.get("trainable") or {}, expect["trainable"]
        diff = sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if a[k] != b[k])
        problems.append(f"trainable tensors differ ({len(diff)}: {', '.join(diff[:4])})")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} does not fit this run: " + "; ".join(problems),
                              "resume with the command that wrote it, or start over with --overwrite "
                              "(or another --out)")


def _load_checkpoint(ckpt: Path, module, opt) -> dict:
    import torch
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(str(ckpt / "trainable.safetensors"))
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    rng = tensors.pop("__rng__.torch", None)
    _load_optimizer(opt, tensors, json.loads((ckpt / "optimizer.json").read_text()))
    if rng is not None:
        torch.set_rng_state(rng)
    return state


# -- the loop ----------------------------------------------------------------------------------------------


def _accelerator(cfg: TrainConfig):
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs
    except ImportError:
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError("training needs Hugging Face Accelerate", "pip install 'edgevlm[train]'") from None
    import torch

    cpu = (not torch.cuda.is_available()) if cfg.cpu is None else cfg.cpu
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def _batch_plan(task: Task, cfg: TrainConfig, processes: int) -> tuple[int, int, int]:
    """(samples per micro-batch in each process, steps per epoch, total steps), or a ConfigError."""
    per_proc, rem = divmod(cfg.batch_size, processes * cfg.grad_accum)
    if rem or per_proc < 1:
        raise ConfigError(f"global batch {cfg.batch_size} does not split over {processes} process(es) x "
                          f"{cfg.grad_accum} accumulation step(s)",
                          f"use a batch size that is a multiple of {processes * cfg.grad_accum}")
    steps_per_epoch = task.num_samples // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"{task.num_samples} training samples are fewer than one global batch of {cfg.batch_size}",
                          "lower --batch-size or use more data")
    total = steps_per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    return per_proc, steps_per_epoch, total


class _Run:
    """The state of one :func:`fit` call, with its stages: setup, one training step, the end of an epoch
    (evaluation), checkpointing and the final result."""

    def __init__(self, task: Task, cfg: TrainConfig, log: Callable[[str], None] | None) -> None:
        """Setup: the accelerator and batch plan, existing checkpoints, the optimizer, resuming, Accelerate's wrap."""
        import torch
        from accelerate.utils import set_seed

        self.task, self.cfg = task, cfg
        self.acc = acc = _accelerator(cfg)
        self.main = acc.is_main_process
        self.say = ((log or (lambda m: print(m, file=sys.stderr, flush=True))) if self.main and not cfg.quiet
                    else (lambda m: None))
        self.P = acc.num_processes
        self.per_proc, self.steps_per_epoch, self.total = _batch_plan(task, cfg, self.P)

        module = task.module
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(f"{task.name}: nothing to train (every parameter is frozen)",
                              "pick a mode that trains a part")
        self.trainable, self.n_total = count_parameters(module)
        self.names = {n: list(p.shape) for n, p in module.named_parameters() if p.requires_grad}
        expect = {"task": task.name, "identity": task.identity, "schedule": cfg.schedule(), "trainable": self.names}

        existing = list_checkpoints(cfg.out)
        if existing and not (cfg.resume or cfg.overwrite):
            raise ConfigError(f"{cfg.out} already holds checkpoints (newest {existing[-1].name})",
                              "pass --resume to continue that run, --overwrite to start over, or another --out")
        if cfg.overwrite and self.main:
            shutil.rmtree(cfg.out / "checkpoints", ignore_errors=True)
        acc.wait_for_everyone()

        set_seed(cfg.seed)
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.raw_opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                          {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.start, self.history, self.best = 0, [], {}
        self.resumed_from = None
        if cfg.resume and existing:
            self._resume(existing[-1], expect)
        self.best_file = cfg.out / "checkpoints" / "best.safetensors"

        self.model, self.opt = acc.prepare(module, self.raw_opt)
        self.say(f"{task.name}: {self.trainable:,} trainable of {self.n_total:,} parameters; {self.total} steps of "
                 f"{cfg.batch_size} ({self.P} process(es) x {cfg.grad_accum} accumulation x {self.per_proc} per "
                 "micro-batch)")

        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=self.start, desc=task.name, unit="step",
                        disable=cfg.quiet or not self.main, file=sys.stderr, dynamic_ncols=True, leave=False)
        self.t0 = time.time()
        self.step = self.start
        self.epoch_loss, self.epoch_t0, self.updating = [], time.time(), False

    def _resume(self, ckpt: Path, expect: dict) -> None:
        """Check the newest checkpoint fits this run, then load its weights, optimizer, RNG and history."""
        state = json.loads((ckpt / "state.json").read_text())
        _check_resumable(ckpt, state, expect)              # before any compute
        state = _load_checkpoint(ckpt, self.task.module, self.raw_opt)
        self.start, self.history, self.best = int(state["step"]), state.get("history", []), state.get("best", {})
        self.resumed_from = self.start
        self.say(f"resuming {self.task.name} from {ckpt} (step {self.start}/{self.total})")

    def train_step(self) -> tuple[int, dict]:
        """One optimizer step on this process's slice of the next global batch; returns (epoch, logs)."""
        import torch

        cfg, acc, model, opt, per_proc = self.cfg, self.acc, self.model, self.opt, self.per_proc
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        order = epoch_order(cfg.seed, epoch, self.task.num_samples)
        glob = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        mine = glob[acc.process_index * per_proc * cfg.grad_accum:(acc.process_index + 1) * per_proc * cfg.grad_accum]
        lr = lr_at(self.step, self.total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for m in range(cfg.grad_accum):
            micro = mine[m * per_proc:(m + 1) * per_proc]
            batch = self.task.batch(micro, epoch)
            ctx = acc.no_sync(model) if m < cfg.grad_accum - 1 else nullcontext()
            with ctx:
                out = model(batch)
                acc.backward(out["loss"] / cfg.grad_accum)
            loss_sum += float(out["loss"].detach()) / cfg.grad_accum
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.updating = True
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.updating = False
        self.step += 1
        loss = float(acc.reduce(torch.tensor(loss_sum), "mean")) if self.P > 1 else loss_sum
        self.epoch_loss.append(loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        return epoch, {"loss": loss, "lr": lr, "epoch": epoch}

    def _evaluate(self, rec: dict, epoch: int) -> None:
        """Add the task's evaluation to ``rec`` and keep the best weights by its metric (main process only)."""
        import torch

        cfg, best = self.cfg, self.best
        unwrapped = self.acc.unwrap_model(self.model)
        unwrapped.eval()
        with torch.no_grad():
            rec.update(self.task.evaluate(unwrapped))
        train_mode(unwrapped)
        metric = getattr(self.task, "metric", None)
        if metric and metric in rec and rec[metric] > best.get(metric, -math.inf):
            best.clear()
            best.update({metric: rec[metric], "epoch": epoch + 1, "step": self.step})
            if cfg.select_best:
                from safetensors.torch import save_file

                self.best_file.parent.mkdir(parents=True, exist_ok=True)
                save_file(trainable_state(unwrapped), str(self.best_file.with_suffix(".tmp")))
                self.best_file.with_suffix(".tmp").replace(self.best_file)

    def end_epoch(self, epoch: int, full: bool) -> None:
        """Record the epoch (loss, time, evaluation), report it, and start the next epoch's tally."""
        cfg = self.cfg
        rec = {"epoch": epoch + 1, "step": self.step,
               "loss": float(np.mean(self.epoch_loss)) if self.epoch_loss else float("nan"),
               "seconds": round(time.time() - self.epoch_t0, 2), "full_epoch": full}
        if cfg.eval_every_epoch and hasattr(self.task, "evaluate") and self.main:
            self._evaluate(rec, epoch)
        self.history.append(rec)
        self.say(f"  epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in rec.items() if k not in ("epoch", "full_epoch")))
        self.epoch_loss, self.epoch_t0 = [], time.time()

    def checkpoint(self) -> Path | None:
        """Save a checkpoint at the current step (main process) and wait for every process."""
        path = None
        if self.main:
            state = {"task": self.task.name, "identity": self.task.identity, "schedule": self.cfg.schedule(),
                     "trainable": self.names, "history": self.history, "best": self.best,
                     "epoch": self.step // self.steps_per_epoch}
            path = save_checkpoint(self.cfg.out, self.step, self.acc.unwrap_model(self.model), self.raw_opt, state,
                                   self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def save_on_interrupt(self) -> None:
        """After Ctrl+C in a one-process run: checkpoint the last finished step, unless it is already saved."""
        out, step = self.cfg.out, self.step
        if self.main and self.P == 1 and not self.updating and step > self.start and not (
                list_checkpoints(out) and list_checkpoints(out)[-1].name == f"step_{step:07d}"):
            path = self.checkpoint()
            self.say(f"interrupted: saved {path}; rerun with --resume to continue")

    def result(self) -> TrainResult:
        """Leave the best weights (if selected) in the module, in eval mode, and return the run's record."""
        import torch

        unwrapped = self.acc.unwrap_model(self.model)
        if self.cfg.select_best and self.best and self.best_file.is_file():
            from safetensors.torch import load_file

            with torch.no_grad():
                own = dict(unwrapped.named_parameters()) | dict(unwrapped.named_buffers())
                for k, v in load_file(str(self.best_file)).items():
                    own[k].copy_(v)
        unwrapped.eval()
        last = list_checkpoints(self.cfg.out)
        return TrainResult(steps=self.step, epochs_run=math.ceil(self.step / self.steps_per_epoch),
                           trainable_params=self.trainable, total_params=self.n_total, history=self.history,
                           best=dict(self.best), seconds=time.time() - self.t0, processes=self.P,
                           resumed_from=self.resumed_from, checkpoint=str(last[-1]) if last else None)


def fit(task: Task, cfg: TrainConfig, callbacks: tuple[Callable[[int, dict], None], ...] = (),
        log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``task.module`` in place; returns the run's record (and leaves the best weights in the module
    when ``cfg.select_best`` and the task has a metric)."""
    run = _Run(task, cfg, log)
    train_mode(run.model)
    try:
        while run.step < run.total:
            epoch, logs = run.train_step()
            epoch_done = run.step % run.steps_per_epoch == 0 or run.step == run.total
            if epoch_done:
                run.end_epoch(epoch, full=run.step % run.steps_per_epoch == 0)
            if (cfg.save_every and run.step % cfg.save_every == 0) or epoch_done:
                run.checkpoint()
            for cb in callbacks:
                cb(run.step, logs)
    except KeyboardInterrupt:
        run.save_on_interrupt()
        raise
    finally:
        run.bar.close()
    return run.result()


def summary_table(result: TrainResult, title: str) -> str:
    from ..report import table

    return table(result.summary_rows(), ["item", "value"], title=title)


def config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["out"] = str(cfg.out)
    return d
