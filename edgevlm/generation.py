"""Generation options, statistics and sampling shared by eager models and bundles (no torch).

Sampling works on numpy logits so that a bundle on a phone and the eager model on a desktop pick
tokens the same way; greedy decoding (``temperature == 0``) is an argmax in both.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError


@dataclass
class GenerationConfig:
    """Sampling options. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}", "ask for at least one new token")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} is negative", "use 0 (greedy) or a positive value")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} is outside (0, 1]", "use e.g. 0.9, or 1 to disable")
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is negative", "use 0 to disable, or a positive count")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    image_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    stopped_by: str = ""
    encode_s: float = 0.0           # image encoding + prompt assembly (bundles; part of time to first token)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)

    def __str__(self) -> str:           # print(vlm.generate(...)) shows the answer
        return self.text


def pick_token_np(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator | None) -> int:
    """Greedy, or temperature / top-k / top-p sampling from (V,) logits."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k:
        k = min(cfg.top_k, x.size)
        kth = np.partition(x, -k)[-k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if cfg.top_p < 1:
        order = np.argsort(-p, kind="stable")
        sp = p[order]
        keep = np.cumsum(sp) - sp < cfg.top_p                          # always keeps the top token
        q = np.zeros_like(p)
        q[order[keep]] = sp[keep]
        p = q / q.sum()
    rng = rng or np.random.default_rng()
    return int(rng.choice(p.size, p=p))


def decode_loop(prefill: Callable[[], object], step: Callable[[int], object], pick: Callable[[object], int],
                cfg: GenerationConfig, stats: GenerationStats, n_prompt: int, max_context: int) -> Iterator[int]:
    """The decode loop of eager models and bundles alike: ``prefill()`` once, then ``step(token)`` per new
    token (the caller keeps the KV cache), ``pick(logits)`` chooses; stops at a stop id, at
    ``max_new_tokens`` or at the context's end, and fills ``stats`` (time to first token, tokens/s)."""
    if n_prompt >= max_context:
        raise ConfigError(f"the prompt takes {n_prompt} tokens (with the image), the context holds {max_context}",
                          "shorten the prompt")
    budget = min(cfg.max_new_tokens, max_context - n_prompt)
    stop = set(cfg.stop_ids)
    t0 = time.perf_counter()
    logits = prefill()
    stats.stopped_by = "max_new_tokens" if budget == cfg.max_new_tokens else "context"
    t_first = None
    for i in range(budget):
        tok = pick(logits)
        if t_first is None:
            t_first = time.perf_counter()
            stats.time_to_first_token_s = t_first - t0
        if tok in stop:
            stats.stopped_by = "stop token"
            break
        stats.new_tokens = i + 1
        yield tok
        if i + 1 == budget:
            break
        logits = step(tok)
    if t_first is not None and stats.new_tokens > 1:
        stats.decode_tokens_per_s = (stats.new_tokens - 1) / max(time.perf_counter() - t_first, 1e-9)
