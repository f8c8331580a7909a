"""litplug.merging.pareto: MAP's quadratic fit and Pareto fronts."""

import pytest
import torch

from litplug.merging import (
    fit_quadratic,
    grid_pareto_front,
    map_pareto_front,
    pareto_mask,
)


def test_map_quadratic_fit_is_exact_on_a_quadratic_and_fronts_agree():
    def metrics(c):
        c1, c2 = c
        return [1 - (c1 - 0.8) ** 2 - 0.5 * c2**2 + 0.1 * c1 * c2, 1 - (c2 - 0.7) ** 2 - 0.3 * c1**2]

    coeffs = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fit = fit_quadratic(coeffs, torch.tensor([metrics(c.tolist())[0] for c in coeffs]))
    probe = torch.rand(50, 2, dtype=torch.float64)
    torch.testing.assert_close(fit(probe), torch.tensor([metrics(c.tolist())[0] for c in probe], dtype=torch.float64))
    assert fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs >= 6 evaluations, got 5"):
        fit_quadratic(coeffs[:5], torch.zeros(5))

    calls = []
    counted = lambda c: calls.append(c) or metrics(c)  # noqa: E731
    front = map_pareto_front(counted, 2, num_evaluations=6, candidates=500)
    assert front.evaluations == len(calls) == 6
    # every predicted front point is exact and non-dominated among the grid's measured points
    measured = torch.tensor([metrics(c.tolist()) for c in front.coefficients], dtype=torch.float64)
    torch.testing.assert_close(front.values, measured)
    grid = grid_pareto_front(metrics, 2, points=11)
    assert grid.evaluations == 121
    both = torch.cat([measured, grid.values])
    assert pareto_mask(both)[: len(measured)].float().mean() > 0.9


def test_pareto_mask():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0]])
    assert pareto_mask(v).tolist() == [True, True, True, False, True]
    assert pareto_mask(v, maximize=False).tolist() == [True, True, False, True, True]
