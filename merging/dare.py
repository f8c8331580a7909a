"""DARE: drop and rescale (see :mod:`litplug.merging` for the method card)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .arithmetic import scales_for
from .states import AnyWeights, Weights, check_density, returned_as
from .task_vectors import combine, stacked_deltas


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int, got {seed!r}")


def dare(
    base: Weights,
    finetuned: Sequence[AnyWeights],
    density: float,
    seed: int,
    scale: float | Sequence[float] = 1.0,
    consensus: bool = False,
) -> Weights:
    """DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from
    Homologous Models as a Free Lunch", Eq. 1): every entry of each task vector
    ``tau_t = finetuned_t - base`` is kept with probability ``density`` (a Bernoulli draw) and
    rescaled by ``1 / density``, so the expected task vector is unchanged; then
    ``theta = base + sum_t scale_t * tau_t'`` (``consensus=False``, mergekit's ``dare_linear``), or
    with ``consensus=True`` TIES' sign election and disjoint mean of the rescaled vectors
    (mergekit's ``dare_ties`` with ``normalize: true``).

    The masks come from a ``torch.Generator`` seeded with ``seed``, drawn tensor by tensor in
    ``base``'s order, one ``(fine-tunes, *shape)`` draw per tensor: the same seed gives the same
    masks on every rank and every run. mergekit rescales the kept entries to the task vector's
    L1 norm instead of by ``1 / density`` (equal in expectation) and draws from torch's global
    generator. Returns the kind of ``base`` (module or state dict).

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(10_000)}
        >>> merged = dare(base, [{"w": torch.ones(10_000)}], density=0.25, seed=0)["w"]
        >>> sorted(merged.unique().tolist()), round(merged.mean().item(), 1)
        ([0.0, 4.0], 1.0)
    """
    check_density(density)
    check_seed(seed)
    return drop_and_rescale(base, finetuned, lambda d: density, scale, seed, consensus)


def drop_and_rescale(
    base: Weights,
    finetuned: Sequence[AnyWeights],
    keep: Callable[[Tensor], Tensor | float],
    scale: float | Sequence[float],
    seed: int,
    consensus: bool,
) -> Weights:
    """The merge of DARE and DELLA: each task-vector entry ``d`` is kept with probability
    ``p = keep(d)`` (a number, or a tensor shaped like the stacked deltas) and divided by it, so
    the kept vector is ``d`` in expectation; then the task vectors are combined. One Bernoulli draw
    per entry from a generator seeded with ``seed``."""
    base_state, states, deltas = stacked_deltas(base, finetuned)
    scales = scales_for(scale, len(states))
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    for name, d in deltas.items():
        p = keep(d)
        probabilities = p.float() if isinstance(p, Tensor) else torch.full(d.shape, float(p))
        mask = torch.bernoulli(probabilities, generator=gen).to(d.dtype)
        kept[name] = d * mask / p
    merged = combine(base_state, kept, scales, consensus=consensus, normalize=consensus, scale=1.0)
    return returned_as(base, merged)
