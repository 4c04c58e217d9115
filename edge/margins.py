"""Refusal margins read as a ranking: the AUC that training's validation and the eval both report.

A margin (``EdgeSafe.refusal_margin``; the float32 one in training) says how strongly a case
is refused; a bank ranks well when violating cases get higher margins than should-answer ones,
whatever the threshold. One function, so training and runtime figures rank alike. numpy only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """P(score of a violating case > score of a should-answer case), ties counted half (Mann-Whitney U);
    None when either side is empty."""
    if not len(pos) or not len(neg):
        return None
    both = np.concatenate([np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each group of equal values
    ranks = (ends - (counts - 1) / 2)[inverse]  # ties share their average rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return round(float(u / (len(pos) * len(neg))), 4)
