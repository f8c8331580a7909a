"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .averaging import EMA, SWA

__all__: list[str] = ["EMA", "SWA"]
