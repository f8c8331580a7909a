"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .offline import GradientAscentSearch

__all__: list[str] = ["GradientAscentSearch"]
