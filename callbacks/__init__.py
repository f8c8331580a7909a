"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .averaging import EMA, SWA
from .offline import GradientAscentSearch
from .sharpness import SAM, SharpnessAwareMinimization, SharpnessMonitor, SurrogateSharpness

__all__: list[str] = ["EMA", "GradientAscentSearch", "SAM", "SWA", "SharpnessAwareMinimization", "SharpnessMonitor", "SurrogateSharpness"]
