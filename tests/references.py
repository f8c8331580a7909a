"""Reference formulas written out for the tests: the equations the library computes in place."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def sam_gradient(grad: Sequence[Tensor], grad_perturbed: Sequence[Tensor], penalty_weight: float) -> list[Tensor]:
    """``(1 - a) g + a grad L(w + e)``: SAM for ``a = 1``, the gradient-norm penalty for ``0 < a < 1``."""
    a = penalty_weight
    return [(1 - a) * g + a * gp for g, gp in zip(grad, grad_perturbed)]


def ignite_gradient(
    grad_loss: Sequence[Tensor],
    grad_g: Sequence[Tensor],
    grad_g_hat: Sequence[Tensor],
    lam: float | Tensor,
    rho: float,
    radius: float,
) -> list[Tensor]:
    """IGNITE's final gradient ``grad L(b) + (lambda rho / radius) (grad G(b_hat) - grad G(b))``."""
    c = lam * rho / radius
    return [gl + c * (gh - gg) for gl, gg, gh in zip(grad_loss, grad_g, grad_g_hat)]
