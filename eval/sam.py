"""Safety Alignment Margin (magic-token paper, arXiv 2508.14904): silhouette of first-token logits by mode.

For every point i with label L: a(i) is the mean euclidean distance to the other
points of L, b(i) the smallest mean distance to the points of another label, and
s(i) = (b - a) / max(a, b) (0 for a point alone in its label, as in scikit-learn).
SAM is the mean of s(i) over all points: near 1 when each mode's first-token
logits form a tight group far from the other modes, near 0 when the modes overlap.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pairwise_distances(x: np.ndarray, block: int = 64) -> np.ndarray:
    """Euclidean distances (n, n) of the rows of x (n, d), in float64, computed in row blocks."""
    x = np.asarray(x)
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)  # (n,)
    gram = np.empty((n, n), dtype=np.float64)
    for i in range(0, n, block):
        gram[i:i + block] = x[i:i + block].astype(np.float64) @ x.T.astype(np.float64)
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(np.maximum(d2, 0.0))


def silhouette_samples(x: np.ndarray, labels: Sequence) -> np.ndarray:
    """s(i) for every row of x (n, d) grouped by ``labels`` (n,); needs at least two labels."""
    labels = np.asarray(labels)
    names = list(dict.fromkeys(labels.tolist()))
    if len(names) < 2:
        raise ValueError(f"a silhouette needs at least two groups; got {names}")
    dist = pairwise_distances(x)
    masks = [labels == name for name in names]
    s = np.zeros(len(labels))
    for i in range(len(labels)):
        own = next(k for k, m in enumerate(masks) if m[i])
        n_own = masks[own].sum() - 1
        if n_own == 0:
            continue  # a point alone in its group scores 0
        a = dist[i, masks[own]].sum() / n_own
        b = min(dist[i, m].mean() for k, m in enumerate(masks) if k != own)
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return s


def silhouette_score(x: np.ndarray, labels: Sequence) -> float:
    """Mean silhouette coefficient (the SAM when x holds first-token logits and labels are modes)."""
    return float(silhouette_samples(x, labels).mean())
