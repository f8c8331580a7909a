"""DELLA: drop by magnitude rank and rescale (see :mod:`litplug.merging` for the method card)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .dare import check_seed, drop_and_rescale
from .states import AnyWeights, Weights, check_density, check_finite


def keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """MagPrune's keep probabilities for one task vector of one tensor: within each row (a 1-d
    tensor is one row), ranking the magnitudes from smallest (rank 0) to largest (rank 1),
    ``p = density - epsilon + 2 * epsilon * rank``; ties ranked by position."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(n, dtype=rows.dtype).expand_as(rows).contiguous())
    rank = ranks / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    return (density - epsilon + 2 * epsilon * rank).reshape(delta.shape)


def della(
    base: Weights,
    finetuned: Sequence[AnyWeights],
    density: float,
    epsilon: float,
    seed: int,
    scale: float | Sequence[float] = 1.0,
    consensus: bool = True,
) -> Weights:
    """DELLA-merging (Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging
    through Magnitude-Based Sampling"): MagPrune keeps each entry of ``tau_t = finetuned_t - base``
    with a probability that grows with its magnitude's rank within its row, from
    ``density - epsilon`` (smallest) to ``density + epsilon`` (largest) as mergekit parametrises
    it, and rescales a kept entry by ``1 / p`` (the paper's rescaling; mergekit rescales to the L1
    norm); then, with ``consensus=True`` (mergekit's ``della``), TIES' sign election and disjoint
    mean, else the weighted sum (``della_linear``): ``theta = base + merge(scale_t * tau_t')``.
    Masks come from a ``torch.Generator`` seeded with ``seed`` (as :func:`dare`). Returns the
    kind of ``base`` (module or state dict).

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(4, 1000)}
        >>> merged = della(base, [{"w": torch.randn(4, 1000)}], density=0.5, epsilon=0.2, seed=0)["w"]
        >>> 0.45 < (merged != 0).float().mean().item() < 0.55
        True
    """
    check_density(density)
    check_finite("epsilon", epsilon)
    if not (0.0 <= epsilon and density - epsilon > 0 and density + epsilon <= 1):
        raise ValueError(
            f"`epsilon` must keep density - epsilon > 0 and density + epsilon <= 1, got epsilon={epsilon} "
            f"with density={density}"
        )
    check_seed(seed)

    def keep(d: Tensor) -> Tensor:
        return torch.stack([keep_probabilities(row.float(), density, epsilon) for row in d]).to(d.dtype)

    return drop_and_rescale(base, finetuned, keep, scale, seed, consensus)
