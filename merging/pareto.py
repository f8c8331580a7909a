"""MAP: amortised Pareto fronts of merging coefficients from quadratic surrogates, and the grid
reference (see :mod:`litplug.merging`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _quadratic_features(c: Tensor) -> Tensor:
    n, t = c.shape
    cols = [torch.ones(n, dtype=c.dtype), *c.T]
    for i in range(t):
        for j in range(i, t):
            cols.append(c[:, i] * c[:, j])
    return torch.stack(cols, 1)


@dataclass
class QuadraticFit:
    """``m(c) = w . [1, c_1..c_T, c_i c_j (i <= j)]`` fitted by least squares; ``r2`` on the
    fitting points."""

    weights: Tensor
    r2: float

    def __call__(self, c: Tensor) -> Tensor:
        c = torch.as_tensor(c, dtype=torch.float64)
        return _quadratic_features(c.reshape(-1, c.shape[-1])) @ self.weights


def fit_quadratic(coefficients: Tensor, values: Tensor) -> QuadraticFit:
    """Least-squares fit of a full quadratic in the merging coefficients (MAP's surrogate).

    Args:
        coefficients: ``(n, T)`` evaluated coefficient vectors; ``n`` must be at least the
            number of quadratic terms, ``(T + 1)(T + 2) / 2``.
        values: ``(n,)`` the metric at each.
    """
    c = torch.as_tensor(coefficients, dtype=torch.float64)
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if c.dim() != 2 or c.shape[0] != v.shape[0]:
        raise ValueError(f"`coefficients` must be (n, T) and `values` (n,), got {tuple(c.shape)} and {tuple(v.shape)}")
    x = _quadratic_features(c)
    if c.shape[0] < x.shape[1]:
        raise ValueError(
            f"a quadratic in {c.shape[1]} coefficients needs >= {x.shape[1]} evaluations, got {c.shape[0]}"
        )
    w = torch.linalg.lstsq(x, v.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    resid = v - x @ w
    total = ((v - v.mean()) ** 2).sum()
    r2 = 1.0 - float((resid**2).sum() / total) if total > 0 else 1.0
    return QuadraticFit(w, r2)


def pareto_mask(values: Tensor, maximize: bool = True) -> Tensor:
    """Boolean mask of the non-dominated rows of ``values`` (``(n, k)``, ``k`` objectives)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    if not maximize:
        v = -v
    # [i, j]: row j is >= row i in every objective and > in one, i.e. j dominates i
    dominates = (v.unsqueeze(0) >= v.unsqueeze(1)).all(-1) & (v.unsqueeze(0) > v.unsqueeze(1)).any(-1)
    dominated = dominates.any(1)
    return ~dominated


def _grid(num_tasks: int, points: int, low: float, high: float) -> Tensor:
    axis = torch.linspace(low, high, points, dtype=torch.float64)
    return torch.cartesian_prod(*[axis] * num_tasks).reshape(-1, num_tasks)


@dataclass
class MAPResult:
    """A Pareto front over merging coefficients.

    Attributes:
        coefficients: ``(m, T)`` the front's coefficient vectors.
        values: ``(m, k)`` their metrics (predicted by the surrogates for MAP, measured for a grid).
        evaluations: how many true evaluations (merged models scored) it took.
        fits: MAP's fitted surrogates, one per metric (empty for a grid).
        evaluated: ``(evaluations, T)`` the coefficient vectors that were evaluated.
        evaluated_values: ``(evaluations, k)`` their measured metrics.
    """

    coefficients: Tensor
    values: Tensor
    evaluations: int
    fits: list[QuadraticFit]
    evaluated: Tensor
    evaluated_values: Tensor


def map_pareto_front(
    evaluate: Callable[[Sequence[float]], Sequence[float]],
    num_tasks: int,
    num_evaluations: int | None = None,
    low: float = 0.0,
    high: float = 1.0,
    candidates: int = 2000,
    maximize: bool = True,
    seed: int = 0,
) -> MAPResult:
    """MAP (Li et al. 2024): the amortised Pareto front of merging coefficients.

    ``evaluate(c)`` scores the merged model for coefficients ``c`` (e.g. ``task_arithmetic(base,
    finetuned, c)``) and returns one metric per task. MAP evaluates ``num_evaluations`` points
    (default twice the number of quadratic terms) drawn uniformly from ``[low, high]^T``, fits one
    quadratic per metric (:func:`fit_quadratic`), predicts every metric on ``candidates`` further
    random points, and returns the predicted non-dominated set.
    """
    if num_tasks < 1:
        raise ValueError(f"`num_tasks` must be >= 1, got {num_tasks}")
    terms = (num_tasks + 1) * (num_tasks + 2) // 2
    n = 2 * terms if num_evaluations is None else num_evaluations
    if n < terms:
        raise ValueError(f"`num_evaluations` must be >= {terms} for {num_tasks} tasks, got {n}")
    if not low < high:
        raise ValueError(f"`low` must be < `high`, got {low} and {high}")
    gen = torch.Generator().manual_seed(seed)
    sample = lambda m: low + (high - low) * torch.rand(m, num_tasks, generator=gen, dtype=torch.float64)  # noqa: E731
    coeffs = sample(n)
    measured = torch.tensor([list(evaluate(c.tolist())) for c in coeffs], dtype=torch.float64)
    fits = [fit_quadratic(coeffs, measured[:, k]) for k in range(measured.shape[1])]
    pool = torch.cat([sample(candidates), coeffs])
    predicted = torch.stack([f(pool) for f in fits], 1)
    keep = pareto_mask(predicted, maximize)
    return MAPResult(pool[keep], predicted[keep], n, fits, coeffs, measured)


def grid_pareto_front(
    evaluate: Callable[[Sequence[float]], Sequence[float]],
    num_tasks: int,
    points: int = 11,
    low: float = 0.0,
    high: float = 1.0,
    maximize: bool = True,
) -> MAPResult:
    """The brute-force reference: evaluate every point of a ``points^T`` grid over
    ``[low, high]^T`` and keep the measured non-dominated set."""
    grid = _grid(num_tasks, points, low, high)
    measured = torch.tensor([list(evaluate(c.tolist())) for c in grid], dtype=torch.float64)
    keep = pareto_mask(measured, maximize)
    return MAPResult(grid[keep], measured[keep], len(grid), [], grid, measured)
