"""litplug datamodules: embedded digits, synthetic data, text and question/answer pairs, MNIST/CIFAR-10 from
disk, and wrappers for anyone's datamodule (forget/retain splits, per-example indices)."""

from .base import TensorDataModule
from .digits import Digits, DigitsTasks
from .forgetting import ForgetRetain
from .indexed import Indexed
from .noisy import NoisyLabels
from .offline import OfflineDesigns
from .qa import FictitiousQA
from .synthetic import SyntheticClassification
from .text import MarkovText
from .vision import CIFAR10, MNIST

__all__ = [
    "CIFAR10",
    "MNIST",
    "Digits",
    "DigitsTasks",
    "FictitiousQA",
    "ForgetRetain",
    "Indexed",
    "MarkovText",
    "NoisyLabels",
    "OfflineDesigns",
    "SyntheticClassification",
    "TensorDataModule",
]
