"""litplug LightningModules and backbones."""

from .base import TrainingModule
from .classifier import Classifier
from .networks import MLP, ConvNet
from .regression import Regressor

__all__ = ["MLP", "Classifier", "ConvNet", "Regressor", "TrainingModule"]
