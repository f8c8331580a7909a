"""Design search on a trained surrogate (offline model-based optimisation): projected gradient
ascent and the choice of starting designs, the "Grad" baseline of Design-Bench (Trabucco et al.
2022). :class:`litplug.callbacks.GradientAscentSearch` runs them at the end of ``fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

__all__ = ["gradient_ascent", "starting_designs"]


def gradient_ascent(
    surrogate: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    steps: int,
    step_size: float,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected gradient ascent: ``steps`` times ``x <- clip(x + step_size * grad sum f(x))``.

    Each design moves along the gradient of its own prediction (``f`` maps ``[N, d]`` to ``[N]``
    or ``[N, 1]`` and treats rows independently, e.g. a network in eval mode). Gradients are taken
    with respect to the designs only; parameters of ``surrogate`` get no ``.grad``.

    Example:
        >>> x = gradient_ascent(lambda x: -(x**2).sum(-1), torch.ones(1, 2), steps=1, step_size=0.25)
        >>> x  # x - 0.25 * 2x
        tensor([[0.5000, 0.5000]])
    """
    x = x0.detach().clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(surrogate(x).sum(), x)
        x = x.detach() + step_size * grad.to(x.dtype)
        if lower is not None or upper is not None:
            x = x.clamp(min=lower, max=upper)
    return x


def starting_designs(
    designs: torch.Tensor, scores: torch.Tensor, num: int, init: Literal["top", "random"], seed: int = 0
) -> torch.Tensor:
    """The ``num`` offline designs with the highest scores (``top``), or ``num`` drawn uniformly
    without replacement with ``seed`` (``random``)."""
    num = min(num, len(scores))
    if init == "top":
        idx = torch.topk(scores, num).indices
    else:
        idx = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))[:num]
    return designs[idx]
