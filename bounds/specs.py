"""Input specifications: the normalised box of a pixel-space L-inf ball, the margin
specification ``e_y - e_j``, and the margin lower bounds built from them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..validation import check_choice, check_int, check_number
from .crown import METHODS, linear_bounds
from .engine import bounded, check_box


def _channel_view(name: str, values: Sequence[float] | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=x.dtype, device=x.device).flatten()
    if t.numel() == 1:
        return t.reshape([1] * x.dim())
    if x.dim() < 2 or t.numel() != x.shape[1]:
        channels = x.shape[1] if x.dim() >= 2 else 1
        raise ValueError(f"`{name}` must hold one value or one per channel ({channels}), got {t.numel()}")
    return t.view([1, -1] + [1] * (x.dim() - 2))


def input_box(
    x: torch.Tensor,
    eps: float,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    pixel_range: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised box of an L-inf ball of radius ``eps`` in *pixel* space.

    ``x`` is normalised (``(pixel - mean) / std``); the ball around its pixels is clamped to
    ``pixel_range`` and mapped back through ``mean``/``std`` (per channel, or one value).
    """
    check_number("eps", eps, low=0)
    for v in [mean] if isinstance(mean, (int, float)) else mean:
        check_number("mean", v)
    for v in [std] if isinstance(std, (int, float)) else std:
        check_number("std", v, low=0, low_open=True)
    low_end, high_end = (check_number("pixel_range", v, allow_inf=True) for v in pixel_range)
    if low_end > high_end:
        raise ValueError(f"`pixel_range` must be (low, high) with low <= high, got {tuple(pixel_range)}")
    mean_t, std_t = _channel_view("mean", mean, x), _channel_view("std", std, x)
    pixels = x * std_t + mean_t
    low = (pixels - eps).clamp(min=pixel_range[0])
    high = (pixels + eps).clamp(max=pixel_range[1])
    return (low - mean_t) / std_t, (high - mean_t) / std_t


def margin_spec(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[B, K, K]`` specification with rows ``e_y - e_j`` (the row ``j = y`` is zero)."""
    eye = torch.eye(num_classes, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


def margin_bounds(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    pixel_range: tuple[float, float] = (-math.inf, math.inf),
    num_classes: int | None = None,
    method: str = "ibp",
) -> torch.Tensor:
    """Lower bounds ``[B, K]`` of ``z_y - z_j`` over the pixel-space ``eps`` ball around ``x``
    (entry ``y`` is 0), with the last linear layer elided. A sample is verified when every other
    entry is > 0. ``y``: integer labels ``[B]`` in ``[0, K)``; ``num_classes`` (``K``) defaults to
    the width of ``model``'s output and must equal it. ``method``: ``"ibp"`` (interval bounds),
    ``"crown"`` or ``"crown-ibp"`` (:func:`~.crown.crown_bounds`).

    Raises:
        TypeError: ``x`` or ``y`` not a tensor, ``y`` not of an integer dtype.
        ValueError: ``x`` not batched like the network's input, or not of the dtype and device of
            its parameters (it is not cast); ``y`` not of shape ``[B]`` or out of range; a bad
            ``num_classes``, ``eps`` or ``method``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> margin_bounds(net, torch.rand(2, 4), torch.tensor([0, 2]), eps=0.0).shape
        torch.Size([2, 3])
    """
    check_choice("method", method, ("ibp", *METHODS))
    engine = bounded(model)
    engine.check_layout(x, x, ("x", "x"))
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        got = f"a {y.dtype} tensor" if isinstance(y, torch.Tensor) else type(y).__name__
        raise TypeError(f"`y` must be an integer tensor of class indices, got {got}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"`y` must have shape [batch] = [{x.shape[0]}], got {tuple(y.shape)}")
    outputs = engine.num_outputs(x)
    if num_classes is None:
        num_classes = outputs
    elif check_int("num_classes", num_classes, low=2) != outputs:
        raise ValueError(f"`num_classes` must equal the network's {outputs} outputs, got {num_classes}")
    if y.numel() and not bool(((y >= 0) & (y < num_classes)).all()):
        raise ValueError(
            f"`y` must hold class indices in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )
    lower, upper = input_box(x, eps, mean, std, pixel_range)
    check_box(engine, lower, upper, ("x", "x"))
    spec = margin_spec(y, num_classes).to(x.dtype)
    if method == "ibp":
        return engine(lower, upper, clean=x, spec=spec).lower
    result = linear_bounds(engine, lower, upper, method, spec, clean=x, bound_upper=False, tighten=True)  # type: ignore[arg-type]
    return result.lower
