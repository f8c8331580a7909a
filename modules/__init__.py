"""litplug LightningModules and backbones."""

from .base import TrainingModule
from .classifier import Classifier
from .networks import MLP, ConvNet

__all__ = ["MLP", "Classifier", "ConvNet", "TrainingModule"]
