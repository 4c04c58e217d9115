"""Next-token choice from a logits vector: greedy, or temperature + nucleus sampling (and
the range of ``strictness``, the runtime's bias on the refusal opener until the first visible reply token).

Works on a numpy view of llama.cpp's logits buffer (n_vocab,), so greedy decoding
costs one ``argmax`` and no copy.
"""
from __future__ import annotations

import math

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


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise EdgeSafeError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise EdgeSafeError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy (argmax) when ``temperature == 0``; otherwise sample from softmax(logits / T), top-p."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature  # (n_vocab,)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p < 1.0:
        order = _most_likely(p, top_p)
        keep = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1  # smallest set with mass >= top_p
        ids = order[: min(keep, len(order))]
        q = p[ids] / p[ids].sum()
        return int(ids[rng.choice(len(ids), p=q)])
    return int(min(np.searchsorted(np.cumsum(p), rng.random()), len(p) - 1))


def _most_likely(p: np.ndarray, mass: float, k: int = 1024) -> np.ndarray:
    """Token ids by falling probability, enough of them to hold ``mass`` (a partial sort when it can)."""
    if len(p) > k:
        top = np.argpartition(-p, k - 1)[:k]
        top = top[np.argsort(-p[top])]
        if p[top].sum() >= mass:
            return top
    return np.argsort(-p)
