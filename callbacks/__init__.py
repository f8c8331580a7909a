"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .certified import IBPWarmup
from .checkpoint_soup import CheckpointSoup
from .elr import ELR
from .ema import EMA
from .ignite import SurrogateSharpness
from .monitor import SharpnessMonitor
from .offline import GradientAscentSearch
from .pruning import DataPruning
from .pskd import PSKD
from .sam import SAM
from .swa import SWA
from .tightness import BoundTightness
from .unlearning import UnlearningMask
from .unlearning_evaluation import UnlearningEvaluation
from .wise_ft import WiSEFT

__all__: list[str] = [
    "BoundTightness",
    "CheckpointSoup",
    "DataPruning",
    "ELR",
    "EMA",
    "GradientAscentSearch",
    "SAM",
    "SWA",
    "IBPWarmup",
    "PSKD",
    "SharpnessMonitor",
    "SurrogateSharpness",
    "UnlearningEvaluation",
    "UnlearningMask",
    "WiSEFT",
]
