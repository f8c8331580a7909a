"""Weight averaging, pure torch: the EMA decay schedule, the in-place average update (EMA and SWA)
and the BatchNorm statistics pass of SWA. :class:`litplug.callbacks.EMA` and
:class:`litplug.callbacks.SWA` wire them into the Trainer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..plumbing import training_mode
from ..plumbing.third_party_private import BatchNorm, foreach_add_, foreach_copy_, foreach_lerp_, foreach_mul_

__all__ = ["average_update_", "ema_decay", "update_bn_"]


def ema_decay(t: int, decay: float, warmup: bool = False, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay of the EMA update number ``t`` (0-based): 0 for the first update (a copy), then
    ``decay``, or ``min(decay, 1 - (1 + t / gamma) ** -power)`` with ``warmup``.

    Example:
        >>> ema_decay(0, 0.999), ema_decay(1, 0.999), round(ema_decay(1, 0.999, warmup=True), 4)
        (0.0, 0.999, 0.37)
    """
    if t <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + t / gamma) ** -power)


@torch.no_grad()
def average_update_(
    average: list[Tensor], current: list[Tensor], weight: float, staging: list[Tensor] | None = None
) -> None:
    """``average <- average + weight * (current - average)`` in place, for whole lists at once.

    EMA uses ``weight = 1 - decay``, SWA ``weight = 1 / (n + 1)``; ``weight == 1`` copies exactly.
    Tensors are paired by position (callers pair them by name). If the dtypes differ (an fp32
    average of a bf16 model) the update is computed in the average's dtype; if the devices differ
    (an average offloaded to the CPU) ``current`` is first copied into ``staging`` (tensors like
    ``average``; allocated here if not given).

    Example:
        >>> avg, cur = [torch.zeros(2)], [torch.ones(2)]
        >>> average_update_(avg, cur, 0.25); avg
        [tensor([0.2500, 0.2500])]
    """
    if not average:
        return
    if weight == 1.0:
        foreach_copy_(average, current)
        return
    if average[0].device != current[0].device:
        if staging is None:
            staging = [torch.empty_like(a) for a in average]
        foreach_copy_(staging, current)
        current = staging
    if average[0].dtype == current[0].dtype:
        foreach_lerp_(average, current, weight)
    else:
        foreach_mul_(average, 1.0 - weight)
        foreach_add_(average, current, alpha=weight)


@torch.no_grad()
def update_bn_(module: nn.Module, batches: Iterable[Any]) -> bool:
    """Recompute the running statistics of every BatchNorm layer of ``module`` as the plain mean
    over ``batches`` (``module(batch[0])`` for tuples/lists, ``module(batch)`` otherwise).

    Returns whether ``module`` has any BatchNorm layer (nothing runs if not). Like
    ``torch.optim.swa_utils.update_bn`` but over an already device-placed iterable, so the caller
    decides how many batches (``limit_train_batches``) and how to move them.
    """
    norms = [m for m in module.modules() if isinstance(m, BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches
    with training_mode(module, True):
        for batch in batches:
            module(batch[0] if isinstance(batch, (tuple, list)) else batch)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return True
