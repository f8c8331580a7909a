"""Model soups (Wortsman et al. 2022): the uniform soup (mean of the ingredients' weights) and the
greedy soup (add ingredients in order of their held-out metric while the soup strictly improves).
:class:`litplug.modules.ModelSoup` runs them on the validation split.

Example:
    >>> import torch
    >>> soup = uniform_soup([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
    >>> soup["w"]
    tensor([0.5000, 0.5000])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..merging.states import State

__all__ = ["greedy_soup", "uniform_soup"]


def uniform_soup(states: Sequence[State]) -> State:
    """Mean of the floating tensors of ``states`` (computed in float64, returned in the first
    state's dtypes); integer tensors (``num_batches_tracked``) are taken from the first."""
    if not states:
        raise ValueError("`states` must hold at least one state dict")
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            out[name] = torch.stack([s[name].double() for s in states]).mean(0).to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def greedy_soup(
    states: Sequence[State],
    evaluate: Callable[[State], float],
    maximize: bool = True,
    on_trial: Callable[[int, float, bool], None] | None = None,
) -> tuple[State, list[int], list[float]]:
    """Greedy soup of Wortsman et al. 2022.

    Args:
        states: the ingredients.
        evaluate: held-out metric of a state dict.
        maximize: whether larger metric values are better.
        on_trial: called once per ingredient in the order tried, with its index, the held-out
            metric of the soup with it added (the best ingredient alone first) and whether it was
            kept: what a figure of the soup as it grows needs, at no extra evaluation.

    Returns:
        ``(soup, kept, scores)``: the soup, the indices of the kept ingredients in the order they
        were added, and every ingredient's own score.
    """
    scores = [evaluate(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: scores[i], reverse=maximize)
    kept = [order[0]]
    best = scores[order[0]]
    soup = states[order[0]]
    if on_trial is not None:
        on_trial(order[0], best, True)
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in kept + [i]])
        score = evaluate(candidate)
        accepted = (score > best) if maximize else (score < best)
        if accepted:
            kept, best, soup = kept + [i], score, candidate
        if on_trial is not None:
            on_trial(i, score, accepted)
    return soup, kept, scores
