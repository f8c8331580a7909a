"""litplug LightningModules and backbones."""

from .base import TrainingModule
from .classifier import Classifier
from .networks import MLP, ConvNet
from .regression import Regressor
from .soup import ModelSoup

__all__ = ["MLP", "Classifier", "ConvNet", "ModelSoup", "Regressor", "TrainingModule"]
