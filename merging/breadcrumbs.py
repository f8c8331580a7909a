"""Model breadcrumbs (see :mod:`litplug.merging` for the method card)."""

from __future__ import annotations

from collections.abc import Sequence

from .arithmetic import scales_for
from .states import AnyWeights, Weights, check_density, check_finite, returned_as
from .task_vectors import Trim, combine, outlier_masks, stacked_deltas
from .ties import check_trim


def breadcrumbs(
    base: Weights,
    finetuned: Sequence[AnyWeights],
    density: float = 0.9,
    gamma: float = 0.01,
    scale: float | Sequence[float] = 1.0,
    consensus: bool = False,
    trim: Trim = "tensor",
) -> Weights:
    """Model breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling Multi-Task Model
    Merging with Sparse Masks"): each task vector ``tau_t = finetuned_t - base`` loses its
    outliers and its small perturbations, ``theta = base + sum_t scale_t * mask_t * tau_t``.

    The mask drops the ``int(gamma * d)`` largest magnitudes and keeps the next exactly
    ``int(density * d)`` (the smallest are dropped; when the two shares do not fit in ``d``
    fewer large ones are dropped), ``d`` counted per tensor (``trim="tensor"``, the paper's
    per-layer masks and mergekit's) or over the whole model (``trim="model"``); ties are broken
    towards the earliest entries as in :func:`ties_merge`. ``consensus=True`` elects signs and
    averages the agreeing entries as TIES does (mergekit's ``breadcrumbs_ties`` with
    ``normalize: true``). Returns the kind of ``base`` (module or state dict).

    Args:
        base: the pre-trained weights.
        finetuned: the fine-tunes of ``base``.
        density: share of entries kept, in (0, 1].
        gamma: share of the largest magnitudes dropped, in [0, 1).
        scale: one coefficient for every task vector or one per fine-tune (mergekit's ``weight``).
        consensus: elect signs and take the disjoint mean (TIES) instead of the weighted sum.
        trim: count ``d`` per tensor or over the whole model.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(4)}
        >>> breadcrumbs(base, [{"w": torch.tensor([4.0, -3.0, 2.0, 1.0])}], density=0.5, gamma=0.25)["w"]
        tensor([ 0., -3.,  2.,  0.])
    """
    check_density(density)
    check_finite("gamma", gamma)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"`gamma` must be in [0, 1), got {gamma}")
    check_trim(trim)
    base_state, states, deltas = stacked_deltas(base, finetuned)
    scales = scales_for(scale, len(states))
    masks = outlier_masks(deltas, density, gamma, trim)
    kept = {name: d * masks[name] for name, d in deltas.items()}
    if consensus:
        merged = combine(base_state, kept, scales, consensus=True, normalize=True, scale=1.0)
    else:
        merged = combine(base_state, kept, scales, consensus=False, normalize=False, scale=1.0)
    return returned_as(base, merged)
