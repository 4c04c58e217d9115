"""Next-token choice from a logits vector: greedy, or temperature, top-k, min-p and nucleus sampling, with a
repeat penalty (and
the range of ``strictness``, the runtime's bias on the refusal opener until the first visible reply token).

Works on a numpy view of llama.cpp's logits buffer (n_vocab,), so greedy decoding
costs one ``argmax`` and no copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge_safe.convert.errors import EdgeSafeError

MAX_STRICTNESS = 20.0  # |strictness| beyond this decides every request outright: almost surely a typo


def check_strictness(value: float) -> float:
    """A finite float within ±MAX_STRICTNESS (logit units), or a clear error."""
    try:
        if isinstance(value, bool):  # True would silently mean 1.0
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise EdgeSafeError(f"strictness must be a number (logit units, e.g. -2 to 2), got {value!r}") from None
    if not math.isfinite(v) or abs(v) > MAX_STRICTNESS:
        raise EdgeSafeError(
            f"strictness must be between {-MAX_STRICTNESS:g} and {MAX_STRICTNESS:g} (logit units; 0 = the bank as "
            f"trained, > 0 refuses more, < 0 less), got {value!r}"
        )
    return v


@dataclass(frozen=True)
class Sampling:
    """How a reply's tokens are chosen, with llama-cpp-python's keyword names and meanings.

    ``temperature == 0`` is greedy (``top_p``, ``top_k`` and ``min_p`` then play no part, as in
    llama.cpp); ``repeat_penalty`` (1 = off) divides a positive logit, or multiplies a negative
    one, of every token among the reply's last ``repeat_last_n`` tokens, greedy or not."""

    temperature: float = 0.0
    top_p: float = 1.0  # nucleus: the smallest set of tokens holding this much probability
    top_k: int = 0  # only the k most likely tokens (0 = all)
    min_p: float = 0.0  # only tokens at least this fraction as likely as the most likely one
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # how many of the reply's latest tokens the penalty looks at

    def __post_init__(self):
        checks = [("temperature", self.temperature >= 0, ">= 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"), ("repeat_penalty", self.repeat_penalty > 0, "> 0")]
        for name, ok, want in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
                raise EdgeSafeError(f"{name} must be a number {want}, got {value!r}")
        for name in ("top_k", "repeat_last_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EdgeSafeError(f"{name} must be a whole number >= 0, got {value!r}")

    def penalise(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """``logits`` with the repeat penalty applied over ``history`` (a copy; the same array when off)."""
        recent = history[-self.repeat_last_n:] if self.repeat_last_n else ()
        if self.repeat_penalty == 1.0 or not len(recent):
            return logits
        ids = np.unique(np.asarray(recent, dtype=np.int64))
        out = np.array(logits, dtype=np.float32)
        vals = out[ids]
        out[ids] = np.where(vals > 0, vals / self.repeat_penalty, vals * self.repeat_penalty)
        return out

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        """Greedy (argmax) when ``temperature == 0``; otherwise top-k, min-p, top-p, then sample."""
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature  # (n_vocab,)
        z -= z.max()
        p = np.exp(z)
        if self.top_k:
            p[np.argpartition(-p, min(self.top_k, len(p)) - 1)[self.top_k:]] = 0.0
        if self.min_p:
            p[p < self.min_p] = 0.0  # p is relative to the most likely token (z.max() == 0)
        p /= p.sum()
        if self.top_p < 1.0:
            order = _most_likely(p, self.top_p)
            keep = int(np.searchsorted(np.cumsum(p[order]), self.top_p)) + 1  # smallest set with mass >= top_p
            ids = order[: min(keep, len(order))]
            q = p[ids] / p[ids].sum()
            return int(ids[rng.choice(len(ids), p=q)])
        return int(min(np.searchsorted(np.cumsum(p), rng.random()), len(p) - 1))


GREEDY = Sampling()

#: Defaults of `edge-safe chat` and `edge-safe serve` (the Python API's are llama-cpp-python's neutral ones:
#: greedy, no penalty). Greedy with no penalty makes the bundled 270M model repeat a sentence until
#: max_tokens ("I'm thinking of a gift for her. I'm not sure what to choose." x 20 for a gift question);
#: 1.1 over the reply's last 64 tokens ends it after one answer. top_k and min_p are llama.cpp's and act
#: only with temperature > 0.
CHAT_REPEAT_PENALTY, CHAT_TOP_K, CHAT_MIN_P = 1.1, 40, 0.05


def _most_likely(p: np.ndarray, mass: float, k: int = 1024) -> np.ndarray:
    """Token ids by falling probability, enough of them to hold ``mass`` (a partial sort when it can)."""
    if len(p) > k:
        top = np.argpartition(-p, k - 1)[:k]
        top = top[np.argsort(-p[top])]
        if p[top].sum() >= mass:
            return top
    return np.argsort(-p)
