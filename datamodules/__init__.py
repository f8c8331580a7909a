"""litplug datamodules: embedded digits, synthetic data, MNIST/CIFAR-10 from disk."""

from .base import TensorDataModule
from .digits import Digits
from .forgetting import ForgetRetain
from .offline import OfflineDesigns
from .synthetic import SyntheticClassification
from .vision import CIFAR10, MNIST

__all__ = ["CIFAR10", "MNIST", "Digits", "ForgetRetain", "OfflineDesigns", "SyntheticClassification", "TensorDataModule"]
