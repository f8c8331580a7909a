"""litplug LightningModules and backbones."""

from .base import TrainingModule
from .classifier import Classifier
from .networks import MLP, ConvNet
from .soup import ModelSoup
from .unlearning import Unlearner

__all__ = ["MLP", "Classifier", "ConvNet", "ModelSoup", "TrainingModule", "Unlearner"]
