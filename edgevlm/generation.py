"""Generation options, statistics and sampling shared by eager models and bundles (no torch).

Sampling works on numpy logits so that a bundle on a phone and the eager model on a desktop pick
tokens the same way; greedy decoding (``temperature == 0``) is an argmax in both.
"""
from __future__ import annotations

import math
import operator
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError


MAX_NEW_TOKENS = 1_000_000        # beyond any edge model's context: a larger number is a typo
MIN_TEMPERATURE = 1e-6            # smaller (denormals included) overflows float32 logits / temperature
MAX_TEMPERATURE = 100.0           # far past uniform sampling; larger only breeds inf / NaN
MAX_SEED = 2**64 - 1              # torch.Generator.manual_seed's range (numpy's rng takes any non-negative int)


def _integer(value, name: str, fix: str) -> int:
    if not isinstance(value, bool):
        try:
            return operator.index(value)         # int, numpy and 0-d torch integers; not 2.5, "3" or True
        except TypeError:
            pass
    raise ConfigError(f"{name}={value!r} is not a whole number", fix)


def _real(value, name: str, fix: str) -> float:
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a number", fix) from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} is not a finite number", fix)
    return value


@dataclass
class GenerationConfig:
    """Sampling options. ``temperature == 0`` is greedy decoding.

    Every option is checked here, where eager models, bundles and the CLI all build their config, so a NaN,
    an infinity or a number out of range is a :class:`ConfigError` naming it rather than a failure deep in
    the sampler.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        fix = f"ask for 1 to {MAX_NEW_TOKENS:,} new tokens (e.g. 128)"
        self.max_new_tokens = _integer(self.max_new_tokens, "max_new_tokens", fix)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} is less than one token", fix)
        if self.max_new_tokens > MAX_NEW_TOKENS:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} is more than any model's context", fix)
        fix = f"use 0 (greedy) or a temperature from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g} (e.g. 0.7)"
        self.temperature = _real(self.temperature, "temperature", fix)
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} is negative", fix)
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise ConfigError(f"temperature={self.temperature:g} is too small to sample with (logits / temperature "
                              "overflows)", fix)
        if self.temperature > MAX_TEMPERATURE:
            raise ConfigError(f"temperature={self.temperature:g} is absurdly large", fix)
        fix = "use a top_p in (0, 1], e.g. 0.9, or 1 to disable"
        self.top_p = _real(self.top_p, "top_p", fix)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} is outside (0, 1]", fix)
        fix = "use 0 to disable, or a positive count"
        self.top_k = _integer(self.top_k, "top_k", fix)
        if self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k} is negative", fix)
        if self.seed is not None:
            fix = "use a seed from 0 to 2**64 - 1, or none for a random one"
            self.seed = _integer(self.seed, "seed", fix)
            if not 0 <= self.seed <= MAX_SEED:
                raise ConfigError(f"seed={self.seed} is " + ("negative" if self.seed < 0 else "over 2**64 - 1"), fix)


def check_prompt(text, what: str = "the prompt") -> str:
    """``text`` if it is valid text to tokenize, else a :class:`ConfigError` naming the problem.

    Refused: anything but ``str`` (bytes included), and strings that are not valid Unicode: lone
    surrogates, which is how Python passes on bytes that are not UTF-8 in a command-line argument
    (``--prompt $'\\xff'`` arrives as U+DCFF) and how broken JSON escapes (``"\\ud83d"``) arrive.
    """
    if isinstance(text, (bytes, bytearray)):
        raise ConfigError(f"{what} is bytes, not text", "decode it first, e.g. prompt.decode('utf-8')")
    if not isinstance(text, str):
        raise ConfigError(f"{what} is a {type(text).__name__}, not text", "pass the prompt as a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        if 0xDC80 <= ch <= 0xDCFF:   # surrogateescape: an undecodable byte from argv, a file name or stdin
            problem = (f"{what} is not valid UTF-8 (byte 0x{ch - 0xDC00:02x} at character {e.start}, "
                       "passed on by Python as a lone surrogate)")
            fix = "pass the prompt as UTF-8 text (check the terminal's or the file's encoding, e.g. LANG=C.UTF-8)"
        else:
            problem = f"{what} holds a lone surrogate U+{ch:04X} at character {e.start}, which is not valid text"
            fix = "pass the prompt as valid Unicode text (a surrogate pair's two halves belong together)"
        raise ConfigError(problem, fix) from None
    bad = next((i for i, c in enumerate(text) if (ord(c) < 32 and c not in "\t\n\r") or c == "\x7f"), None)
    if bad is not None:                 # NUL and other control characters: no tokenizer of ours means them as text
        raise ConfigError(f"{what} holds the control character U+{ord(text[bad]):04X} at character {bad}",
                          "remove control characters from the prompt (tabs and newlines are fine)")
    return text


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


def pick_token(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator | None) -> int:
    """Greedy, or temperature / top-k / top-p sampling from (V,) logits: the one sampler of eager models and bundles
    (the same seed gives the same choices on the same logits)."""
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
