"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .certified import IBPWarmup

__all__: list[str] = ["IBPWarmup"]
