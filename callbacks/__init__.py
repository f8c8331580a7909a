"""litplug callbacks, importable by short name (``from litplug.callbacks import EMA``)."""

from .certified import IBPWarmup
from .ema import EMA
from .ignite import SurrogateSharpness
from .monitor import SharpnessMonitor
from .offline import GradientAscentSearch
from .pruning import DataPruning
from .sam import SAM, SharpnessAwareMinimization
from .swa import SWA
from .unlearning import UnlearningMask
from .unlearning_evaluation import UnlearningEvaluation

__all__: list[str] = [
    "DataPruning",
    "EMA",
    "GradientAscentSearch",
    "SAM",
    "SWA",
    "IBPWarmup",
    "SharpnessAwareMinimization",
    "SharpnessMonitor",
    "SurrogateSharpness",
    "UnlearningEvaluation",
    "UnlearningMask",
]
