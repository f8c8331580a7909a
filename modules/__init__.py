"""litplug LightningModules and backbones."""

from .base import TrainingModule
from .bounds import interval_bounds, margin_bounds
from .certified import CertifiedClassifier
from .classifier import Classifier
from .networks import CNN7, MLP, ConvNet

__all__ = ["CNN7", "MLP", "CertifiedClassifier", "Classifier", "ConvNet", "TrainingModule", "interval_bounds", "margin_bounds"]
