"""Linear combinations of models: interpolation, weighted averages and task arithmetic (see
:mod:`litplug.merging` for the method card)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .states import AnyWeights, Weights, check_finite, check_states, returned_as, state_of, states_of, work_dtype
from .task_vectors import combine, stacked_deltas


def interpolate(a: Weights, b: AnyWeights, alpha: float) -> Weights:
    """``(1 - alpha) * a + alpha * b`` for floating tensors (``torch.lerp`` in float32, float64
    for float64 tensors, returned in ``a``'s dtypes); integer tensors are copied from ``a``.
    ``alpha`` may lie outside [0, 1]. Returns the kind of ``a`` (module or state dict).

    Example:
        >>> import torch
        >>> interpolate({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"]
        tensor([0.2500, 0.2500])
    """
    check_finite("alpha", alpha)
    sa, sb = state_of(a, "a"), state_of(b, "b")
    check_states([sa, sb], "states")
    out = {}
    for name, va in sa.items():
        if va.is_floating_point():
            dtype = work_dtype(va)
            out[name] = torch.lerp(va.to(dtype), sb[name].to(dtype), float(alpha)).to(va.dtype)
        else:
            out[name] = va.clone()
    return returned_as(a, out)


def linear(models: Sequence[AnyWeights], weights: Sequence[float] | None = None, normalize: bool = True) -> AnyWeights:
    """Weighted average ``sum_i w_i theta_i / sum_i w_i`` (Wortsman et al. 2022, "Model soups";
    mergekit's ``linear``): accumulated in float32 (float64 for float64 tensors) in the models'
    order, as mergekit does. ``weights=None`` is the uniform soup; ``normalize=False`` skips the
    division. Integer tensors come from the first model. Returns the kind of ``models[0]``.

    Example:
        >>> import torch
        >>> linear([{"w": torch.zeros(2)}, {"w": torch.ones(2)}], [1.0, 3.0])["w"]
        tensor([0.7500, 0.7500])
    """
    states = states_of(models, "models")
    if not states:
        raise ValueError("`models` must hold at least one model or state dict")
    check_states(states, "models")
    if weights is None:
        weights = [1.0] * len(states)
    weights = [float(w) for w in weights]
    if len(weights) != len(states):
        raise ValueError(f"`weights` must hold one value per model ({len(states)}), got {len(weights)}")
    for w in weights:
        check_finite("weights", w)
    if normalize and sum(weights) == 0:
        raise ValueError("`weights` sum to 0: they cannot be normalised (pass normalize=False)")
    out = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        dtype = work_dtype(first)
        coefficients = torch.tensor(weights, dtype=dtype)
        acc = torch.zeros_like(first, dtype=dtype)
        for state, c in zip(states, coefficients.unbind()):
            acc.addcmul_(state[name], c)
        if normalize:
            acc.div_(coefficients.sum())
        out[name] = acc.to(first.dtype)
    return returned_as(models[0], out)


def task_arithmetic(base: Weights, finetuned: Sequence[AnyWeights], scale: float | Sequence[float] = 1.0) -> Weights:
    """Task arithmetic (Ilharco et al. 2023): ``base + sum_t scale_t * (finetuned_t - base)``,
    in float32 (float64 for float64 tensors) in mergekit's order of operations. Returns the kind
    of ``base`` (module or state dict).

    Args:
        base: the pre-trained weights every fine-tune started from.
        finetuned: the fine-tuned weights, one per task.
        scale: one scaling coefficient ``lambda`` for all task vectors, or one per task (the
            merging coefficients MAP searches over).

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(2)}
        >>> task_arithmetic(base, [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}], 0.5)["w"]
        tensor([0.5000, 1.0000])
    """
    base_state, states, deltas = stacked_deltas(base, finetuned)
    scales = scales_for(scale, len(states))
    return returned_as(base, combine(base_state, deltas, scales, consensus=False, normalize=False, scale=1.0))


def scales_for(scale: float | Sequence[float], n: int) -> list[float]:
    """One float per fine-tune from a number or a list (validated)."""
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        check_finite("scale", scale)
        return [float(scale)] * n
    scales = [float(s) for s in scale]
    if len(scales) != n:
        raise ValueError(f"`scale` must be a number or hold one value per fine-tune ({n}), got {len(scales)} values")
    for s in scales:
        check_finite("scale", s)
    return scales
