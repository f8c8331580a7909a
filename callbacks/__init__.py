"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .averaging import EMA, SWA
from .certified import IBPWarmup
from .offline import GradientAscentSearch
from .sharpness import SAM, SharpnessAwareMinimization, SharpnessMonitor, SurrogateSharpness
from .unlearning import UnlearningMask

__all__: list[str] = [
    "EMA",
    "GradientAscentSearch",
    "SAM",
    "SWA",
    "IBPWarmup",
    "SharpnessAwareMinimization",
    "SharpnessMonitor",
    "SurrogateSharpness",
    "UnlearningMask",
]
