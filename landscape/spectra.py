"""Spectral densities from stochastic Lanczos quadrature (numpy only, no torch).

The Hessian's eigenvalue density by stochastic Lanczos quadrature (SLQ): Lin, Saad & Yang
2016, "Approximating spectral densities of large matrices"; Ubaru, Chen & Saad 2017, "Fast
estimation of tr(f(A)) via stochastic Lanczos quadrature"; Ghorbani, Krishnan & Xiao 2019,
"An investigation into neural net optimization via Hessian eigenvalue density"; Yao et al.
2020, "PyHessian: neural networks through the lens of the Hessian".
:func:`landscape.hessian.slq` computes the nodes and weights; this module turns them into a
density, so that figures can draw a stored spectrum without importing the measurements.
"""

from __future__ import annotations

import math

import numpy as np

from .utils import UserError

__all__ = ["density_from_slq"]


def density_from_slq(
    nodes: np.ndarray,
    weights: np.ndarray,
    grid: np.ndarray | int | None = None,
    sigma: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The smoothed spectral density ``rho(t) = mean_v sum_i w_vi N(t; theta_vi, sigma^2)``.

    ``nodes`` and ``weights`` are ``(n_v, steps)`` (or 1-D for one vector), as from
    :func:`landscape.hessian.slq`. ``sigma`` defaults to 1% of the nodes' range (1% of their
    largest magnitude for a one-point spectrum, 1 for an all-zero one): the outliers stay
    sharp while the bulk near zero becomes one peak, as in Ghorbani et al. 2019's figures;
    pass a smaller one to resolve the bulk. ``grid``: the evaluation points, or their number
    (default 1000, or 4 per sigma if that is more, up to 100,000; spanning the nodes +- 5
    sigma, so the density integrates to 1 within 1e-6).
    Returns ``(grid, density)``.
    """
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if nodes.shape != weights.shape or nodes.size == 0:
        raise UserError(f"nodes {nodes.shape} and weights {weights.shape} must match")
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) or 0.01 * max(abs(lo), abs(hi)) or 1.0
    if sigma <= 0:
        raise UserError(f"sigma must be positive, got {sigma}")
    if grid is None or isinstance(grid, int | np.integer):
        num = grid or min(max(1000, int(4 * (hi - lo) / sigma) + 41), 100_000)
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, int(num))
    grid = np.asarray(grid, dtype=np.float64)
    dens = np.zeros_like(grid)
    for theta, w in zip(nodes, weights, strict=True):
        dens += np.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2) @ w
    return grid, dens / (len(nodes) * sigma * math.sqrt(2 * math.pi))
