"""Sharpness penalties, pure torch: SAM/ASAM's perturbation, the SAM / gradient-norm-penalty and
IGNITE gradient combinations and IGNITE's dual ascent.

Each combination is computed in place (``sam_gradient_``, ``ignite_gradient_``): it rewrites the
first gradient and returns the weight with which the second gradient must then be accumulated into
the same buffers (by a backward pass), so the buffers end holding the combination's value. That is
what lets DDP all-reduce once, on the combined gradient, with no extra copy of either gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..plumbing import is_sharded, local
from ..plumbing.third_party_private import foreach_mul_

__all__ = [
    "EPS",
    "dual_ascent",
    "global_norm",
    "ignite_gradient_",
    "sam_gradient_",
    "sam_perturbation",
]

EPS = 1e-12


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``tensors`` taken together. DTensors (FSDP2 shards) give the norm of the full
    tensors: one all-reduce of a scalar; plain tensors need no collective."""
    if not tensors:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(tensors, norm_type=2.0)
    return norm.full_tensor() if is_sharded(norm) else norm


def sam_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    adaptive: bool = False,
    eps: float = EPS,
    inplace: bool = False,
    eta: float = 0.0,
    scaled: Sequence[bool] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """``e = rho * T^2 g / (||T g|| + eps)`` with ``T = 1`` (SAM) or, for adaptive SAM,
    ``T = |w| + eta`` on the parameters flagged in ``scaled`` (all when None) and ``T = 1`` on the
    others.

    The norm is global over all ``params``; ``e`` is scale-invariant in ``g`` (up to ``eps``), so
    loss-scaled fp16 gradients give the same perturbation.

    Args:
        inplace: for SAM (not adaptive), write ``e`` into ``grads`` (no allocation; when ``g`` is
            not needed afterwards).
        eta: added to ``|w|`` in adaptive SAM's ``T``.
        scaled: per parameter, whether adaptive SAM scales it by ``|w| + eta``.

    Returns:
        ``(e, ||T g||)``; for DTensors, ``e`` holds the local shards.

    Example:
        >>> e, n = sam_perturbation([torch.ones(2)], [torch.tensor([3.0, 4.0])], rho=0.5)
        >>> e[0], n
        (tensor([0.3000, 0.4000]), tensor(5.))
    """
    flags = [True] * len(params) if scaled is None else list(scaled)
    t = [p.abs() + eta if adaptive and f else None for p, f in zip(params, flags)]
    tg = [g if ti is None else ti * g for ti, g in zip(t, grads)]
    norm = global_norm(tg)
    scale = rho / (norm + eps)
    if adaptive:
        e = [local(x).clone() if ti is None else local(x) * local(ti) for x, ti in zip(tg, t)]
    else:
        e = [local(g) if inplace else local(g).clone() for g in grads]
    foreach_mul_(e, scale.to(e[0].device) if e else scale)
    return e, norm


@torch.no_grad()
def sam_gradient_(grad: Sequence[Tensor], penalty_weight: float) -> tuple[list[Tensor | None], float]:
    """SAM's final gradient ``(1 - a) g + a grad L(w + e)`` (SAM for ``a = 1``, the gradient-norm
    penalty of Zhao et al. for ``0 < a < 1``) in place: returns ``(buffers, a)``: the buffers are
    ``(1 - a) g`` (``g`` scaled in place; None for ``a = 1``, where ``g`` is dropped) into which
    ``a grad L(w + e)`` is then accumulated.

    Example:
        >>> g, gp = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 5.0])]
        >>> (buf,), w = sam_gradient_([t.clone() for t in g], 0.5)
        >>> buf + w * gp[0]
        tensor([2.0000, 3.5000])
    """
    a = penalty_weight
    if a == 1.0:
        return [None] * len(grad), a
    for g in grad:
        g.mul_(1.0 - a)
    return list(grad), a


@torch.no_grad()
def ignite_gradient_(
    grad_loss: Sequence[Tensor], grad_g: Sequence[Tensor], lam: float | Tensor, rho: float, radius: float
) -> float | Tensor:
    """IGNITE's final gradient ``grad L(b) + c (grad G(b_hat) - grad G(b))`` in place:
    ``grad_loss <- grad L(b) - c grad G(b)`` with ``c = lambda rho / radius``; returns ``c``, the
    weight with which ``grad G(b_hat)`` is then accumulated into ``grad_loss``. DTensors are
    updated through their local shards.

    Example:
        >>> gl, gg, gh = [torch.tensor([1.0])], [torch.tensor([2.0])], [torch.tensor([4.0])]
        >>> c = ignite_gradient_(gl, gg, 0.5, 0.1, 0.05)
        >>> gl[0] + c * gh[0]
        tensor([3.])
    """
    c = lam * rho / radius
    for gl, gg in zip(grad_loss, grad_g):
        g = local(gg)
        local(gl).sub_(g * (c.to(g.device) if isinstance(c, Tensor) else c))
    return c


def dual_ascent(lam: Tensor, grad_norm: Tensor, rho: float, epsilon: float, lr: float) -> Tensor:
    """``max(0, lambda + lr (rho ||grad G|| - epsilon))``; ``lambda`` is kept when the norm is not
    finite (an fp16 step the GradScaler skips)."""
    new = torch.clamp(lam + lr * (rho * grad_norm - epsilon), min=0.0)
    return torch.where(torch.isfinite(grad_norm), new, lam)
