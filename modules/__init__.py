"""litplug LightningModules and backbones."""

from .base import TrainingModule
from .certified import CertifiedClassifier
from .classifier import Classifier
from .language import CausalTransformer, LanguageModel
from .merge import ModelMerge
from .networks import CNN7, MLP, ConvNet
from .regression import Regressor
from .sisa import SISA
from .soup import ModelSoup
from .unlearning import Unlearner

__all__ = [
    "SISA",
    "CNN7",
    "CausalTransformer",
    "MLP",
    "CertifiedClassifier",
    "Classifier",
    "ConvNet",
    "LanguageModel",
    "ModelMerge",
    "ModelSoup",
    "Regressor",
    "TrainingModule",
    "Unlearner",
]
