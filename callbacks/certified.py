"""Fast certified training with short warmup (Shi et al. 2021): :class:`IBPWarmup`.

Method card: Shi, Wang, Zhang, Yi, Hsieh, "Fast Certified Robust Training with Short Warmup"
(NeurIPS 2021). Three changes to IBP training make a short eps ramp enough:

1. IBP initialisation: weights of every Linear/Conv layer except the last are drawn from
   ``N(0, (sqrt(2 pi) / fan_in)^2)`` (halved on residual branches), so bound radii
   neither explode nor vanish with depth at initialisation; biases are left as they are.
2. An eps schedule per batch: 0 before ``start_epoch``, then over ``ramp_epochs`` either
   ``"linear"`` or ``"smoothed"``: ``eps * a * (p / mid)^beta`` for the first ``mid`` fraction of
   the ramp (progress ``p``) and linear to ``eps`` after, with ``a = mid / (beta (1 - mid) + mid)``
   so value and slope are continuous.
3. Warmup regularizers on the ReLU pre-activation bounds during the ramp (bound tightness and
   ReLU balance with tolerance ``tau``, :func:`litplug.bounds.warmup_regularizers`),
   weighted ``lambda * (1 - eps_t / eps)``.

Cost: nothing beyond the module's IBP loss (the regularizers reuse its bounds).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from ..functional.certified import Schedule, eps_schedule, ibp_init_
from ..protocols import CertifiedModule, require
from ..validation import check_bool, check_choice, check_int, check_number, check_positive_int

__all__ = ["IBPWarmup"]

_SCHEDULES = ("smoothed", "linear")


class IBPWarmup(Callback):
    """Drive a module's certified training with the short-warmup recipe of Shi et al. 2021.

    **Certified interface** (:class:`litplug.protocols.CertifiedModule`, checked at setup): the
    callback works with any ``LightningModule`` that has

    * ``eps: float``: the target radius (read);
    * ``current_eps: float``: the radius its next ``training_step`` uses (set at every batch start);
    * ``regularizer_weight: float`` and ``regularizer_tolerance: float``: weight ``lambda_t`` and
      tolerance ``tau`` of the warmup regularizers in its next ``training_step`` (set at every
      batch start; 0 outside the ramp). The module computes them from its own bounds, e.g. with
      :func:`litplug.bounds.warmup_regularizers`, and logs ``certified/reg_tightness`` and
      ``certified/reg_relu``;
    * ``backbone: nn.Module``: the network that ``ibp_init`` re-initialises.

    :class:`litplug.modules.CertifiedClassifier` implements it. The schedule position (batches
    seen) is the callback's state, saved in checkpoints, so a resumed run continues the same
    schedule; the ramp is measured in batches of ``trainer.num_training_batches``. The callback
    logs ``certified/reg_weight``.

    Distributed: no collective; every rank computes the same schedule. IBP initialisation runs at
    ``setup`` of the first fit, before DDP broadcasts rank 0's weights. Under DDP the warmup
    regularizers are ratios of per-rank batch statistics, so with them a 2-rank run is close to,
    not identical with, one process on the global batch. FSDP2: as the module (CertifiedClassifier
    rejects it).

    Args:
        start_epoch: epochs of natural training (eps 0) before the ramp, >= 0.
        ramp_epochs: epochs over which eps grows to its target, >= 1.
        schedule: ``"smoothed"`` or ``"linear"``.
        mid: fraction of the ramp with polynomial growth (smoothed), in (0, 1).
        beta: power of the polynomial growth (smoothed), >= 1.
        ibp_init: re-initialise the backbone with IBP initialisation at the start of fit.
        regularizer_weight: ``lambda`` of the warmup regularizers, >= 0 (0 disables them).
        regularizer_tolerance: ``tau`` of the regularizers, in (0, 1].

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from litplug.datamodules import Digits
        >>> from litplug.modules import CNN7, CertifiedClassifier
        >>> model = CertifiedClassifier(CNN7([1, 8, 8], 10, width=16, linear_size=128), num_classes=10, eps=0.1)
        >>> trainer = Trainer(max_epochs=20, callbacks=[IBPWarmup(start_epoch=1, ramp_epochs=8)])
        >>> trainer.fit(model, Digits())  # doctest: +SKIP
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "certified": {"warmup regularizer weight and eps": ["^certified/reg_weight$", "^certified/eps$"]},
    }

    def __init__(
        self,
        start_epoch: int = 1,
        ramp_epochs: int = 10,
        schedule: Schedule = "smoothed",
        mid: float = 0.25,
        beta: float = 4.0,
        ibp_init: bool = True,
        regularizer_weight: float = 0.5,
        regularizer_tolerance: float = 0.5,
    ) -> None:
        check_int("start_epoch", start_epoch, low=0)
        check_positive_int("ramp_epochs", ramp_epochs)
        check_choice("schedule", schedule, _SCHEDULES)
        check_number("mid", mid, 0, 1, low_open=True, high_open=True)
        check_number("beta", beta, low=1)
        check_bool("ibp_init", ibp_init)
        check_number("regularizer_weight", regularizer_weight, low=0)
        check_number("regularizer_tolerance", regularizer_tolerance, 0, 1, low_open=True)
        self.start_epoch = start_epoch
        self.ramp_epochs = ramp_epochs
        self.schedule = schedule
        self.mid = mid
        self.beta = beta
        self.ibp_init = ibp_init
        self.regularizer_weight = regularizer_weight
        self.regularizer_tolerance = regularizer_tolerance
        self.batches = 0  # schedule position: training batches started so far

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require(pl_module, CertifiedModule, "IBPWarmup")
        # On resume the checkpoint (restored after setup) overwrites these weights.
        if stage == "fit" and self.ibp_init and self.batches == 0:
            ibp_init_(pl_module.backbone)

    def progress(self, steps_per_epoch: int) -> float:
        """Ramp progress in [0, 1] (negative before the ramp) at the current position."""
        start = self.start_epoch * steps_per_epoch
        return (self.batches - start) / (self.ramp_epochs * steps_per_epoch)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        steps = max(int(trainer.num_training_batches), 1) if math.isfinite(trainer.num_training_batches) else 1
        p = self.progress(steps)
        target = float(pl_module.eps)
        eps = 0.0 if p < 0 else eps_schedule(p, target, self.schedule, self.mid, self.beta)
        in_ramp = 0.0 < eps < target
        pl_module.current_eps = eps
        pl_module.regularizer_weight = self.regularizer_weight * (1 - eps / target) if in_ramp else 0.0
        pl_module.regularizer_tolerance = self.regularizer_tolerance
        pl_module.log("certified/reg_weight", pl_module.regularizer_weight)
        self.batches += 1

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches = int(state_dict["batches"])
