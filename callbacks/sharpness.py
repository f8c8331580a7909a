"""Sharpness penalties and the sharpness monitor: the names of ``litplug.callbacks.sharpness``.

Each lives in its own file: :mod:`litplug.callbacks.sam` (SAM/ASAM/gradient-norm penalty),
:mod:`litplug.callbacks.ignite` (IGNITE's surrogate sharpness), :mod:`litplug.callbacks.monitor`
and the closure machinery they share, :mod:`litplug.callbacks.passes`; the formulas are in
:mod:`litplug.functional.sharpness`.
"""

from ..functional.sharpness import dual_ascent, global_norm, ignite_gradient, sam_gradient, sam_perturbation
from .ignite import SurrogateSharpness
from .monitor import SharpnessMonitor
from .sam import SAM, SharpnessAwareMinimization

__all__ = [
    "SAM",
    "SharpnessAwareMinimization",
    "SharpnessMonitor",
    "SurrogateSharpness",
    "dual_ascent",
    "global_norm",
    "ignite_gradient",
    "sam_gradient",
    "sam_perturbation",
]
