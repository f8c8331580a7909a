"""Linear combinations of state dicts: interpolation, task vectors, task arithmetic and
TIES-merging (see :mod:`litplug.merging` for the method card)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

State = dict[str, Tensor]


# ============================================================================ checks
def check_states(states: Sequence[Mapping[str, Tensor]], what: str) -> None:
    first = states[0]
    for i, state in enumerate(states[1:], 1):
        if state.keys() != first.keys():
            missing = sorted(set(first) ^ set(state))[0]
            raise ValueError(f"`{what}`[{i}] and `{what}`[0] differ in their tensors: {missing!r} is in one only")
        for name, value in state.items():
            if value.shape != first[name].shape:
                raise ValueError(
                    f"`{what}`[{i}][{name!r}] has shape {tuple(value.shape)}, expected {tuple(first[name].shape)}"
                )


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")


# ============================================================================ linear combinations
def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], alpha: float) -> State:
    """``(1 - alpha) * a + alpha * b`` for floating tensors (computed in float64, returned in
    ``a``'s dtypes); integer tensors are copied from ``a``. ``alpha`` may lie outside [0, 1]."""
    _check_finite("alpha", alpha)
    check_states([a, b], "states")
    out = {}
    for name, va in a.items():
        if va.is_floating_point():
            out[name] = torch.lerp(va.double(), b[name].double(), float(alpha)).to(va.dtype)
        else:
            out[name] = va.clone()
    return out


def task_vector(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> State:
    """``finetuned - base`` for every floating tensor (float64)."""
    check_states([base, finetuned], "states")
    return {k: finetuned[k].double() - v.double() for k, v in base.items() if v.is_floating_point()}


def _add_to_base(base: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> State:
    return {k: (v.double() + delta[k]).to(v.dtype) if k in delta else v.clone() for k, v in base.items()}


def task_arithmetic(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], scale: float | Sequence[float] = 1.0
) -> State:
    """Task arithmetic (Ilharco et al. 2023): ``base + sum_t scale_t * (finetuned_t - base)``.

    Args:
        base: the pre-trained weights every fine-tune started from.
        finetuned: the fine-tuned weights, one per task.
        scale: one scaling coefficient ``lambda`` for all task vectors, or one per task (the
            merging coefficients MAP searches over).

    Example:
        >>> base = {"w": torch.zeros(2)}
        >>> task_arithmetic(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}], 0.5)["w"]
        tensor([0.5000, 1.0000])
    """
    if not finetuned:
        raise ValueError("`finetuned` must hold at least one state dict")
    scales = _scales(scale, len(finetuned))
    check_states([base, *finetuned], "states")
    delta: State = {}
    for s, ft in zip(scales, finetuned):
        for k, tau in task_vector(base, ft).items():
            delta[k] = delta[k] + s * tau if k in delta else s * tau
    return _add_to_base(base, delta)


def _scales(scale: float | Sequence[float], n: int) -> list[float]:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        _check_finite("scale", scale)
        return [float(scale)] * n
    scales = [float(s) for s in scale]
    if len(scales) != n:
        raise ValueError(f"`scale` must be a number or hold one value per fine-tune ({n}), got {len(scales)} values")
    for s in scales:
        _check_finite("scale", s)
    return scales


def ties_merge(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], density: float = 0.2, scale: float = 1.0
) -> State:
    """TIES-merging (Yadav et al. 2023, Algorithm 1) on whole-model task vectors.

    Every floating tensor of ``finetuned_t - base`` is flattened into one vector ``tau_t`` of
    length ``d`` (as the authors' code does, over the whole model, not per layer), then:

    1. trim: keep the ``k = int(density * d)`` entries of largest magnitude of each ``tau_t``
       (entries tied with the ``k``-th largest magnitude are kept too), zero the rest. The
       authors' ``topk_values_mask`` keeps the entries at or above the ``(d - k)``-th smallest
       magnitude, i.e. ``k + 1`` entries when magnitudes are distinct; litplug keeps ``k``;
    2. elect: ``gamma = sign(sum_t trimmed_t)``; entries where the sum is exactly 0 take the sign
       of ``sum(gamma)`` (the authors' "majority" rule);
    3. disjoint merge: ``tau_m = sum_t [sign(trimmed_t) == gamma] trimmed_t / max(1, count)``
       (the mean over the tasks whose kept entry agrees with the elected sign);

    and returns ``base + scale * tau_m``. Integer tensors are copied from ``base``.

    Example:
        >>> base = {"w": torch.zeros(3)}
        >>> fts = [{"w": torch.tensor([1.0, -2.0, 0.1])}, {"w": torch.tensor([3.0, 1.0, -0.2])}]
        >>> ties_merge(base, fts, density=2 / 3)["w"]
        tensor([ 2., -2.,  0.])
    """
    if not finetuned:
        raise ValueError("`finetuned` must hold at least one state dict")
    _check_finite("density", density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density}")
    _check_finite("scale", scale)
    check_states([base, *finetuned], "states")
    names = [k for k, v in base.items() if v.is_floating_point()]
    if not names:
        raise ValueError("`base` has no floating tensors to merge")
    taus = torch.stack([torch.cat([(ft[k].double() - base[k].double()).flatten() for k in names]) for ft in finetuned])
    d = taus.shape[1]
    keep = int(density * d)
    if keep == 0:
        taus = torch.zeros_like(taus)
    elif keep < d:
        threshold = taus.abs().kthvalue(d - keep + 1, dim=1, keepdim=True).values  # the keep-th largest
        taus = taus * (taus.abs() >= threshold)
    summed = taus.sum(0)
    sign = torch.sign(summed)
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, taus > 0, taus < 0)
    selected = taus * agree
    merged = selected.sum(0) / agree.sum(0).clamp(min=1)
    delta, offset = {}, 0
    for k in names:
        n = base[k].numel()
        delta[k] = scale * merged[offset : offset + n].view_as(base[k])
        offset += n
    return _add_to_base(base, delta)


# ============================================================================ permutation structure
