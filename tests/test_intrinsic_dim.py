"""TwoNN: known dimensions on synthetic point clouds, equality with a plain reference, determinism, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvemb_st.intrinsic_dim import twonn, twonn_ratios


def embed(points: torch.Tensor, ambient: int, seed: int) -> torch.Tensor:
    """Place ``points`` (N, d) in a random d-dimensional subspace of R^ambient, with a random offset."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(ambient, points.shape[1], generator=g, dtype=torch.float64))
    return points @ basis.T + torch.randn(ambient, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def plane() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return embed(torch.rand(800, 2, generator=g, dtype=torch.float64), 64, seed=1)


@pytest.fixture(scope="module")
def gaussian5() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return embed(torch.randn(1000, 5, generator=g, dtype=torch.float64), 64, seed=3)


@pytest.mark.parametrize("estimator", ["mle", "fit"])
def test_known_dimension_within_15_percent(plane, gaussian5, estimator):
    assert twonn(plane, estimator) == pytest.approx(2.0, rel=0.15)
    assert twonn(gaussian5, estimator) == pytest.approx(5.0, rel=0.15)


def reference_ratios(points: np.ndarray) -> np.ndarray:
    """Nearest-neighbour ratios by brute force, one point at a time."""
    ratios = []
    for i in range(len(points)):
        distances = sorted(math.dist(points[i], points[j]) for j in range(len(points)) if j != i)
        ratios.append(distances[1] / distances[0])
    return np.sort(np.array(ratios))


def test_matches_plain_reference():
    points = np.random.default_rng(0).normal(size=(60, 7))
    mu = reference_ratios(points)
    np.testing.assert_allclose(twonn_ratios(points).numpy(), mu, rtol=1e-12)
    assert twonn(points, "mle") == pytest.approx(len(mu) / np.log(mu).sum(), rel=1e-12)
    keep = round(len(mu) * 0.9)
    x, y = np.log(mu[:keep]), -np.log(1 - np.arange(keep) / len(mu))
    assert twonn(points, "fit") == pytest.approx((x @ y) / (x @ x), rel=1e-12)


def test_deterministic_and_order_independent(gaussian5):
    permuted = gaussian5[torch.randperm(len(gaussian5), generator=torch.Generator().manual_seed(0))]
    assert twonn(gaussian5) == twonn(gaussian5)
    assert twonn(permuted) == twonn(gaussian5)
    assert twonn(gaussian5.float()) == pytest.approx(twonn(gaussian5), rel=1e-4)


def test_duplicate_points_are_ignored_not_infinite(plane):
    with_duplicates = torch.cat([plane, plane[:50]])
    assert twonn(with_duplicates) == twonn(plane)


def test_equidistant_neighbours_tie_to_ratio_one():
    # Each point of a square grid has 2-4 neighbours at equal distance: r2 == r1 exactly.
    grid = torch.cartesian_prod(torch.arange(10.0), torch.arange(10.0)).to(torch.float64)
    assert torch.equal(twonn_ratios(grid), torch.ones(100, dtype=torch.float64))
    assert twonn(grid) == float("inf")


@pytest.mark.parametrize(
    "points, estimator, match",
    [
        (torch.zeros(5, 3), "mle", "at least 3 distinct points"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [1.0, 1.0]]), "mle", "NaN or infinite"),
        (torch.zeros(5), "mle", "2-D"),
        (torch.randn(10, 3), "median", "unknown TwoNN estimator"),
    ],
)
def test_bad_input_is_a_clear_error(points, estimator, match):
    with pytest.raises(ValueError, match=match):
        twonn(points, estimator)
