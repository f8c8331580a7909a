"""local_lipschitz (litplug.bounds.lipschitz): never below the largest gradient l1 norm over
10,000 sampled points (box corners included), exact where no ReLU is unstable, errors."""

from __future__ import annotations

import pytest
import torch
from bound_networks import Mixed, networks, samples
from torch import nn

from litplug.bounds import UnsupportedOperationError, lipschitz, local_lipschitz


def _gradient_norms(net: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """``||d net(x)_k / dx||_1`` for every point and output: ``[N, K]``."""
    points = points.detach().requires_grad_(True)
    out = net(points)
    norms = []
    for k in range(out.shape[1]):
        (grad,) = torch.autograd.grad(out[:, k].sum(), points, retain_graph=True)
        norms.append(grad.flatten(1).abs().sum(1))
    return torch.stack(norms, 1)


def _assert_above_samples(net: nn.Module, x: torch.Tensor, eps: float, bound: torch.Tensor, g: torch.Generator) -> None:
    """Every sample's bound above the gradient norms of 10,000 points of its box."""
    for i in range(len(x)):
        sampled = _gradient_norms(net, samples(x[i] - eps, x[i] + eps, 10_000, g)).amax(0)
        assert (sampled <= bound[i] * (1 + 1e-12)).all()


@pytest.mark.parametrize(("name", "eps"), [("mlp", 0.01), ("mlp", 0.1), ("cnn_bn", 0.05), ("residual", 0.05)])
def test_bound_above_every_sampled_gradient_norm(name: str, eps: float) -> None:
    net = networks()[name]
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)
    bound = local_lipschitz(net, x - eps, x + eps)
    assert bound.shape == (1, 10 if name != "residual" else 5)
    intervals = local_lipschitz(net, x - eps, x + eps, method="crown-ibp")
    sampled = _gradient_norms(net, samples(x[0] - eps, x[0] + eps, 10_000, g)).amax(0)
    for found in (bound, intervals):
        assert (sampled <= found[0] * (1 + 1e-12)).all()
    assert (bound <= intervals + 1e-12).all()


def test_sign_splits_are_sound_and_tighten() -> None:
    net = networks()["mlp"]
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    bound = local_lipschitz(net, x - 0.01, x + 0.01)
    split = local_lipschitz(net, x - 0.01, x + 0.01, splits=4)
    assert (split <= bound).all() and (split / bound).mean() < 0.97
    _assert_above_samples(net, x, 0.01, split, g)
    stable = torch.full_like(x, 0.5)  # no unstable neuron at this width: nothing to split
    torch.testing.assert_close(
        local_lipschitz(net, stable, stable + 1e-9, splits=2), local_lipschitz(net, stable, stable + 1e-9)
    )


def test_gradient_bounds_linked_to_the_pre_activations_tighten() -> None:
    """``steps``: the McCormick bounds in ``z`` at the first ReLU layer: never looser, tighter somewhere."""
    net = networks()["mlp"]
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    chord = local_lipschitz(net, x - 0.01, x + 0.01)
    linked = local_lipschitz(net, x - 0.01, x + 0.01, steps=10)
    assert (linked <= chord + 1e-12).all() and (linked < chord * (1 - 1e-4)).any()
    _assert_above_samples(net, x, 0.01, linked, g)


def test_exact_where_every_relu_is_stable() -> None:
    net = networks()["mlp"]
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    bound = local_lipschitz(net, x - 1e-9, x + 1e-9)
    torch.testing.assert_close(bound, _gradient_norms(net, x), rtol=1e-9, atol=1e-12)


def test_errors() -> None:
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.rand(5, 4)
    with pytest.raises(ValueError, match="batch norm with fixed statistics.*module '1'"):
        local_lipschitz(bn, x, x)
    local_lipschitz(bn.eval(), x, x)
    with pytest.raises(UnsupportedOperationError, match="Tanh at module '1'"):
        local_lipschitz(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), x, x)
    with pytest.raises(ValueError, match="`method` must be one of"):
        local_lipschitz(bn, x, x, method="ibp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`steps` must be >= 0, got -1"):
        local_lipschitz(bn, x, x, steps=-1)
    with pytest.raises(TypeError, match="`splits` must be an int"):
        local_lipschitz(bn, x, x, splits=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`splits` must be"):
        local_lipschitz(bn, x, x, splits=17)
    with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
        local_lipschitz(bn, x + 1, x)
    with pytest.raises(ValueError, match="same shape"):
        local_lipschitz(bn, x, x[:1])


@pytest.mark.parametrize(("name", "eps"), [("cnn_bn", 0.05), ("residual", 0.05)])
def test_linear_relaxation_of_the_jacobian_graph_is_tighter_than_intervals(
    name: str, eps: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each stage tightens: the linear bound of the Jacobian graph over the interval one, and the
    linear intermediate bounds of every ReLU's gradient (``method="crown"``) over intervals."""
    net = networks()[name]
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    bound = local_lipschitz(net, x - eps, x + eps)
    monkeypatch.setattr(lipschitz, "_refine", lambda run, gradients, out, node, c, r: (c, r))
    unrefined = local_lipschitz(net, x - eps, x + eps)
    assert (bound <= unrefined).all() and (bound / unrefined).mean() < 0.8
    monkeypatch.setattr(lipschitz, "_linear_bound", lambda *a: torch.tensor(float("inf"), dtype=torch.float64))
    interval = local_lipschitz(net, x - eps, x + eps)
    assert (unrefined <= interval).all() and (unrefined / interval).mean() < 0.9


def test_every_operator_of_the_table_is_sound() -> None:
    torch.manual_seed(0)
    net = Mixed().eval().double()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.rand(1, 8, dtype=torch.float64)
    bound = local_lipschitz(net, x - 0.1, x + 0.1)
    sampled = _gradient_norms(net, samples(x[0] - 0.1, x[0] + 0.1, 4000, torch.Generator().manual_seed(0))).amax(0)
    assert (sampled <= bound[0] * (1 + 1e-12)).all()
