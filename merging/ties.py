"""TIES-merging (see :mod:`litplug.merging` for the method card)."""

from __future__ import annotations

from collections.abc import Sequence

from .states import AnyWeights, Weights, check_density, check_finite, returned_as
from .task_vectors import TRIMS, Trim, combine, magnitude_masks, stacked_deltas


def check_trim(trim: str) -> None:
    if trim not in TRIMS:
        raise ValueError(f"`trim` must be one of {TRIMS}, got {trim!r}")


def ties_merge(
    base: Weights,
    finetuned: Sequence[AnyWeights],
    density: float = 0.2,
    scale: float = 1.0,
    trim: Trim = "model",
) -> Weights:
    """TIES-merging (Yadav et al. 2023, Algorithm 1).

    With ``tau_t = finetuned_t - base`` (floating tensors, float32; float64 for float64 tensors):

    1. trim: keep exactly ``k = int(density * d)`` entries of largest magnitude of each task
       vector and zero the rest. ``trim="model"`` (default, the authors' code) counts ``d``
       over the whole model, ``trim="tensor"`` (mergekit) per tensor. Among entries tied with
       the ``k``-th largest magnitude the earliest (state-dict order, then row-major) are kept,
       so quantised task vectors keep ``k`` entries too. The authors' ``topk_values_mask`` keeps
       every entry at or above the ``(d - k)``-th smallest magnitude (``k + 1`` or more);
    2. elect: ``gamma = sign(sum_t trimmed_t)``; entries where the sum is exactly 0 take the sign
       of ``sum(gamma)`` (the authors' "majority" rule; mergekit elects +);
    3. disjoint merge: ``tau_m = sum_t [sign(trimmed_t) == gamma] trimmed_t / max(1, count)``;

    and returns ``base + scale * tau_m`` as the kind of ``base`` (module or state dict). Integer
    tensors are copied from ``base``.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(3)}
        >>> fts = [{"w": torch.tensor([1.0, -2.0, 0.1])}, {"w": torch.tensor([3.0, 1.0, -0.2])}]
        >>> ties_merge(base, fts, density=2 / 3)["w"]
        tensor([ 2., -2.,  0.])
    """
    check_density(density)
    check_finite("scale", scale)
    check_trim(trim)
    base_state, states, deltas = stacked_deltas(base, finetuned)
    masks = magnitude_masks(deltas, density, trim)
    trimmed = {name: d * masks[name] for name, d in deltas.items()}
    merged = combine(base_state, trimmed, [1.0] * len(states), consensus=True, normalize=True, scale=float(scale))
    return returned_as(base, merged)
