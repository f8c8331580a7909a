"""Spherical linear interpolation of two models (see :mod:`litplug.merging` for the method card)."""

from __future__ import annotations

import torch
from torch import Tensor

from .states import AnyWeights, Weights, check_finite, check_states, returned_as, state_of, work_dtype

DOT_THRESHOLD = 0.9995  # |cos| above it: near-parallel, interpolate linearly (as mergekit)
EPS = 1e-8  # norms at or below it count as 1 (a zero tensor is not normalised)


def slerp_tensor(a: Tensor, b: Tensor, t: float) -> Tensor:
    """SLERP of one tensor pair treated as one vector (Shoemake 1985):
    ``sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b`` with
    ``cos(theta) = <a / |a|, b / |b|>``; linear interpolation where ``|cos(theta)| > 0.9995``.
    Computed in float32 (float64 for float64), returned in ``a``'s dtype."""
    dtype = work_dtype(a)
    x, y = a.to(dtype).reshape(1, -1), b.to(dtype).reshape(1, -1)
    t_ = torch.tensor([[t]], dtype=dtype)
    if x.shape[1] == 0:
        return a.clone()
    norm_x = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    norm_y = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    norm_x = torch.where(norm_x > EPS, norm_x, 1)
    norm_y = torch.where(norm_y > EPS, norm_y, 1)
    dot = ((x / norm_x) * (y / norm_y)).sum(dim=1, keepdim=True).clamp(-1, 1)
    near_parallel = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(near_parallel, 0, dot))
    sin_theta = torch.sin(theta)
    coef_x = torch.where(near_parallel, 1 - t_, torch.sin((1 - t_) * theta) / sin_theta)
    coef_y = torch.where(near_parallel, t_, torch.sin(t_ * theta) / sin_theta)
    return (coef_x * x + coef_y * y).reshape(a.shape).to(a.dtype)


def slerp(a: Weights, b: AnyWeights, t: float) -> Weights:
    """Spherical linear interpolation from ``a`` (``t = 0``) to ``b`` (``t = 1``), tensor by
    tensor, each tensor treated as one vector (Shoemake 1985, as mergekit's ``slerp`` merges
    models): the angle ``theta`` between the two directions is interpolated, not the weights.
    Where the two tensors are near-parallel (``|cos theta| > 0.9995``) or antiparallel the
    formula is ill-conditioned and linear interpolation is used instead, as in mergekit.
    Integer tensors come from ``a``. Returns the kind of ``a`` (module or state dict).

    Args:
        a: the model at ``t = 0`` (mergekit's ``base_model``).
        b: the model at ``t = 1``.
        t: the interpolation weight, in [0, 1].

    Example:
        >>> import torch
        >>> slerp({"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}, 0.5)["w"]
        tensor([0.7071, 0.7071])
    """
    check_finite("t", t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"`t` must be in [0, 1], got {t}")
    sa, sb = state_of(a, "a"), state_of(b, "b")
    check_states([sa, sb], "states")
    out = {k: slerp_tensor(v, sb[k], float(t)) if v.is_floating_point() else v.clone() for k, v in sa.items()}
    return returned_as(a, out)
