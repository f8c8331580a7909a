"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

__all__: list[str] = []
