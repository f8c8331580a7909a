"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .unlearning import UnlearningMask

__all__: list[str] = ["UnlearningMask"]
