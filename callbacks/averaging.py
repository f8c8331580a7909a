"""Weight averaging: the names of ``litplug.callbacks.averaging``.

:class:`EMA` is in :mod:`litplug.callbacks.ema`, :class:`SWA` in :mod:`litplug.callbacks.swa`, their
shared machinery in :mod:`litplug.callbacks.weight_averaging` and the formulas in
:mod:`litplug.functional.averaging`.
"""

from ..functional.averaging import average_update_, ema_decay, update_bn_
from .ema import EMA
from .swa import SWA

__all__ = ["EMA", "SWA", "average_update_", "ema_decay", "update_bn_"]
