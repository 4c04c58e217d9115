"""Safety Alignment Margin: the numpy silhouette against hand-computed cases and a brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_safe.eval.sam import pairwise_distances, silhouette_samples, silhouette_score


def test_two_groups_on_a_line_by_hand():
    # A = {0, 2}, B = {5, 7}: a(i) = 2 for every point;
    # b(0) = (5+7)/2 = 6, b(2) = (3+5)/2 = 4, b(5) = (5+3)/2 = 4, b(7) = (7+5)/2 = 6
    # s = [(6-2)/6, (4-2)/4, (4-2)/4, (6-2)/6] = [2/3, 1/2, 1/2, 2/3]; mean 7/12
    x = np.array([[0.0], [2.0], [5.0], [7.0]])
    s = silhouette_samples(x, ["A", "A", "B", "B"])
    np.testing.assert_allclose(s, [2 / 3, 1 / 2, 1 / 2, 2 / 3])
    assert silhouette_score(x, ["A", "A", "B", "B"]) == pytest.approx(7 / 12)


def test_three_groups_in_the_plane_with_a_singleton_by_hand():
    # P = {(0,0), (0,4)}, N = {(3,0)}, R = {(3,4), (6,4)}
    # (0,0): a = 4;  b = min(N: 3, R: (5 + sqrt(52))/2 = 6.1056) = 3   -> s = (3-4)/4 = -1/4
    # (0,4): a = 4;  b = min(N: 5, R: (3+6)/2 = 4.5) = 4.5             -> s = 0.5/4.5 = 1/9
    # (3,0): alone in N                                                -> s = 0
    # (3,4): a = 3;  b = min(P: (5+3)/2 = 4, N: 4) = 4                 -> s = 1/4
    # (6,4): a = 3;  b = min(P: (sqrt(52)+6)/2 = 6.6056, N: 5) = 5     -> s = 2/5
    x = np.array([[0, 0], [0, 4], [3, 0], [3, 4], [6, 4]], dtype=np.float32)
    labels = ["P", "P", "N", "R", "R"]
    s = silhouette_samples(x, labels)
    np.testing.assert_allclose(s, [-1 / 4, 1 / 9, 0.0, 1 / 4, 2 / 5], atol=1e-9)
    assert silhouette_score(x, labels) == pytest.approx((-1 / 4 + 1 / 9 + 1 / 4 + 2 / 5) / 5)


def brute_force(x, labels):
    n = len(x)
    d = [[float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in range(n)] for i in range(n)]
    out = []
    for i in range(n):
        own = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not own:
            out.append(0.0)
            continue
        a = sum(d[i][j] for j in own) / len(own)
        b = min(
            sum(d[i][j] for j in range(n) if labels[j] == other) / labels.count(other)
            for other in set(labels) - {labels[i]}
        )
        out.append((b - a) / max(a, b))
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_matches_a_brute_force_on_random_high_dimensional_points(seed):
    rng = np.random.default_rng(seed)
    labels = [str(v) for v in rng.integers(0, 3, size=23)]
    labels[:3] = ["0", "1", "2"]  # every group present
    x = rng.standard_normal((23, 300)).astype(np.float32) * 10 + rng.standard_normal(300) * 50
    np.testing.assert_allclose(silhouette_samples(x, labels), brute_force(x, labels), atol=1e-6)


def test_pairwise_distances_blocks_and_symmetry():
    x = np.random.default_rng(0).standard_normal((10, 7))
    d = pairwise_distances(x, block=3)
    for i, j in itertools.product(range(10), repeat=2):
        assert d[i, j] == pytest.approx(np.linalg.norm(x[i] - x[j]), abs=1e-9)


def test_well_separated_groups_score_near_one_and_one_group_is_an_error():
    x = np.concatenate([np.zeros((5, 4)), np.full((5, 4), 100.0)]) + np.random.default_rng(0).random((10, 4))
    assert silhouette_score(x, ["a"] * 5 + ["b"] * 5) > 0.95
    with pytest.raises(ValueError, match="at least two groups"):
        silhouette_score(x, ["a"] * 10)
