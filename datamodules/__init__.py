"""litplug datamodules: embedded digits, synthetic data and text, MNIST/CIFAR-10 from disk."""

from .base import TensorDataModule
from .digits import Digits
from .forgetting import ForgetRetain
from .offline import OfflineDesigns
from .synthetic import SyntheticClassification
from .text import MarkovText
from .vision import CIFAR10, MNIST

__all__ = [
    "CIFAR10",
    "MNIST",
    "Digits",
    "ForgetRetain",
    "MarkovText",
    "OfflineDesigns",
    "SyntheticClassification",
    "TensorDataModule",
]
