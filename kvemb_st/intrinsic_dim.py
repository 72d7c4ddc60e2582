"""TwoNN intrinsic-dimension estimator (Facco et al., Sci. Rep. 7, 12140, 2017).

For every point, ``mu = r2 / r1`` (distances to its second and first nearest neighbour) follows a
Pareto law with exponent ``d`` on a ``d``-dimensional manifold, whatever the ambient dimension. That
is why it suits LLM hidden states: a few hundred points in a 576- to 4096-dimensional space.

Deterministic by construction: no sampling, float64 distances computed without the matmul shortcut
(which can round a true distance to zero), and exact duplicate points removed first -- a duplicate
would give ``r1 = 0`` and an infinite ratio, and the result would depend on how ties were broken.
"""

from __future__ import annotations

import numpy as np
import torch

ESTIMATORS = ("mle", "fit")
MIN_POINTS = 3


def twonn_ratios(points: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``mu_i = r2 / r1`` for every distinct point of ``points`` ``(N, D)``, in float64, sorted ascending."""
    x = torch.as_tensor(points).detach().to(device="cpu", dtype=torch.float64)
    if x.ndim != 2:
        raise ValueError(f"points must be a 2-D (num_points, dim) array, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("points contain NaN or infinite values; the intrinsic dimension is undefined")
    x = torch.unique(x, dim=0)  # sorted, hence also independent of the input order
    if x.shape[0] < MIN_POINTS:
        raise ValueError(f"TwoNN needs at least {MIN_POINTS} distinct points, got {x.shape[0]}")
    distances = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))
    r1, r2 = distances.topk(2, dim=1, largest=False, sorted=True).values.unbind(dim=1)
    return torch.sort(r2 / r1).values


def twonn(points: torch.Tensor | np.ndarray, estimator: str = "mle", discard_fraction: float = 0.1) -> float:
    """Intrinsic dimension of the point cloud ``points`` ``(N, D)``.

    Args:
        estimator: ``mle`` -- ``d = N / sum(log mu)``; ``fit`` -- least-squares slope through the origin of
            ``-log(1 - F(mu))`` against ``log mu``, with the largest ``discard_fraction`` of ratios dropped
            (they are the noisiest, and ``F = 1`` at the very top).
        discard_fraction: Only used by ``fit``; in [0, 1).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown TwoNN estimator {estimator!r}; expected one of {ESTIMATORS}")
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    log_mu = torch.log(twonn_ratios(points))
    n = log_mu.numel()
    if estimator == "mle":
        total = log_mu.sum().item()
        return n / total if total > 0 else float("inf")
    empirical_cdf = torch.arange(n, dtype=torch.float64) / n  # F(mu_(i)) = i / N, so that F < 1 everywhere
    keep = max(2, int(round(n * (1.0 - discard_fraction))))
    x, y = log_mu[:keep], -torch.log1p(-empirical_cdf[:keep])
    denominator = (x * x).sum().item()
    return (x * y).sum().item() / denominator if denominator > 0 else float("inf")
