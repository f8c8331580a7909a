"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .sharpness import SAM, SharpnessAwareMinimization, SharpnessMonitor, SurrogateSharpness

__all__: list[str] = ["SAM", "SharpnessAwareMinimization", "SharpnessMonitor", "SurrogateSharpness"]
