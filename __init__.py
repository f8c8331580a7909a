"""litplug: research training methods as PyTorch Lightning plugins.

``litplug.callbacks``, ``litplug.modules`` and ``litplug.datamodules`` hold the public classes;
``litplug fit --config ...`` (``litplug.cli``) runs them from YAML.
"""

__version__ = "0.1.0"
